"""``fl-server status``: the enrolled sites and where the run is.

Usage::

    from fedseal.server.status import collect_status, render, superlink_nodes
    st = collect_status(cfg, now=time.time(), live=superlink_nodes)
    st.to_json()                       # what --json prints
    header, table = render(st)         # what a terminal shows

Sources, each read as a concurrent writer leaves it (``fl-server run`` and its ServerApp replace
their files atomically; a file that is missing or unreadable is reported, never fatal), so
``status`` answers before any run, during one and after it:

* ``coordinator.roster``: each site enrolled or revoked (and why), its approved dataset roots,
  how many of its roots were withdrawn;
* ``state/nodes.json``: each site's Flower node id (``fl-server run`` registers the sites);
* the SuperLink's Control API (``ListNodes`` on the control socket, this user only), only while
  ``fl-server run`` is up: each node online or not and when it was last seen (its last heartbeat,
  or when it went offline); otherwise "coordinator not running";
* ``state/site-floors.json`` (:func:`fedseal.server.site_floors.read_floors`): the floor each
  online site reported at the last run's start;
* ``state/status.json`` and ``rounds.jsonl``: the run's phase, round and stage, the rounds
  recorded; a run whose status is neither finished nor failed while no coordinator runs was
  interrupted (``fl-server run --resume`` continues it).

The live source is a parameter (:data:`LiveNodes`), so tests give a stand-in and production
gives :func:`superlink_nodes`.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from fedseal.server.config import ServerConfig
from fedseal.server.errors import CoordinatorError
from fedseal.server.roster import Enrolment
from fedseal.server.rundir import NODES_FILE, ROUNDS_FILE, STATUS_FILE
from fedseal.server.runs import Runs
from fedseal.server.site_floors import SiteFloor, read_floors

__all__ = [
    "CoordinatorStatus",
    "LiveNodes",
    "NodeSeen",
    "RunView",
    "SiteStatus",
    "SuperLinkUnavailable",
    "collect_status",
    "render",
    "superlink_nodes",
]

NOT_RUNNING = "coordinator not running"
CONTROL_TIMEOUT_S = 5.0


class SuperLinkUnavailable(CoordinatorError):
    """The SuperLink cannot be asked (not running, or not answering); the message says which."""

    def __init__(self, reason: str, *, running: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.running = running


@dataclass(frozen=True, slots=True)
class NodeSeen:
    """One SuperNode as the SuperLink sees it.

    Attributes:
        node_id: Flower's node id.
        status: Flower's node status: ``online``, ``offline``, ``registered`` (never connected)
            or ``unregistered``.
        last_seen: Unix seconds of its last heartbeat (online) or of going offline; ``None`` if
            it never connected.
    """

    node_id: int
    status: str
    last_seen: float | None


LiveNodes = Callable[[Path], Mapping[int, NodeSeen]]
"""Given the state directory, every node the running SuperLink knows.

Raises :class:`SuperLinkUnavailable` when no coordinator runs or its SuperLink does not answer."""


@dataclass(frozen=True, slots=True)
class SiteStatus:
    """One enrolled site.

    Attributes:
        site: Its name.
        enrolment: ``active`` or ``revoked``.
        revoke_reason: Why it was revoked (``""`` if not, or no reason recorded).
        key_id: Its key id (64 hex).
        dataset_roots: Its approved dataset roots (64 hex each).
        withdrawn_roots: How many of its roots were withdrawn.
        node_id: Its Flower node id (``None``: never registered by a run).
        online: Whether its SuperNode is online now (``None``: unknown, the SuperLink could not
            be asked or no coordinator runs).
        node_status: Flower's node status (``None``: unknown or not registered).
        last_seen: Unix seconds it was last seen (``None``: unknown or never).
        floor: The floor it reported at the last run's start (``None``: did not report).
    """

    site: str
    enrolment: str
    revoke_reason: str
    key_id: str
    dataset_roots: tuple[str, ...]
    withdrawn_roots: int
    node_id: int | None
    online: bool | None
    node_status: str | None
    last_seen: float | None
    floor: SiteFloor | None


@dataclass(frozen=True, slots=True)
class RunView:
    """The run as ``status.json`` and ``rounds.jsonl`` record it.

    Attributes:
        phase: ``waiting-for-sites``, ``training``, ``finished``, ``failed`` (or
            ``interrupted``: not ended, and no coordinator runs).
        round: The round in progress or last reached.
        rounds: The rounds configured (``run.rounds``).
        stage: The secure round's stage in progress (``""`` if none).
        run_id: The run's id (hex, ``""`` before it has one).
        reason: Why it failed or stopped early (``""`` if not).
        updated: Unix seconds of the last status written.
        rounds_recorded: Rounds in ``rounds.jsonl``.
        rounds_committed: Of those, committed.
        model: The final model's path (finished runs).
        audit_log: The audit log's path.
    """

    phase: str
    round: int
    rounds: int
    stage: str
    run_id: str
    reason: str
    updated: float | None
    rounds_recorded: int
    rounds_committed: int
    model: str
    audit_log: str


@dataclass(frozen=True, slots=True)
class CoordinatorStatus:
    """Everything ``fl-server status`` shows.

    Attributes:
        config: The server.toml read.
        running: Whether a coordinator runs (its SuperLink answered, or its control socket is
            there but could not be asked).
        detail: What the SuperLink said or why it was not asked (one line).
        run: The run, or ``None`` if none was started (or its status is gone).
        floors_asked_at: When the sites' floors were last asked (Unix seconds), or ``None``.
        sites: Every site in the roster, in enrolment order.
        problems: What could not be read (one line each).
    """

    config: Path
    running: bool
    detail: str
    run: RunView | None
    floors_asked_at: float | None
    sites: tuple[SiteStatus, ...]
    problems: tuple[str, ...] = ()
    queue: str = ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (times as ISO 8601 UTC strings, ``null`` when unknown)."""
        run = None
        if self.run is not None:
            run = {
                "phase": self.run.phase,
                "round": self.run.round,
                "rounds": self.run.rounds,
                "stage": self.run.stage or None,
                "run_id": self.run.run_id or None,
                "reason": self.run.reason or None,
                "updated": _iso(self.run.updated),
                "rounds_recorded": self.run.rounds_recorded,
                "rounds_committed": self.run.rounds_committed,
                "model": self.run.model or None,
                "audit_log": self.run.audit_log or None,
            }
        return {
            "config": str(self.config),
            "coordinator": {"running": self.running, "detail": self.detail},
            "run": run,
            "runs": self.queue or None,
            "floors_asked_at": _iso(self.floors_asked_at),
            "sites": [
                {
                    "site": s.site,
                    "enrolment": s.enrolment,
                    "revoke_reason": s.revoke_reason or None,
                    "key_id": s.key_id,
                    "dataset_roots": list(s.dataset_roots),
                    "withdrawn_roots": s.withdrawn_roots,
                    "node_id": s.node_id,
                    "online": s.online,
                    "node_status": s.node_status,
                    "last_seen": _iso(s.last_seen),
                    "floor": None
                    if s.floor is None
                    else {
                        "min_cohort": s.floor.min_cohort,
                        "allow_plain": s.floor.allow_plain,
                        "dp_required": s.floor.dp_required,
                    },
                }
                for s in self.sites
            ],
            "problems": list(self.problems),
        }


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


# -- the live source: the SuperLink's Control API ----------------------------------------------
def _parse_time(text: str) -> float | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def superlink_nodes(state_dir: Path) -> Mapping[int, NodeSeen]:
    """Every node the running SuperLink knows (Control API ``ListNodes``, the request
    ``flwr supernode list`` sends), over the coordinator's control socket.

    Raises:
        SuperLinkUnavailable: No coordinator runs (no control socket, or a stale one), the
            socket is another user's, or the SuperLink did not answer.
    """
    from fedseal.server.superlink import ControlSocketError, control_client, control_socket_path

    try:
        path = control_socket_path(state_dir)
    except ControlSocketError as exc:
        raise SuperLinkUnavailable(str(exc)) from None
    if not path.exists():
        raise SuperLinkUnavailable(NOT_RUNNING)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(CONTROL_TIMEOUT_S)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        raise SuperLinkUnavailable(NOT_RUNNING) from None  # a socket a killed SuperLink left
    except PermissionError:
        raise SuperLinkUnavailable(
            f"the control socket {path} is not this user's: run fl-server status as the "
            "coordinator's user",
            running=True,
        ) from None
    except OSError as exc:
        raise SuperLinkUnavailable(f"cannot reach the control socket {path}: {exc}") from None
    finally:
        probe.close()
    try:
        from flwr.common.constant import HEARTBEAT_PATIENCE
        from flwr.proto.control_pb2 import ListNodesRequest

        client = control_client(path, timeout=CONTROL_TIMEOUT_S)
        try:
            res = client.ListNodes(ListNodesRequest())
        finally:
            client.close()
    except Exception as exc:  # httpx transport errors, Flower's API errors, a version gate
        raise SuperLinkUnavailable(
            f"the SuperLink did not answer on {path}: {type(exc).__name__}: {exc}", running=True
        ) from None
    nodes: dict[int, NodeSeen] = {}
    for info in res.nodes_info:
        status = str(info.status)
        seen: float | None = None
        if status == "online" and info.online_until and info.heartbeat_interval:
            # Flower sets online_until = last heartbeat + HEARTBEAT_PATIENCE * interval.
            seen = float(info.online_until) - HEARTBEAT_PATIENCE * float(info.heartbeat_interval)
        elif status == "online":
            seen = _parse_time(info.last_activated_at)
        elif status in ("offline", "unregistered"):
            seen = _parse_time(info.last_deactivated_at) or (
                float(info.online_until) if info.online_until else None
            )
        nodes[int(info.node_id)] = NodeSeen(int(info.node_id), status, seen)
    return nodes


# -- collecting --------------------------------------------------------------------------------
def _read_json(path: Path, problems: list[str]) -> Any:
    """``path``'s JSON (``None`` if missing); a replace racing the read is retried once."""
    for attempt in (1, 2):
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            if attempt == 2:
                problems.append(f"{path}: unreadable ({type(exc).__name__})")
    return None


def _node_map(state_dir: Path, problems: list[str]) -> dict[str, int]:
    doc = _read_json(state_dir / NODES_FILE, problems)
    site_node: dict[str, int] = {}
    if isinstance(doc, dict):
        for node, site in doc.items():
            with contextlib.suppress(ValueError):
                site_node[str(site)] = int(node)
    return site_node


def _run_view(cfg: ServerConfig, running: bool, problems: list[str]) -> RunView | None:
    state = cfg.coordinator.state_dir
    doc = _read_json(state / STATUS_FILE, problems)
    if not isinstance(doc, dict):
        return None
    recorded = committed = 0
    try:
        with (state / ROUNDS_FILE).open() as fh:
            for line in fh:
                if line.strip():
                    recorded += 1
                    with contextlib.suppress(ValueError, AttributeError):
                        committed += json.loads(line).get("outcome") == "committed"
    except FileNotFoundError:
        pass
    except OSError as exc:
        problems.append(f"{state / ROUNDS_FILE}: unreadable ({exc.strerror or exc})")
    phase = str(doc.get("phase") or "starting")
    if not running and phase not in ("finished", "failed"):
        phase = "interrupted"
    updated = doc.get("time")
    rnd = doc.get("round")
    return RunView(
        phase=phase,
        round=rnd if isinstance(rnd, int) else 0,
        rounds=cfg.run.rounds,
        stage=str(doc.get("stage") or "") if phase == "training" else "",
        run_id=str(doc.get("run_id") or ""),
        reason=str(doc.get("reason") or doc.get("stopped") or ""),
        updated=float(updated) if isinstance(updated, int | float) else None,
        rounds_recorded=recorded,
        rounds_committed=committed,
        model=str(doc.get("model") or ""),
        audit_log=str(doc.get("audit_log") or ""),
    )


def collect_status(cfg: ServerConfig, *, live: LiveNodes) -> CoordinatorStatus:
    """Gather :class:`CoordinatorStatus` for ``cfg`` (module docstring: the sources).

    Args:
        cfg: The coordinator's configuration.
        live: The running SuperLink's nodes (:func:`superlink_nodes` in production).

    Raises:
        EnrolmentError: The roster file exists but is not a valid roster.
    """
    state = cfg.coordinator.state_dir
    problems: list[str] = []
    nodes: Mapping[int, NodeSeen] | None
    try:
        nodes = live(state)
        running, detail = True, f"running: {len(nodes)} node(s) registered with its SuperLink"
    except SuperLinkUnavailable as exc:
        nodes, running, detail = None, exc.running, exc.reason
    roster = Enrolment.load_or_create(cfg.coordinator.roster)
    site_node = _node_map(state, problems)
    asked_at, floors = read_floors(state)
    withdrawn = roster.withdrawn()
    sites: list[SiteStatus] = []
    for entry in roster.sites:
        node_id = site_node.get(entry.name)
        seen = nodes.get(node_id) if nodes is not None and node_id is not None else None
        revocation = roster.revocation(entry.name) if entry.status != "active" else None
        online = None if nodes is None else seen is not None and seen.status == "online"
        sites.append(
            SiteStatus(
                site=entry.name,
                enrolment=entry.status,
                revoke_reason=revocation.reason if revocation is not None else "",
                key_id=entry.key_id_hex,
                dataset_roots=entry.dataset_roots,
                withdrawn_roots=sum(1 for w in withdrawn.values() if w.site == entry.name),
                node_id=node_id,
                online=online,
                node_status=seen.status if seen is not None else None,
                last_seen=seen.last_seen if seen is not None else None,
                floor=floors.get(entry.name),
            )
        )
    return CoordinatorStatus(
        config=cfg.path,
        running=running,
        detail=detail,
        run=_run_view(cfg, running, problems),
        floors_asked_at=asked_at,
        sites=tuple(sites),
        problems=tuple(problems),
        queue=_queue_text(state),
    )


def _queue_text(state: Path) -> str:
    """The runs (:mod:`fedseal.server.runs`) in one line: who drives them, the one running,
    how many wait, the last one ended; ``""`` before any run was registered."""
    runs = Runs(state)
    recs = runs.all()
    if not recs:
        return ""
    parts = [f"served by pid {runs.driver()}" if runs.driver() is not None else "no coordinator drives them"]
    parts += [f"run {r.id} running" for r in recs if r.status == "running"]
    queued = [str(r.id) for r in recs if r.status == "queued"]
    if queued:
        parts.append(f"queued: {', '.join(queued)}")
    ended = [r for r in recs if r.ended_]
    if ended:
        parts.append(f"last ended: run {ended[-1].id} {ended[-1].status}")
    return "; ".join(parts) + " (fl-server runs)"


# -- rendering ---------------------------------------------------------------------------------
def _when(t: float | None, now: float) -> str:
    if t is None:
        return ""
    ago = max(0.0, now - t)
    span = (
        f"{ago:.0f} s" if ago < 120 else f"{ago / 60:.0f} min" if ago < 7200
        else f"{ago / 3600:.0f} h" if ago < 172800 else f"{ago / 86400:.0f} days"
    )  # fmt: skip
    return f"{datetime.fromtimestamp(t, UTC):%Y-%m-%d %H:%M:%S} UTC ({span} ago)"


def _floor_text(floor: SiteFloor | None) -> str:
    if floor is None:
        return "not reported"
    return (
        f"cohort >= {floor.min_cohort}\nplain {'allowed' if floor.allow_plain else 'refused'}\n"
        f"DP {'required' if floor.dp_required else 'optional'}"
    )


def _seen_text(st: CoordinatorStatus, s: SiteStatus, now: float) -> str:
    if s.online is None:
        return "unknown: " + (NOT_RUNNING if not st.running else "SuperLink not asked")
    if s.node_id is None:
        return "no: not registered yet"
    if s.online:
        return "online, last seen " + (_when(s.last_seen, now) or "now")
    state = "never connected" if s.node_status in (None, "registered") else s.node_status
    seen = _when(s.last_seen, now)
    return f"no: {state}" + (f", last seen {seen}" if seen else "")


def _run_line(st: CoordinatorStatus, now: float) -> str:
    run = st.run
    if run is None:
        if st.running:
            return "run: starting (no status yet)"
        return "run: no run started yet (no status.json in the state directory)"
    text = f"run: {run.phase}"
    if run.phase in ("training", "interrupted", "finished", "failed") and run.round:
        text += f", round {run.round}/{run.rounds}"
    if run.stage:
        text += f" ({run.stage})"
    text += f"; {run.rounds_committed} of {run.rounds_recorded} recorded round(s) committed"
    if run.reason:
        text += f"; {run.reason}"
    if run.phase == "interrupted":
        text += "; fl-server run --resume (or fl-server submit --resume) continues it"
    if run.updated is not None:
        text += f"; updated {_when(run.updated, now)}"
    return text


def render(st: CoordinatorStatus, *, now: float) -> tuple[list[str], Table]:
    """Header lines (coordinator, run, floors) and the sites' table, for a terminal."""
    header = [
        f"coordinator ({st.config}): {st.detail}",
        _run_line(st, now),
    ]
    if st.queue:
        header.append(f"runs: {st.queue}")
    if st.floors_asked_at is not None:
        header.append(
            f"site floors: reported at the last run's start, {_when(st.floors_asked_at, now)}"
        )
    header += [f"warning: {p}" for p in st.problems]
    table = Table(title=f"{len(st.sites)} enrolled site(s)" if st.sites else "no site enrolled")
    table.add_column("site / node", overflow="fold", min_width=12)
    table.add_column("enrolment", overflow="fold")
    table.add_column("dataset roots", no_wrap=True)
    table.add_column("online / last seen", overflow="fold")
    table.add_column("floor (last run)", overflow="fold")
    for s in st.sites:
        enrolment = s.enrolment + (f": {s.revoke_reason}" if s.revoke_reason else "")
        roots = "\n".join(r[:16] + "…" for r in s.dataset_roots) or "none"
        if s.withdrawn_roots:
            roots += f"\n({s.withdrawn_roots} withdrawn)"
        site = s.site + ("" if s.node_id is None else f"\n[dim]node {s.node_id}[/dim]")
        table.add_row(site, escape(enrolment), roots, _seen_text(st, s, now), _floor_text(s.floor))
    return header, table
