"""Known-answer tests for fedseal.crypto.merkle (transparency-dev probes, RFC 6962 tree vectors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedseal.crypto import MerkleProofError, merkle
from tests.vectorfiles import b64, load_json, vector_path

TD = vector_path("merkle", "transparency-dev")
INCLUSION = sorted(p for p in (TD / "inclusion").rglob("*.json"))
CONSISTENCY = sorted(p for p in (TD / "consistency").rglob("*.json"))
TREE = load_json("merkle", "rfc6962_tree_vectors.json")


def _probe(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = load_json(*path.relative_to(TD.parent.parent).parts)
    return data


def _id(path: Path) -> str:
    return str(path.relative_to(TD))


def test_all_196_transparency_dev_probes_are_present() -> None:
    assert len(INCLUSION) + len(CONSISTENCY) == 196


@pytest.mark.parametrize("path", INCLUSION, ids=_id)
def test_inclusion_probe_gives_the_expected_verdict(path: Path) -> None:
    p = _probe(path)
    args = (b64(p["leafHash"]), p["leafIdx"], p["treeSize"], [b64(h) for h in p["proof"] or []])
    if p["wantErr"]:
        with pytest.raises(MerkleProofError):
            merkle.verify_inclusion(*args, b64(p["root"]))
    else:
        merkle.verify_inclusion(*args, b64(p["root"]))
        assert merkle.root_from_inclusion_proof(*args) == b64(p["root"])


@pytest.mark.parametrize("path", CONSISTENCY, ids=_id)
def test_consistency_probe_gives_the_expected_verdict(path: Path) -> None:
    p = _probe(path)
    args = (
        p["size1"],
        p["size2"],
        b64(p["root1"]),
        b64(p["root2"]),
        [b64(h) for h in p["proof"] or []],
    )
    if p["wantErr"]:
        with pytest.raises(MerkleProofError):
            merkle.verify_consistency(*args)
    else:
        merkle.verify_consistency(*args)


LEAVES = [bytes.fromhex(h) for h in TREE["leaf_inputs_hex"]]


@pytest.mark.parametrize("size", range(len(TREE["roots_by_size_hex"])))
def test_root_of_each_prefix_matches_the_rfc6962_vector(size: int) -> None:
    want = bytes.fromhex(TREE["roots_by_size_hex"][size])
    assert merkle.root(LEAVES[:size]) == want
    assert merkle.root_from_leaf_hashes(merkle.leaf_hashes(LEAVES[:size])) == want


def test_single_hash_checks_match_the_rfc6962_vectors() -> None:
    for check in TREE["single_hash_checks"]:
        want = bytes.fromhex(check["want"])
        if "left_ascii" in check:
            got = merkle.node_hash(check["left_ascii"].encode(), check["right_ascii"].encode())
        elif "input_ascii" in check:
            got = merkle.leaf_hash(check["input_ascii"].encode())
        elif "input_hex" in check:
            got = merkle.leaf_hash(bytes.fromhex(check["input_hex"]))
        else:
            got = merkle.EMPTY_ROOT
        assert got == want, check["desc"]


@pytest.mark.parametrize(
    "case", TREE["inclusion_proofs"], ids=lambda c: f"{c['leaf_index_0based']}of{c['tree_size']}"
)
def test_generated_inclusion_proof_matches_the_rfc6962_vector(case: dict[str, Any]) -> None:
    index, size = case["leaf_index_0based"], case["tree_size"]
    want = [bytes.fromhex(h) for h in case["proof_hex"]]
    assert merkle.inclusion_proof(LEAVES[:size], index) == want
    merkle.verify_inclusion(
        merkle.leaf_hash(LEAVES[index]), index, size, want, merkle.root(LEAVES[:size])
    )


@pytest.mark.parametrize(
    "case", TREE["consistency_proofs"], ids=lambda c: f"{c['size1']}to{c['size2']}"
)
def test_generated_consistency_proof_matches_the_rfc6962_vector(case: dict[str, Any]) -> None:
    old, new = case["size1"], case["size2"]
    want = [bytes.fromhex(h) for h in case["proof_hex"]]
    assert merkle.consistency_proof(LEAVES[:new], old) == want
    merkle.verify_consistency(old, new, merkle.root(LEAVES[:old]), merkle.root(LEAVES[:new]), want)
