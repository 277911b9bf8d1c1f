"""The coordinator's state directory as one run uses it: its files and the run's state.

Files (``coordinator.state_dir``)::

    nodes.json       Flower node id -> enrolled site (written by the fleet gateway)
    status.json      the run's phase, round and stage (replaced atomically; fl-server polls it)
    rounds.jsonl     one record per ended round (committed, failed or abandoned)
    serverapp.pid    the ServerApp's pid, so a restarted coordinator can end its predecessor
    stop.request     an operator's stop request for the run (its reason), relayed by the
                     driving ``fl-server`` process (:mod:`fedseal.server.runs`); read between
                     rounds and while waiting for sites
    checkpoints/     the committed models (:mod:`fedseal.server.checkpoint`)

:class:`Run` is what every step of a round reads: the grid, the config, the roster, the node
map, the checkpoints and the metrics, and :meth:`Run.status` to say where the run is.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedseal.server.checkpoint import CheckpointError, CheckpointStore
from fedseal.server.config import ServerConfig
from fedseal.server.errors import RunStopped
from fedseal.server.metrics import Metrics
from fedseal.server.roster import Enrolment

if TYPE_CHECKING:
    from flwr.serverapp import Grid

__all__ = [
    "MAX_REASON_CHARS",
    "NODES_FILE",
    "ROUNDS_FILE",
    "SERVERAPP_PID_FILE",
    "STATUS_FILE",
    "STOP_REQUEST_FILE",
    "WANT_ALL_GRACE_S",
    "Run",
    "absent_text",
    "append_round",
    "inputs_text",
    "read_rounds",
    "summary",
    "write_status",
]

log = logging.getLogger("fedseal.server")

NODES_FILE = "nodes.json"
STATUS_FILE = "status.json"
ROUNDS_FILE = "rounds.jsonl"
#: How long a run start waits for the rest of the enrolled sites once ``run.min_sites`` are
#: online (a site that is off for good does not hold the run for ``sites_wait_timeout_s``).
WANT_ALL_GRACE_S = 15.0
#: An operator's stop request for the run in progress (its reason, one line).
STOP_REQUEST_FILE = "stop.request"
#: The ServerApp process's pid, so a restarted coordinator can end one its predecessor left.
SERVERAPP_PID_FILE = "serverapp.pid"
#: ``status.json``'s ``reason`` is one line for a terminal; the traceback is in serverapp.log.
MAX_REASON_CHARS = 300


def read_rounds(path: Path) -> list[dict[str, Any]]:
    """The round records of ``rounds.jsonl`` (empty if there is none yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_round(path: Path, rec: dict[str, Any]) -> None:
    """Append one round record to ``rounds.jsonl``."""
    with path.open("a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")


MAX_ABSENT_NAMED = 8
"""Sites named with their reason in a round's console line; the rest are in ``rounds.jsonl``."""


def summary(round_: int, total: int, rec: dict[str, Any]) -> str:
    """A round record as the operator's one console line: outcome, sites, accuracy, time, and
    every sampled site that is not in the sum with why (``absent``; at most
    :data:`MAX_ABSENT_NAMED`, the rest counted)."""
    acc = rec.get("accuracy")
    parts = [
        f"round {round_}/{total}: {rec['outcome']}",
        f"sites {rec['accepted']}/{rec['sampled']}" + inputs_text(rec),
    ]
    if rec.get("rejected"):
        parts.append(f"rejected {rec['rejected']}")
    if acc is not None:
        parts.append(f"accuracy {acc:.4f} macro-F1 {rec['macro_f1']:.4f} loss {rec['loss']:.4f}")
    parts.append(f"{rec['seconds']:.1f}s")
    return ", ".join(parts) + absent_text(rec)


def inputs_text(rec: dict[str, Any]) -> str:
    """`` (2 inputs received, not summed)`` for an abandoned round that accepted masked
    inputs (its ``sites`` count is 0: nothing entered the model), else ``""``."""
    received = rec.get("survivors")
    if rec.get("accepted") or not isinstance(received, list) or not received:
        return ""
    return f" ({len(received)} input{'s' if len(received) > 1 else ''} received, not summed)"


def absent_text(rec: dict[str, Any]) -> str:
    """``"; not in the sum: site (why); ..."`` for a round record's ``absent`` sites (at most
    :data:`MAX_ABSENT_NAMED` named, the rest counted), or ``""``."""
    absent = rec.get("absent") or {}
    if not isinstance(absent, dict) or not absent:
        return ""
    named = [f"{site} ({why})" for site, why in list(absent.items())[:MAX_ABSENT_NAMED]]
    more = len(absent) - len(named)
    return "; not in the sum: " + "; ".join(named) + (f"; and {more} more (rounds.jsonl)" if more else "")


def write_status(state_dir: Path, *, secure: bool, **fields: Any) -> None:
    """Replace ``status.json`` atomically (the coordinator's CLI polls it)."""
    tmp = state_dir / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps({"secure": secure, "time": time.time(), **fields}))
    os.replace(tmp, state_dir / STATUS_FILE)


class Run:
    """One run's state: grid, config, roster, node map, checkpoints, metrics, status."""

    def __init__(self, grid: Grid, cfg: ServerConfig) -> None:
        self.grid = grid
        self.cfg = cfg
        self.state_dir = cfg.coordinator.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.roster = Enrolment.load_or_create(cfg.coordinator.roster)
        self.checkpoints = CheckpointStore(self.state_dir / "checkpoints")
        (self.state_dir / SERVERAPP_PID_FILE).write_text(f"{os.getpid()}\n")
        self.failure_recorded = False
        self.metrics = Metrics.start(cfg.network.metrics_port, cfg.network.metrics_host)
        self.node_sites = self._load_node_map()

    @property
    def rounds_log(self) -> Path:
        return self.state_dir / ROUNDS_FILE

    def _load_node_map(self) -> dict[int, str]:
        path = self.state_dir / NODES_FILE
        doc = json.loads(path.read_text()) if path.exists() else {}
        return {int(k): str(v) for k, v in doc.items()}

    def archive_checkpoints(self) -> None:
        """Move an earlier run's checkpoints aside (``checkpoints-<run id>``) before a new run,
        so ``--resume`` can never pick up another run's model."""
        directory = self.checkpoints.directory
        if not directory.is_dir() or not any(directory.iterdir()):
            return
        try:
            latest = self.checkpoints.latest()
        except CheckpointError:
            latest = None
        tag = latest[0].run_id[:16] if latest is not None else f"unknown-{int(time.time())}"
        target = directory.with_name(f"{directory.name}-{tag}")
        if target.exists():
            target = directory.with_name(f"{directory.name}-{tag}-{int(time.time())}")
        directory.rename(target)
        log.info("earlier checkpoints moved to %s", target)

    def read_status(self) -> dict[str, Any]:
        """The last status written (by this or an earlier, killed coordinator), or {}."""
        try:
            doc = json.loads((self.state_dir / STATUS_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def status(self, **fields: Any) -> None:
        """Replace ``status.json`` with ``fields`` (a ``phase = "failed"`` is remembered: the
        run's end does not overwrite its reason)."""
        write_status(self.state_dir, secure=self.cfg.run.secure, **fields)
        if fields.get("phase") == "failed":
            self.failure_recorded = True

    def fail(self, reason: str) -> None:
        """Record the run as failed with ``reason`` (one line, cut to :data:`MAX_REASON_CHARS`)."""
        self.status(phase="failed", reason=reason[:MAX_REASON_CHARS])

    def stop_requested(self) -> str | None:
        """The operator's reason when the run was asked to stop (``fl-server stop``), or None."""
        try:
            text = (self.state_dir / STOP_REQUEST_FILE).read_text()
        except OSError:
            return None
        return " ".join(text.split()) or "no reason given"

    def site_of(self, node: int) -> str:
        """The enrolled site name of a node (``node <id>`` for a node that maps to none)."""
        return self.node_sites.get(int(node)) or f"node {int(node)}"

    def enrolled_online(self) -> list[int]:
        active = {s.name for s in self.roster.active()}
        return sorted(
            n for n in self.grid.get_node_ids() if self.node_sites.get(int(n)) in active
        )

    def wait_for_sites(self, minimum: int, timeout: float, *, want_all: bool = False) -> list[int]:
        """Wait until ``minimum`` enrolled sites are online (``want_all``: every active one,
        settling for ``minimum`` once they have been online :data:`WANT_ALL_GRACE_S`, or at the
        deadline).

        Raises:
            RunStopped: An operator asked the run to stop meanwhile.
        """
        deadline = time.monotonic() + timeout
        goal = max(minimum, len(self.roster.active())) if want_all else minimum
        enough_since: float | None = None
        while True:
            nodes = self.enrolled_online()
            now = time.monotonic()
            if len(nodes) >= goal or now >= deadline:
                return nodes
            if len(nodes) >= minimum:  # the others get a grace, not the whole timeout
                enough_since = enough_since if enough_since is not None else now
                if now - enough_since >= WANT_ALL_GRACE_S:
                    return nodes
            else:
                enough_since = None
            stop = self.stop_requested()
            if stop is not None:
                raise RunStopped(stop)
            time.sleep(0.5)
