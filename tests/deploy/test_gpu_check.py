"""bench/gpu_check.sh on the CPU with tiny sizes: the CI smoke test of the GPU check."""

from __future__ import annotations

import json
import re

import pytest

from tests.deploy.deploytools import REPO, run

pytest.importorskip("torch", reason="torch is needed by fedseal's client training path")


def test_gpu_check_reports_both_throughputs_their_ratio_and_a_verified_secure_round() -> None:
    proc = run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--samples", "128", "--epochs", "1",
         "--batch-size", "32", "--round-samples", "96", "--repeats", "2", "--stream-workers", "0", "1"],
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"^gpu: ", out, re.M)
    assert re.search(r"^\| bare PyTorch \(baseline\) \| [\d,]+ \| [\d.]+ \|$", out, re.M)
    assert re.search(r"^\| fedseal client training path \| [\d,]+ \| [\d.]+ \|$", out, re.M)
    assert re.search(r"^\| \*\*fedseal / baseline\*\* \| \*\*\d+\.\d\d\*\* \| goal >= 0\.90 \|$", out, re.M)
    for workers in (0, 1):
        assert re.search(
            rf"^\| fedseal streamed from Parquet shards, {workers} loader workers \| [\d,]+ \| [\d.]+ \|$", out, re.M
        )
    assert re.search(r"^secure round: ok: 3 in-process sites, 3 survivors, ", out, re.M)
    (line,) = [ln for ln in out.splitlines() if ln.startswith("gpu_check-json: ")]
    summary = json.loads(line.removeprefix("gpu_check-json: "))
    assert summary["device"] in ("cpu", "cuda")
    assert summary["samples"] == 128
    assert summary["baseline_samples_per_s"] > 0 and summary["fedseal_samples_per_s"] > 0
    ratio = summary["fedseal_samples_per_s"] / summary["baseline_samples_per_s"]
    assert abs(summary["ratio"] - ratio) < 1e-3
    assert summary["repeats"] == 2
    runs = summary["runs_samples_per_s"]
    assert len(runs["baseline"]) == len(runs["fedseal"]) == 2
    assert summary["baseline_samples_per_s"] in runs["baseline"]  # the median of the runs
    assert set(summary["streamed"]) == {"0", "1"}
    for streamed in summary["streamed"].values():
        assert streamed["samples_per_s"] > 0
        assert abs(streamed["ratio"] - streamed["samples_per_s"] / summary["baseline_samples_per_s"]) < 1e-3
    rnd = summary["secure_round"]
    assert rnd["ok"] is True and rnd["survivors"] == 3
    assert rnd["max_abs_error"] <= rnd["bound"]


def test_gpu_check_rejects_non_positive_sizes() -> None:
    proc = run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--repeats", "0"], timeout=300, cwd=REPO)
    assert proc.returncode == 2
    assert "sizes must be positive" in proc.stderr
    proc = run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--stream-workers", "-1"], timeout=300, cwd=REPO)
    assert proc.returncode == 2
    assert "--stream-workers must be in 0..64" in proc.stderr
    proc = run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--samples", "0"], timeout=300, cwd=REPO)
    assert proc.returncode == 2
    assert "sizes must be positive" in proc.stderr
