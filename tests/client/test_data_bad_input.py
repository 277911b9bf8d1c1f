"""Bad input gives one clear error naming the file and the reason, and nothing is written over.

Covers all eight files of apache/parquet-testing ``bad_data`` (tests/vectors/parquet_bad_data:
pyarrow raises on seven and silently reads 21,186 rows from ARROW-GH-43605.parquet), a schema
that differs between shards, a row count that differs from the manifest, a symlink, an empty
file, and a missing manifest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseal.client.cli import app
from fedseal.client.data import (
    CorruptShardError,
    DatasetError,
    LayoutError,
    ManifestError,
    RowCountMismatchError,
    SchemaMismatchError,
    attest,
    prepare_dataset,
    verify_dataset,
)
from fedseal.client.data.manifest import MANIFEST_NAME, load_manifest
from fedseal.client.data.shards import iter_file_batches
from tests.client._data_support import make_dataset, rows_table, write_manifest_for, write_shard
from tests.vectorfiles import VECTORS

BAD_FILES = sorted(p.name for p in (VECTORS / "parquet_bad_data").glob("*.parquet"))
runner = CliRunner()


def test_all_eight_bad_parquet_files_are_present() -> None:
    assert len(BAD_FILES) == 8
    assert "ARROW-GH-43605.parquet" in BAD_FILES


@pytest.mark.parametrize("name", BAD_FILES)
def test_preparing_from_a_bad_parquet_file_fails_naming_it_and_writes_nothing(tmp_path: Path, name: str) -> None:
    source = tmp_path / name
    shutil.copy(VECTORS / "parquet_bad_data" / name, source)
    out = tmp_path / "out"
    with pytest.raises(DatasetError) as info:
        prepare_dataset(source, out)
    assert info.value.path is not None and name in info.value.path
    assert info.value.reason
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no staging directory left behind


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_bad_parquet_file_added_to_a_dataset_is_refused_by_attest_and_the_manifest_is_kept(
    tmp_path: Path, name: str
) -> None:
    d = tmp_path / "d"
    make_dataset(d, [100, 100])
    manifest_before = (d / MANIFEST_NAME).read_bytes()
    shutil.copy(VECTORS / "parquet_bad_data" / name, d / "shard-00002.parquet")
    with pytest.raises((CorruptShardError, SchemaMismatchError)) as info:
        attest(d, use_cache=False)
    assert info.value.path == "shard-00002.parquet"
    result = runner.invoke(app, ["attest", str(d), "--update", "--no-cache"])
    assert result.exit_code == 1
    assert "shard-00002.parquet" in result.output
    assert (d / MANIFEST_NAME).read_bytes() == manifest_before


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_shard_replaced_by_a_bad_parquet_file_is_refused_by_the_loader(tmp_path: Path, name: str) -> None:
    from fedseal.client.data import ShardDataset

    d = tmp_path / "d"
    make_dataset(d, [100, 100])
    shutil.copy(VECTORS / "parquet_bad_data" / name, d / "shard-00001.parquet")
    for verify in (True, False):
        with pytest.raises(DatasetError) as info:
            ShardDataset(d, verify=verify)
        assert info.value.path == "shard-00001.parquet"


@pytest.mark.parametrize("name", BAD_FILES)
def test_decoding_every_page_turns_each_pyarrow_failure_into_a_named_error(name: str) -> None:
    """What ``verify_dataset(deep=True)`` and the loader run over each shard.

    ARROW-GH-43605 decodes "successfully" into rows matching its footer: only the schema check
    against the manifest (tests above) catches it.
    """
    path = str(VECTORS / "parquet_bad_data" / name)
    if name == "ARROW-GH-43605.parquet":
        assert sum(b.num_rows for b in iter_file_batches(path, name)) == 21186
        return
    with pytest.raises(CorruptShardError) as info:
        for _batch in iter_file_batches(path, name):
            pass
    assert info.value.path == name
    assert "Parquet" in info.value.reason


def test_deep_verification_finds_page_corruption_that_footers_do_not_show(tmp_path: Path) -> None:
    d = tmp_path / "d"
    make_dataset(d, [300], row_group_rows=300)
    shard = d / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    footer_len = int.from_bytes(data[-8:-4], "little")
    start = 4
    end = len(data) - 8 - footer_len
    data[start:end] = bytes(end - start)  # zero every page: the footer still parses
    shard.write_bytes(bytes(data))
    write_manifest_for(d)
    verify_dataset(d, use_cache=False)
    with pytest.raises(CorruptShardError) as info:
        verify_dataset(d, deep=True, use_cache=False)
    assert info.value.path == "shard-00000.parquet"


def test_a_schema_that_differs_between_shards_is_named(tmp_path: Path) -> None:
    d = tmp_path / "d"
    make_dataset(d, [100, 100])
    write_shard(d / "shard-00002.parquet", rows_table(200, 50, extra_column=True))
    with pytest.raises(SchemaMismatchError) as info:
        attest(d, use_cache=False)
    assert info.value.path == "shard-00002.parquet"
    assert "note" in info.value.reason


def test_a_row_count_that_differs_from_the_manifest_is_named(tmp_path: Path) -> None:
    d = tmp_path / "d"
    make_dataset(d, [100, 100])
    doc = json.loads((d / MANIFEST_NAME).read_text())
    doc["files"][1]["rows"] += 1
    doc["rows"] += 1
    (d / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(RowCountMismatchError) as info:
        verify_dataset(d, use_cache=False)
    assert info.value.path == "shard-00001.parquet"
    assert (info.value.expected, info.value.actual) == (101, 100)
    result = runner.invoke(app, ["attest", str(d)])
    assert result.exit_code == 1 and "shard-00001.parquet" in result.output


def test_a_symlinked_shard_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "d"
    make_dataset(d, [100])
    (d / "shard-00001.parquet").symlink_to(d / "shard-00000.parquet")
    with pytest.raises(LayoutError) as info:
        attest(d)
    assert info.value.path == "shard-00001.parquet" and "symlink" in info.value.reason


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "d"
    make_dataset(d, [100])
    (tmp_path / "elsewhere").mkdir()
    (d / "more").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LayoutError) as info:
        attest(d)
    assert info.value.path == "more"


def test_an_empty_shard_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "d"
    make_dataset(d, [100])
    (d / "sub").mkdir()
    (d / "sub" / "empty.parquet").write_bytes(b"")
    with pytest.raises(LayoutError) as info:
        attest(d)
    assert info.value.path == "sub/empty.parquet" and "empty" in info.value.reason


def test_a_missing_manifest_is_named_and_the_cli_exits_non_zero(tmp_path: Path) -> None:
    d = tmp_path / "d"
    write_shard(d / "shard-00000.parquet", rows_table(0, 10))
    with pytest.raises(ManifestError) as info:
        attest(d)
    assert info.value.path is not None and info.value.path.endswith(MANIFEST_NAME)
    result = runner.invoke(app, ["attest", str(d), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout.splitlines()[0])["error"] == "ManifestError"
    assert list(d.iterdir()) == [d / "shard-00000.parquet"]


def test_a_tampered_manifest_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "d"
    make_dataset(d, [100, 50])
    doc = json.loads((d / MANIFEST_NAME).read_text())
    doc["files"][1]["first_leaf"] += 1
    (d / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(ManifestError):
        load_manifest(d)


def test_preparing_into_a_non_empty_directory_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = runner.invoke(app, ["data", "prepare", "mnist-5k", str(out)])
    assert result.exit_code == 1
    assert "refusing to write over" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_manifest_for_other_files_is_refused_by_the_loader(tmp_path: Path) -> None:
    from fedseal.client.data import ShardDataset

    d = tmp_path / "d"
    make_dataset(d, [100, 100])
    (d / "shard-00001.parquet").unlink()
    write_shard(d / "shard-00001.parquet", rows_table(100, 99))
    with pytest.raises(DatasetError) as info:
        ShardDataset(d, verify=False)
    assert info.value.path == "shard-00001.parquet"
    write_manifest_for(d)
    assert ShardDataset(d).num_rows == 199
