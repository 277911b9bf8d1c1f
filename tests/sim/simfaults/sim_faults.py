"""Virtual-site ClientApps with injected faults, for ``run_fedseal_simulation(site_factory=...)``.

Imported by name inside the simulation engine's processes: the test puts this directory on
``PYTHONPATH`` before the engine starts.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

FAILING_SITE = "site-1"


class _FailsFirstEvaluation(ClientApp):
    """The real site, except that its first evaluation fails (an error reply): the setup of
    the next round that rode on that evaluation never reaches it."""

    def __init__(self, inner: ClientApp) -> None:
        super().__init__()
        self.inner = inner
        self.failed = False

    def __call__(self, message: Message, context: Context) -> Message:
        if message.metadata.message_type == "evaluate" and not self.failed:
            self.failed = True
            raise RuntimeError(f"{FAILING_SITE} is unreachable during its first evaluation")
        return self.inner(message, context)


def site_down_for_first_evaluation(site_dir: Path) -> ClientApp:
    from fedseal.sim.sites import real_site_app

    real = real_site_app(Path(site_dir), ())
    return _FailsFirstEvaluation(real) if Path(site_dir).name == FAILING_SITE else real
