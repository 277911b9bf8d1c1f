"""The dataset root matches DESIGN.md §6, re-implemented here from the text alone.

The reference below uses only hashlib and its own recursive RFC 6962 tree hash: no fedseal code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedseal.client.data import attest, attest_with
from fedseal.client.data.spec import discover_shards
from tests.client._data_support import (
    SALT,
    flip_byte_in_pages,
    make_dataset,
    rows_table,
    write_shard,
)

# ---- reference implementation of DESIGN.md §6 ---------------------------------------------------


def _mth(hashes: list[bytes]) -> bytes:
    """RFC 6962 §2.1 Merkle tree hash over leaf hashes (recursive, as in the RFC)."""
    if not hashes:
        return hashlib.sha256(b"").digest()
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return hashlib.sha256(b"\x01" + _mth(hashes[:k]) + _mth(hashes[k:])).digest()


def reference_root(directory: Path, salt: bytes, chunk: int) -> tuple[bytes, int]:
    names = []
    for dirpath, _dirs, files in os.walk(directory):
        for f in files:
            full = Path(dirpath) / f
            if f.endswith(".parquet") and full.is_file() and not full.is_symlink():
                names.append(full.relative_to(directory).as_posix())
    names.sort(key=lambda n: n.encode("utf-8"))
    leaf_hashes = []
    for name in names:
        data = (directory / name).read_bytes()
        p = name.encode("utf-8")
        for i in range(0, len(data), chunk):
            leaf = salt + struct.pack(">I", len(p)) + p + struct.pack(">Q", i // chunk) + data[i : i + chunk]
            leaf_hashes.append(hashlib.sha256(b"\x00" + leaf).digest())
    return _mth(leaf_hashes), len(leaf_hashes)


# ---- datasets ---------------------------------------------------------------------------------


def _nested(tmp: Path) -> Path:
    d = tmp / "nested"
    write_shard(d / "b.parquet", rows_table(0, 500), compression="none")
    write_shard(d / "a" / "z.parquet", rows_table(500, 50))
    write_shard(d / "a" / "b" / "c.parquet", rows_table(550, 900), compression="none")
    write_shard(d / "A.parquet", rows_table(1450, 10))
    write_shard(d / "ä-ü.parquet", rows_table(1460, 20))  # non-ASCII: sorted as UTF-8 bytes
    (d / "README.txt").write_text("not a shard")
    return d


@pytest.mark.parametrize("chunk", [1, 777, 4096, 1 << 20])
def test_the_root_of_a_nested_dataset_matches_the_reference_for_several_chunk_sizes(tmp_path: Path, chunk: int) -> None:
    d = _nested(tmp_path)
    if chunk == 1:
        # one leaf per byte: keep this case small
        shutil.rmtree(d / "a")
        (d / "b.parquet").unlink()
    got = attest_with(d, SALT, chunk, use_cache=False, workers=2)
    want, leaves = reference_root(d, SALT, chunk)
    assert got.root == want
    assert got.leaves == leaves
    assert [f.path for f in got.files] == sorted((f.path for f in got.files), key=lambda s: s.encode())


def test_multi_chunk_files_give_one_leaf_per_chunk_with_a_short_last_chunk(tmp_path: Path) -> None:
    d = tmp_path / "d"
    write_shard(d / "shard-00000.parquet", rows_table(0, 2000), compression="none")
    size = (d / "shard-00000.parquet").stat().st_size
    att = attest_with(d, SALT, 1000, use_cache=False)
    assert att.leaves == -(-size // 1000) > 10
    assert size % 1000 != 0
    assert att.root == reference_root(d, SALT, 1000)[0]


def test_a_prepared_dataset_root_matches_the_reference_and_the_manifest(tmp_path: Path) -> None:
    m = make_dataset(tmp_path / "ds", [300, 250, 5], chunk_size=512)
    assert m.root == reference_root(tmp_path / "ds", SALT, 512)[0]
    assert attest(tmp_path / "ds", use_cache=False).root == m.root


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_the_root_is_the_same_for_any_worker_count(tmp_path: Path, workers: int) -> None:
    d = _nested(tmp_path)
    assert attest_with(d, SALT, 333, use_cache=False, workers=workers).root == reference_root(d, SALT, 333)[0]


def test_discovery_order_does_not_depend_on_directory_listing_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _nested(tmp_path)
    before = attest_with(d, SALT, 500, use_cache=False).root
    real_scandir = os.scandir

    class Reversed:
        def __init__(self, path: str) -> None:
            self._it = real_scandir(path)

        def __enter__(self) -> list[os.DirEntry[str]]:
            return list(reversed(list(self._it)))

        def __exit__(self, *exc: object) -> None:
            self._it.close()

    monkeypatch.setattr("fedseal.client.data.spec.os.scandir", Reversed)
    assert [s.path for s in discover_shards(d)] == sorted((s.path for s in discover_shards(d)), key=lambda p: p.encode())
    assert attest_with(d, SALT, 500, use_cache=False).root == before


# ---- what changes the root ------------------------------------------------------------------


@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(fraction=st.floats(min_value=0.0, max_value=1.0), which=st.integers(min_value=0, max_value=2))
def test_any_byte_change_changes_the_root(tmp_path_factory: pytest.TempPathFactory, fraction: float, which: int) -> None:
    d = tmp_path_factory.mktemp("flip")
    make_dataset(d, [200, 150, 120], chunk_size=700)
    before = attest_with(d, SALT, 700, use_cache=False).root
    flip_byte_in_pages(d / f"shard-{which:05d}.parquet", fraction)
    after = attest_with(d, SALT, 700, use_cache=False)
    assert after.root != before
    assert after.root == reference_root(d, SALT, 700)[0]


def test_renaming_a_shard_changes_the_root_even_if_the_order_is_kept(tmp_path: Path) -> None:
    d = tmp_path / "d"
    make_dataset(d, [100, 100])
    before = attest_with(d, SALT, 1024, use_cache=False).root
    (d / "shard-00001.parquet").rename(d / "shard-00001b.parquet")
    assert attest_with(d, SALT, 1024, use_cache=False).root != before


def test_reordering_shards_changes_the_root(tmp_path: Path) -> None:
    d = tmp_path / "d"
    make_dataset(d, [100, 120])
    before = attest_with(d, SALT, 1024, use_cache=False).root
    (d / "shard-00000.parquet").rename(d / "tmp.parquet.x")
    (d / "shard-00001.parquet").rename(d / "shard-00000.parquet")
    (d / "tmp.parquet.x").rename(d / "shard-00001.parquet")
    assert attest_with(d, SALT, 1024, use_cache=False).root != before


def test_a_different_salt_or_chunk_size_changes_the_root(tmp_path: Path) -> None:
    d = tmp_path / "d"
    make_dataset(d, [100])
    base = attest_with(d, SALT, 1024, use_cache=False).root
    assert attest_with(d, bytes(32), 1024, use_cache=False).root != base
    assert attest_with(d, SALT, 1000, use_cache=False).root != base


def test_files_that_are_not_parquet_do_not_change_the_root(tmp_path: Path) -> None:
    d = tmp_path / "d"
    make_dataset(d, [100])
    base = attest_with(d, SALT, 1024, use_cache=False).root
    (d / "notes.txt").write_text("x")
    (d / "sub").mkdir()
    (d / "sub" / "data.parquet.bak").write_bytes(b"y")
    assert attest_with(d, SALT, 1024, use_cache=False).root == base
