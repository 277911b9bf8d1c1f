"""The live view of ``fl-server run`` / ``fl-server demo`` on a terminal.

On a terminal, a rich progress bar shows the rounds done out of the rounds planned and what the
coordinator is doing now (waiting for sites, the current round and protocol stage), with one
line per finished round printed above it. Anywhere else (a log file, CI) the same round lines
are printed plainly and the status is not repeated.

Usage::

    with LiveView(console, total_rounds=cfg.run.rounds) as view:
        run_coordinator(cfg, ..., on_round=view.round, on_info=view.info, on_status=view.status)
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from fedseal.server.rundir import absent_text, inputs_text

__all__ = ["LiveView", "describe_status", "round_line"]

_PHASES = {
    "waiting-for-sites": "waiting for enrolled sites",
    "training": "round {round}",
    "finished": "finished",
    "failed": "failed",
}


def round_line(rec: dict[str, Any]) -> str:
    """One finished round as a line (outcome, sites, accuracy, seconds, and every sampled site
    not in the sum with why, as the ServerApp's own line: :func:`fedseal.server.rundir.absent_text`)."""
    acc = rec.get("accuracy")
    acc_s = f"accuracy {acc:.4f}  macro-F1 {rec.get('macro_f1', 0.0):.4f}" if isinstance(acc, float) else ""
    return (
        f"round {rec.get('round')}: {rec.get('outcome')}  sites {rec.get('accepted')}/{rec.get('sampled')}"
        f"{inputs_text(rec)}  "
        f"{acc_s}  ({float(str(rec.get('seconds', 0.0))):.1f}s)" + absent_text(rec)
    )


def describe_status(status: dict[str, Any]) -> str:
    """What the coordinator is doing, from its status file (``phase``, ``round``, ``stage``)."""
    phase = str(status.get("phase", ""))
    text = _PHASES.get(phase, phase or "starting").format(round=status.get("round", "?"))
    stage = status.get("stage")
    if phase == "training" and stage:
        text += f": {stage}"
    return text


class LiveView:
    """Progress of a run: a live bar on a terminal, plain lines elsewhere."""

    def __init__(self, console: Console, total_rounds: int) -> None:
        self.console = console
        self.live = console.is_terminal
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console, transient=False,
        ) if self.live else None
        self._task = self._progress.add_task("starting", total=total_rounds) if self._progress else None
        self._last = ""

    def __enter__(self) -> LiveView:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def info(self, text: str) -> None:
        """A line of information above the bar (printed as it is: never read as markup)."""
        self.console.print(escape(text), soft_wrap=True, highlight=False)

    def round(self, rec: dict[str, Any]) -> None:
        """A finished (or abandoned) round: its line, and the bar advances."""
        self.console.print(escape(round_line(rec)), soft_wrap=True, highlight=False)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=int(str(rec.get("round", 0))))

    def status(self, status: dict[str, Any]) -> None:
        """The coordinator's current status (called about twice a second)."""
        text = describe_status(status)
        if text == self._last:
            return
        self._last = text
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=text)
