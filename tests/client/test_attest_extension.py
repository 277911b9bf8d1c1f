"""`--extends`: an RFC 6962 consistency proof that only shards sorting last were appended."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedseal.client.data import ExtensionError, attest_with, prove_extension
from fedseal.crypto import merkle
from tests.client._data_support import (
    SALT,
    flip_byte_in_pages,
    make_dataset,
    rows_table,
    write_shard,
)


def test_appending_a_shard_that_sorts_last_is_proven_an_extension(tmp_path: Path) -> None:
    old = make_dataset(tmp_path / "d", [200, 150], chunk_size=600)
    write_shard(tmp_path / "d" / "shard-00002.parquet", rows_table(350, 90))
    new = attest_with(tmp_path / "d", SALT, 600, use_cache=False)
    proof = prove_extension(old, new)
    assert proof.new_files == ("shard-00002.parquet",)
    assert (proof.old_size, proof.new_size) == (old.leaves, new.leaves)
    # checked again here with the crypto layer directly
    merkle.verify_consistency(old.leaves, new.leaves, old.root, new.root, list(proof.proof))


def test_an_unchanged_dataset_extends_itself_with_an_empty_proof(tmp_path: Path) -> None:
    old = make_dataset(tmp_path / "d", [200], chunk_size=600)
    proof = prove_extension(old, attest_with(tmp_path / "d", SALT, 600, use_cache=False))
    assert proof.proof == ()


def test_a_changed_old_shard_breaks_the_extension_and_is_named(tmp_path: Path) -> None:
    old = make_dataset(tmp_path / "d", [200, 150], chunk_size=600)
    write_shard(tmp_path / "d" / "shard-00002.parquet", rows_table(350, 90))
    flip_byte_in_pages(tmp_path / "d" / "shard-00000.parquet", 0.3)
    with pytest.raises(ExtensionError) as info:
        prove_extension(old, attest_with(tmp_path / "d", SALT, 600, use_cache=False))
    assert info.value.path == "shard-00000.parquet"
    assert "content changed" in info.value.reason


def test_a_removed_old_shard_breaks_the_extension_and_is_named(tmp_path: Path) -> None:
    old = make_dataset(tmp_path / "d", [200, 150, 100], chunk_size=600)
    (tmp_path / "d" / "shard-00001.parquet").unlink()
    with pytest.raises(ExtensionError) as info:
        prove_extension(old, attest_with(tmp_path / "d", SALT, 600, use_cache=False))
    assert info.value.path == "shard-00001.parquet"


def test_a_new_shard_sorting_before_an_old_one_breaks_the_extension_and_is_named(tmp_path: Path) -> None:
    old = make_dataset(tmp_path / "d", [200, 150], chunk_size=600)
    write_shard(tmp_path / "d" / "shard-00000a.parquet", rows_table(350, 90))
    with pytest.raises(ExtensionError) as info:
        prove_extension(old, attest_with(tmp_path / "d", SALT, 600, use_cache=False))
    assert info.value.path == "shard-00000a.parquet"
    assert "sort" in info.value.reason


def test_rewriting_the_last_old_shard_with_more_rows_is_not_an_extension(tmp_path: Path) -> None:
    old = make_dataset(tmp_path / "d", [200], chunk_size=600)
    write_shard(tmp_path / "d" / "shard-00000.parquet", rows_table(0, 260))
    with pytest.raises(ExtensionError) as info:
        prove_extension(old, attest_with(tmp_path / "d", SALT, 600, use_cache=False))
    assert info.value.path == "shard-00000.parquet"


def test_another_salt_or_chunk_size_is_not_an_extension(tmp_path: Path) -> None:
    old = make_dataset(tmp_path / "d", [200], chunk_size=600)
    shutil.copy(tmp_path / "d" / "shard-00000.parquet", tmp_path / "d" / "shard-00001.parquet")
    with pytest.raises(ExtensionError):
        prove_extension(old, attest_with(tmp_path / "d", bytes(32), 600, use_cache=False))
    with pytest.raises(ExtensionError):
        prove_extension(old, attest_with(tmp_path / "d", SALT, 601, use_cache=False))


def test_appending_with_prepare_adds_shards_that_sort_last_and_records_a_verified_extension(tmp_path: Path) -> None:
    from fedseal.client.data import PrepareOptions, load_manifest, prepare_dataset, verify_dataset
    from fedseal.client.data.prepare import append_to_dataset

    d = tmp_path / "d"
    old = prepare_dataset("mnist-5k", d, options=PrepareOptions(target_shard_bytes=400_000, chunk_size=65536))
    new, proof = append_to_dataset("mnist-5k", d, options=PrepareOptions(target_shard_bytes=400_000, seed=9))
    assert new.rows == 2 * old.rows and new.salt == old.salt
    assert [f.path for f in new.files[: len(old.files)]] == [f.path for f in old.files]
    assert all(p > old.files[-1].path for p in proof.new_files) and proof.new_files
    merkle.verify_consistency(old.leaves, new.leaves, old.root, new.root, list(proof.proof))
    assert load_manifest(d) == new
    assert verify_dataset(d, use_cache=False).root == new.root


def test_appending_data_with_another_schema_leaves_the_dataset_untouched(tmp_path: Path) -> None:
    from fedseal.client.data import SchemaMismatchError
    from fedseal.client.data.prepare import append_to_dataset

    d = tmp_path / "d"
    make_dataset(d, [100])
    before = sorted(p.name for p in d.iterdir())
    manifest_bytes = (d / "fedseal-manifest.json").read_bytes()
    with pytest.raises(SchemaMismatchError):
        append_to_dataset("mnist-5k", d)
    assert sorted(p.name for p in d.iterdir()) == before
    assert (d / "fedseal-manifest.json").read_bytes() == manifest_bytes
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
