"""Builds realistic audit logs for the tests: a coordinator, enrolled sites with real keys,
rounds of really signed envelopes (masked inputs are real protocol ``MaskedInput`` payloads;
the other stages use a stand-in message type), rejections, a revocation, checkpoints and
signed tree heads."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.audit.entries import INPUT_MESSAGE_TYPE, RosterAction, RunStatus
from fedseal.audit.writer import AuditLog
from fedseal.crypto.keys import generate_identity_key, key_id, public_key_to_der
from fedseal.crypto.signing import sign
from fedseal.protocol.dp import DpParams
from fedseal.protocol.messages import Header, MaskedInput
from fedseal.protocol.types import SiteId

STAND_IN_TYPE = "fedseal/test/consistency-stand-in"
CLOCK0 = 1_780_000_000_000


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


def masked_input_payload(
    run_id: bytes, rnd: int, site: str, model: bytes, root: bytes, examples: int, bulk: bytes
) -> bytes:
    header = Header(
        run_id=run_id,
        round=rnd,
        sender=SiteId(site),
        recipient=SiteId(""),
        model_digest=model,
        setup_digest=digest("setup", run_id, rnd),
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
) -> BuiltLog:
    """A complete run; site ``n_sites-1`` is revoked after ``revoke_last_after_round``.

    With ``evaluations``, each round's checkpoint is followed by its evaluation entry
    (accuracy, loss, macro-F1 of the new model over the sites' validation examples), as the
    coordinator logs it. With ``dp``, the run start carries ``dp_budget`` and every round is
    a DP round with these parameters: its accounting entry is written with its result (up to
    round ``dp_until`` if given; later rounds are left without one)."""
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
            payload = masked_input_payload(run_id, rnd, s, model, root, 100 + i, bulk)
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
