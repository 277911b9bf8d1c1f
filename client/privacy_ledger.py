"""The site's ledger of differential privacy spent: one zCDP ρ per DP round it took part in.

One job: remember, durably and exactly once per round, the privacy each DP round cost this
site, across every run it ever joins, and answer "how much ε so far" and "would one more round
break the budget". It lives in the site's state directory (``state_dir/privacy-ledger.json``)::

    ledger = PrivacyLedger(cfg.state_dir)
    budget = cfg.privacy.budget()                      # Budget(ε, δ) of client.toml [privacy]
    ledger.charge_round(run_id, round, dp_params, honest_sites=n_h, budget=budget)
    send(noised_masked_input)                          # only after the charge is on disk
    print(ledger.spent(budget.delta))                  # ε of all charged rounds, all runs

Rules (docs/dp.md §4-§6):

* **Charge, then send.** The adapter charges a round *before* the site's noised input leaves
  it. A crash between the two loses budget (the round was paid for and never released), never
  privacy (a released round that was not paid for).
* **Once per (run, round).** A retried round or a re-setup attempt of the same round charges
  nothing more: the protocol's :class:`~fedseal.protocol.SetupGuard` lets a site mask one
  input per round of a run ("a site never masks two inputs for one round"), so at most one
  noised release per (run, round) exists. If a second charge of the same round names other
  parameters (another digest), the round keeps the larger ρ and both digests: the one input
  that was released cost at most that.
* **Across runs.** A run's ε bounds what that run's models reveal; the same site data in two
  runs is two releases (docs/dp.md §6, design.md §3 open item 4). The ledger keeps every run
  and the budget of ``[privacy] epsilon_budget`` applies to all of them together.
* **ρ composes by adding** (Bun & Steinke 2016, zCDP); ε of the whole ledger is
  :func:`fedseal.privacy.epsilon` over every recorded ρ (dp-accounting's RDP accountant with
  Canonne, Kamath & Steinke 2020's conversion).

Durability: the ledger is one JSON document, replaced as a whole by
:func:`fedseal.crypto.keys.write_atomic` (temporary file, fsync, rename, fsync of the
directory) under an exclusive ``flock`` (concurrent chargers serialise; readers need no lock,
a rename is atomic). A SIGKILL at any point leaves the old ledger or the new one, so a charge
that returned is on disk and a charge is never half-written or written twice. The document
carries a SHA-256 of its body: since no crash can truncate it, a truncated, edited or damaged
file is :class:`LedgerCorruptError`, never "nothing spent" (a ledger that silently reset would
hand a coordinator the whole budget again). A missing file is an empty ledger: deleting it is
an operator's act, as deleting the state directory is. Size: one entry (~200 bytes) per DP
round, rewritten per charge; 10^4 rounds are 2 MB, a small cost next to a round's training.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseal.client.errors import SiteError
from fedseal.crypto.keys import write_atomic
from fedseal.privacy import Budget, RoundNoise, epsilon, round_rho
from fedseal.privacy import dp_round_noise as _dp_round_noise
from fedseal.protocol.dp import DpParams

__all__ = [
    "FORMAT",
    "LEDGER_FILE",
    "BudgetExceededError",
    "Charge",
    "LedgerCorruptError",
    "LedgerError",
    "PrivacyLedger",
    "RunSpend",
    "dp_round_noise",
    "params_digest",
]

LEDGER_FILE = "privacy-ledger.json"
LOCK_FILE = "privacy-ledger.lock"
FORMAT = "fedseal/privacy-ledger/v1"
MAX_LEDGER_BYTES = 64 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class LedgerError(SiteError):
    """The privacy ledger cannot be used or refuses a charge."""


class LedgerCorruptError(LedgerError):
    """The ledger file exists but is not a ledger this code wrote (truncated, edited, damaged).

    Never treated as "nothing spent": the site stops charging (and so stops sending DP inputs)
    until an operator restores the file from a backup.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"privacy ledger {path} is unreadable ({reason}); it is left as it is: restore it "
            "from a backup (deleting it would reset the privacy spent to zero)"
        )
        self.path = path
        self.reason = reason


class BudgetExceededError(LedgerError):
    """Charging the round would take the site past its ε budget; nothing was charged."""

    def __init__(self, spent: float, after: float, budget: Budget) -> None:
        super().__init__(
            f"privacy budget: this round would raise epsilon from {spent:.6g} to {after:.6g}, "
            f"past the budget {budget.epsilon:g} at delta {budget.delta:g} "
            "([privacy] epsilon_budget, all runs together)"
        )
        self.spent = spent
        self.after = after
        self.budget = budget


@dataclass(frozen=True, slots=True)
class Charge:
    """One DP round this site paid for.

    Attributes:
        run_id: The run, as text (a protocol run id is its hex).
        round: The round number within the run.
        rho: The round's zCDP ρ (:func:`fedseal.privacy.round_rho` of its parameters).
        time: When it was first charged, seconds since the epoch.
        params: SHA-256 digests (hex) of the round parameters charged for it (usually one).
    """

    run_id: str
    round: int
    rho: float
    time: float
    params: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run_id,
            "round": self.round,
            "rho": self.rho,
            "time": self.time,
            "params": list(self.params),
        }


@dataclass(frozen=True, slots=True)
class RunSpend:
    """What one run cost: its charged rounds and their ε on their own at ``delta``."""

    run_id: str
    rounds: tuple[int, ...]
    rho: float
    epsilon: float


def params_digest(dp: DpParams) -> str:
    """SHA-256 (hex) of the canonical bytes of a round's DP parameters."""
    return hashlib.sha256(dp.to_bytes()).hexdigest()


def dp_round_noise(dp: DpParams, *, honest_sites: int | None = None) -> RoundNoise:
    """The accountant's view of a round with parameters ``dp``
    (:func:`fedseal.privacy.dp_round_noise`, shared with the coordinator and the audit
    verifier), lowered to ``honest_sites`` honest survivors when the site assumes fewer.

    Raises:
        LedgerError: No noise (σ = 0: ρ would be infinite) or no honest survivor.
    """
    try:
        return _dp_round_noise(dp, honest_sites=honest_sites)
    except ValueError as exc:
        raise LedgerError(f"privacy ledger: {exc}") from exc


def _run_text(run_id: str | bytes) -> str:
    text = run_id.hex() if isinstance(run_id, bytes) else run_id
    if not isinstance(text, str) or not text or len(text) > 256:
        raise ValueError("run_id must be non-empty bytes or text of at most 256 characters")
    return text


def _digest_text(digest: str | bytes) -> str:
    text = digest.hex() if isinstance(digest, bytes) else str(digest).lower()
    if not _HEX64.fullmatch(text):
        raise ValueError("params digest must be 32 bytes (or 64 hex characters)")
    return text


def _body_bytes(charges: Sequence[Charge]) -> bytes:
    body = {"format": FORMAT, "charges": [c.to_json() for c in charges]}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


class PrivacyLedger:
    """The ledger in ``state_dir`` (see the module docstring).

    Args:
        state_dir: The site's state directory (``[site] state_dir``).
        clock: Seconds since the epoch, for a charge's time (injectable for tests).
    """

    def __init__(self, state_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        self._dir = Path(state_dir)
        self._clock = clock

    @property
    def path(self) -> Path:
        return self._dir / LEDGER_FILE

    # -- reading -------------------------------------------------------------------------------

    def charges(self) -> tuple[Charge, ...]:
        """Every charge, in the order they were first made.

        Raises:
            LedgerCorruptError: The file exists and is not a valid ledger.
        """
        path = self.path
        try:
            with path.open("rb") as fh:
                raw = fh.read(MAX_LEDGER_BYTES + 1)
        except FileNotFoundError:
            return ()
        except OSError as exc:
            raise LedgerCorruptError(path, f"cannot read: {exc.strerror}") from exc
        if len(raw) > MAX_LEDGER_BYTES:
            raise LedgerCorruptError(path, "larger than 64 MiB")
        return _parse(path, raw)

    def rhos(self, run_id: str | bytes | None = None) -> list[float]:
        """The ρ of every charged round (of one run when ``run_id`` is given)."""
        run = None if run_id is None else _run_text(run_id)
        return [c.rho for c in self.charges() if run is None or c.run_id == run]

    def spent(self, delta: float, run_id: str | bytes | None = None) -> float:
        """ε at ``delta`` of every charged round, all runs together (or of one run)."""
        return epsilon(self.rhos(run_id), delta)

    def would_exceed(self, rho: float, budget: Budget) -> bool:
        """Whether one more round of zCDP ``rho`` would take ε past ``budget`` (all runs)."""
        _check_rho(rho)
        return epsilon([*self.rhos(), rho], budget.delta) > budget.epsilon

    def runs(self, delta: float) -> list[RunSpend]:
        """Per run, in order of first charge: its rounds, total ρ and its own ε at ``delta``."""
        by_run: dict[str, list[Charge]] = {}
        for c in self.charges():
            by_run.setdefault(c.run_id, []).append(c)
        return [
            RunSpend(
                run_id=run,
                rounds=tuple(sorted(c.round for c in cs)),
                rho=math.fsum(c.rho for c in cs),
                epsilon=epsilon([c.rho for c in cs], delta),
            )
            for run, cs in by_run.items()
        ]

    # -- charging ------------------------------------------------------------------------------

    def charge(
        self,
        run_id: str | bytes,
        round: int,
        rho: float,
        params: str | bytes,
        *,
        budget: Budget | None = None,
    ) -> Charge:
        """Record that round ``round`` of ``run_id`` cost ``rho``; durable when it returns.

        Idempotent per (run, round): a second charge of a round already charged at least as
        much returns the recorded charge and writes nothing (a retry always goes through, its
        round was paid for). With ``budget``, the check and the charge are one locked step.

        Args:
            params: SHA-256 of the round's parameters (:func:`params_digest`).

        Raises:
            BudgetExceededError: The charge would take ε past ``budget``; nothing recorded.
            LedgerCorruptError: The ledger on disk is not valid (nothing recorded).
            ValueError: ``rho`` not finite and > 0, or a bad run id, round or digest.
            OSError: The ledger could not be written (nothing recorded).
        """
        run = _run_text(run_id)
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an int >= 0, got {round!r}")
        _check_rho(rho)
        digest = _digest_text(params)
        with self._locked():
            charges = list(self.charges())
            index = next(
                (i for i, c in enumerate(charges) if (c.run_id, c.round) == (run, round)), None
            )
            if index is None:
                new = Charge(run, round, float(rho), float(self._clock()), (digest,))
                updated = [*charges, new]
            else:
                old = charges[index]
                merged = old.params if digest in old.params else (*old.params, digest)
                new = Charge(run, round, max(old.rho, float(rho)), old.time, merged)
                if new == old:
                    return old
                updated = [*charges[:index], new, *charges[index + 1 :]]
            if budget is not None and (index is None or new.rho > charges[index].rho):
                after = epsilon([c.rho for c in updated], budget.delta)
                if after > budget.epsilon:  # (ε before: only for the message)
                    raise BudgetExceededError(epsilon([c.rho for c in charges], budget.delta), after, budget)
            self._write(updated)
            return new

    def charge_round(
        self,
        run_id: str | bytes,
        round: int,
        dp: DpParams,
        *,
        honest_sites: int | None = None,
        budget: Budget | None = None,
    ) -> Charge:
        """:meth:`charge` the ρ of a round with parameters ``dp`` (:func:`dp_round_noise`)."""
        rho = round_rho(dp_round_noise(dp, honest_sites=honest_sites))
        return self.charge(run_id, round, rho, params_digest(dp), budget=budget)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock (a killed process's lock goes with it)

    def _write(self, charges: Sequence[Charge]) -> None:
        body = _body_bytes(charges)
        doc = body[:-1] + b',"sha256":"' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'
        # Temporary files of writers killed before their rename are garbage: under the lock no
        # other writer is between mkstemp and rename.
        for stale in self._dir.glob(f".{LEDGER_FILE}.*.tmp"):
            stale.unlink(missing_ok=True)
        write_atomic(self.path, doc, mode=0o600)


def _check_rho(rho: float) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)):
        raise TypeError(f"rho must be a number, got {type(rho).__name__}")
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be finite and > 0 (a round without noise is refused), got {rho!r}")


def _parse(path: Path, raw: bytes) -> tuple[Charge, ...]:
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise LedgerCorruptError(path, f"not JSON: {exc}") from exc
    if not isinstance(doc, dict) or set(doc) != {"format", "charges", "sha256"}:
        raise LedgerCorruptError(path, "not a privacy ledger document")
    if doc["format"] != FORMAT:
        raise LedgerCorruptError(path, f"unknown format {doc['format']!r}")
    if not isinstance(doc["charges"], list):
        raise LedgerCorruptError(path, "charges must be a list")
    charges: list[Charge] = []
    seen: set[tuple[str, int]] = set()
    for i, item in enumerate(doc["charges"]):
        charge = _parse_charge(item)
        if charge is None:
            raise LedgerCorruptError(path, f"charge {i} is malformed")
        if (charge.run_id, charge.round) in seen:
            raise LedgerCorruptError(path, f"charge {i} repeats run {charge.run_id} round {charge.round}")
        seen.add((charge.run_id, charge.round))
        charges.append(charge)
    expected = hashlib.sha256(_body_bytes(charges)).hexdigest()
    if doc["sha256"] != expected:
        raise LedgerCorruptError(path, "checksum mismatch")
    return tuple(charges)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid value")


def _parse_charge(item: object) -> Charge | None:
    if not isinstance(item, dict) or set(item) != {"run", "round", "rho", "time", "params"}:
        return None
    run, rnd, rho, when, params = (item[k] for k in ("run", "round", "rho", "time", "params"))
    if not isinstance(run, str) or not run or len(run) > 256:
        return None
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
        return None
    if not isinstance(rho, float) or not (math.isfinite(rho) and rho > 0):
        return None
    if not isinstance(when, float) or not math.isfinite(when):
        return None
    if not isinstance(params, list) or not params:
        return None
    if not all(isinstance(p, str) and _HEX64.fullmatch(p) for p in params):
        return None
    return Charge(run, rnd, rho, when, tuple(params))
