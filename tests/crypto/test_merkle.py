"""Behaviour and property tests for fedseal.crypto.merkle."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedseal.crypto import (
    HashSizeError,
    MerkleProofError,
    ProofLengthError,
    RootMismatchError,
    merkle,
)


def reference_root(leaves: list[bytes]) -> bytes:
    """MTH exactly as written in RFC 9162 §2.1.1 (recursive; small trees only)."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1 << ((n - 1).bit_length() - 1)
    return hashlib.sha256(
        b"\x01" + reference_root(leaves[:k]) + reference_root(leaves[k:])
    ).digest()


def make_leaves(n: int) -> list[bytes]:
    return [b"leaf-%d" % i for i in range(n)]


@given(st.integers(min_value=0, max_value=300))
def test_root_equals_the_recursive_rfc_definition_for_every_size(n: int) -> None:
    leaves = make_leaves(n)
    assert merkle.root(leaves) == reference_root(leaves)
    assert merkle.root_from_leaf_hashes(merkle.leaf_hashes(leaves)) == reference_root(leaves)


@given(st.data())
def test_inclusion_proofs_verify_for_random_sizes_and_indices(data: st.DataObject) -> None:
    n = data.draw(st.integers(min_value=1, max_value=400))
    index = data.draw(st.integers(min_value=0, max_value=n - 1))
    leaves = make_leaves(n)
    head = merkle.root(leaves)
    proof = merkle.inclusion_proof(leaves, index)
    merkle.verify_inclusion(merkle.leaf_hash(leaves[index]), index, n, proof, head)
    # A different leaf or index is refused. (A different tree size can verify against the same
    # root under RFC 6962, e.g. leaf 0 of 3 vs of 4: the size must be authenticated with the root.)
    with pytest.raises(MerkleProofError):
        merkle.verify_inclusion(merkle.leaf_hash(b"other"), index, n, proof, head)
    if n > 1:
        with pytest.raises(MerkleProofError):
            merkle.verify_inclusion(
                merkle.leaf_hash(leaves[index]), (index + 1) % n, n, proof, head
            )


@given(st.data())
def test_consistency_proofs_verify_for_random_sizes(data: st.DataObject) -> None:
    new = data.draw(st.integers(min_value=1, max_value=400))
    old = data.draw(st.integers(min_value=1, max_value=new))
    leaves = make_leaves(new)
    old_root, new_root = merkle.root(leaves[:old]), merkle.root(leaves)
    proof = merkle.consistency_proof(leaves, old)
    merkle.verify_consistency(old, new, old_root, new_root, proof)
    forked = [*leaves[: old - 1], b"forked", *leaves[old:]]
    with pytest.raises(MerkleProofError):
        merkle.verify_consistency(old, new, old_root, merkle.root(forked), proof)


@given(st.data())
def test_proofs_from_a_subtree_callable_equal_proofs_from_leaf_hashes(data: st.DataObject) -> None:
    n = data.draw(st.integers(min_value=1, max_value=300))
    index = data.draw(st.integers(min_value=0, max_value=n - 1))
    old = data.draw(st.integers(min_value=1, max_value=n))
    hashes = merkle.leaf_hashes(make_leaves(n))
    calls: list[tuple[int, int]] = []

    def perfect_root(start: int, size: int) -> bytes:
        assert size & (size - 1) == 0 and start % size == 0
        calls.append((start, size))
        return merkle.root_from_leaf_hashes(hashes[start : start + size])

    def subtree_root(start: int, end: int) -> bytes:
        return merkle.root_from_perfect_subtrees(start, end, perfect_root)

    assert merkle.inclusion_proof_from_subtrees(
        subtree_root, index, n
    ) == merkle.inclusion_proof_from_leaf_hashes(hashes, index)
    assert merkle.consistency_proof_from_subtrees(
        subtree_root, old, n
    ) == merkle.consistency_proof_from_leaf_hashes(hashes, old)
    assert merkle.root_from_perfect_subtrees(0, n, perfect_root) == merkle.root_from_leaf_hashes(
        hashes
    )
    assert calls  # the perfect-subtree callable was really used


def test_root_from_perfect_subtrees_refuses_an_unaligned_range() -> None:
    with pytest.raises(ValueError):
        merkle.root_from_perfect_subtrees(3, 7, lambda s, n: b"\x00" * 32)


def test_a_tree_of_a_million_leaves_has_the_rfc_root_without_recursion_limits() -> None:
    # 2**20 equal leaf hashes (a perfect left subtree whose root is h hashed with itself 20
    # times) followed by 3 more: the root must be node_hash(left, MTH(last 3)), RFC 9162 §2.1.1.
    same = hashlib.sha256(b"same").digest()
    tail = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
    left = same
    for _ in range(20):
        left = merkle.node_hash(left, left)
    right = merkle.node_hash(merkle.node_hash(tail[0], tail[1]), tail[2])
    assert merkle.root_from_leaf_hashes([same] * (1 << 20) + tail) == merkle.node_hash(left, right)


def test_leaf_hashes_of_the_wrong_size_are_a_programming_error() -> None:
    with pytest.raises(ValueError):
        merkle.root_from_leaf_hashes([b"\x00" * 32, b"\x00" * 31])


def test_proof_generation_refuses_out_of_range_arguments() -> None:
    leaves = make_leaves(5)
    with pytest.raises(ValueError):
        merkle.inclusion_proof(leaves, 5)
    with pytest.raises(ValueError):
        merkle.consistency_proof(leaves, 0)
    with pytest.raises(ValueError):
        merkle.consistency_proof(leaves, 6)


def test_verification_errors_have_precise_types() -> None:
    leaves = make_leaves(7)
    head = merkle.root(leaves)
    proof = merkle.inclusion_proof(leaves, 3)
    lh = merkle.leaf_hash(leaves[3])
    with pytest.raises(ProofLengthError) as too_short:
        merkle.verify_inclusion(lh, 3, 7, proof[:-1], head)
    assert (too_short.value.got, too_short.value.want) == (len(proof) - 1, len(proof))
    with pytest.raises(HashSizeError):
        merkle.verify_inclusion(lh[:31], 3, 7, proof, head)
    with pytest.raises(HashSizeError):
        merkle.verify_inclusion(lh, 3, 7, [proof[0] + b"\x00", *proof[1:]], head)
    with pytest.raises(RootMismatchError):
        merkle.verify_inclusion(lh, 3, 7, proof, merkle.root(leaves[:6]))
    with pytest.raises(MerkleProofError):
        merkle.verify_inclusion(lh, -1, 7, proof, head)
    with pytest.raises(MerkleProofError):
        merkle.verify_consistency(0, 7, merkle.EMPTY_ROOT, head, [])
    with pytest.raises(ProofLengthError):
        merkle.verify_consistency(3, 7, merkle.root(leaves[:3]), head, [])


def _mutations(value: bytes) -> list[bytes]:
    """Every single-byte mutation (each position, flipped by 0x01 and by 0x80)."""
    out = []
    for i in range(len(value)):
        for mask in (0x01, 0x80):
            out.append(value[:i] + bytes([value[i] ^ mask]) + value[i + 1 :])
    return out


def test_every_single_byte_mutation_of_an_inclusion_proof_is_refused() -> None:
    leaves = make_leaves(11)
    index, head = 6, merkle.root(leaves)
    lh = merkle.leaf_hash(leaves[index])
    proof = merkle.inclusion_proof(leaves, index)
    merkle.verify_inclusion(lh, index, 11, proof, head)
    for bad in _mutations(lh):
        with pytest.raises(MerkleProofError):
            merkle.verify_inclusion(bad, index, 11, proof, head)
    for bad in _mutations(head):
        with pytest.raises(MerkleProofError):
            merkle.verify_inclusion(lh, index, 11, proof, bad)
    for k, h in enumerate(proof):
        for bad in _mutations(h):
            with pytest.raises(MerkleProofError):
                merkle.verify_inclusion(lh, index, 11, [*proof[:k], bad, *proof[k + 1 :]], head)


def test_every_single_byte_mutation_of_a_consistency_proof_is_refused() -> None:
    leaves = make_leaves(13)
    old, new = 6, 13
    old_root, new_root = merkle.root(leaves[:old]), merkle.root(leaves)
    proof = merkle.consistency_proof(leaves, old)
    merkle.verify_consistency(old, new, old_root, new_root, proof)
    for bad in _mutations(old_root):
        with pytest.raises(MerkleProofError):
            merkle.verify_consistency(old, new, bad, new_root, proof)
    for bad in _mutations(new_root):
        with pytest.raises(MerkleProofError):
            merkle.verify_consistency(old, new, old_root, bad, proof)
    for k, h in enumerate(proof):
        for bad in _mutations(h):
            with pytest.raises(MerkleProofError):
                merkle.verify_consistency(
                    old, new, old_root, new_root, [*proof[:k], bad, *proof[k + 1 :]]
                )


# --- compact range ----------------------------------------------------------------------------


@given(st.lists(st.binary(max_size=8), max_size=70))
def test_a_compact_range_has_the_root_of_every_prefix_it_grows_through(leaves: list[bytes]) -> None:
    rng = merkle.CompactRange()
    assert rng.root() == merkle.root([]) == merkle.EMPTY_ROOT
    for n, leaf in enumerate(leaves, 1):
        rng.append(merkle.leaf_hash(leaf))
        assert rng.size == n
        assert len(rng.roots) == n.bit_count()
        assert rng.root() == merkle.root(leaves[:n])


@given(st.lists(st.binary(max_size=4), min_size=1, max_size=70))
def test_a_compact_range_reports_every_completed_perfect_subtree_once_with_its_root(
    leaves: list[bytes],
) -> None:
    seen: list[tuple[int, int, bytes]] = []
    rng = merkle.CompactRange()
    for leaf in leaves:
        rng.append(merkle.leaf_hash(leaf), lambda h, k, root: seen.append((h, k, root)))
    n = len(leaves)
    want = {
        (h, k): merkle.root(leaves[k << h : (k + 1) << h])
        for h in range(1, n.bit_length())
        for k in range(n >> h)
    }
    assert len(seen) == len(want)
    assert {(h, k): root for h, k, root in seen} == want


@given(st.lists(st.binary(max_size=4), max_size=40), st.lists(st.binary(max_size=4), max_size=20))
def test_a_compact_range_rebuilt_from_perfect_subtree_roots_continues_like_the_original(
    head: list[bytes], tail: list[bytes]
) -> None:
    def perfect_root(start: int, width: int) -> bytes:
        return merkle.root(head[start : start + width])

    rebuilt = merkle.CompactRange.from_perfect_subtrees(len(head), perfect_root)
    assert rebuilt.root() == merkle.root(head)
    copy = rebuilt.copy()
    for leaf in tail:
        rebuilt.append(merkle.leaf_hash(leaf))
    assert rebuilt.root() == merkle.root(head + tail)
    assert copy.root() == merkle.root(head) and copy.size == len(head)  # the copy is independent


def test_a_compact_range_needs_one_root_per_set_bit_of_its_size() -> None:
    with pytest.raises(ValueError):
        merkle.CompactRange([b"\x00" * 32], 3)
    with pytest.raises(ValueError):
        merkle.CompactRange([b"\x00" * 31], 1)
    assert merkle.CompactRange([b"\x01" * 32, b"\x02" * 32], 3).size == 3
