"""The examples are separate packages (``pip install -e examples/tabular``); where they are not
installed, the tests import them from their folders, as the README's "by path" option does."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

for package, folder in (("fedseal_example_tabular", "tabular"), ("fedseal_example_image", "image")):
    if importlib.util.find_spec(package) is None:
        sys.path.insert(0, str(EXAMPLES / folder))
