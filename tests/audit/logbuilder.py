"""Builds realistic audit logs for the tests: a coordinator, enrolled sites with real keys,
rounds of really signed envelopes (masked inputs are real protocol ``MaskedInput`` payloads;
the other stages use a stand-in message type), rejections, a revocation, checkpoints and
signed tree heads. DP runs also log each round's real signed ``RoundSetup`` (whose digest the
masked inputs bind), as the coordinator does."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.audit.entries import INPUT_MESSAGE_TYPE, AuditEntry, RosterAction, RunStatus
from fedseal.audit.writer import AuditLog
from fedseal.crypto.keys import generate_identity_key, key_id, public_key_to_der
from fedseal.crypto.signing import sign
from fedseal.protocol.config import Limits, QuantizationConfig, RoundParameters
from fedseal.protocol.dp import DpParams, rotation_seed_for
from fedseal.protocol.envelope import Envelope, seal
from fedseal.protocol.messages import CohortMember, Header, MaskedInput, RoundSetup
from fedseal.protocol.types import MessageKind, SiteId

STAND_IN_TYPE = "fedseal/test/consistency-stand-in"
CLOCK0 = 1_780_000_000_000
_LIMITS = Limits()


def sample_dp_params(noise_multiplier: float = 10.0) -> DpParams:
    """A DP round's parameters for the built logs: d = 1024, 4 sites, 3 survivors, 1 colluder."""
    return DpParams.from_noise_multiplier(
        noise_multiplier, length=1000, clip=1.0, gamma=1e-3, sites=4, min_survivors=3,
        colluding_fraction=1 / 3, modulus_bits=32,
    )  # fmt: skip


def digest(*parts: object) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()


@dataclass
class BuiltLog:
    path: Path
    coordinator: ec.EllipticCurvePrivateKey
    sites: dict[str, ec.EllipticCurvePrivateKey]
    roots: dict[str, bytes]
    run_id: bytes
    rounds: int
    input_index: dict[tuple[str, int], int] = field(default_factory=dict)
    models: list[bytes] = field(default_factory=list)


class Clock:
    def __init__(self) -> None:
        self.t = CLOCK0

    def __call__(self) -> int:
        self.t += 1000
        return self.t


SETUP_TYPE = MessageKind.ROUND_SETUP.type_name


def round_setup(
    run_id: bytes,
    rnd: int,
    model: bytes,
    cohort: dict[str, ec.EllipticCurvePrivateKey],
    dp: DpParams | None,
    *,
    attempt: int = 0,
    rotation_seed: bytes | None = None,
) -> RoundSetup:
    """The round's setup as the coordinator signs it (threshold 2 of degree 3 for 4 sites)."""
    n = len(cohort)
    params = RoundParameters(
        vector_length=1000,
        quantization=QuantizationConfig.from_clip(1.0, levels=1 << 12, modulus_bits=32),
        max_weight=1000,
        degree=n - 1,
        threshold=max(1, (n - 1) // 2 + 1),
        min_survivors=max(1, (n - 1) // 2 + 1),
        dp=dp,
        rotation_seed=(b"" if dp is None else rotation_seed or rotation_seed_for(run_id, rnd)),
    )
    header = Header(run_id, rnd, SiteId(""), SiteId(min(cohort)), model, bytes(32))
    members = tuple(
        CohortMember(SiteId(s), public_key_to_der(cohort[s].public_key())) for s in sorted(cohort)
    )
    return RoundSetup(header, members, params, expires_at=CLOCK0 // 1000 + 3600, attempt=attempt)


def log_setup(log: AuditLog, setup: RoundSetup, coordinator: ec.EllipticCurvePrivateKey) -> int:
    """Log ``setup`` as the coordinator does (``server.audit_hook.RunAudit.setup``)."""
    env = Envelope.from_bytes(seal(setup, coordinator), _LIMITS)
    return log.append_envelope(
        SETUP_TYPE, env.payload, env.signature, env.signer, accepted=True, reason=None, site="",
        round=setup.header.round, stage="setup",
    )  # fmt: skip


def masked_input_payload(
    run_id: bytes,
    rnd: int,
    site: str,
    model: bytes,
    root: bytes,
    examples: int,
    bulk: bytes,
    setup_digest: bytes | None = None,
) -> bytes:
    header = Header(
        run_id=run_id,
        round=rnd,
        sender=SiteId(site),
        recipient=SiteId(""),
        model_digest=model,
        setup_digest=setup_digest or digest("setup", run_id, rnd),
    )
    msg = MaskedInput(
        header=header,
        dataset_root=root,
        example_count=examples,
        vector_length=1000,
        modulus_bits=32,
        clipped=0,
        bulk_digest=bulk,
    )
    return msg.to_payload()


def build_run_log(
    path: Path,
    *,
    n_sites: int = 4,
    rounds: int = 3,
    seed: int = 0,
    coordinator: ec.EllipticCurvePrivateKey | None = None,
    sites: dict[str, ec.EllipticCurvePrivateKey] | None = None,
    end_run: bool = True,
    revoke_last_after_round: int | None = 2,
    evaluations: bool = False,
    dp: DpParams | None = None,
    dp_budget: tuple[float, float] = (8.0, 1e-6),
    dp_until: int | None = None,
    restart_round: int | None = None,
) -> BuiltLog:
    """A complete run; site ``n_sites-1`` is revoked after ``revoke_last_after_round``.

    With ``evaluations``, each round's checkpoint is followed by its evaluation entry
    (accuracy, loss, macro-F1 of the new model over the sites' validation examples), as the
    coordinator logs it. With ``dp``, the run start carries ``dp_budget`` and every round is
    a DP round with these parameters: its accounting entry is written with its result (up to
    round ``dp_until`` if given; later rounds are left without one). Round ``restart_round``
    of a DP run has two setup attempts: attempt 0 with other DP parameters (noise multiplier 5
    instead of ``dp``'s), then attempt 1 with ``dp``, whose digest its inputs bind."""
    clock = Clock()
    coordinator = coordinator or generate_identity_key()
    if sites is None:
        sites = {f"site-{chr(97 + i)}": generate_identity_key() for i in range(n_sites)}
    names = sorted(sites)
    roots = {s: digest("root", s, seed) for s in names}
    log = AuditLog.open(path, signer=coordinator, now_ms=clock(), log_id=digest("log", seed)[:16])
    for s in names:
        log.append_roster_change(
            RosterAction.ENROL,
            s,
            public_key_der=public_key_to_der(sites[s].public_key()),
            approved_roots=[roots[s]],
            now_ms=clock(),
        )
    log.sign_tree_head(clock())
    run_id = digest("run", seed)[:16]
    model = digest("model", 0, seed)
    built = BuiltLog(path, coordinator, sites, roots, run_id, rounds, models=[model])
    log.append_run_start(
        run_id,
        config_digest=digest("config"),
        initial_model_digest=model,
        code_version="0.1.0",
        started_at_ms=clock(),
        planned_rounds=rounds,
        dp_budget=None if dp is None else dp_budget,
    )
    outsider = generate_identity_key()
    revoked: set[str] = set()
    for rnd in range(1, rounds + 1):
        bound: bytes | None = None
        if dp is not None:
            active = {s: sites[s] for s in names if s not in revoked}
            attempt = 0
            if rnd == restart_round:
                first = round_setup(run_id, rnd, model, active, sample_dp_params(5.0))
                log_setup(log, first, coordinator)
                attempt = 1
            setup = round_setup(run_id, rnd, model, active, dp, attempt=attempt)
            log_setup(log, setup, coordinator)
            bound = setup.digest
        for s in names:
            if s in revoked:
                continue
            # stage stand-in (e.g. a key advert), accepted
            payload = run_id + rnd.to_bytes(4, "big") + s.encode() + b"/advert"
            log.append_envelope(
                STAND_IN_TYPE,
                payload,
                sign(sites[s], STAND_IN_TYPE, payload),
                bytes(key_id(sites[s].public_key())),
                accepted=True,
                reason=None,
                site=s,
                round=rnd,
                stage="advertise",
            )
        # a non-enrolled sender, rejected
        junk = masked_input_payload(
            run_id, rnd, "mallory", model, digest("x"), 5, digest("bulk", "mallory", rnd)
        )
        log.append_envelope(
            INPUT_MESSAGE_TYPE,
            junk,
            sign(outsider, INPUT_MESSAGE_TYPE, junk),
            bytes(key_id(outsider.public_key())),
            accepted=False,
            reason="signer not enrolled",
            site="mallory",
            round=rnd,
            stage="masked_input",
        )
        for i, s in enumerate(names):
            bulk = digest("bulk", s, rnd, seed)
            if s in revoked:
                root, ok, reason = roots[s], False, "site revoked"
            elif rnd == 2 and i == 0:
                root, ok, reason = digest("unapproved"), False, "dataset root not approved"
            else:
                root, ok, reason = roots[s], True, None
            payload = masked_input_payload(run_id, rnd, s, model, root, 100 + i, bulk, bound)
            index = log.append_envelope(
                INPUT_MESSAGE_TYPE,
                payload,
                sign(sites[s], INPUT_MESSAGE_TYPE, payload),
                bytes(key_id(sites[s].public_key())),
                accepted=ok,
                reason=reason,
                site=s,
                round=rnd,
                stage="masked_input",
                dataset_root=root,
                bulk_digest=bulk,
                num_examples=100 + i,
                model_digest=model,
            )
            if ok:
                built.input_index[(s, rnd)] = index
        new_model = digest("model", rnd, seed)
        log.append_round_result(
            rnd,
            aggregate_digest=digest("aggregate", rnd, seed),
            new_model_digest=new_model,
            metrics={"accuracy": 0.5 + 0.1 * rnd, "loss": 1.0 / rnd},
            dp_params=None if dp is None or rnd > (dp_until or rounds) else dp.to_bytes(),
        )
        log.sign_tree_head(clock())
        log.append_checkpoint(
            rnd,
            model_digest=new_model,
            file_digest=digest("ckpt", rnd),
            name=f"round-{rnd}.safetensors",
        )
        if evaluations:
            log.append_evaluation(
                rnd,
                metrics={
                    "accuracy": 0.6 + 0.1 * rnd,
                    "loss": 1.5 / rnd,
                    "macro-f1": 0.5 + 0.1 * rnd,
                },
                num_examples=500 * len(names),
                sites=[s for s in names if s not in revoked],
                now_ms=clock(),
            )
        model = new_model
        built.models.append(model)
        if revoke_last_after_round == rnd:
            victim = names[-1]
            log.append_roster_change(
                RosterAction.REVOKE, victim, reason="key compromised", now_ms=clock()
            )
            revoked.add(victim)
    if end_run:
        log.append_run_end(RunStatus.COMPLETED, ended_at_ms=clock())
        log.sign_tree_head(clock())
    log.close()
    return built


def rewrite_log(
    built: BuiltLog,
    dst: Path,
    transform: Callable[[AuditEntry], list[AuditEntry]],
) -> Path:
    """The log as its own coordinator could rewrite it: each entry replaced by
    ``transform(entry)`` (none, itself or several), every DP accounting entry's ρ and ε
    recomputed from its parameters (so they stay self-consistent), every entry re-appended and
    every tree head re-signed with the *real* key over the rewritten entries it now covers."""
    from fedseal.audit.codec import decode_entry, encode_entry, entry_tags
    from fedseal.audit.entries import DpRound, RunStart
    from fedseal.audit.store import MerkleLogStore
    from fedseal.audit.treehead import SignedTreeHead
    from fedseal.privacy import dp_round_noise, epsilon, round_rho

    items: list[tuple[int, bytes, str | None, int | None]] = []
    new_size: dict[int, int] = {}  # old entry count -> new entry count
    rhos: list[float] = []
    delta = 1e-6
    with MerkleLogStore.open(built.path, read_only=True) as src:
        for stored in src.iter_entries():
            for entry in transform(decode_entry(stored.data)):
                if isinstance(entry, RunStart):
                    rhos = []
                    delta = entry.dp_budget[1] if entry.dp_budget else delta
                if isinstance(entry, DpRound):
                    rho = round_rho(dp_round_noise(entry.params))
                    rhos.append(rho)
                    entry = dataclasses.replace(
                        entry, rho=rho, epsilon_so_far=epsilon(rhos, delta), delta=delta
                    )
                items.append((*entry_tags(entry)[:1], encode_entry(entry), *entry_tags(entry)[1:]))
            new_size[stored.index + 1] = len(items)
        heads = [SignedTreeHead.from_bytes(h.blob) for h in src.tree_heads()]
    with MerkleLogStore.open(dst) as out:
        out.append_many(items)
        for old in heads:
            size = new_size[old.tree_size]
            root = out.root(size)
            new = SignedTreeHead.create(
                built.coordinator, log_id=old.log_id, tree_size=size, root_hash=root,
                timestamp_ms=old.timestamp_ms,
            )  # fmt: skip
            out.add_tree_head(new.tree_size, root, new.timestamp_ms, new.to_bytes())
    return dst
