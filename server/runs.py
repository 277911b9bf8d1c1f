"""The coordinator's runs: a registry of every run submitted to it, queued, running or ended.

One run at a time trains (the sites, the audit log and the checkpoints are the coordinator's
one set); the others wait in submission order. ``fl-server serve`` drives the queue,
``fl-server run`` registers and drives its one run, ``fl-server submit`` queues a run,
``fl-server runs`` lists them, ``fl-server logs RUN`` shows (``--follow``: follows) one, and
``fl-server stop RUN`` asks one to stop (:mod:`fedseal.server.runs_cli`).

Files (``coordinator.state_dir/runs``)::

    driver.json      the process driving runs (fl-server serve, or fl-server run): its pid and
                     the configuration it serves
    <id>/run.json    the run's record (:class:`RunRecord`; replaced atomically by its writer)
    <id>/stop        an operator's stop request (its reason), written by ``fl-server stop``
    <id>/rounds.jsonl, <id>/status.json   the run's round records and last status, kept when
                     it ends (while it runs they are the state directory's own, as
                     :mod:`fedseal.server.rundir` describes)

Ids are 1, 2, 3... in submission order; a new id is claimed by creating its directory
(``mkdir`` is atomic), so two ``submit`` commands never get the same one. Who writes what: the
submitting command writes a queued record once; from then on only the driver writes the record
(start, end), and ``fl-server stop`` writes only the ``stop`` file, which the driver relays to
the ServerApp (:data:`STOP_REQUEST_FILE` in the state directory, read between rounds): a run
stops after the round in progress, its committed rounds kept and its audit log closed with the
operator's reason. A queued run asked to stop never starts (``cancelled``).

A record says ``running`` while its driver lives; one whose driver is gone (killed, machine
restarted) reads as ``interrupted`` (``fl-server submit --resume`` continues it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedseal.crypto.keys import write_atomic
from fedseal.server.errors import CoordinatorError
from fedseal.server.rundir import ROUNDS_FILE, STATUS_FILE, STOP_REQUEST_FILE, read_rounds

__all__ = [
    "ACTIVE",
    "ENDED",
    "STOP_REQUEST_FILE",
    "RunRecord",
    "Runs",
    "RunsError",
]

RUNS_DIR = "runs"
RUN_FILE = "run.json"
STOP_FILE = "stop"
DRIVER_FILE = "driver.json"
DRIVER_LOCK = "driver.lock"
#: Longest operator reason kept (one line).
MAX_STOP_REASON = 200

#: Statuses of a run that has not ended.
ACTIVE = ("queued", "running")
#: Statuses of an ended run.
ENDED = ("completed", "failed", "stopped", "cancelled", "interrupted")


def one_line(text: str) -> str:
    """``text`` as one printable line (control characters and line breaks become spaces)."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


class RunsError(CoordinatorError):
    """A run registry request that cannot be done (no such run, a run already ended...)."""


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One run as the registry records it. Times are seconds since the epoch.

    ``status``: ``queued``, ``running``, ``completed``, ``failed``, ``stopped`` (by an
    operator, its committed rounds kept), ``cancelled`` (stopped before it started) or
    ``interrupted`` (its driver died). ``run_id``: the run's id in the audit log and
    checkpoints, once it started; ``rounds_planned``: ``run.rounds`` of its config.
    """

    id: int
    config: str
    submitted: float
    rounds_planned: int
    resume: bool = False
    status: str = "queued"
    started: float | None = None
    ended: float | None = None
    reason: str = ""
    run_id: str = ""
    flower_run_id: int | None = None
    driver_pid: int | None = None
    model: str | None = None
    audit_log: str | None = None
    stop_reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ended_(self) -> bool:
        return self.status in ENDED

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RunRecord:
        known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _alive(pid: int | None) -> bool:
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (ended, not reaped) is not a driver
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Runs:
    """The run registry of one coordinator state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.root = state_dir / RUNS_DIR

    # -- reading ---------------------------------------------------------------------------

    def _dir(self, run: int) -> Path:
        return self.root / str(run)

    def _read(self, run: int) -> RunRecord | None:
        try:
            doc = json.loads((self._dir(run) / RUN_FILE).read_text())
        except (OSError, ValueError):
            return None  # being created (no record yet), or not a run
        return RunRecord.from_json(doc) if isinstance(doc, dict) else None

    def get(self, run: int) -> RunRecord:
        """Run ``run`` as it stands (``running`` with a dead driver reads ``interrupted``).

        Raises:
            RunsError: No such run.
        """
        rec = self._read(run)
        if rec is None:
            known = ", ".join(str(r.id) for r in self.all()) or "none yet"
            raise RunsError(f"no run {run} in {self.root} (runs: {known})")
        return self._as_seen(rec)

    def _as_seen(self, rec: RunRecord) -> RunRecord:
        if rec.status == "running" and not _alive(rec.driver_pid):
            return replace(rec, status="interrupted", reason=rec.reason or "its driver ended mid-run")
        return rec

    def ids(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.name) for p in self.root.iterdir() if p.name.isdigit() and p.is_dir())

    def all(self) -> list[RunRecord]:
        """Every run, oldest first."""
        out = []
        for i in self.ids():
            rec = self._read(i)
            if rec is not None:
                out.append(self._as_seen(rec))
        return out

    def stop_requested(self, run: int) -> str | None:
        """The operator's stop reason for ``run``, or None when none was asked."""
        try:
            return (self._dir(run) / STOP_FILE).read_text().strip() or "no reason given"
        except OSError:
            return None

    def rounds(self, rec: RunRecord) -> list[dict[str, Any]]:
        """The run's round records: the state directory's own while it runs, its kept copy
        once it ended."""
        if rec.status == "running":
            return read_rounds(self.state_dir / ROUNDS_FILE)
        return read_rounds(self._dir(rec.id) / ROUNDS_FILE)

    def status_doc(self, rec: RunRecord) -> dict[str, Any]:
        """The run's last ``status.json`` (phase, round, stage; reason when it failed)."""
        path = self.state_dir / STATUS_FILE if rec.status == "running" else self._dir(rec.id) / STATUS_FILE
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_text())
            if isinstance(doc, dict):
                return doc
        return {}

    def _driver_doc(self) -> dict[str, Any]:
        try:
            doc = json.loads((self.root / DRIVER_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def driver(self) -> int | None:
        """The pid of the live process driving runs on this state directory, or None."""
        pid = self._driver_doc().get("pid")
        return pid if isinstance(pid, int) and _alive(pid) else None

    def driver_config(self) -> Path | None:
        """The configuration the live driver serves (None when no driver is up)."""
        config = self._driver_doc().get("config")
        return Path(config) if isinstance(config, str) and self.driver() is not None else None

    # -- writing ---------------------------------------------------------------------------

    def _write(self, rec: RunRecord) -> None:
        write_atomic(self._dir(rec.id) / RUN_FILE, json.dumps(rec.to_json(), indent=1).encode())

    def submit(self, config: Path, *, rounds_planned: int, resume: bool = False) -> RunRecord:
        """Queue a run of ``config``; returns its record (its id claimed atomically).

        Raises:
            RunsError: The path holds a double quote or a control character (it travels inside
                Flower's run-config string).
        """
        path = str(config.resolve())
        if '"' in path or not path.isprintable():
            raise RunsError(f"{path!r}: a run's configuration path cannot hold a double quote or a control character")
        self.root.mkdir(parents=True, exist_ok=True)
        run = (self.ids() or [0])[-1] + 1
        while True:
            try:
                self._dir(run).mkdir()
                break
            except FileExistsError:
                run += 1
        rec = RunRecord(
            id=run, config=path, submitted=time.time(),
            rounds_planned=rounds_planned, resume=resume,
        )  # fmt: skip
        self._write(rec)
        return rec

    def request_stop(self, run: int, reason: str) -> RunRecord:
        """Ask run ``run`` to stop (``reason``: one line, kept). A queued run with no live
        driver is cancelled here; otherwise the driver acts on it.

        Raises:
            RunsError: No such run, or it has ended.
        """
        rec = self.get(run)
        if rec.ended_:
            raise RunsError(f"run {run} has already ended ({rec.status})")
        text = one_line(reason)[:MAX_STOP_REASON] or "no reason given"
        write_atomic(self._dir(run) / STOP_FILE, text.encode())
        if rec.status == "queued" and self.driver() is None:
            rec = replace(rec, status="cancelled", ended=time.time(), stop_reason=text, reason=text)
            self._write(rec)
        return rec

    @contextlib.contextmanager
    def driving(self, config: Path) -> Iterator[None]:
        """This process drives runs of ``config`` while inside (``driver.json``); runs left
        ``running`` before (a killed predecessor) are marked interrupted, their files kept.

        Raises:
            RunsError: Another live process drives runs on this state directory.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        # One driver per state directory: an exclusive lock held while driving (two coordinators
        # started at once both found no driver.json before).
        lock = os.open(self.root / DRIVER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            other = self.driver()
            raise RunsError(
                f"another coordinator{f' (pid {other})' if other else ''} is driving runs on {self.state_dir}"
            ) from None
        other = self.driver()
        if other is not None and other != os.getpid():
            os.close(lock)
            raise RunsError(f"another coordinator (pid {other}) is driving runs on {self.state_dir}")
        for run in self.ids():
            raw = self._read(run)
            if raw is not None and raw.status == "running" and not _alive(raw.driver_pid):
                self._keep_files(run)
                self._write(replace(self._as_seen(raw), ended=time.time()))
        doc = {"pid": os.getpid(), "config": str(config.resolve())}
        write_atomic(self.root / DRIVER_FILE, json.dumps(doc).encode())
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                if self.driver() == os.getpid():
                    (self.root / DRIVER_FILE).unlink()
            os.close(lock)  # releases the lock

    def next_queued(self) -> RunRecord | None:
        """The oldest queued run; queued runs asked to stop are cancelled on the way."""
        for rec in self.all():
            if rec.status != "queued":
                continue
            reason = self.stop_requested(rec.id)
            if reason is not None:
                self._write(replace(rec, status="cancelled", ended=time.time(), stop_reason=reason, reason=reason))
                continue
            return rec
        return None

    def start(self, rec: RunRecord) -> RunRecord:
        """Mark ``rec`` running under this process; the state directory's stop request is
        cleared (a stop asked of an earlier run does not stop this one)."""
        (self.state_dir / STOP_REQUEST_FILE).unlink(missing_ok=True)
        rec = replace(rec, status="running", started=time.time(), driver_pid=os.getpid())
        self._write(rec)
        return rec

    def update(self, rec: RunRecord, **fields: Any) -> RunRecord:
        """Change ``fields`` of the stored record of ``rec`` (what else was stored stays)."""
        rec = replace(self._read(rec.id) or rec, **fields)
        self._write(rec)
        return rec

    def relay_stop(self, rec: RunRecord) -> str | None:
        """Pass an operator's stop request for the running ``rec`` on to the ServerApp
        (:data:`STOP_REQUEST_FILE`); returns the reason once asked."""
        reason = self.stop_requested(rec.id)
        if reason is not None:
            path = self.state_dir / STOP_REQUEST_FILE
            if not path.exists():
                write_atomic(path, reason.encode())
        return reason

    def finish(self, rec: RunRecord, status: str, *, started: bool = True, **fields: Any) -> RunRecord:
        """The run ended: its files kept in its directory (``started``: it had a ServerApp;
        else the state directory's files are another run's), its record ended."""
        (self.state_dir / STOP_REQUEST_FILE).unlink(missing_ok=True)
        if started:
            self._keep_files(rec.id)
        stop = self.stop_requested(rec.id)
        if stop is not None and status in ("completed", "failed"):
            status = "stopped"
            fields.setdefault("stop_reason", stop)
        return self.update(rec, status=status, ended=time.time(), **fields)

    def _keep_files(self, run: int) -> None:
        for name in (ROUNDS_FILE, STATUS_FILE):
            src = self.state_dir / name
            if src.exists():
                shutil.copyfile(src, self._dir(run) / name)
