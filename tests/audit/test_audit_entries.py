"""Audit entries and tree heads: canonical bytes, strict decoding, and the coordinator's guard rails."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedseal.audit.codec import decode_entry, encode_entry
from fedseal.audit.entries import (
    INPUT_MESSAGE_TYPE,
    Checkpoint,
    EnvelopeRecord,
    Genesis,
    RosterAction,
    RosterChange,
    RoundRecord,
    RoundStatus,
    RunEnd,
    RunStart,
    RunStatus,
    metric_to_micros,
)
from fedseal.audit.errors import AuditStateError
from fedseal.audit.treehead import SignedTreeHead
from fedseal.audit.writer import AuditLog
from fedseal.crypto.keys import generate_identity_key, key_id, public_key_to_der
from fedseal.crypto.signing import sign
from fedseal.protocol.errors import BadSignatureError, DecodeError
from tests.audit.logbuilder import digest, masked_input_payload

d32 = st.binary(min_size=32, max_size=32)
d16 = st.binary(min_size=16, max_size=16)
text = st.text(max_size=20)
site = st.text(min_size=1, max_size=12)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)

entries = st.one_of(
    st.builds(Genesis, d16, st.binary(max_size=100), u64, text),
    st.builds(RunStart, d16, d32, d32, d32, text, u64, u32),
    st.builds(
        lambda s, roots, r, t: RosterChange(RosterAction.SET_ROOTS, s, b"", tuple(sorted(set(roots))), r, t),
        site, st.lists(d32, max_size=4), text, u64,
    ),
    st.builds(
        lambda run, rnd, stg, s, mt, k, acc, p, sig, root, ex: EnvelopeRecord(
            run, rnd, stg, s, mt, k, acc, "" if acc else "rejected", p, sig, root, None, ex, None
        ),
        d16, u32, text, text, st.text(min_size=1, max_size=20), d32, st.booleans(),
        st.binary(max_size=200), st.binary(max_size=72), st.none() | d32, st.none() | u64,
    ),
    st.builds(
        lambda run, rnd, base, sites, digs, agg, new, m: RoundRecord(
            run, rnd, RoundStatus.COMPLETED, base, tuple(sorted(set(sites), key=str.encode)),
            tuple(sorted(set(digs))), agg, new, "", tuple(sorted({k: v for k, v in m}.items())),
        ),
        d16, u32, d32, st.lists(site, max_size=5), st.lists(d32, max_size=5), st.none() | d32, d32,
        st.lists(st.tuples(st.text(min_size=1, max_size=10), st.integers(-(2**63), 2**63 - 1)), max_size=3),
    ),
    st.builds(Checkpoint, d16, u32, d32, d32, text),
    st.builds(RunEnd, d16, st.sampled_from(RunStatus), u32, d32, u64, text),
)  # fmt: skip


@given(entries)
def test_every_entry_round_trips_through_its_canonical_bytes(entry: object) -> None:
    data = encode_entry(entry)  # type: ignore[arg-type]
    assert decode_entry(data) == entry
    assert encode_entry(decode_entry(data)) == data


@given(entries, st.data())
def test_mutated_or_truncated_entry_bytes_raise_only_decode_errors(
    entry: object, data: st.DataObject
) -> None:
    raw = bytearray(encode_entry(entry))  # type: ignore[arg-type]
    choice = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if choice == "flip":
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    elif choice == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=8))
    try:
        decoded = decode_entry(bytes(raw))
    except DecodeError:
        return
    # A mutation that still decodes must decode to a different entry (canonical: one encoding).
    assert encode_entry(decoded) == bytes(raw)


def test_unsorted_lists_are_not_canonical_and_are_refused() -> None:
    r = RosterChange(RosterAction.SET_ROOTS, "s", b"", (b"\x01" * 32, b"\x02" * 32))
    raw = encode_entry(r)
    swapped = raw.replace(b"\x01" * 32 + b"\x02" * 32, b"\x02" * 32 + b"\x01" * 32)
    with pytest.raises(DecodeError):
        decode_entry(swapped)


def test_metrics_are_stored_as_exact_millionths() -> None:
    assert metric_to_micros(0.1234567) == 123457
    assert metric_to_micros(-2.5) == -2_500_000
    with pytest.raises(ValueError):
        metric_to_micros(float("nan"))


def test_a_tree_head_signature_covers_every_field() -> None:
    key = generate_identity_key()
    head = SignedTreeHead.create(
        key, log_id=b"L" * 16, tree_size=7, root_hash=b"r" * 32, timestamp_ms=5
    )
    head.verify(key.public_key())
    assert SignedTreeHead.from_bytes(head.to_bytes()) == head
    for change in (
        {"tree_size": 8},
        {"root_hash": b"s" * 32},
        {"timestamp_ms": 6},
        {"log_id": b"M" * 16},
    ):
        with pytest.raises(BadSignatureError):
            dataclasses.replace(head, **change).verify(key.public_key())  # type: ignore[arg-type]
    with pytest.raises(BadSignatureError):
        head.verify(generate_identity_key().public_key())


# --- the coordinator's guard rails ------------------------------------------------------------


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    coordinator = generate_identity_key()
    log = AuditLog.open(tmp_path / "a.sqlite", signer=coordinator, now_ms=1, log_id=b"L" * 16)
    return log


def _enrol(log: AuditLog, name: str, root: bytes) -> object:
    key = generate_identity_key()
    log.append_roster_change(
        RosterAction.ENROL,
        name,
        public_key_der=public_key_to_der(key.public_key()),
        approved_roots=[root],
        now_ms=2,
    )
    return key


def _input(
    log: AuditLog, key: object, name: str, rnd: int, root: bytes, model: bytes, **kw: object
) -> int:
    run_id = log.current_run_id
    assert run_id is not None
    payload = masked_input_payload(run_id, rnd, name, model, root, 10, digest("bulk", name, rnd))
    args = dict(
        accepted=True, reason=None, site=name, round=rnd, stage="masked_input", dataset_root=root,
        bulk_digest=digest("bulk", name, rnd), num_examples=10, model_digest=model,
    )  # fmt: skip
    args.update(kw)
    return log.append_envelope(
        INPUT_MESSAGE_TYPE,
        payload,
        sign(key, INPUT_MESSAGE_TYPE, payload),
        bytes(key_id(key.public_key())),  # type: ignore[attr-defined, arg-type]
        **args,  # type: ignore[arg-type]
    )


def _start(log: AuditLog, model: bytes) -> None:
    log.append_run_start(
        b"R" * 16,
        config_digest=b"c" * 32,
        initial_model_digest=model,
        code_version="t",
        started_at_ms=3,
    )


def test_the_log_refuses_an_accepted_input_with_an_unapproved_root(log: AuditLog) -> None:
    key = _enrol(log, "a", b"r" * 32)
    _start(log, b"m" * 32)
    with pytest.raises(AuditStateError):
        _input(log, key, "a", 1, b"x" * 32, b"m" * 32)
    # The same input, rejected with a reason, is recorded.
    _input(log, key, "a", 1, b"x" * 32, b"m" * 32, accepted=False, reason="root not approved")


def test_the_log_refuses_fields_that_disagree_with_the_signed_payload(log: AuditLog) -> None:
    key = _enrol(log, "a", b"r" * 32)
    _start(log, b"m" * 32)
    with pytest.raises(AuditStateError):
        _input(log, key, "a", 1, b"r" * 32, b"m" * 32, num_examples=11)


def test_the_log_refuses_inputs_from_revoked_sites_and_skipped_rounds(log: AuditLog) -> None:
    key = _enrol(log, "a", b"r" * 32)
    _start(log, b"m" * 32)
    _input(log, key, "a", 1, b"r" * 32, b"m" * 32)
    with pytest.raises(AuditStateError):
        log.append_round_result(2, aggregate_digest=b"g" * 32, new_model_digest=b"n" * 32)
    log.append_round_result(1, aggregate_digest=b"g" * 32, new_model_digest=b"n" * 32)
    with pytest.raises(AuditStateError):  # round 1 is closed
        _input(log, key, "a", 1, b"r" * 32, b"n" * 32)
    log.append_roster_change(RosterAction.REVOKE, "a", reason="compromised", now_ms=4)
    with pytest.raises(AuditStateError):
        _input(log, key, "a", 2, b"r" * 32, b"n" * 32)


def test_the_round_result_defaults_to_exactly_the_accepted_inputs(log: AuditLog) -> None:
    ka, kb = _enrol(log, "a", b"r" * 32), _enrol(log, "b", b"s" * 32)
    _start(log, b"m" * 32)
    _input(log, ka, "a", 1, b"r" * 32, b"m" * 32)
    _input(log, kb, "b", 1, b"s" * 32, b"m" * 32)
    with pytest.raises(AuditStateError):
        log.append_round_result(
            1, aggregate_digest=b"g" * 32, new_model_digest=b"n" * 32, survivors=["a"]
        )
    index = log.append_round_result(
        1, aggregate_digest=b"g" * 32, new_model_digest=b"n" * 32, metrics={"loss": 0.5}
    )
    result = decode_entry(log.entries(index, index + 1)[0].data)
    assert isinstance(result, RoundRecord)
    assert result.survivors == ("a", "b") and len(result.accepted_input_digests) == 2
    assert result.metric_values == {"loss": 0.5}


def test_a_failed_round_must_leave_the_model_unchanged(log: AuditLog) -> None:
    _enrol(log, "a", b"r" * 32)
    _start(log, b"m" * 32)
    with pytest.raises(AuditStateError):
        log.append_round_result(
            1, aggregate_digest=None, new_model_digest=b"n" * 32, status=RoundStatus.FAILED
        )
    log.append_round_result(
        1,
        aggregate_digest=None,
        new_model_digest=b"m" * 32,
        status=RoundStatus.FAILED,
        reason="too few",
    )


def test_tree_heads_cannot_go_back_in_time(log: AuditLog) -> None:
    log.sign_tree_head(100)
    with pytest.raises(AuditStateError):
        log.sign_tree_head(99)


def test_a_batch_of_envelopes_is_written_all_or_nothing(log: AuditLog) -> None:
    from fedseal.audit.writer import ReceivedEnvelope

    keys = {name: _enrol(log, name, name.encode() * 32) for name in ("a", "b")}
    _start(log, b"m" * 32)

    def envelope(name: str, root: bytes) -> ReceivedEnvelope:
        payload = masked_input_payload(
            b"R" * 16, 1, name, b"m" * 32, root, 10, digest("bulk", name)
        )
        key = keys[name]
        return ReceivedEnvelope(
            INPUT_MESSAGE_TYPE, payload, sign(key, INPUT_MESSAGE_TYPE, payload),  # type: ignore[arg-type]
            bytes(key_id(key.public_key())), True, None, name, 1, "masked_input",  # type: ignore[attr-defined]
            root, digest("bulk", name), 10, b"m" * 32,
        )  # fmt: skip

    size = log.size
    with pytest.raises(AuditStateError, match="item 1 of the batch"):
        log.append_envelopes([envelope("a", b"a" * 32), envelope("b", b"x" * 32)])
    assert log.size == size
    indices = log.append_envelopes([envelope("a", b"a" * 32), envelope("b", b"b" * 32)])
    assert indices == [size, size + 1]
    index = log.append_round_result(1, aggregate_digest=b"g" * 32, new_model_digest=b"n" * 32)
    result = decode_entry(log.entries(index, index + 1)[0].data)
    assert isinstance(result, RoundRecord) and result.survivors == ("a", "b")


def test_the_log_refuses_an_entry_the_verifier_could_not_decode(log: AuditLog) -> None:
    key = _enrol(log, "a", b"r" * 32)
    _start(log, b"m" * 32)
    huge = b"x" * (2 << 20)
    with pytest.raises(ValueError, match="exceeds a bound"):
        log.append_envelope(
            "fedseal/test/x", huge, sign(key, "fedseal/test/x", huge),  # type: ignore[arg-type]
            bytes(key_id(key.public_key())), accepted=False, reason="too big", site="a",  # type: ignore[attr-defined]
            round=1, stage="s",
        )  # fmt: skip
    # Nothing was written, and the log goes on.
    log.append_round_result(
        1, aggregate_digest=None, new_model_digest=b"m" * 32, status=RoundStatus.FAILED
    )
