"""A site's memory of the round setups it answered: bounds graph re-draws per round.

Usage (one guard per site, kept by the adapter for the life of the site process and handed
to every :class:`~fedseal.protocol.client.ClientSession`)::

    guard = SetupGuard(SitePolicy(max_setup_attempts=3, min_cohort=3))
    session = ClientSession(site, key, coordinator_key, update_fn=train, rng=rng, guard=guard)
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

A session without a guard makes a private one, which bounds attempts within that session;
the bound spans sessions (an adapter that builds a fresh session per received setup) only
if the adapter keeps one guard. The guard remembers the newest round of the last
:data:`MAX_RUNS` runs (least recently used forgotten first).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .config import SitePolicy
from .encoding import Reader, Writer
from .errors import DecodeError, SetupAttemptError, StaleMessageError
from .types import RUN_ID_BYTES

__all__ = ["MAX_RUNS", "SetupGuard"]

MAX_RUNS = 64
"""Runs a guard remembers."""

_MAGIC = b"fedseal/v1/setup-guard\x00"


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

    __slots__ = ("_runs", "policy")

    def __init__(self, policy: SitePolicy | None = None) -> None:
        self.policy = policy if policy is not None else SitePolicy()
        self._runs: OrderedDict[bytes, _Entry] = OrderedDict()

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
        self._runs[key] = entry
        self._runs.move_to_end(key)
        while len(self._runs) > MAX_RUNS:
            self._runs.popitem(last=False)

    def to_bytes(self) -> bytes:
        """Canonical bytes (for the adapter to persist; holds no secrets)."""
        w = Writer().raw(_MAGIC).count(len(self._runs))
        for run_id, entry in self._runs.items():
            w.fixed(run_id, RUN_ID_BYTES).u32(entry.round).u16(entry.attempt)
            w.u8(1 if entry.shared else 0)
        return w.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes, policy: SitePolicy | None = None) -> SetupGuard:
        """Restore a guard from :meth:`to_bytes`.

        Raises:
            DecodeError: Malformed, truncated, over :data:`MAX_RUNS` entries, or a run twice.
        """
        guard = cls(policy)
        r = Reader(data, what="setup guard")
        if r.fixed(len(_MAGIC)) != _MAGIC:
            raise DecodeError("setup guard: bad magic")
        for _ in range(r.count(MAX_RUNS)):
            run_id = r.fixed(RUN_ID_BYTES)
            round_, attempt, shared = r.u32(), r.u16(), r.u8()
            if shared > 1:
                raise DecodeError("setup guard: bad flag")
            if run_id in guard._runs:
                raise DecodeError("setup guard: a run appears twice")
            guard._runs[run_id] = _Entry(round_, attempt, shared=bool(shared))
        r.finish()
        return guard
