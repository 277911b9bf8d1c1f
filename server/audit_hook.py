"""Feeding the coordinator's audit log (:class:`fedseal.audit.writer.AuditLog`) from a run.

Usage (inside the ServerApp)::

    audit = RunAudit.open(state_dir / "audit.sqlite", coordinator_key, roster)  # mirrors roster
    watch = ConsortiumWatch(cfg.consortium)      # [consortium] in server.toml, if set
    audit.consortium_roster(watch.check(), again=True)   # verified; raises ConsortiumRefusedError
    audit.run_start(run_id, config_bytes, initial_digest, rounds)       # skipped on --resume
    changed = watch.check()                # at the start of each round: None if unchanged
    audit.setup(rnd, packet_bytes)         # each signed round setup (attempt) sent
    audit.envelopes(rnd, server.log)       # every accepted/rejected envelope of the round
    audit.round_result(rnd, aggregate_digest, new_digest, dp=dp, absent=rec.get("absent"))
                                           # + tree head (+ DP round); absent: site -> why
    audit.checkpoint(rnd, model_digest, file_sha256, name)
    audit.evaluation(rnd, {"accuracy": .., "loss": .., "macro-f1": ..}, examples, sites)
    audit.run_end()                        # + a signed tree head; the WAL checkpointed
    audit.close()                          # checkpoints the WAL into audit.sqlite again

Roster changes are mirrored from the enrolment roster file's hash-chained events (``roster.events``):
the count already mirrored is the number of roster entries in the log, so re-opening is
idempotent. The consortium roster the sites run under (``[consortium]`` in ``server.toml``)
is verified under the roster authority's public key and recorded as the authority signed it
(:class:`fedseal.audit.entries.ConsortiumRosterRecord`) at run start and whenever the file's
version changes; a version lower than the one in force is refused. Envelopes are recorded after the protocol state machine verified them (the
machine verifies and sums in one call); the round result, which the auditor checks against
them, is always written after. A round's federated evaluation (aggregated accuracy, loss,
macro-F1, example count, the sites counted) is its own signed entry
(:class:`fedseal.audit.entries.Evaluation`), written once the evaluation of the round's new
model is aggregated: the round result precedes the model leaving the coordinator.

The log runs in SQLite WAL mode: after the run end (and on :meth:`RunAudit.close`) the WAL is
checkpointed into ``audit.sqlite`` and truncated, so the file alone is the whole log once a run
has ended; copies of a live log are made with SQLite's online backup (``fedseal-backup``).

Fail closed (:class:`FailClosedAudit`, what the ServerApp writes through): an entry the log
refuses or fails to store stops the run with :class:`AuditHaltError` (``status.json`` says
why): nothing is acknowledged to a site or published as a model before its entry is committed.

Round setups: each signed setup the coordinator sends (every attempt of every round) is logged
once, as an accepted envelope entry of message type ``fedseal/v1/round-setup`` signed by the
coordinator (site ``""``: its sender). Every later message of the round binds its setup digest,
so ``fl-audit verify`` can match a round's DP accounting against the DP parameters its sites
signed for (:mod:`fedseal.audit.rules`).

Absent sites: a round's result names every sampled site that is not in its sum, with the
one-line reason the round record gives (``refused: …``, ``error: …``, ``rejected at <stage>:
…``, ``dropped at <stage>…``), so the DPO's report can say why an expected site sent nothing;
``fl-audit verify`` checks each is an enrolled site whose masked input the round did not accept.

Distributed DP: a round that accepted a masked input counts as released whether it commits or
not (the coordinator holds the inputs; whether it could remove the masks cannot be told from
the log): its :class:`~fedseal.audit.entries.DpRound` goes into its round result's commit,
failed or not.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.audit.entries import (
    MAX_ABSENT_REASON,
    RosterAction,
    RoundStatus,
    RunStatus,
    canonical_settings,
)
from fedseal.audit.errors import AuditError
from fedseal.audit.writer import AuditLog, ReceivedEnvelope
from fedseal.crypto.errors import KeyFormatError
from fedseal.crypto.keys import key_id, load_public_key
from fedseal.protocol import Accepted, MessageKind, Rejection
from fedseal.protocol.config import Limits
from fedseal.protocol.consortium import (
    MAX_ROSTER_JSON_BYTES,
    ConsortiumRoster,
    ConsortiumRosterError,
    SignedConsortiumRoster,
)
from fedseal.protocol.dp import DpParams
from fedseal.protocol.envelope import Envelope
from fedseal.protocol.errors import ProtocolError
from fedseal.server.config import ConsortiumSection, ServerConfig
from fedseal.server.errors import CoordinatorError
from fedseal.server.roster import Enrolment, roots_through

__all__ = [
    "AuditHaltError",
    "ConsortiumRefusedError",
    "ConsortiumWatch",
    "FailClosedAudit",
    "LoadedConsortiumRoster",
    "RunAudit",
    "load_consortium_roster",
    "refresh_roster",
]

_log = logging.getLogger("fedseal.server")

_ACTIONS = {
    "enroll": RosterAction.ENROL,
    "approve-root": RosterAction.SET_ROOTS,
    "revoke": RosterAction.REVOKE,
    "withdraw-root": RosterAction.WITHDRAW_ROOT,
}


#: Message type recorded for a received frame that does not parse as an envelope (its signer
#: key id is all zeros: nothing in it is signed).
UNPARSEABLE_FRAME = "fedseal/unparseable-frame"
#: How many leading bytes of such a frame the log keeps (its length and digest are in the reason).
UNPARSEABLE_KEEP = 4096


def declared_settings(cfg: ServerConfig) -> str:
    """The run settings a run start records (canonical JSON): what a reader of the log (a DPO's
    report) needs to know about how the run was configured, not where its files are."""
    r, dp = cfg.run, cfg.dp
    settings: dict[str, object] = {
        "secure": r.secure, "strategy": r.strategy, "strategy_options": dict(r.strategy_options),
        "rounds": r.rounds, "min_sites": r.min_sites, "model": r.model, "seed": r.seed,
        "epochs": r.epochs, "batch_size": r.batch_size, "learning_rate": r.learning_rate,
        "clip_norm": r.clip_norm, "update_clip": r.update_clip,
    }  # fmt: skip
    if r.contract_digest:
        settings["data_contract"] = r.contract_digest.hex()
    if dp.enabled:
        settings["dp"] = {
            k: v for k, v in (
                ("epsilon", dp.epsilon), ("delta", dp.delta), ("clip", dp.clip),
                ("noise_multiplier", dp.noise_multiplier), ("granularity", dp.granularity),
                ("modulus_bits", dp.modulus_bits),
            ) if v is not None
        }  # fmt: skip
    return canonical_settings(settings)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _absent_reason(why: object) -> str:
    """An absent site's reason as a round result holds it: one printable line (whitespace
    runs made one space) of at most :data:`MAX_ABSENT_REASON` UTF-8 bytes, cut on a character
    boundary; ``"no reason given"`` when nothing is left.

    A site's error reply is kept as its kind only (``error: RecipeError``): its text can quote
    the site's data (``could not convert string to float: 'Jane Doe'``), and the log is signed
    and append-only; the whole line stays in ``rounds.jsonl`` and on the console. Refusals
    (the site's policy, fedseal's own words) and the coordinator's own reasons are kept."""
    text = " ".join("".join(c if c.isprintable() else " " for c in str(why)).split())
    if text.startswith("error: "):
        kind = text.removeprefix("error: ").split(":", 1)[0].split(" ", 1)[0]
        text = f"error: {kind}" if kind.isidentifier() else "error"
    raw = text.encode("utf-8", "replace")  # a lone surrogate becomes "?"
    if len(raw) > MAX_ABSENT_REASON:
        raw = raw[: MAX_ABSENT_REASON - len("…".encode())]
        text = raw.decode("utf-8", "ignore").rstrip() + "…"
    else:
        text = raw.decode("utf-8")
    return text or "no reason given"


class ConsortiumRefusedError(CoordinatorError, RuntimeError):
    """The configured consortium roster cannot be used: unreadable, malformed, not signed by
    the roster authority, or older than the one in force. The message is one line."""


@dataclass(frozen=True, slots=True)
class LoadedConsortiumRoster:
    """A consortium roster file verified under the roster authority's public key."""

    signed: SignedConsortiumRoster
    roster: ConsortiumRoster  # as verified
    authority: ec.EllipticCurvePublicKey
    path: Path

    @property
    def digest(self) -> bytes:
        """SHA-256 of the signed roster bytes."""
        return self.roster.digest()

    def describe(self) -> str:
        active = sum(1 for s in self.roster.sites if s.active)
        return (
            f"consortium roster {self.roster.consortium!r} version {self.roster.version} "
            f"({active} active sites, authority key {bytes(key_id(self.authority)).hex()[:16]}…)"
        )


def load_consortium_roster(section: ConsortiumSection) -> LoadedConsortiumRoster:
    """Read ``[consortium]``'s roster file and verify it under the authority's public key.

    Raises:
        ConsortiumRefusedError: Naming the file and what is wrong (one line).
    """
    try:
        authority = load_public_key(section.authority)
    except FileNotFoundError as exc:
        raise ConsortiumRefusedError(
            f"consortium.authority {section.authority}: roster authority public key not found"
        ) from exc
    except OSError as exc:
        raise ConsortiumRefusedError(
            f"consortium.authority {section.authority}: cannot read: {exc.strerror or exc}"
        ) from exc
    except KeyFormatError as exc:
        raise ConsortiumRefusedError(
            f"consortium.authority {section.authority}: not a usable authority key: {exc}"
        ) from exc
    try:
        with section.roster.open("rb") as fh:
            data = fh.read(MAX_ROSTER_JSON_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConsortiumRefusedError(
            f"consortium.roster {section.roster}: consortium roster not found"
        ) from exc
    except OSError as exc:
        raise ConsortiumRefusedError(
            f"consortium.roster {section.roster}: cannot read: {exc.strerror or exc}"
        ) from exc
    try:
        signed = SignedConsortiumRoster.from_json(data)
        roster = signed.verify(authority)
    except ConsortiumRosterError as exc:
        raise ConsortiumRefusedError(f"consortium roster {section.roster}: {exc}") from exc
    return LoadedConsortiumRoster(signed, roster, authority, section.roster)


class ConsortiumWatch:
    """The consortium roster in force: verified when the run starts, checked again before every
    round (the coordinator holds no roster of its own: the file is the authority's)."""

    def __init__(self, section: ConsortiumSection) -> None:
        self.section = section
        self.current: LoadedConsortiumRoster | None = None

    def check(self) -> LoadedConsortiumRoster | None:
        """Read and verify the file; return it if it differs from the roster in force (always
        on the first call), else ``None``.

        Raises:
            ConsortiumRefusedError: It does not verify, or its version is lower than the one in
                force (or the same version with other contents).
        """
        loaded = load_consortium_roster(self.section)
        current = self.current
        if current is not None:
            if loaded.digest == current.digest:
                return None
            old, new = current.roster, loaded.roster
            if new.consortium == old.consortium and new.version <= old.version:
                raise ConsortiumRefusedError(
                    f"consortium roster {loaded.path}: version {new.version} is "
                    + ("older than" if new.version < old.version else "a different roster than")
                    + f" version {old.version} in force (roster versions never go down)"
                )
        self.current = loaded
        return loaded


class RunAudit:
    """The ServerApp's view of the audit log."""

    def __init__(self, log: AuditLog, path: Path) -> None:
        self.log = log
        self.path = path

    @classmethod
    def open(cls, path: Path, key: ec.EllipticCurvePrivateKey, roster: Enrolment) -> RunAudit:
        """Open (or create) the log and mirror roster changes it does not hold yet.

        Raises:
            fedseal.audit.errors.AuditError: The log refuses an entry (names the reason).
        """
        log = AuditLog.open(path, signer=key, now_ms=_now_ms(), log_id=os.urandom(16))
        audit = cls(log, path)
        audit.mirror_roster(roster)
        return audit

    def mirror_roster(self, roster: Enrolment) -> int:
        """Record the roster changes the log does not hold yet (``<log>.roster-seq`` counts
        those mirrored), each with its own time and reason: an enrolment (key + roots), a
        roots change (the site's roots after it), a revocation, a root withdrawal (the roots
        withdrawn). Returns how many it recorded.

        Raises:
            fedseal.audit.errors.AuditError: The log refuses an entry (e.g. a withdrawn root
                approved again): the changes before it stay recorded.
        """
        marker = self.path.with_suffix(".roster-seq")
        done = int(marker.read_text()) if marker.exists() else 0
        sites = {s.name: s for s in roster.sites}
        for event in roster.events[done:]:
            action = _ACTIONS[event.action]
            if action is RosterAction.WITHDRAW_ROOT:
                roots: tuple[str, ...] = event.dataset_roots
            elif action is RosterAction.REVOKE:
                roots = ()
            else:
                roots = roster_roots_at(roster, event.seq, event.site)
            self.log.append_roster_change(
                action,
                event.site,
                public_key_der=sites[event.site].public_key_der if action is RosterAction.ENROL else b"",
                approved_roots=[bytes.fromhex(r) for r in roots],
                reason=event.reason,
                now_ms=event.time_ms,
            )
            marker.write_text(str(event.seq + 1))
        return max(0, len(roster.events) - done)

    def consortium_roster(self, loaded: LoadedConsortiumRoster, *, again: bool = False) -> bool:
        """Record the verified consortium roster unless the log's last one is the same roster
        (``again``: record it anyway, e.g. at a new run's start). Returns whether it did.

        Raises:
            fedseal.audit.errors.AuditStateError: The log refuses it (a version lower than
                the one it last recorded for the consortium, or a different roster with the
                same version).
        """
        last = self.log.consortium_roster
        if not again and last is not None and last.roster_digest == loaded.digest:
            return False
        self.log.append_consortium_roster(loaded.signed, loaded.authority, now_ms=_now_ms())
        return True

    def run_start(
        self, run_id: str, config_bytes: bytes, initial_digest: bytes, rounds: int,
        dp_budget: tuple[float, float] | None = None, settings: str = "",
    ) -> None:
        """Record the run start; ``dp_budget`` = ``[dp]``'s (epsilon, delta) for a DP run;
        ``settings``: :func:`declared_settings` of the run's config."""
        self.log.append_run_start(
            bytes.fromhex(run_id),
            config_digest=hashlib.sha256(config_bytes).digest(),
            initial_model_digest=initial_digest,
            code_version="fedseal-0.1.0",
            started_at_ms=_now_ms(),
            planned_rounds=rounds,
            dp_budget=dp_budget,
            settings=settings,
        )
        self.log.sign_tree_head(_now_ms())

    def envelopes(self, rnd: int, receipts: Iterable[Any]) -> None:
        """Record one round's accepted and rejected envelopes (one durable commit): what the
        protocol state machine checked travels with each receipt, nothing is decoded again."""
        items = []
        for r in receipts:
            if isinstance(r, Accepted):
                facts = r.masked_input
                extra: dict[str, Any] = {}
                if facts is not None:
                    extra = {
                        "dataset_root": facts.dataset_root,
                        "bulk_digest": facts.bulk_digest,
                        "num_examples": facts.example_count,
                        "model_digest": facts.model_digest,
                    }
                items.append(
                    ReceivedEnvelope(
                        message_type=MessageKind(r.kind).type_name, payload=r.payload,
                        signature=r.signature, signer_key_id=r.signer, accepted=True, reason=None,
                        site=str(r.site), round=rnd, stage=r.stage.value, **extra,
                    )
                )
            elif isinstance(r, Rejection):
                env, raw = r.envelope, r.frame
                if env is None:
                    if raw is None:
                        continue  # nothing was received (a dropout): the round result says so
                    # A frame that is not an envelope has nothing signed to keep; it is still
                    # recorded, rejected, with its length and SHA-256 and its first bytes.
                    items.append(
                        ReceivedEnvelope(
                            message_type=UNPARSEABLE_FRAME, payload=raw[:UNPARSEABLE_KEEP],
                            signature=b"", signer_key_id=bytes(32), accepted=False,
                            reason=(f"{r.reason[:120] or 'unparseable'} ({len(raw)} bytes, "
                                    f"sha256 {hashlib.sha256(raw).hexdigest()[:32]}...)"),
                            site=str(r.site), round=rnd, stage=r.stage.value,
                        )
                    )
                    continue
                items.append(
                    ReceivedEnvelope(
                        message_type=MessageKind(env.kind).type_name, payload=env.payload,
                        signature=env.signature, signer_key_id=env.signer, accepted=False,
                        reason=r.reason[:200] or "rejected", site=str(r.site), round=rnd,
                        stage=r.stage.value,
                    )
                )
        if items:
            self.log.append_envelopes(items)

    def setup(self, rnd: int, sealed: bytes) -> bool:
        """Record round ``rnd``'s signed setup (``sealed``: the envelope bytes sent to one
        cohort member; the body, and so the setup digest, is the same for all). Returns
        whether it was one (other packets are not recorded here).

        Raises:
            fedseal.audit.errors.AuditStateError: The log refuses it (e.g. not the open round).
        """
        try:
            env = Envelope.from_bytes(sealed, Limits())
        except ProtocolError:
            return False
        if env.kind is not MessageKind.ROUND_SETUP:
            return False
        self.log.append_envelopes(
            [
                ReceivedEnvelope(
                    message_type=env.kind.type_name, payload=env.payload, signature=env.signature,
                    signer_key_id=env.signer, accepted=True, reason=None, site="", round=rnd,
                    stage="setup",
                )
            ]
        )  # fmt: skip
        return True

    def round_result(
        self, rnd: int, aggregate_digest: bytes | None, new_digest: bytes, *, failed: str = "",
        dp: DpParams | None = None, absent: Mapping[str, str] | None = None,
    ) -> None:
        """Record the round's result (+ a signed tree head). ``dp``: the parameters of a DP
        round whose noisy sum was unmasked, committed or ``failed`` after that: its
        accounting entry goes into the same commit as the result. ``absent``: the round
        record's ``absent`` (each sampled site not in the sum -> why); each reason is made one
        printable line and cut to :data:`~fedseal.audit.entries.MAX_ABSENT_REASON` bytes (a
        site's own error text is part of it).

        Raises:
            fedseal.audit.errors.AuditStateError: The log refuses the result (e.g. an absent
                site that is not enrolled, or whose masked input the round accepted).
            ValueError: ``absent`` holds more than
                :data:`~fedseal.audit.entries.MAX_ABSENT_SITES` sites, or an empty site id.
        """
        params = None if dp is None else dp.to_bytes()
        self.log.append_round_result(
            rnd,
            aggregate_digest=aggregate_digest,
            new_model_digest=new_digest,
            status=RoundStatus.FAILED if failed else RoundStatus.COMPLETED,
            reason=failed[:200],
            dp_params=params,
            absent={str(site): _absent_reason(why) for site, why in (absent or {}).items()},
        )
        self.log.sign_tree_head(_now_ms())

    def dp_round(self, rnd: int, dp: DpParams) -> tuple[float, float]:
        """Record round ``rnd``'s DP accounting (after its result): its ρ and the run's ε so
        far, computed from ``dp`` as ``fl-audit verify`` recomputes them.
        Returns ``(rho, epsilon_so_far)``.

        Raises:
            fedseal.audit.errors.AuditStateError: The log refuses it (no DP run, not the last
                round, a round that released no sum, parameters other than its setup's, a
                second entry).
        """
        self.log.append_dp_round(rnd, dp_params=dp.to_bytes())
        return self.log.dp_rhos[-1], self.dp_epsilon()

    def dp_epsilon(self) -> float:
        """The open DP run's ε so far, as logged (0 before its first DP round)."""
        from fedseal.privacy import epsilon  # dp-accounting and scipy: only for DP runs

        budget = self.log.dp_budget
        return 0.0 if budget is None else epsilon(list(self.log.dp_rhos), budget[1])

    def checkpoint(self, rnd: int, model_digest: bytes, file_sha256: bytes, name: str) -> None:
        self.log.append_checkpoint(rnd, model_digest=model_digest, file_digest=file_sha256, name=name)

    def evaluation(
        self, rnd: int, metrics: dict[str, float], num_examples: int, sites: Iterable[str]
    ) -> bool:
        """Record round ``rnd``'s aggregated evaluation of its new model (finite numeric metrics
        only; names over 64 bytes are left out). Returns whether there was anything to record.

        Raises:
            fedseal.audit.errors.AuditStateError: The log refuses it (not the last round, a
                failed round, a second evaluation).
        """
        values = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            and 0 < len(k.encode()) <= 64 and abs(v) < 9.2e12
        }  # fmt: skip
        if not values:
            return False
        self.log.append_evaluation(
            rnd, metrics=values, num_examples=max(0, int(num_examples)), sites=sites,
            now_ms=_now_ms(),
        )  # fmt: skip
        return True

    def run_end(self, reason: str = "", *, aborted: bool = False) -> None:
        """Record the run end: completed (``reason`` e.g. "privacy budget reached"), or
        ``aborted`` (e.g. no round committed)."""
        status = RunStatus.ABORTED if aborted else RunStatus.COMPLETED
        self.log.append_run_end(status, ended_at_ms=_now_ms(), reason=reason[:200])
        self.log.sign_tree_head(_now_ms())
        # The run is over: make audit.sqlite alone the whole log (a reader may keep it open).
        self.log.store.checkpoint()

    def close(self) -> None:
        self.log.close()


class AuditHaltError(CoordinatorError, RuntimeError):
    """The audit log could not take an entry; the run stops rather than continue unrecorded."""


class FailClosedAudit:
    """The run's :class:`RunAudit`, fail closed: every write that the log refuses or fails to
    store stops the run (``halt(reason)`` records why, then :class:`AuditHaltError`)."""

    #: ``status.json``'s ``reason`` is one line for a terminal; the traceback is in serverapp.log.
    MAX_REASON_CHARS = 300

    def __init__(self, audit: RunAudit, halt: Callable[[str], None]) -> None:
        self.audit = audit
        self._halt = halt

    @property
    def log(self) -> AuditLog:
        return self.audit.log

    @property
    def path(self) -> Path:
        return self.audit.path

    def _call(self, what: str, fn: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except (AuditError, ValueError, OSError, sqlite3.Error) as exc:
            reason = f"the audit log refused {what}: {type(exc).__name__}: {exc}"
            reason = reason[: self.MAX_REASON_CHARS]
            _log.error("%s; stopping the run (nothing further is acknowledged or published)", reason)
            self._halt(reason)
            raise AuditHaltError(reason) from exc

    def consortium_roster(self, loaded: LoadedConsortiumRoster, *, again: bool = False) -> None:
        self._call("the consortium roster", self.audit.consortium_roster, loaded, again=again)

    def mirror_roster(self, roster: Enrolment) -> None:
        self._call("a roster change", self.audit.mirror_roster, roster)

    def run_start(
        self, run_id: str, config_bytes: bytes, initial_digest: bytes, rounds: int,
        dp_budget: tuple[float, float] | None = None, settings: str = "",
    ) -> None:
        self._call(
            "run start", self.audit.run_start, run_id, config_bytes, initial_digest, rounds,
            dp_budget, settings,
        )  # fmt: skip

    def envelopes(self, rnd: int, receipts: Sequence[Any]) -> None:
        if receipts:
            self._call("envelopes", self.audit.envelopes, rnd, receipts)

    def setup(self, rnd: int, sealed: bytes) -> None:
        self._call("round setup", self.audit.setup, rnd, sealed)

    def round_result(
        self, rnd: int, aggregate_digest: bytes | None, new_digest: bytes, *, failed: str = "",
        dp: DpParams | None = None, absent: Mapping[str, str] | None = None,
    ) -> None:
        self._call(
            "round result", self.audit.round_result, rnd, aggregate_digest, new_digest,
            failed=failed, dp=dp, absent=absent,
        )  # fmt: skip

    def dp_round(self, rnd: int, dp: DpParams) -> None:
        self._call("DP accounting", self.audit.dp_round, rnd, dp)

    def checkpoint(self, rnd: int, model_digest: bytes, file_sha256: bytes, name: str) -> None:
        self._call("checkpoint", self.audit.checkpoint, rnd, model_digest, file_sha256, name)

    def evaluation(
        self, rnd: int, metrics: dict[str, float], num_examples: int, sites: Iterable[str]
    ) -> None:
        self._call("evaluation", self.audit.evaluation, rnd, metrics, num_examples, sites)

    def run_end(self, reason: str = "", *, aborted: bool = False) -> None:
        self._call("run end", self.audit.run_end, reason, aborted=aborted)

    def close(self) -> None:
        self.audit.close()


def refresh_roster(
    path: Path, in_force: Enrolment, audit: FailClosedAudit | None
) -> Enrolment | None:
    """Read the roster file again before a round; return the roster the run moves to
    (:meth:`Enrolment.update_during_run`: a withdrawn root is refused from this round on), or
    ``None`` when nothing changed. The changes applied are recorded in the audit log (when
    there is one) before the round uses them.

    Raises:
        fedseal.server.roster.EnrolmentError: The file cannot be read, is invalid, or
            rewrites the history in force (the run stops rather than guess).
        AuditHaltError: The audit log refused a change.
    """
    if not in_force.events and not path.exists():
        return None
    newer = Enrolment.load(path)
    if newer.digest() == in_force.digest() and len(newer.events) == len(in_force.events):
        return None
    updated = in_force.update_during_run(newer)
    if updated == in_force:
        return None
    if audit is not None:
        audit.mirror_roster(updated)
    withdrawn = newer.withdrawn()
    for site in updated.sites:
        old = in_force.get(site.name)
        for root in old.dataset_roots if old is not None else ():
            if root not in site.dataset_roots and root in withdrawn:
                _log.warning("roster: %s; refused from this round on", withdrawn[root].describe())
    pending = len(newer.events) - len(updated.events)
    if pending:
        _log.warning(
            "roster: %d change(s) from a revocation on (%s) apply from the next run",
            pending, newer.events[len(updated.events)].site,
        )  # fmt: skip
    return updated


def roster_roots_at(roster: Enrolment, seq: int, site: str) -> tuple[str, ...]:
    """The site's approved roots right after event ``seq`` (enrolments and approvals add
    roots; a withdrawal removes them)."""
    return roots_through(roster.events[: seq + 1], site)
