"""The verifier's fast paths agree with the general code they short-cut.

``fl-audit verify`` decodes envelope entries with a one-pass decoder, checks masked-input
payloads against the recorded fields with a byte-level comparison, caches parsed public keys
per process and scans the SQLite store in batches of plain rows. Each fast path must accept
exactly what the general path accepts (and otherwise hand over to it), so these tests compare
them on real, mutated and generated inputs.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedseal.audit import codec, entries, signatures
from fedseal.audit.auditor import verify_log
from fedseal.audit.codec import decode_entry, encode_entry
from fedseal.audit.entries import INPUT_MESSAGE_TYPE, EntryKind, EnvelopeRecord
from fedseal.audit.errors import AuditVerificationError, RuleViolation
from fedseal.audit.signatures import SignatureJob, check_signatures_serial
from fedseal.audit.store import MerkleLogStore
from fedseal.audit.verifier import AuditVerifier
from fedseal.crypto.keys import generate_identity_key, public_key_to_der
from fedseal.crypto.signing import sign
from fedseal.protocol.config import Limits
from fedseal.protocol.encoding import Reader
from fedseal.protocol.errors import DecodeError, ProtocolError
from fedseal.protocol.messages import MaskedInput, decode_payload
from fedseal.protocol.types import MessageKind
from tests.audit.logbuilder import BuiltLog, build_run_log, digest, masked_input_payload


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> BuiltLog:
    return build_run_log(tmp_path_factory.mktemp("fast") / "audit.sqlite")


def _all_rows(path: Path) -> list[tuple[int, bytes, bytes]]:
    with MerkleLogStore.open(path, read_only=True) as store:
        return list(store.iter_leaf_rows())


def _general_decode(data: bytes) -> object:
    """The general decoder alone (no fast path): the entry, or the DecodeError it raises."""
    try:
        r = Reader(data, what="audit entry")
        if r.u8() != entries.ENTRY_VERSION or r.u8() != int(EntryKind.ENVELOPE):
            raise DecodeError("not a version-1 envelope")
        entry = EnvelopeRecord._decode(r)
        r.finish()
    except (DecodeError, ValueError) as exc:
        return DecodeError(str(exc))
    return entry


def _envelope_rows(built: BuiltLog) -> list[bytes]:
    return [d for _, d, _ in _all_rows(built.path) if d[1] == int(EntryKind.ENVELOPE)]


def test_the_fast_envelope_decoder_reads_every_envelope_of_a_real_log_like_the_general_one(
    built: BuiltLog,
) -> None:
    envelopes = _envelope_rows(built)
    kinds = {(decode_entry(d).accepted, decode_entry(d).message_type) for d in envelopes}  # type: ignore[union-attr]
    assert len(kinds) >= 3  # accepted inputs, rejected inputs, accepted stand-ins
    for data in envelopes:
        fast = codec.decode_envelope_fast(data)
        assert fast is not None
        assert fast == _general_decode(data)
        assert encode_entry(fast) == data


def test_the_fast_envelope_decoder_never_accepts_what_the_general_decoder_rejects(
    built: BuiltLog,
) -> None:
    rng = random.Random(1)
    envelopes = _envelope_rows(built)
    accepted_mutants = 0
    for _ in range(3000):
        data = bytearray(rng.choice(envelopes))
        how = rng.randrange(5)
        pos = rng.randrange(len(data))
        if how == 0:
            data[pos] ^= 1 << rng.randrange(8)
        elif how == 1:
            del data[pos:]
        elif how == 2:
            data.insert(pos, rng.randrange(256))
        elif how == 3:
            data[pos] = rng.choice([0, 1, 2, 0x7F, 0xC0, 0xFF])
        else:
            data += bytes(rng.randrange(1, 4))  # trailing bytes
        mutated = bytes(data)
        general = _general_decode(mutated)
        envelope_header = mutated[:2] == bytes([entries.ENTRY_VERSION, EntryKind.ENVELOPE])
        # decode_entry only takes the fast path for a version-1 envelope header.
        fast = codec.decode_envelope_fast(mutated) if envelope_header else None
        if fast is None:
            pass  # handed over to the general decoder
        else:
            assert fast == general, mutated.hex()
            accepted_mutants += 1
        # decode_entry (fast path first) behaves exactly like the general decoder.
        if isinstance(general, DecodeError):
            with pytest.raises(DecodeError):
                decode_entry(mutated)
        elif envelope_header:
            assert decode_entry(mutated) == general
    assert accepted_mutants > 0  # some flips land in hashes/payload bytes and stay decodable


_digests = st.none() | st.binary(min_size=32, max_size=32)
_texts = st.text(max_size=20)


@given(
    stage=_texts,
    site=_texts,
    mtype=st.text(min_size=1, max_size=40),
    accepted=st.booleans(),
    reason=st.text(min_size=1, max_size=30),
    payload=st.binary(max_size=300),
    signature=st.binary(max_size=80),
    root=_digests,
    bulk=_digests,
    examples=st.none() | st.integers(min_value=0, max_value=(1 << 64) - 1),
    model=_digests,
    rnd=st.integers(min_value=0, max_value=(1 << 32) - 1),
)
def test_any_valid_envelope_record_round_trips_through_the_fast_decoder(
    stage: str,
    site: str,
    mtype: str,
    accepted: bool,
    reason: str,
    payload: bytes,
    signature: bytes,
    root: bytes | None,
    bulk: bytes | None,
    examples: int | None,
    model: bytes | None,
    rnd: int,
) -> None:
    record = EnvelopeRecord(
        b"R" * 16, rnd, stage, site, mtype, b"K" * 32, accepted, "" if accepted else reason,
        payload, signature, root, bulk, examples, model,
    )  # fmt: skip
    data = encode_entry(record)
    fast = codec.decode_envelope_fast(data)
    assert fast == record
    assert decode_entry(data) == record
    # Breaking the accepted/reason rule in the bytes is left to the general decoder.
    flag_at = 2 + 16 + 4 + 2 + len(stage.encode()) + 2 + len(site.encode()) + 2
    flag_at += len(mtype.encode()) + 32
    flipped = bytearray(data)
    flipped[flag_at] ^= 1
    assert codec.decode_envelope_fast(bytes(flipped)) is None
    with pytest.raises(DecodeError):
        decode_entry(bytes(flipped))


def _slow_input_agrees(e: EnvelopeRecord) -> bool:
    """The general cross-check: decode the payload fully and compare every recorded field."""
    try:
        msg = decode_payload(MessageKind.MASKED_INPUT, e.payload, Limits())
    except ProtocolError:
        return False
    assert isinstance(msg, MaskedInput)
    h = msg.header
    return (
        h.run_id == e.run_id
        and h.round == e.round
        and h.sender == e.site
        and (e.model_digest is None or h.model_digest == e.model_digest)
        and msg.dataset_root == e.dataset_root
        and msg.bulk_digest == e.bulk_digest
        and msg.example_count == e.num_examples
    )


def test_the_fast_input_cross_check_agrees_with_a_full_payload_decode(built: BuiltLog) -> None:
    inputs = [
        e
        for e in map(decode_entry, _envelope_rows(built))
        if isinstance(e, EnvelopeRecord) and e.accepted and e.message_type == INPUT_MESSAGE_TYPE
    ]
    assert inputs and all(signatures.input_agrees(e) for e in inputs)
    rng = random.Random(2)
    fast_yes = 0
    for _ in range(2000):
        e = rng.choice(inputs)
        payload = bytearray(e.payload)
        pos = rng.randrange(len(payload))
        how = rng.randrange(4)
        if how == 0:
            payload[pos] ^= 1 << rng.randrange(8)
        elif how == 1:
            del payload[pos:]
        elif how == 2:
            payload.insert(pos, rng.randrange(256))
        else:
            payload += bytes(rng.randrange(1, 4))  # trailing bytes
        mutant = dataclasses.replace(e, payload=bytes(payload))
        fast = signatures.input_agrees(mutant)
        slow = _slow_input_agrees(mutant)
        if fast:
            fast_yes += 1
            assert slow, bytes(payload).hex()
        # The public check (fast path, then the general one) passes exactly when the slow one does.
        try:
            signatures.cross_check(mutant)
            passed = True
        except RuleViolation:
            passed = False
        assert passed == slow
    assert fast_yes > 0  # flips in fields nobody cross-checks (setup digest, vector length)


def test_recorded_fields_are_compared_on_the_fast_path_too(built: BuiltLog) -> None:
    e = next(
        x
        for x in map(decode_entry, _envelope_rows(built))
        if isinstance(x, EnvelopeRecord) and x.accepted and x.message_type == INPUT_MESSAGE_TYPE
    )
    for change in (
        {"num_examples": (e.num_examples or 0) + 1},
        {"dataset_root": digest("other root")},
        {"bulk_digest": digest("other bulk")},
        {"model_digest": digest("other model")},
        {"site": e.site + "x"},
        {"round": e.round + 1},
        {"run_id": b"\x00" * 16},
    ):
        forged = dataclasses.replace(e, **change)  # type: ignore[arg-type]
        assert not signatures.input_agrees(forged)
        with pytest.raises(RuleViolation) as err:
            signatures.cross_check(forged)
        assert err.value.check == "payload-mismatch"


def test_cached_public_keys_still_reject_a_signature_swapped_between_sites() -> None:
    a, b = generate_identity_key(), generate_identity_key()
    der_a, der_b = public_key_to_der(a.public_key()), public_key_to_der(b.public_key())
    run_id = b"R" * 16

    def job(index: int, key_der: bytes, signer: object, site: str) -> SignatureJob:
        payload = masked_input_payload(run_id, 1, site, b"m" * 32, b"r" * 32, 7, b"b" * 32)
        sig = sign(signer, INPUT_MESSAGE_TYPE, payload)  # type: ignore[arg-type]
        rec = EnvelopeRecord(
            run_id, 1, "masked_input", site, INPUT_MESSAGE_TYPE, b"k" * 32, True, "", payload,
            sig, b"r" * 32, b"b" * 32, 7, b"m" * 32,
        )  # fmt: skip
        return SignatureJob(index, key_der, rec)

    good_a, good_b = job(1, der_a, a, "site-a"), job(2, der_b, b, "site-b")
    # Warm the per-process key cache with both keys.
    assert check_signatures_serial([good_a, good_b]) is None
    assert signatures._KEY_CACHE.get(der_a) is not None
    swapped = SignatureJob(
        3, der_a, dataclasses.replace(good_a.record, signature=good_b.record.signature)
    )
    bad = check_signatures_serial([good_a, good_b, swapped])
    assert bad is not None and bad.position == 2 and bad.check == "signature"
    # The right signature under the other site's (cached) key is rejected as well.
    wrong_key = SignatureJob(4, der_b, good_a.record)
    bad = check_signatures_serial([wrong_key])
    assert bad is not None and bad.position == 0 and bad.check == "signature"


def _store_with(path: Path, n: int) -> list[bytes]:
    leaves = [b"leaf %d " % i + bytes([i % 251]) * (i % 7) for i in range(n)]
    with MerkleLogStore.open(path) as store:
        store.append_many((1, leaf, None, None) for leaf in leaves)
    return leaves


@pytest.mark.parametrize("batch", [1, 2, 3, 7, 16, 36, 37, 38, 1000])
def test_batched_row_reads_neither_skip_nor_repeat_an_entry_at_a_batch_boundary(
    tmp_path: Path, batch: int
) -> None:
    leaves = _store_with(tmp_path / "rows.sqlite", 37)
    with MerkleLogStore.open(tmp_path / "rows.sqlite", read_only=True) as store:
        rows = list(store.iter_leaf_rows(batch=batch))
        assert [i for i, _, _ in rows] == list(range(37))
        assert [d for _, d, _ in rows] == leaves
        assert [(e.index, e.data, e.leaf_hash) for e in store.iter_entries()] == rows
        part = list(store.iter_leaf_rows(5, 30, batch=batch))
        assert [i for i, _, _ in part] == list(range(5, 30))


def test_a_deleted_row_shows_as_a_gap_in_the_batched_scan(tmp_path: Path) -> None:
    path = tmp_path / "gap.sqlite"
    _store_with(path, 20)
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM entries WHERE idx=8")
    conn.commit()
    conn.close()
    with MerkleLogStore.open(path, read_only=True) as store:
        for batch in (1, 4, 8, 9, 100):
            assert [i for i, _, _ in store.iter_leaf_rows(batch=batch)] == [
                i for i in range(20) if i != 8
            ]
        with pytest.raises(ValueError):
            list(store.iter_leaf_rows(batch=0))


def test_the_row_scan_and_the_entry_scan_give_the_same_verdict(built: BuiltLog) -> None:
    with MerkleLogStore.open(built.path, read_only=True) as store:
        heads = store.tree_heads()
        by_rows = AuditVerifier().run_rows(store.iter_leaf_rows(batch=5), heads)
        by_entries = AuditVerifier().run(store.iter_entries(), heads)
    assert by_rows == by_entries
    assert by_rows.signatures == by_rows.accepted_envelopes > 0
    assert verify_log(built.path) == by_rows


def test_fl_audit_verify_on_the_row_scan_names_a_flipped_payload_byte(
    built: BuiltLog, tmp_path: Path
) -> None:
    import shutil

    from fedseal.crypto.merkle import leaf_hash

    path = tmp_path / "flip.sqlite"
    shutil.copy(built.path, path)
    i = built.input_index[("site-b", 2)]
    conn = sqlite3.connect(path)
    (data,) = conn.execute("SELECT data FROM entries WHERE idx=?", (i,)).fetchone()
    forged = bytearray(data)
    forged[-60] ^= 0x01  # inside the recorded bulk digest / example count area
    conn.execute(
        "UPDATE entries SET data=?, leaf_hash=? WHERE idx=?",
        (bytes(forged), leaf_hash(bytes(forged)), i),
    )
    conn.commit()
    conn.close()
    with pytest.raises(AuditVerificationError) as err:
        verify_log(path, jobs=1)
    assert err.value.index == i and err.value.check == "payload-mismatch"


@given(st.lists(st.binary(max_size=3), max_size=8))
def test_the_sorted_and_unique_check_accepts_exactly_strictly_increasing_lists(
    values: list[bytes],
) -> None:
    strictly_increasing = all(a < b for a, b in itertools.pairwise(values))
    try:
        entries._check_sorted_unique(values, "values")
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == strictly_increasing
