"""Run the benchmarks: ``python -m bench`` (all) or ``python -m bench crypto protocol``.

Each ``bench/bench_<name>.py`` exposes ``main(argv: list[str]) -> None`` and prints a
Markdown table comparing fedseal against a baseline measured in the same run.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def main() -> None:
    here = Path(__file__).resolve().parent
    available = sorted(p.stem.removeprefix("bench_") for p in here.glob("bench_*.py"))
    args = sys.argv[1:]
    # Leading bare words name benchmarks; everything from the first option on goes to each of them.
    split = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    names, extra = args[:split] or available, args[split:]
    unknown = sorted(set(names) - set(available))
    if unknown:
        sys.exit(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available)}")
    for name in names:
        print(f"\n## {name}\n", flush=True)
        importlib.import_module(f"bench.bench_{name}").main(extra)


if __name__ == "__main__":
    main()
