"""fl-audit's verifier: a real run verifies; every kind of tampering is caught and located."""

from __future__ import annotations

import random
import shutil
import sqlite3
from pathlib import Path

import pytest

from fedseal.audit.codec import decode_entry, encode_entry
from fedseal.audit.entries import EnvelopeRecord
from fedseal.audit.errors import AuditVerificationError, LogFormatError
from fedseal.audit.signatures import JobFailure, SignatureJob, check_signatures_serial
from fedseal.audit.store import MerkleLogStore, StoredEntry, StoredTreeHead
from fedseal.audit.treehead import SignedTreeHead
from fedseal.audit.verifier import AuditVerifier
from fedseal.crypto import merkle
from fedseal.crypto.keys import generate_identity_key, public_key_to_der
from fedseal.protocol.roster import Roster, RosterEntry
from tests.audit.logbuilder import BuiltLog, build_run_log


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> BuiltLog:
    return build_run_log(tmp_path_factory.mktemp("log") / "audit.sqlite")


def _read(path: Path) -> tuple[list[StoredEntry], list[StoredTreeHead]]:
    with MerkleLogStore.open(path, read_only=True) as store:
        return list(store.iter_entries()), store.tree_heads()


def _verify(path: Path, **kw: object) -> None:
    entries, heads = _read(path)
    AuditVerifier(**kw).run(entries, heads)  # type: ignore[arg-type]


def _copy(built: BuiltLog, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.sqlite"
    shutil.copy(built.path, dst)
    return dst


def _sql(path: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    conn = sqlite3.connect(path)
    for sql, args in statements:
        conn.execute(sql, args)
    conn.commit()
    conn.close()


def _row(path: Path, index: int) -> tuple[bytes, bytes]:
    conn = sqlite3.connect(path)
    data, lh = conn.execute("SELECT data, leaf_hash FROM entries WHERE idx=?", (index,)).fetchone()
    conn.close()
    return data, lh


def test_a_complete_run_verifies_with_every_signature_checked(built: BuiltLog) -> None:
    entries, heads = _read(built.path)
    result = AuditVerifier(coordinator_key=built.coordinator.public_key()).run(entries, heads)
    assert result.entries == len(entries)
    assert result.signatures == result.accepted_envelopes > 0
    assert result.rejected_envelopes == 5
    assert result.runs[0][1:] == ("completed", 3, 0)
    assert result.warnings == ()
    with MerkleLogStore.open(built.path, read_only=True) as store:
        assert result.root_hash == store.root()


def test_a_pinned_coordinator_key_that_differs_from_the_genesis_key_fails(built: BuiltLog) -> None:
    with pytest.raises(AuditVerificationError) as err:
        _verify(built.path, coordinator_key=generate_identity_key().public_key())
    assert err.value.index == 0 and err.value.check == "coordinator-key"


def test_a_trusted_roster_that_disagrees_with_an_enrolment_fails(built: BuiltLog) -> None:
    sites = sorted(built.sites)
    entries = [
        RosterEntry.from_der(s, public_key_to_der(built.sites[s].public_key()), [built.roots[s]])
        for s in sites[1:]
    ]
    entries.append(
        RosterEntry.from_der(
            sites[0],
            public_key_to_der(generate_identity_key().public_key()),
            [built.roots[sites[0]]],
        )
    )
    with pytest.raises(AuditVerificationError) as err:
        _verify(built.path, trusted_roster=Roster(entries))
    assert err.value.check == "trusted-roster" and err.value.index == 1


def test_a_trusted_roster_that_agrees_passes(built: BuiltLog) -> None:
    roster = Roster(
        RosterEntry.from_der(s, public_key_to_der(k.public_key()), [built.roots[s]])
        for s, k in built.sites.items()
    )
    _verify(built.path, trusted_roster=roster)


def test_flipping_a_byte_of_an_entry_in_the_database_names_that_entry(
    built: BuiltLog, tmp_path: Path
) -> None:
    path = _copy(built, tmp_path)
    data, _ = _row(path, 12)
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x01
    _sql(path, ("UPDATE entries SET data=? WHERE idx=12", (bytes(bad),)))
    with pytest.raises(AuditVerificationError) as err:
        _verify(path)
    assert err.value.index == 12 and err.value.check == "leaf-hash"


def test_flipping_a_byte_and_fixing_the_stored_hashes_is_caught_by_the_signed_tree_head(
    built: BuiltLog, tmp_path: Path
) -> None:
    path = _copy(built, tmp_path)
    entry = decode_entry(_row(path, 10)[0])
    assert isinstance(entry, EnvelopeRecord) and not entry.accepted
    forged = _forge_reason(entry)
    _sql(
        path,
        ("UPDATE entries SET data=?, leaf_hash=? WHERE idx=10", (forged, merkle.leaf_hash(forged))),
    )
    with pytest.raises(AuditVerificationError) as err:
        _verify(path)
    assert err.value.check == "tree-head-root" and err.value.tree_head_seq == 2


def _forge_reason(entry: EnvelopeRecord) -> bytes:
    import dataclasses

    return encode_entry(dataclasses.replace(entry, reason="a different, innocent reason"))


def test_flipping_a_byte_in_the_raw_database_file_is_caught(
    built: BuiltLog, tmp_path: Path
) -> None:
    path = _copy(built, tmp_path)
    data, _ = _row(path, 20)
    raw = bytearray(path.read_bytes())
    at = raw.find(data)
    assert at >= 0
    raw[at + len(data) - 3] ^= 0x80
    path.write_bytes(bytes(raw))
    with pytest.raises(AuditVerificationError) as err:
        _verify(path)
    assert err.value.index == 20


def test_deleting_an_entry_names_the_missing_index(built: BuiltLog, tmp_path: Path) -> None:
    path = _copy(built, tmp_path)
    _sql(path, ("DELETE FROM entries WHERE idx=17", ()))
    with pytest.raises(AuditVerificationError) as err:
        _verify(path)
    assert err.value.index == 17 and err.value.check == "missing-entry"


def test_deleting_an_entry_and_renumbering_the_rest_is_caught(
    built: BuiltLog, tmp_path: Path
) -> None:
    path = _copy(built, tmp_path)
    _sql(
        path,
        ("DELETE FROM entries WHERE idx=17", ()),
        ("UPDATE entries SET idx=idx-1 WHERE idx>17", ()),
    )
    with pytest.raises(AuditVerificationError) as err:
        _verify(path)
    assert err.value.tree_head_seq is not None or (err.value.index or 0) >= 17


def test_reordering_two_entries_is_caught(built: BuiltLog, tmp_path: Path) -> None:
    path = _copy(built, tmp_path)
    a, b = _row(path, 11), _row(path, 13)
    _sql(
        path,
        ("UPDATE entries SET data=?, leaf_hash=? WHERE idx=11", b),
        ("UPDATE entries SET data=?, leaf_hash=? WHERE idx=13", a),
    )
    with pytest.raises(AuditVerificationError) as err:
        _verify(path)
    assert err.value.tree_head_seq is not None or err.value.index in (11, 12, 13)


def test_truncating_the_log_is_caught_by_the_last_tree_head(
    built: BuiltLog, tmp_path: Path
) -> None:
    path = _copy(built, tmp_path)
    _sql(path, ("DELETE FROM entries WHERE idx>=30", ()))
    with pytest.raises(AuditVerificationError) as err:
        _verify(path)
    assert err.value.check == "truncated"


def test_truncating_the_database_file_makes_verification_fail(
    built: BuiltLog, tmp_path: Path
) -> None:
    path = _copy(built, tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises((AuditVerificationError, LogFormatError)):
        _verify(path)


def test_swapping_signatures_between_two_envelopes_names_the_first(
    built: BuiltLog, tmp_path: Path
) -> None:
    import dataclasses

    path = _copy(built, tmp_path)
    i, j = built.input_index[("site-b", 1)], built.input_index[("site-c", 1)]
    ei, ej = decode_entry(_row(path, i)[0]), decode_entry(_row(path, j)[0])
    assert isinstance(ei, EnvelopeRecord) and isinstance(ej, EnvelopeRecord)
    ni = encode_entry(dataclasses.replace(ei, signature=ej.signature))
    nj = encode_entry(dataclasses.replace(ej, signature=ei.signature))
    _sql(
        path,
        ("UPDATE entries SET data=?, leaf_hash=? WHERE idx=?", (ni, merkle.leaf_hash(ni), i)),
        ("UPDATE entries SET data=?, leaf_hash=? WHERE idx=?", (nj, merkle.leaf_hash(nj), j)),
    )
    with pytest.raises(AuditVerificationError) as err:
        _verify(path)
    assert err.value.index == i and err.value.check == "signature"


def test_replacing_a_tree_head_with_one_signed_by_another_key_is_caught(
    built: BuiltLog, tmp_path: Path
) -> None:
    path = _copy(built, tmp_path)
    _, heads = _read(path)
    head = SignedTreeHead.from_bytes(heads[2].blob)
    fake = SignedTreeHead.create(
        generate_identity_key(),
        log_id=head.log_id,
        tree_size=head.tree_size,
        root_hash=head.root_hash,
        timestamp_ms=head.timestamp_ms,
    )
    _sql(path, ("UPDATE tree_heads SET blob=? WHERE seq=?", (fake.to_bytes(), heads[2].seq)))
    with pytest.raises(AuditVerificationError) as err:
        _verify(path)
    assert err.value.tree_head_seq == heads[2].seq and err.value.check == "tree-head-signature"


def test_replacing_a_tree_head_with_an_earlier_genuine_one_is_caught(
    built: BuiltLog, tmp_path: Path
) -> None:
    path = _copy(built, tmp_path)
    _, heads = _read(path)
    _sql(
        path,
        (
            "UPDATE tree_heads SET blob=?, tree_size=? WHERE seq=?",
            (heads[1].blob, heads[1].tree_size, heads[2].seq),
        ),
    )
    with pytest.raises(AuditVerificationError) as err:
        _verify(path)
    assert err.value.check == "missing-tree-head"


def test_deleting_the_final_tree_head_is_caught(built: BuiltLog, tmp_path: Path) -> None:
    path = _copy(built, tmp_path)
    _sql(path, ("DELETE FROM tree_heads WHERE seq=(SELECT max(seq) FROM tree_heads)", ()))
    with pytest.raises(AuditVerificationError) as err:
        _verify(path)
    assert err.value.check == "missing-tree-head" and err.value.entry_type == "run-end"


# --- randomized tampering --------------------------------------------------------------------


def _mutate(
    rng: random.Random, entries: list[StoredEntry], heads: list[StoredTreeHead]
) -> tuple[list[StoredEntry], list[StoredTreeHead], str, int | None]:
    e, h = list(entries), list(heads)
    n = len(e)
    kind = rng.choice(
        ["flip", "flip-rehash", "delete", "swap", "truncate", "head-flip", "renumber"]
    )
    if kind in ("flip", "flip-rehash"):
        i = rng.randrange(n)
        data = bytearray(e[i].data)
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
        lh = merkle.leaf_hash(bytes(data)) if kind == "flip-rehash" else e[i].leaf_hash
        e[i] = StoredEntry(i, e[i].kind, bytes(data), lh)
        return e, h, kind, i
    if kind == "delete":
        i = rng.randrange(n)
        del e[i]
        return e, h, kind, i
    if kind == "renumber":
        i = rng.randrange(n)
        del e[i]
        e = [StoredEntry(k, x.kind, x.data, x.leaf_hash) for k, x in enumerate(e)]
        return e, h, kind, i
    if kind == "swap":
        i, j = sorted(rng.sample(range(n), 2))
        e[i], e[j] = (
            StoredEntry(i, e[j].kind, e[j].data, e[j].leaf_hash),
            StoredEntry(j, e[i].kind, e[i].data, e[i].leaf_hash),
        )
        return e, h, kind, i
    if kind == "truncate":
        k = rng.randrange(1, n)
        return e[: n - k], h, kind, None
    t = rng.randrange(len(h))
    blob = bytearray(h[t].blob)
    blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
    h[t] = StoredTreeHead(h[t].seq, h[t].tree_size, h[t].root_hash, h[t].timestamp_ms, bytes(blob))
    return e, h, kind, None


def _memo_checker() -> object:
    """check_signatures_serial, remembering verdicts per unchanged job (ECDSA is deterministic
    for fixed key, bytes and signature); a mutated record is a new key, so it is really checked."""
    cache: dict[tuple[int, bytes, bytes], object] = {}

    def check(jobs: list[SignatureJob]) -> object:
        for pos, job in enumerate(jobs):
            key = (job.index, job.public_key_der, encode_entry(job.record))
            if key not in cache:
                cache[key] = check_signatures_serial([job])
            bad = cache[key]
            if bad is not None:
                return JobFailure(pos, bad.check, bad.detail)  # type: ignore[attr-defined]
        return None

    return check


def test_a_thousand_random_mutations_are_all_caught_and_located(tmp_path: Path) -> None:
    small = build_run_log(tmp_path / "small.sqlite", n_sites=3, rounds=2, revoke_last_after_round=1)
    entries, heads = _read(small.path)
    assert len(entries) > 20 and len(heads) >= 4
    rng = random.Random(6962)
    seen: dict[str, int] = {}
    checker = _memo_checker()
    for _ in range(1000):
        e, h, kind, where = _mutate(rng, entries, heads)
        with pytest.raises(AuditVerificationError) as err:
            AuditVerifier(check_signatures=checker).run(e, h)  # type: ignore[arg-type]
        seen[kind] = seen.get(kind, 0) + 1
        if kind == "flip":
            assert err.value.index == where and err.value.check == "leaf-hash"
        elif kind == "delete" and where != len(entries) - 1:
            assert err.value.index == where and err.value.check == "missing-entry"
        elif kind in ("flip-rehash", "swap", "renumber"):
            # Located at the entry itself, a later one it breaks, or the first tree head covering it.
            assert where is not None
            assert (
                err.value.tree_head_seq is not None
                or err.value.check == "missing-tree-head"
                or (err.value.index is not None and err.value.index >= where)
            ), (kind, where, err.value)
    assert len(seen) == 7


def test_recorded_fields_that_disagree_with_the_signed_payload_are_named(
    built: BuiltLog, tmp_path: Path
) -> None:
    import dataclasses

    path = _copy(built, tmp_path)
    i = built.input_index[("site-c", 3)]
    entry = decode_entry(_row(path, i)[0])
    assert isinstance(entry, EnvelopeRecord)
    forged = encode_entry(dataclasses.replace(entry, num_examples=(entry.num_examples or 0) * 10))
    _sql(
        path,
        (
            "UPDATE entries SET data=?, leaf_hash=? WHERE idx=?",
            (forged, merkle.leaf_hash(forged), i),
        ),
    )
    with pytest.raises(AuditVerificationError) as err:
        _verify(path)
    assert err.value.index == i and err.value.check == "payload-mismatch"
