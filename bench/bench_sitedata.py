"""A site's data at scale (``python -m bench sitedata [--dir D] [--size 20GB] [--shard 1.5GB]``).

Generates (once; reused while its parameters match) ``--size`` bytes of rows (uncompressed; zstd
saves ~7 % on this data, so ``--size 21.6GB --shard 1.6GB`` gives ~20 GB on disk in shards of
~1.5 GB) as zstd Parquet shards, written by fedseal's prepare path conventions (row groups
of ~32 MiB, ``fedseal-manifest.json`` from ``finalize``): rows of ``--features`` float32 values
(normal noise) in one fixed-size-list column and an int64 label (the argmax
of the first 10 features: learnable). Then, each phase in a fresh interpreter that reports its
own peak RSS (VmHWM):

1. ``attest``: ``verify_dataset(full=True)`` (every byte hashed, the site's start-up check after
   a change) and a cached ``verify_dataset`` (unchanged files: footers and the stat cache).
2. ``raw``: a raw pyarrow pass over the same files and columns (``iter_batches`` of
   ``--read-rows`` rows, features flattened to a numpy view, labels to numpy): the ceiling.
3. ``site``: ``load_site_data`` (verification from the cache and its one counting pass), one
   streamed pass of the training part with no model (the loader alone), then one epoch of
   ``fedseal.client.training.train`` of a small MLP (``F -> --hidden -> 10``) on that part, the
   site's real path; and the same MLP's steps on in-memory random batches (the model's own
   ceiling on this machine).

Rows/s of a pass count the rows it yields (the training part is ~90 % of the rows). torch runs
``--torch-threads`` intra-op threads (default 1, as ``fl-client run``: on a shared 2-core box two
OpenMP threads beside the loader's read-ahead thread made the same MLP ~10x slower). The page
cache is as the previous phase left it (the data is about the size of a small machine's RAM:
say which in the results). ``--size 4MiB --shard 1MiB`` runs in seconds (the test does).
Delete the data with ``--delete`` (after the run) or by hand.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_DIR = Path("/tmp/fedseal-bench-sitedata")
ROW_GROUP_BYTES = 32 << 20
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
}
_LABELS = 10


def parse_size(text: str) -> int:
    """``"20GB"`` -> 20·10⁹, ``"1.5GiB"`` -> 1.5·2³⁰ bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 20GB, 1.5GiB or 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


# -- generation -------------------------------------------------------------------------------


def _schema(features: int) -> pa.Schema:
    return pa.schema(
        [("x", pa.list_(pa.field("element", pa.float32()), features)), ("label", pa.int64())]
    )


def _write_shards(job: tuple[Path, list[int], int, int, int]) -> int:
    """Write shards ``indices`` of ``shard_bytes`` each (a worker process); returns rows written."""
    from fedseal.client.data.shards import ZSTD_LEVEL, shard_name

    directory, indices, shard_bytes, features, row_group_rows = job
    rng = np.random.default_rng(indices[0] if indices else 0)
    pool = rng.standard_normal(max(4 * row_group_rows * features, 1 << 20), dtype=np.float32)
    schema = _schema(features)
    rows = 0
    for index in indices:
        path = directory / shard_name(index)
        with pq.ParquetWriter(
            path, schema, compression="zstd", compression_level=ZSTD_LEVEL,
            use_dictionary=False, write_statistics=False,
        ) as writer:  # fmt: skip
            written = 0
            while written < shard_bytes:
                start = int(rng.integers(0, len(pool) - row_group_rows * features + 1))
                start -= start % features
                x = pool[start : start + row_group_rows * features]
                labels = np.argmax(x.reshape(row_group_rows, features)[:, :_LABELS], axis=1).astype(
                    np.int64
                )
                column = pa.FixedSizeListArray.from_arrays(pa.array(x), type=schema.field("x").type)
                writer.write_table(
                    pa.table([column, pa.array(labels)], schema=schema),
                    row_group_size=row_group_rows,
                )
                rows += row_group_rows
                written += row_group_rows * features * 4  # uncompressed bytes, ~1.1x the file's
    return rows


def generate(directory: Path, *, size: int, shard: int, features: int, processes: int = 2) -> str:
    """The dataset in ``directory``, generated unless one with the same parameters is there.

    Returns:
        ``"reused"`` or ``"generated in N s"``.
    """
    from fedseal.client.data.manifest import DatasetSchema, load_manifest
    from fedseal.client.data.prepare import finalize
    from fedseal.client.data.shards import column_specs
    from fedseal.client.data.spec import DEFAULT_CHUNK_SIZE, MANIFEST_NAME

    tag = f"bench sitedata: size={size} shard={shard} features={features}"
    if (directory / MANIFEST_NAME).is_file() and load_manifest(directory).source == tag:
        return "reused"
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    t0 = time.perf_counter()
    shards = max(1, round(size / shard))
    per_shard = size // shards
    row_group_rows = max(64, min(ROW_GROUP_BYTES, per_shard) // (4 * features))
    jobs = [
        (directory, list(range(p, shards, processes)), per_shard, features, row_group_rows)
        for p in range(processes)
    ]
    jobs = [j for j in jobs if j[1]]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        rows = sum(pool.map(_write_shards, jobs))
    schema = _schema(features)
    written = pq.read_schema(next(directory.glob("*.parquet"))).remove_metadata()
    described = DatasetSchema(column_specs(written), "label", ("x",), (features,), 1.0, _LABELS)
    del schema
    finalize(
        directory,
        described,
        rows=rows,
        chunk_size=DEFAULT_CHUNK_SIZE,
        salt=os.urandom(32),
        source=tag,
    )
    return f"generated in {time.perf_counter() - t0:.0f} s"


# -- phases (each in its own interpreter) -----------------------------------------------------


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - wall0, time.process_time() - cpu0


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def phase_attest(directory: Path, _args: argparse.Namespace) -> dict[str, Any]:
    from fedseal.client.data import verify_dataset

    att, wall, cpu = _timed(lambda: verify_dataset(directory, full=True))
    _, cached_wall, cached_cpu = _timed(lambda: verify_dataset(directory))
    return {"bytes": att.bytes, "rows": att.rows, "full_s": wall, "full_cpu_s": cpu,
            "cached_s": cached_wall, "cached_cpu_s": cached_cpu}  # fmt: skip


def phase_raw(directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    files = sorted(directory.glob("*.parquet"))

    def scan() -> int:
        rows = 0
        for path in files:
            with pq.ParquetFile(path, pre_buffer=False) as handle:
                for batch in handle.iter_batches(batch_size=args.read_rows, columns=["x", "label"]):
                    x = batch.column(0).flatten().to_numpy().reshape(batch.num_rows, -1)
                    y = batch.column(1).to_numpy()
                    rows += len(x) + 0 * int(y[:1].sum())
        return rows

    rows, wall, cpu = _timed(scan)
    return {"rows": rows, "s": wall, "cpu_s": cpu}


def phase_site(directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch import nn

    from fedseal.client.site_data import load_site_data
    from fedseal.client.training import TrainRequest, train, train_step

    torch.set_num_threads(args.torch_threads)  # as fl-client run: oversubscribed OpenMP crawls
    data, load_s, load_cpu = _timed(lambda: load_site_data(directory, validation_fraction=0.1, seed=7,
                                                           read_batch_rows=args.read_rows, num_workers=args.workers))  # fmt: skip
    part = data.train

    def stream() -> int:
        return sum(
            len(y) for _x, y in part.batches(batch_size=args.batch, seed=11, epoch=0, shuffle=True)
        )

    streamed, stream_s, stream_cpu = _timed(stream)

    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(data.num_features, args.hidden),
            nn.ReLU(),
            nn.Linear(args.hidden, data.num_classes),
        )

    req = TrainRequest(epochs=1, batch_size=args.batch, learning_rate=0.01)
    result, train_s, train_cpu = _timed(
        lambda: train(mlp(), data.x_train, data.y_train, req, seed=11)
    )

    model = mlp()  # the model's own ceiling: the same steps on in-memory batches
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    xb = torch.randn(args.batch, data.num_features)
    yb = torch.randint(0, data.num_classes, (args.batch,))
    steps = max(20, min(2000, part.num_rows // args.batch))
    _, model_s, _ = _timed(
        lambda: [train_step(model, opt, xb, yb, 0.0, torch.device("cpu")) for _ in range(steps)]
    )
    return {
        "train_rows": part.num_rows, "load_s": load_s, "load_cpu_s": load_cpu,
        "stream_rows": streamed, "stream_s": stream_s, "stream_cpu_s": stream_cpu,
        "train_s": train_s, "train_cpu_s": train_cpu, "train_examples": result.num_examples,
        "model_rows_per_s": steps * args.batch / model_s, "threads": torch.get_num_threads(),
        "memory_bound_mib": part.memory_bound(batch_size=args.batch) / (1 << 20),
    }  # fmt: skip


PHASES: dict[str, Callable[[Path, argparse.Namespace], dict[str, Any]]] = {
    "attest": phase_attest,
    "raw": phase_raw,
    "site": phase_site,
}


def _run_phase(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.bench_sitedata", "--phase", name, "--dir", str(args.dir),
           "--read-rows", str(args.read_rows), "--batch", str(args.batch), "--workers", str(args.workers), "--hidden", str(args.hidden),
           "--torch-threads", str(args.torch_threads)]  # fmt: skip
    done = subprocess.run(
        cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as info:
            model = next(
                (line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                "",
            )
    except OSError:
        pass
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "ram_gib": pages / (1 << 30),
        "load": os.getloadavg(),
    }


def report(results: dict[str, Any], args: argparse.Namespace, note: str) -> list[str]:
    """The Markdown lines of one run."""
    a, r, s = results["attest"], results["raw"], results["site"]
    gb = a["bytes"] / 1e9
    raw_rate = r["rows"] / r["s"]
    stream_rate = s["stream_rows"] / s["stream_s"]
    train_rate = s["train_examples"] / s["train_s"]
    m0, m1 = results["machine_start"], results["machine_end"]
    return [
        f"Dataset: {gb:.2f} GB of zstd Parquet in {results['shards']} shards, {a['rows']:,} rows of {args.features} float32 "
        f"features ({note}); batches of {args.batch}, record batches of {args.read_rows} rows, "
        f"{args.workers} loader workers, {s['threads']} torch threads.",
        f"Machine: {m0['cpus']} CPUs ({m0['cpu']}), {m0['ram_gib']:.0f} GiB RAM; load average "
        f"{m0['load'][0]:.1f} at start, {m1['load'][0]:.1f} at end.",
        "",
        "| phase | wall s | CPU s | rate | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| attestation, full (`verify_dataset(full=True)`) | {a['full_s']:.1f} | {a['full_cpu_s']:.1f} | {gb / a['full_s']:.2f} GB/s | {a['rss_mib']:.0f} |",
        f"| attestation, cached (`verify_dataset`) | {a['cached_s']:.2f} | {a['cached_cpu_s']:.2f} | | |",
        f"| raw pyarrow pass (baseline) | {r['s']:.1f} | {r['cpu_s']:.1f} | {raw_rate:,.0f} rows/s | {r['rss_mib']:.0f} |",
        f"| `load_site_data` (cached verify + counting pass) | {s['load_s']:.1f} | {s['load_cpu_s']:.1f} | {a['rows'] / s['load_s']:,.0f} rows/s | |",
        f"| site stream, training part, no model | {s['stream_s']:.1f} | {s['stream_cpu_s']:.1f} | {stream_rate:,.0f} rows/s ({stream_rate / raw_rate:.2f}x raw) | |",
        f"| site training epoch, MLP {args.features}-{args.hidden}-10 | {s['train_s']:.1f} | {s['train_cpu_s']:.1f} | {train_rate:,.0f} rows/s ({train_rate / raw_rate:.2f}x raw) | {s['rss_mib']:.0f} (whole site phase) |",
        f"| the MLP's steps on in-memory batches (ceiling) | | | {s['model_rows_per_s']:,.0f} rows/s | |",
        "",
        f"The loader's documented memory bound for this pass (`SiteSplit.memory_bound`): {s['memory_bound_mib']:.0f} MiB.",
    ]  # fmt: skip


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench sitedata")
    parser.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help="where the data is generated (reused if present)",
    )
    parser.add_argument("--size", type=parse_size, default=parse_size("20GB"))
    parser.add_argument("--shard", type=parse_size, default=parse_size("1.5GB"))
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=32, help="hidden width of the MLP")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="as fl-client run (FEDSEAL_TORCH_THREADS)"
    )
    parser.add_argument("--read-rows", type=int, default=8192)
    parser.add_argument(
        "--workers", type=int, default=0, help="DataLoader workers of the site path"
    )
    parser.add_argument(
        "--delete", action="store_true", help="delete the generated data afterwards"
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase is not None:
        out = PHASES[args.phase](args.dir, args)
        out["rss_mib"] = _peak_rss_mib()
        print(json.dumps(out), flush=True)
        return
    results: dict[str, Any] = {"machine_start": _machine()}
    try:
        note = generate(args.dir, size=args.size, shard=args.shard, features=args.features)
        results["shards"] = len(list(args.dir.glob("*.parquet")))
        for name in PHASES:
            results[name] = _run_phase(name, args)
        results["machine_end"] = _machine()
        for line in report(results, args, note):
            print(line)
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        if args.delete:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
