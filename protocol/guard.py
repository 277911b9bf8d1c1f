"""A site's memory of the round setups it answered: bounds graph re-draws per round.

Usage (one guard per site, kept by the adapter for the life of the site process and handed
to every :class:`~fedseal.protocol.client.ClientSession`)::

    guard = SetupGuard(SitePolicy(max_setup_attempts=3, min_cohort=3))
    session = ClientSession(site, key, coordinator_key, update_fn=train, rng=rng,
                            trusted_peers=anchor, guard=guard)
    ...
    blob = guard.to_bytes()                       # persist where processes are short-lived
    guard = SetupGuard.from_bytes(blob, policy)   # and restore before the next session

Every setup attempt of a round is a fresh neighbour-graph draw (new ephemeral keys, new
seed) that a coordinator could choose among. The guard caps this on the site side:

* it answers only attempt numbers ``0..max_setup_attempts-1`` (:class:`SetupAttemptError`
  beyond), each strictly higher than the last attempt it answered for that round of that
  run (:class:`StaleMessageError` otherwise: no replay or rollback of attempts);
* once it has shared keys in one attempt of a round it answers no further setup for that
  round, nor any setup for an earlier round of the run (:class:`StaleMessageError`): a site
  never masks two inputs for one round.

The guard also keeps the site's graph nonces (:mod:`fedseal.protocol.graph`): each key advert
commits to a fresh nonce for the site's next round of the run (:meth:`SetupGuard.new_commitment`);
a later setup listing that commitment for the site gets the nonce back
(:meth:`SetupGuard.nonce_for`) for that one round only, and for each attempt at most once, in
increasing order: a value already revealed is never revealed again for a new draw (the
coordinator would know it in advance and could grind the others). The last :data:`MAX_NONCES`
per run are kept (a forgotten nonce only makes the site refuse).

A session without a guard makes a private one, which bounds attempts within that session;
the bound spans sessions (an adapter that builds a fresh session per received setup) only
if the adapter keeps one guard. The guard never forgets a run it answered (forgetting one would
let a coordinator replay or roll back its rounds): it holds at most :data:`MAX_RUNS` runs and
then answers no setup of a new run (:class:`GuardFullError`) until an operator archives it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .config import SitePolicy
from .encoding import Reader, Writer
from .errors import (
    DecodeError,
    GuardFullError,
    NonceError,
    SetupAttemptError,
    StaleMessageError,
)
from .graph import NONCE_BYTES, nonce_commitment
from .types import RUN_ID_BYTES

__all__ = ["MAX_NONCES", "MAX_RUNS", "SetupGuard"]

MAX_RUNS = 4096
"""Runs a guard remembers (about 100 KiB); beyond, it answers no new run."""

MAX_NONCES = 8
"""Graph nonces a guard keeps per run (the newest)."""

_MAGIC = b"fedseal/v2/setup-guard\x00"
_MAGIC_V1 = b"fedseal/v1/setup-guard\x00"


@dataclass(frozen=True, slots=True)
class _Entry:
    round: int
    attempt: int
    shared: bool


class SetupGuard:
    """Per-site record of answered setups (see the module docstring).

    Args:
        policy: The site's policy (``max_setup_attempts``); default :class:`SitePolicy()`.
    """

    __slots__ = ("_nonces", "_runs", "policy")

    def __init__(self, policy: SitePolicy | None = None) -> None:
        self.policy = policy if policy is not None else SitePolicy()
        self._runs: OrderedDict[bytes, _Entry] = OrderedDict()
        #: run id -> commitment -> (nonce, round it was opened in (0: not yet), the highest
        #: attempt it was opened for).
        self._nonces: OrderedDict[bytes, OrderedDict[bytes, tuple[bytes, int, int]]] = (
            OrderedDict()
        )

    def new_commitment(self, run_id: bytes, site: str, randbytes: Callable[[int], bytes]) -> bytes:
        """Draw a fresh graph nonce for the site's next round of ``run_id``; return its
        commitment (:func:`fedseal.protocol.graph.nonce_commitment`)."""
        nonce = randbytes(NONCE_BYTES)
        if len(nonce) != NONCE_BYTES:
            raise ValueError("randbytes returned the wrong number of bytes")
        commitment = nonce_commitment(run_id, site, nonce)
        table = self._nonces.setdefault(bytes(run_id), OrderedDict())
        self._nonces.move_to_end(bytes(run_id))
        table[commitment] = (nonce, 0, 0)
        while len(table) > MAX_NONCES:
            table.popitem(last=False)
        while len(self._nonces) > MAX_RUNS:
            self._nonces.popitem(last=False)
        return commitment

    def nonce_for(self, run_id: bytes, round: int, commitment: bytes, attempt: int) -> bytes:
        """The nonce behind ``commitment`` for ``attempt`` of ``round`` (recorded: no other
        round gets it, and no attempt at or below one it was opened for).

        Raises:
            NonceError: The site made no such commitment in this run (or forgot it), opened it
                in another round, or already revealed its value for this or a later attempt.
        """
        if round < 1:  # 0 marks a nonce not yet opened: rounds start at 1
            raise NonceError(f"a graph nonce is opened only for rounds 1 and up, not {round}")
        entry = self._nonces.get(bytes(run_id), OrderedDict()).get(bytes(commitment))
        if entry is None:
            raise NonceError(
                "the setup lists a graph-nonce commitment this site did not make for this run"
            )
        nonce, opened, highest = entry
        if opened not in (0, round):
            raise NonceError(
                f"the setup lists a graph-nonce commitment this site opened in round {opened}"
            )
        if opened == round and attempt <= highest:
            raise NonceError(
                f"the graph nonce was already revealed for attempt {highest} of this round: "
                f"attempt {attempt} would reveal a value the coordinator knows"
            )
        self._nonces[bytes(run_id)][bytes(commitment)] = (nonce, round, attempt)
        return nonce

    def check(self, run_id: bytes, round: int, attempt: int) -> None:
        """Raise if the site must not answer this setup; records nothing.

        Raises:
            SetupAttemptError: ``attempt`` is at or beyond ``max_setup_attempts``.
            StaleMessageError: An earlier round of the run, an attempt not newer than one
                answered, or a round in which the site already shared keys.
        """
        cap = self.policy.max_setup_attempts
        if attempt >= cap:
            raise SetupAttemptError(
                f"setup attempt {attempt} is beyond this site's limit of {cap} attempts per round"
            )
        entry = self._runs.get(bytes(run_id))
        if entry is None and len(self._runs) >= MAX_RUNS:
            raise GuardFullError(
                f"this site's setup guard holds {MAX_RUNS} runs, the most it keeps: it answers "
                "no setup of a new run until an operator archives the guard"
            )
        if entry is None or round > entry.round:
            return
        if round < entry.round:
            raise StaleMessageError(f"setup for round {round}, a later round was answered")
        if entry.shared:
            raise StaleMessageError("setup for a round in which this site already shared keys")
        if attempt <= entry.attempt:
            raise StaleMessageError(
                f"setup attempt {attempt} is not newer than attempt {entry.attempt} answered"
            )

    def admit(self, run_id: bytes, round: int, attempt: int) -> None:
        """:meth:`check`, then record that the site answers this attempt.

        Raises:
            SetupAttemptError, StaleMessageError: As :meth:`check`.
        """
        self.check(run_id, round, attempt)
        self._put(bytes(run_id), _Entry(round, attempt, shared=False))

    def mark_shared(self, run_id: bytes, round: int, attempt: int) -> None:
        """Record that the site shared keys in ``attempt`` of ``round`` (no further setup
        for that round is answered)."""
        key = bytes(run_id)
        entry = self._runs.get(key)
        if entry is not None and entry.round > round:
            return
        if entry is not None and entry.round == round:
            attempt = max(attempt, entry.attempt)
        self._put(key, _Entry(round, attempt, shared=True))

    def answered(self, run_id: bytes) -> tuple[int, int, bool] | None:
        """``(round, highest attempt, shared)`` last recorded for ``run_id``, if any."""
        entry = self._runs.get(bytes(run_id))
        return None if entry is None else (entry.round, entry.attempt, entry.shared)

    def _put(self, key: bytes, entry: _Entry) -> None:
        if key not in self._runs and len(self._runs) >= MAX_RUNS:
            raise GuardFullError(f"this site's setup guard holds {MAX_RUNS} runs")
        self._runs[key] = entry

    def to_bytes(self) -> bytes:
        """Canonical bytes for the adapter to persist (the graph nonces not yet opened are
        secret until the setup that uses them: keep the file site-local, mode 0600)."""
        w = Writer().raw(_MAGIC).count(len(self._runs))
        for run_id, entry in self._runs.items():
            w.fixed(run_id, RUN_ID_BYTES).u32(entry.round).u16(entry.attempt)
            w.u8(1 if entry.shared else 0)
        w.count(len(self._nonces))
        for run_id, table in self._nonces.items():
            w.fixed(run_id, RUN_ID_BYTES).count(len(table))
            for commitment, (nonce, opened, highest) in table.items():
                w.fixed(commitment, NONCE_BYTES).fixed(nonce, NONCE_BYTES).u32(opened)
                w.u16(highest)
        return w.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes, policy: SitePolicy | None = None) -> SetupGuard:
        """Restore a guard from :meth:`to_bytes`.

        Raises:
            DecodeError: Malformed, truncated, over :data:`MAX_RUNS` entries, or a run twice.
        """
        guard = cls(policy)
        r = Reader(data, what="setup guard")
        magic = r.fixed(len(_MAGIC))
        if magic not in (_MAGIC, _MAGIC_V1):
            raise DecodeError("setup guard: bad magic")
        for _ in range(r.count(MAX_RUNS)):
            run_id = r.fixed(RUN_ID_BYTES)
            round_, attempt, shared = r.u32(), r.u16(), r.u8()
            if shared > 1:
                raise DecodeError("setup guard: bad flag")
            if run_id in guard._runs:
                raise DecodeError("setup guard: a run appears twice")
            guard._runs[run_id] = _Entry(round_, attempt, shared=bool(shared))
        if magic == _MAGIC:  # v1 (no graph nonces) is read as a guard holding none
            for _ in range(r.count(MAX_RUNS)):
                run_id = r.fixed(RUN_ID_BYTES)
                if run_id in guard._nonces:
                    raise DecodeError("setup guard: a run's nonces appear twice")
                table: OrderedDict[bytes, tuple[bytes, int, int]] = OrderedDict()
                for _ in range(r.count(MAX_NONCES)):
                    commitment, nonce, opened = r.fixed(NONCE_BYTES), r.fixed(NONCE_BYTES), r.u32()
                    highest = r.u16()
                    if commitment in table:
                        raise DecodeError("setup guard: a commitment appears twice")
                    table[commitment] = (nonce, opened, highest)
                guard._nonces[run_id] = table
        r.finish()
        return guard
