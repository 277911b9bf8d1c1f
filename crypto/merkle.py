"""RFC 6962 / RFC 9162 §2.1 Merkle tree hashes, inclusion and consistency proofs (SHA-256).

Example::

    from fedseal.crypto import merkle

    leaves = [b"a", b"b", b"c"]
    head = merkle.root(leaves)
    proof = merkle.inclusion_proof(leaves, 2)
    merkle.verify_inclusion(merkle.leaf_hash(b"c"), 2, len(leaves), proof, head)  # or raises

Definitions (RFC 9162 §2.1.1): ``MTH({}) = SHA-256()``, leaf hash ``SHA-256(0x00 || d)``,
node hash ``SHA-256(0x01 || left || right)``; a tree of ``n > 1`` leaves splits at ``k``, the
largest power of two smaller than ``n``. Leaves are raw leaf data; hashes are 32-byte ``bytes``.

Everything here is iterative (no recursion), so trees of any size work. Proof *generation* is
available over leaf data, over precomputed leaf hashes, and over a callable
``subtree_root(start, end) -> bytes`` so that a log store that keeps subtree hashes can build
proofs without reading every entry (see :func:`root_from_perfect_subtrees`). A log that grows
one leaf at a time keeps its root current with a :class:`CompactRange` (one root per perfect
subtree, ``O(1)`` amortised hashes per leaf).

Verification follows transparency-dev/merkle ``proof`` exactly: a root is recomputed from the
proof (:func:`root_from_inclusion_proof`) and then compared; proof lengths are checked strictly,
leaf and proof hashes must be 32 bytes, and a consistency proof from an empty tree is an error.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence

from .errors import HashSizeError, MerkleProofError, ProofLengthError, RootMismatchError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactRange",
    "NodeSink",
    "SubtreeRoot",
    "consistency_proof",
    "consistency_proof_from_leaf_hashes",
    "consistency_proof_from_subtrees",
    "inclusion_proof",
    "inclusion_proof_from_leaf_hashes",
    "inclusion_proof_from_subtrees",
    "leaf_hash",
    "leaf_hashes",
    "node_hash",
    "root",
    "root_from_inclusion_proof",
    "root_from_leaf_hashes",
    "root_from_perfect_subtrees",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
"""Size in bytes of every tree hash (SHA-256)."""

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""MTH of the empty tree (RFC 9162 §2.1.1)."""

SubtreeRoot = Callable[[int, int], bytes]
"""``subtree_root(start, end)``: the MTH of leaves ``[start, end)`` of the tree."""

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    """Return the RFC 6962 leaf hash ``SHA-256(0x00 || data)``."""
    return _sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the RFC 6962 interior node hash ``SHA-256(0x01 || left || right)``."""
    return _sha256(_NODE_PREFIX + left + right).digest()


def leaf_hashes(leaves: Sequence[bytes]) -> list[bytes]:
    """Return the leaf hash of every leaf, in order."""
    sha = _sha256
    prefix = _LEAF_PREFIX
    return [sha(prefix + d).digest() for d in leaves]


def _check_hashes(hashes: Sequence[bytes]) -> None:
    if hashes and set(map(len, hashes)) != {HASH_SIZE}:
        raise ValueError(f"every leaf hash must be {HASH_SIZE} bytes")


def _fold_levels(level: list[bytes]) -> bytes:
    # Level-by-level pairing with the odd last node carried up unchanged gives exactly the
    # RFC 9162 §2.1.1 split at the largest power of two below n.
    sha = _sha256
    prefix = _NODE_PREFIX
    while len(level) > 1:
        it = iter(level)
        nxt = [sha(prefix + left + right).digest() for left, right in zip(it, it, strict=False)]
        if len(level) & 1:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """Return the Merkle tree hash over precomputed leaf hashes (iterative, O(n) hashes).

    Args:
        hashes: Leaf hashes (32 bytes each), in leaf order.

    Raises:
        ValueError: If a hash is not 32 bytes (a programming error: hashes are local data).
    """
    if not hashes:
        return EMPTY_ROOT
    _check_hashes(hashes)
    return _fold_levels(list(hashes))


def root(leaves: Sequence[bytes]) -> bytes:
    """Return the Merkle tree hash of raw leaves (``EMPTY_ROOT`` for no leaves)."""
    if not leaves:
        return EMPTY_ROOT
    return _fold_levels(leaf_hashes(leaves))


def _largest_pow2_below(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_perfect_subtrees(
    start: int, end: int, perfect_root: Callable[[int, int], bytes]
) -> bytes:
    """Return the MTH of leaves ``[start, end)`` from roots of perfect, aligned subtrees.

    A log store that persists the root of every complete subtree ``[s, s + 2**h)`` with
    ``s % 2**h == 0`` can answer any ``subtree_root(start, end)`` needed by the proof
    functions with at most ``log2(end - start) + 1`` look-ups: the range splits into perfect
    subtrees of decreasing size, whose roots are folded from the right (RFC 9162 §2.1.1).

    Args:
        start: First leaf index; must be a multiple of the smallest power of two that is
            ``>= end - start`` (true for every subtree the RFC 9162 algorithms visit).
        end: One past the last leaf index (``end > start``).
        perfect_root: ``perfect_root(s, size)`` returns the root of leaves ``[s, s + size)``,
            where ``size`` is a power of two and ``s % size == 0``.

    Raises:
        ValueError: If the range is empty or not aligned as an RFC 9162 subtree.
    """
    size = end - start
    if start < 0 or size <= 0:
        raise ValueError("subtree range must be non-empty and non-negative")
    span = 1 << (size - 1).bit_length()
    if start % span:
        raise ValueError("start is not aligned to the subtree's size")
    parts: list[bytes] = []
    pos = start
    bit = span
    while bit:
        if size & bit:
            parts.append(perfect_root(pos, bit))
            pos += bit
        bit >>= 1
    acc = parts[-1]
    for h in reversed(parts[:-1]):
        acc = node_hash(h, acc)
    return acc


# --- compact range: the root of a growing tree, one leaf at a time ----------------------------

NodeSink = Callable[[int, int, bytes], None]
"""``sink(height, k, root)``: the perfect subtree ``[k * 2**height, (k + 1) * 2**height)``
(``height >= 1``) was just completed and has ``root``."""


class CompactRange:
    """The compact range ``[0, size)`` of a Merkle tree: the roots of the perfect, aligned
    subtrees the tree's leaves split into, largest first (one per set bit of ``size``).

    Appending leaf ``n`` merges one root per trailing one bit of ``n`` (amortised one node
    hash per leaf); folding the roots from the right gives the RFC 9162 §2.1.1 tree hash. A
    log that must persist or check every completed subtree passes a :data:`NodeSink`.

    Example::

        rng = CompactRange()
        for leaf in leaves:
            rng.append(leaf_hash(leaf))
        assert rng.root() == root(leaves)
    """

    __slots__ = ("_roots", "_size")

    def __init__(self, roots: Sequence[bytes] = (), size: int = 0) -> None:
        """Args:
        roots: The perfect-subtree roots of ``[0, size)``, largest first.
        size: The number of leaves they cover.

        Raises:
            ValueError: If ``size`` is negative or ``roots`` is not one hash per set bit of it.
        """
        if size < 0 or len(roots) != size.bit_count():
            raise ValueError(f"a compact range of {size} leaves has {size.bit_count()} roots")
        _check_hashes(roots)
        self._roots = list(roots)
        self._size = size

    @classmethod
    def from_perfect_subtrees(
        cls, size: int, perfect_root: Callable[[int, int], bytes]
    ) -> CompactRange:
        """The compact range of ``[0, size)`` from stored perfect-subtree roots.

        Args:
            size: Number of leaves.
            perfect_root: ``perfect_root(start, width)`` returns the root of leaves
                ``[start, start + width)`` (``width`` a power of two, ``start % width == 0``).
        """
        roots: list[bytes] = []
        start = 0
        for height in range(size.bit_length() - 1, -1, -1):
            if size >> height & 1:
                roots.append(perfect_root(start, 1 << height))
                start += 1 << height
        return cls(roots, size)

    @property
    def size(self) -> int:
        """Number of leaves covered."""
        return self._size

    @property
    def roots(self) -> tuple[bytes, ...]:
        """The perfect-subtree roots, largest first."""
        return tuple(self._roots)

    def copy(self) -> CompactRange:
        """An independent copy (to append to tentatively)."""
        twin = CompactRange.__new__(CompactRange)
        twin._roots = list(self._roots)
        twin._size = self._size
        return twin

    def append(self, leaf_hash: bytes, sink: NodeSink | None = None) -> None:
        """Add the leaf with hash ``leaf_hash`` (32 bytes, not checked: local data) as leaf
        ``size``; ``sink`` hears of every perfect subtree the leaf completes, smallest first."""
        roots = self._roots
        carry = leaf_hash
        k = self._size
        height = 0
        sha = _sha256
        prefix = _NODE_PREFIX
        while k & 1:
            carry = sha(prefix + roots.pop() + carry).digest()
            k >>= 1
            height += 1
            if sink is not None:
                sink(height, k, carry)
        roots.append(carry)
        self._size += 1

    def root(self) -> bytes:
        """The Merkle tree hash of leaves ``[0, size)`` (``EMPTY_ROOT`` for none)."""
        roots = self._roots
        if not roots:
            return EMPTY_ROOT
        acc = roots[-1]
        for h in reversed(roots[:-1]):
            acc = node_hash(h, acc)
        return acc


# --- proof generation (RFC 9162 §2.1.3.1 PATH and §2.1.4.1 SUBPROOF, iteratively) ----------


def inclusion_proof_from_subtrees(
    subtree_root: SubtreeRoot, index: int, tree_size: int
) -> list[bytes]:
    """Return the inclusion proof for leaf ``index`` in a tree of ``tree_size`` leaves.

    Args:
        subtree_root: ``subtree_root(start, end)`` returns the MTH of leaves ``[start, end)``;
            it is only called with RFC 9162 subtrees (see :func:`root_from_perfect_subtrees`).
        index: 0-based leaf index.
        tree_size: Number of leaves in the tree.

    Returns:
        The audit path, from the leaf's sibling up to the root's child.

    Raises:
        ValueError: If ``index`` is not in ``[0, tree_size)``.
    """
    if not 0 <= index < tree_size:
        raise ValueError(f"leaf index {index} not in a tree of size {tree_size}")
    path: list[bytes] = []
    start, size, m = 0, tree_size, index
    while size > 1:
        k = _largest_pow2_below(size)
        if m < k:
            path.append(subtree_root(start + k, start + size))
            size = k
        else:
            path.append(subtree_root(start, start + k))
            start += k
            size -= k
            m -= k
    path.reverse()
    return path


def consistency_proof_from_subtrees(
    subtree_root: SubtreeRoot, old_size: int, new_size: int
) -> list[bytes]:
    """Return the consistency proof between tree sizes ``old_size`` and ``new_size``.

    Args:
        subtree_root: As for :func:`inclusion_proof_from_subtrees`.
        old_size: Size of the older tree, ``0 < old_size <= new_size``.
        new_size: Size of the newer tree.

    Returns:
        The RFC 9162 §2.1.4.1 proof (empty when the sizes are equal).

    Raises:
        ValueError: If ``old_size`` is not in ``[1, new_size]``.
    """
    if not 0 < old_size <= new_size:
        raise ValueError(f"old size {old_size} not in [1, {new_size}]")
    proof: list[bytes] = []
    start, size, m, whole = 0, new_size, old_size, True
    while m != size:
        k = _largest_pow2_below(size)
        if m <= k:
            proof.append(subtree_root(start + k, start + size))
            size = k
        else:
            proof.append(subtree_root(start, start + k))
            start += k
            size -= k
            m -= k
            whole = False
    if not whole:
        proof.append(subtree_root(start, start + size))
    proof.reverse()
    return proof


def _subtree_fn(hashes: Sequence[bytes]) -> SubtreeRoot:
    _check_hashes(hashes)

    def subtree_root(start: int, end: int) -> bytes:
        return _fold_levels(list(hashes[start:end]))

    return subtree_root


def inclusion_proof_from_leaf_hashes(hashes: Sequence[bytes], index: int) -> list[bytes]:
    """Return the inclusion proof for leaf ``index`` over precomputed leaf hashes.

    Raises:
        ValueError: If ``index`` is out of range or a hash is not 32 bytes.
    """
    return inclusion_proof_from_subtrees(_subtree_fn(hashes), index, len(hashes))


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """Return the inclusion proof for leaf ``index`` over raw leaves.

    Raises:
        ValueError: If ``index`` is out of range.
    """
    return inclusion_proof_from_leaf_hashes(leaf_hashes(leaves), index)


def consistency_proof_from_leaf_hashes(hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """Return the consistency proof from the first ``old_size`` leaves to all ``hashes``.

    Raises:
        ValueError: If ``old_size`` is not in ``[1, len(hashes)]`` or a hash is not 32 bytes.
    """
    return consistency_proof_from_subtrees(_subtree_fn(hashes), old_size, len(hashes))


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """Return the consistency proof from the first ``old_size`` leaves to all ``leaves``.

    Raises:
        ValueError: If ``old_size`` is not in ``[1, len(leaves)]``.
    """
    return consistency_proof_from_leaf_hashes(leaf_hashes(leaves), old_size)


# --- verification (transparency-dev/merkle proof/verify.go, RFC 9162 §2.1.3.2, §2.1.4.2) -----


def _check_size(what: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise HashSizeError(what, len(value))


def _check_proof_hashes(proof: Sequence[bytes]) -> None:
    for i, h in enumerate(proof):
        if len(h) != HASH_SIZE:
            raise HashSizeError(f"proof hash {i}", len(h))


def _decomp_incl_proof(index: int, size: int) -> tuple[int, int]:
    inner = (index ^ (size - 1)).bit_length()
    border = (index >> inner).bit_count()
    return inner, border


def _chain_inner(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        seed = node_hash(seed, h) if (index >> i) & 1 == 0 else node_hash(h, seed)
    return seed


def _chain_inner_right(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        if (index >> i) & 1:
            seed = node_hash(h, seed)
    return seed


def _chain_border_right(seed: bytes, proof: Sequence[bytes]) -> bytes:
    for h in proof:
        seed = node_hash(h, seed)
    return seed


def _match(computed: bytes, expected: bytes, which: str) -> None:
    if not hmac.compare_digest(computed, expected):
        raise RootMismatchError(which)


def root_from_inclusion_proof(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes]
) -> bytes:
    """Recompute the tree root implied by an inclusion proof.

    Args:
        leaf_hash: The leaf's hash (32 bytes), not the raw leaf.
        index: 0-based leaf index.
        tree_size: Number of leaves in the tree.
        proof: The audit path.

    Returns:
        The root the proof leads to; compare it to a trusted root (or use
        :func:`verify_inclusion`).

    Raises:
        MerkleProofError: If ``index`` is not in ``[0, tree_size)``.
        HashSizeError: If the leaf hash or a proof hash is not 32 bytes.
        ProofLengthError: If the proof has the wrong number of hashes.
    """
    if index < 0 or index >= tree_size:
        raise MerkleProofError(f"leaf index {index} is beyond tree size {tree_size}")
    _check_size("leaf hash", leaf_hash)
    inner, border = _decomp_incl_proof(index, tree_size)
    if len(proof) != inner + border:
        raise ProofLengthError(len(proof), inner + border)
    _check_proof_hashes(proof)
    res = _chain_inner(leaf_hash, proof[:inner], index)
    return _chain_border_right(res, proof[inner:])


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Verify that ``leaf_hash`` is leaf ``index`` of the tree of ``tree_size`` with ``root``.

    Raises:
        MerkleProofError: If the proof does not verify; the subclasses
            :class:`ProofLengthError`, :class:`HashSizeError` and :class:`RootMismatchError`
            say why.
    """
    _match(root_from_inclusion_proof(leaf_hash, index, tree_size, proof), root, "root")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Verify that the tree of ``new_size`` with ``new_root`` extends the one of ``old_size``.

    Steps (transparency-dev/merkle ``VerifyConsistency``):

    1. ``old_size`` must be in ``[1, new_size]``: a proof from the empty tree is meaningless.
    2. Equal sizes need an empty proof and equal roots.
    3. Otherwise the proof is a suffix of the inclusion proof of leaf ``old_size - 1`` in the new
       tree, optionally preceded by the root of the largest perfect subtree ending at
       ``old_size``; its length is checked exactly, then both roots are recomputed and compared.

    Raises:
        MerkleProofError: If the proof does not verify; the subclasses
            :class:`ProofLengthError`, :class:`HashSizeError` and :class:`RootMismatchError`
            say why.
    """
    if new_size < old_size:
        raise MerkleProofError(f"new size {new_size} < old size {old_size}")
    if old_size <= 0:
        raise MerkleProofError("a consistency proof from an empty tree is meaningless")
    if old_size == new_size:
        if proof:
            raise ProofLengthError(len(proof), 0)
        _match(new_root, old_root, "new_root")
        return
    if not proof:
        raise ProofLengthError(0, 1)
    _check_proof_hashes(proof)

    inner, border = _decomp_incl_proof(old_size - 1, new_size)
    shift = ((old_size & -old_size).bit_length()) - 1  # trailing zeros of old_size
    inner -= shift
    # The proof starts with the root of the perfect subtree of size 2**shift ending at old_size,
    # unless old_size is that very power of two (then it is old_root itself).
    if old_size == 1 << shift:
        seed, rest = old_root, proof
        _check_size("old root", old_root)
    else:
        seed, rest = proof[0], proof[1:]
    want = len(proof) - len(rest) + inner + border
    if len(proof) != want:
        raise ProofLengthError(len(proof), want)

    mask = (old_size - 1) >> shift
    hash1 = _chain_inner_right(seed, rest[:inner], mask)
    hash1 = _chain_border_right(hash1, rest[inner:])
    _match(hash1, old_root, "old_root")

    hash2 = _chain_inner(seed, rest[:inner], mask)
    hash2 = _chain_border_right(hash2, rest[inner:])
    _match(hash2, new_root, "new_root")
