"""`fl-client data prepare|split` and `fl-client attest` on the bundled dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseal.client.cli import app
from fedseal.client.data import load_manifest
from fedseal.client.data.cli import parse_size

runner = CliRunner()


def test_prepare_then_attest_json_reports_the_manifest_root(tmp_path: Path) -> None:
    out = tmp_path / "mnist"
    result = runner.invoke(app, ["data", "prepare", "mnist-5k", str(out), "--shard-size", "400KiB", "--json"])
    assert result.exit_code == 0, result.output
    prepared = json.loads(result.stdout)
    attested = runner.invoke(app, ["attest", str(out), "--json", "--workers", "2"])
    assert attested.exit_code == 0, attested.output
    doc = json.loads(attested.stdout)
    assert {"algorithm", "root", "leaves", "bytes", "rows", "files"} <= set(doc)
    assert doc["root"] == prepared["root"] == load_manifest(out).root.hex()
    assert doc["rows"] == 5000 and doc["matches_manifest"] is True
    assert doc["algorithm"] == "fedseal-dataset-v1/rfc6962-sha256"


def test_split_prints_the_label_table_and_writes_three_sites(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["data", "split", "mnist-5k", "--sites", "3", "--scheme", "dirichlet", "--alpha", "0.5", "--seed", "1", str(tmp_path / "s")]
    )
    assert result.exit_code == 0, result.output
    assert "rows per label and site" in result.stdout
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["site-0", "site-1", "site-2"]
    assert sum(load_manifest(p).rows for p in (tmp_path / "s").iterdir()) == 5000


def test_attest_extends_prints_a_verified_proof_and_update_records_the_new_shard(tmp_path: Path) -> None:
    out = tmp_path / "d"
    assert runner.invoke(app, ["data", "prepare", "mnist-5k", str(out), "--shard-size", "300KiB"]).exit_code == 0
    approved = tmp_path / "approved.json"
    shutil.copy(out / "fedseal-manifest.json", approved)
    last = sorted(out.glob("shard-*.parquet"))[-1]
    shutil.copy(last, out / "shard-00099.parquet")
    strict = runner.invoke(app, ["attest", str(out)])
    assert strict.exit_code == 1 and "shard-00099.parquet" in strict.output
    result = runner.invoke(app, ["attest", str(out), "--extends", str(approved), "--update", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["extends"]["new_files"] == ["shard-00099.parquet"] and doc["extends"]["proof"]
    assert doc["manifest_updated"] is True
    assert runner.invoke(app, ["attest", str(out)]).exit_code == 0
    shutil.copy(last, out / "a-first.parquet")
    broken = runner.invoke(app, ["attest", str(out), "--extends", str(approved)])
    assert broken.exit_code == 1 and "a-first.parquet" in broken.output


@pytest.mark.parametrize(("text", "value"), [("1GiB", 1 << 30), ("512MiB", 512 << 20), ("64k", 64000), ("4096", 4096)])
def test_sizes_are_parsed_with_binary_and_decimal_units(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_a_bad_size_is_a_usage_error_with_exit_code_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "prepare", "mnist-5k", str(tmp_path / "o"), "--shard-size", "lots"])
    assert result.exit_code == 2
    assert not (tmp_path / "o").exists()


def test_update_after_rewriting_a_shard_records_a_new_version_and_says_it_is_not_an_extension(tmp_path: Path) -> None:
    out = tmp_path / "d"
    prepared = runner.invoke(app, ["data", "prepare", "mnist-5k", str(out), "--shard-size", "300KiB", "--row-group-rows", "1000"])
    assert prepared.exit_code == 0
    shards = sorted(out.glob("shard-*.parquet"))
    shutil.copy(shards[1], shards[0])  # same schema, other content
    result = runner.invoke(app, ["attest", str(out), "--update", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["manifest_updated"] is True and doc["extends_previous_manifest"] is False
    assert "needs approval" in result.stderr
    assert load_manifest(out).root.hex() == doc["root"]


def test_the_package_exports_what_it_lists_and_loads_lazily() -> None:
    import subprocess
    import sys

    import fedseal.client.data as data

    assert sorted(data.__all__) == sorted(data.EXPORTS)
    for name in data.__all__:
        if name not in ("ShardDataset", "make_loader"):
            assert getattr(data, name) is not None
    code = "import sys, fedseal.client.cli\nprint(sorted(m for m in ('torch', 'pyarrow') if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"
