"""``fl-server serve``, ``submit``, ``runs``, ``logs`` and ``stop``: a coordinator that stays up
and serves several runs, and the operator's view of them (:mod:`fedseal.server.runs`).

Registered on ``fl-server`` by :mod:`fedseal.server.cli` (``runs_cli.register(app,
usage_error)``). Every command finds the coordinator's state directory through ``--config``
(``server.toml``), so they work on the coordinator host as the coordinator's user, whether a
coordinator is up or not (``runs`` and ``logs`` read the kept records).

Exit codes: 0 success; 1 ``serve`` could not start or its SuperLink died, ``logs --follow`` of
a run that did not complete; 2 bad usage or configuration, no such run, a run already ended
(one line naming it).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from fedseal.server.runs import RunRecord, Runs

__all__ = ["end_line", "register", "rounds_text"]

console = Console(stderr=True)

EXIT_FAILED = 1

#: How often ``logs --follow`` looks for new rounds.
FOLLOW_POLL_S = 0.5


def _when(t: float | None) -> str:
    return "" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _committed(rounds: list[dict[str, Any]]) -> int:
    return sum(1 for r in rounds if r.get("outcome") == "committed")


def end_line(rec: RunRecord) -> str:
    """How an ended run ended, as one line."""
    if rec.status == "completed":
        return f"run {rec.id} completed; final model {rec.model}; audit log {rec.audit_log}"
    if rec.status in ("stopped", "cancelled"):
        kept = f"; final model {rec.model}" if rec.model else ""
        return f"run {rec.id} {rec.status} ({rec.stop_reason or rec.reason}){kept}"
    return f"run {rec.id} {rec.status}: {rec.reason or 'no reason recorded'}"


def rounds_text(rec: RunRecord, rounds: list[dict[str, Any]]) -> str:
    """``committed/planned`` rounds of a run."""
    return f"{_committed(rounds)}/{rec.rounds_planned}"


def register(app: typer.Typer, fail: Callable[..., typer.Exit]) -> None:
    """Add ``serve``, ``submit``, ``runs``, ``logs`` and ``stop`` to ``app``; ``fail(message)``
    is the exit to raise for a one-line usage error (``fl-server``'s; ``fail(message, 1)``: a
    failure)."""

    from fedseal.server.admin_cli import config_loader

    load = config_loader(fail)

    def registry(config: Path) -> Runs:
        from fedseal.server.runs import Runs

        return Runs(load(config).coordinator.state_dir)

    def record(runs: Runs, run: int) -> RunRecord:
        from fedseal.server.runs import RunsError

        try:
            return runs.get(run)
        except RunsError as exc:
            raise fail(str(exc)) from exc

    @app.command("serve")
    def serve_cmd(
        config: Annotated[Path, typer.Option(help="server.toml")] = Path("server.toml"),
    ) -> None:
        """Start the coordinator and keep it up, serving the runs queued with ``fl-server
        submit`` one at a time (the metrics endpoint stays up between runs). SIGTERM or Ctrl-C
        stops the run in progress after its round, then the coordinator; a second one ends it
        at once."""
        from fedseal.server.deploy import serve_coordinator
        from fedseal.server.errors import DeployError
        from fedseal.server.live import round_line

        cfg = load(config)
        closing: list[str] = []

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if closing:
                raise KeyboardInterrupt
            closing.append(f"the coordinator is shutting down ({signal.Signals(signum).name})")
            console.print(f"{closing[0]}: stopping after the round in progress (again: at once)")

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            serve_coordinator(
                cfg,
                on_round=lambda rec: console.print(escape(f"  {round_line(rec)}"), soft_wrap=True, highlight=False),
                on_info=lambda text: console.print(escape(text), soft_wrap=True, highlight=False),
                shutting_down=lambda: closing[0] if closing else None,
            )
        except DeployError as exc:
            raise fail(str(exc), EXIT_FAILED) from exc
        console.print("coordinator stopped")

    @app.command("submit")
    def submit_cmd(
        config: Annotated[
            Path,
            typer.Option(
                help="The run's configuration: a server.toml whose \\[run], \\[dp] and \\[consortium] "
                "are this run's (the rest must be the serving coordinator's)."
            ),
        ] = Path("server.toml"),
        resume: Annotated[
            bool, typer.Option(help="Continue the interrupted run from its last committed round.")
        ] = False,
    ) -> None:
        """Queue a run on the coordinator that ``fl-server serve`` keeps up."""
        from fedseal.server.deploy import check_run, serving_mismatch
        from fedseal.server.errors import DeployError
        from fedseal.server.runs import Runs
        from fedseal.server.strategies import StrategyError

        cfg = load(config)
        try:
            check_run(cfg)
        except (DeployError, StrategyError) as exc:
            raise fail(f"{config}: {exc}") from exc
        runs = Runs(cfg.coordinator.state_dir)
        serving = runs.driver_config()
        if serving is not None:
            problem = serving_mismatch(load(serving), cfg)
            if problem is not None:
                raise fail(problem)
        rec = runs.submit(config, rounds_planned=cfg.run.rounds, resume=resume)
        ahead = [r.id for r in runs.all() if r.status in ("queued", "running") and r.id != rec.id]
        waiting = f" after run(s) {', '.join(map(str, ahead))}" if ahead else ""
        typer.echo(f"run {rec.id} queued{waiting}; follow it: fl-server logs {rec.id} --follow")
        if serving is None:
            console.print(
                f"[yellow]note:[/yellow] no coordinator is serving {escape(str(runs.state_dir))}: "
                f"start one with fl-server serve --config {escape(str(config))}",
                soft_wrap=True,
            )

    @app.command("runs")
    def runs_cmd(
        config: Annotated[Path, typer.Option(help="server.toml")] = Path("server.toml"),
        as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    ) -> None:
        """List the coordinator's runs: queued, running and ended, with how each ended."""
        runs = registry(config)
        recs = runs.all()
        if as_json:
            docs = [rec.to_json() | {"rounds_committed": _committed(runs.rounds(rec))} for rec in recs]
            typer.echo(json.dumps({"runs": docs, "serving": runs.driver() is not None}, indent=1))
            return
        table = Table(title=f"runs ({'served' if runs.driver() is not None else 'no coordinator up'})")
        for col in ("run", "status", "rounds", "started", "took", "config"):
            table.add_column(col, no_wrap=True)
        table.add_column("why", overflow="fold")
        for rec in recs:
            why = rec.stop_reason or rec.reason if rec.status != "completed" else ""
            took = "" if rec.started is None else f"{(rec.ended or time.time()) - rec.started:.0f}s"
            table.add_row(
                str(rec.id), rec.status, rounds_text(rec, runs.rounds(rec)), _when(rec.started or None),
                took, escape(Path(rec.config).name), escape(why),
            )  # fmt: skip
        out = Console()
        (out if out.is_terminal else Console(width=160)).print(table)

    @app.command("logs")
    def logs_cmd(
        run: Annotated[int, typer.Argument(help="The run's number (fl-server runs).")],
        config: Annotated[Path, typer.Option(help="server.toml")] = Path("server.toml"),
        follow: Annotated[
            bool, typer.Option("--follow", "-f", help="Keep printing rounds until the run ends.")
        ] = False,
    ) -> None:
        """Show a run: one line per round (with every site not in the sum and why), and how it
        ended. ``--follow`` waits for a queued or running run's rounds as they end; its exit
        status is then 0 only if the run completed."""
        from fedseal.server.live import describe_status, round_line
        from fedseal.server.runs import ACTIVE

        runs = registry(config)
        rec = record(runs, run)
        typer.echo(
            f"run {rec.id}: {rec.status}; {rec.config}; submitted {_when(rec.submitted)}"
            + (f"; started {_when(rec.started)}" if rec.started else "")
        )
        printed = 0
        phase = ""
        while True:
            rounds = runs.rounds(rec) if rec.status != "queued" else []
            for r in rounds[printed:]:
                typer.echo(round_line(r))
            printed = max(printed, len(rounds))
            if rec.status not in ACTIVE or not follow:
                break
            if rec.status == "running":
                now = describe_status(runs.status_doc(rec))
                if now != phase and not now.startswith("round"):
                    typer.echo(f"  ({now})")
                phase = now
            time.sleep(FOLLOW_POLL_S)
            rec = record(runs, run)
        if rec.status in ACTIVE:
            typer.echo(f"run {rec.id} is {rec.status} (--follow to wait for its end)")
            return
        typer.echo(end_line(rec))
        if follow and rec.status != "completed":
            raise typer.Exit(EXIT_FAILED)

    @app.command("stop")
    def stop_cmd(
        run: Annotated[int, typer.Argument(help="The run's number (fl-server runs).")],
        reason: Annotated[
            str, typer.Option(help="Why (one line; recorded with the run and in its audit log's run end).")
        ] = "",
        config: Annotated[Path, typer.Option(help="server.toml")] = Path("server.toml"),
    ) -> None:
        """Stop a run: a queued one never starts; a running one stops after its round in
        progress, its committed rounds kept (its final model is the last committed one)."""
        from fedseal.server.runs import RunsError

        runs = registry(config)
        try:
            rec = runs.request_stop(run, reason)
        except RunsError as exc:
            raise fail(str(exc)) from exc
        if rec.status == "cancelled":
            typer.echo(f"run {rec.id} cancelled (it was queued)")
        elif rec.status == "queued":
            typer.echo(f"run {rec.id} will not start (the coordinator cancels it)")
        else:
            typer.echo(
                f"run {rec.id}: stop asked; it stops after its round in progress "
                f"(fl-server logs {rec.id} --follow)"
            )
