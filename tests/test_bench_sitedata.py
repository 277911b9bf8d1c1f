"""The site-data benchmark at a tiny size: generates, reuses, measures every phase, reports."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench.bench_sitedata import generate, main, parse_size


def test_sizes_are_read_in_decimal_and_binary_units() -> None:
    assert parse_size("20GB") == 20 * 10**9
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("512MiB") == 512 << 20
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_size("twenty")


def test_the_benchmark_runs_every_phase_at_a_tiny_size_and_reuses_its_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, out = tmp_path / "data", tmp_path / "r.json"
    args = ["--dir", str(data), "--size", "3MiB", "--shard", "1MiB", "--features", "32", "--batch", "128",
            "--read-rows", "1024", "--json", str(out)]  # fmt: skip
    main(args)
    first = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["shards"] == 3
    assert results["attest"]["rows"] == results["raw"]["rows"] > 10_000
    assert (
        results["site"]["stream_rows"]
        == results["site"]["train_examples"]
        == results["site"]["train_rows"]
    )
    assert all(results[p]["rss_mib"] > 0 for p in ("attest", "raw", "site"))
    assert "| site training epoch, MLP 32-32-10 |" in first and "(generated in" in first
    mtimes = {p: p.stat().st_mtime_ns for p in data.glob("*.parquet")}
    assert generate(data, size=3 << 20, shard=1 << 20, features=32) == "reused"
    assert {p: p.stat().st_mtime_ns for p in data.glob("*.parquet")} == mtimes
    assert generate(data, size=3 << 20, shard=1 << 20, features=16).startswith("generated")
