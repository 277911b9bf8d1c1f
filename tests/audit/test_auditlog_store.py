"""The SQLite Merkle log store: roots and proofs agree with the reference Merkle functions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedseal.audit.errors import LogFormatError, LogRangeError
from fedseal.audit.store import MerkleLogStore
from fedseal.crypto import merkle


def _leaves(n: int) -> list[bytes]:
    return [b"entry-%d" % i for i in range(n)]


def test_roots_and_proofs_at_every_size_match_the_reference_functions(tmp_path: Path) -> None:
    leaves = _leaves(70)
    with MerkleLogStore.open(tmp_path / "log.sqlite") as store:
        for leaf in leaves[:33]:
            store.append(1, leaf)
        store.append_many([(1, leaf, None, None) for leaf in leaves[33:]])
        for n in range(1, len(leaves) + 1):
            root = store.root(n)
            assert root == merkle.root(leaves[:n])
            for i in range(0, n, 7):
                merkle.verify_inclusion(
                    merkle.leaf_hash(leaves[i]), i, n, store.inclusion_proof(i, n), root
                )
            for m in range(1, n + 1, 5):
                merkle.verify_consistency(m, n, store.root(m), root, store.consistency_proof(m, n))


@given(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=40), st.data())
def test_any_sequence_of_appends_gives_the_rfc6962_root_and_valid_proofs(
    tmp_path_factory: pytest.TempPathFactory, leaves: list[bytes], data: st.DataObject
) -> None:
    path = tmp_path_factory.mktemp("h") / "log.sqlite"
    with MerkleLogStore.open(path) as store:
        store.append_many([(0, leaf, None, None) for leaf in leaves])
        n = len(leaves)
        assert store.root() == merkle.root(leaves)
        i = data.draw(st.integers(0, n - 1))
        size = data.draw(st.integers(i + 1, n))
        merkle.verify_inclusion(
            merkle.leaf_hash(leaves[i]),
            i,
            size,
            store.inclusion_proof(i, size),
            merkle.root(leaves[:size]),
        )
        old = data.draw(st.integers(1, n))
        merkle.verify_consistency(
            old, n, merkle.root(leaves[:old]), store.root(), store.consistency_proof(old, n)
        )


def test_a_reopened_log_continues_the_same_tree(tmp_path: Path) -> None:
    leaves = _leaves(13)
    with MerkleLogStore.open(tmp_path / "log.sqlite") as store:
        for leaf in leaves[:11]:
            store.append(2, leaf, site="s", round=1)
    with MerkleLogStore.open(tmp_path / "log.sqlite") as store:
        assert store.size == 11
        for leaf in leaves[11:]:
            store.append(2, leaf)
        assert store.root() == merkle.root(leaves)
        assert store.find(2, round=1, site="s") == list(range(11))


def test_a_second_writer_connection_sees_and_extends_the_same_tree(tmp_path: Path) -> None:
    leaves = _leaves(9)
    a = MerkleLogStore.open(tmp_path / "log.sqlite")
    b = MerkleLogStore.open(tmp_path / "log.sqlite")
    for i, leaf in enumerate(leaves):
        (a if i % 2 else b).append(0, leaf)
    assert a.root() == b.root() == merkle.root(leaves)
    a.close()
    b.close()


def test_the_log_runs_in_wal_mode_with_full_synchronous_commits(tmp_path: Path) -> None:
    with MerkleLogStore.open(tmp_path / "log.sqlite") as store:
        store.append(0, b"x")
    conn = sqlite3.connect(tmp_path / "log.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_out_of_range_requests_raise_a_typed_error(tmp_path: Path) -> None:
    with MerkleLogStore.open(tmp_path / "log.sqlite") as store:
        store.append_many([(0, leaf, None, None) for leaf in _leaves(5)])
        with pytest.raises(LogRangeError):
            store.inclusion_proof(5, 5)
        with pytest.raises(LogRangeError):
            store.inclusion_proof(0, 6)
        with pytest.raises(LogRangeError):
            store.consistency_proof(0, 3)
        with pytest.raises(LogRangeError):
            store.root(6)
        with pytest.raises(ValueError):
            store.append(0, b"")


def test_a_file_that_is_not_a_fedseal_log_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(LogFormatError):
        MerkleLogStore.open(other)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(LogFormatError):
        MerkleLogStore.open(junk)


def test_a_read_only_store_refuses_appends(tmp_path: Path) -> None:
    with MerkleLogStore.open(tmp_path / "log.sqlite") as store:
        store.append(0, b"x")
    with MerkleLogStore.open(tmp_path / "log.sqlite", read_only=True) as ro:
        assert ro.size == 1
        with pytest.raises(PermissionError):
            ro.append(0, b"y")


def test_a_missing_stored_subtree_hash_is_reported_not_guessed(tmp_path: Path) -> None:
    with MerkleLogStore.open(tmp_path / "log.sqlite") as store:
        store.append_many([(0, leaf, None, None) for leaf in _leaves(8)])
    conn = sqlite3.connect(tmp_path / "log.sqlite")
    conn.execute("DELETE FROM nodes")
    conn.commit()
    conn.close()
    with pytest.raises(LogFormatError):
        MerkleLogStore.open(tmp_path / "log.sqlite")
