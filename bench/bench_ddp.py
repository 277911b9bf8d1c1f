"""Multi-process training inside a site: fedseal's DDP ranks vs a bare DDP loop on the same data
(``python -m bench ddp [--devices cpu:2] [--rows 60000] [--epochs 2] [--repeats 2]``).

One generated site dataset (synthetic 28x28 uint8 digits as zstd Parquet shards with 2,048-row
groups, prepared and attested like a site's data; not timed), the demo MLP or CNN, SGD with
momentum 0.9, the same global batch ``b`` (each of W ranks batches ``b // W``):

- **fedseal, W ranks**: :func:`fedseal.client.distributed.train_ranks`, what
  ``train_stream(..., devices=...)`` runs for ``[training] devices`` with several devices:
  spawn W ranks, rendezvous, each rank reads its row groups of the split, per-step row counts,
  weighted loss, clipping, rank 0's weights back into the site's model.
- **bare DDP loop, W ranks**: the same spawn start method, process group and per-rank data
  (:func:`fedseal.client.distributed.rank_batches` of the same split), ``DistributedDataParallel``
  and a plain ``zero_grad / cross_entropy / backward / step`` under ``join()`` (uneven shards),
  no clipping, no loss bookkeeping, weights not sent back.
- **fedseal, one process** (for reference): ``train_stream`` on the first device.

Every process runs ``--threads`` torch intra-op threads (default 1, a site's
``FEDSEAL_TORCH_THREADS`` default; fedseal's ranks inherit the site process's count).

Timing: every arm reads the split through :class:`TimedSource`, which notes on rank 0 when the
first epoch's first batch is asked for and when the last epoch's stream is exhausted: the
training loop as the ranks run it (data, steps, all-reduces), the same clock for all arms (for
fedseal's loop, which asks one batch ahead, the last step falls after the mark: at most one step
in a few hundred). Spawn to exit is also shown: the fixed start cost (interpreters, imports,
rendezvous, DDP set-up) is paid once per training call, i.e. per round. samples/s per rank =
rows x epochs / loop seconds / W. Arms alternate, median of ``--repeats``. The same command runs
on GPUs (``--devices cuda`` or ``--devices cuda:0,cuda:1``; one GPU: one NCCL rank, the
plumbing without a peer).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class Run:
    seconds: float  # spawn to exit (one process: the call)
    loop_seconds: float  # rank 0: first batch asked for -> last epoch's stream exhausted


_started: list[float] = []


@dataclass(frozen=True)
class TimedSource:
    """The split, with rank 0's loop timed into ``out`` (pickled into the ranks with it)."""

    inner: Any
    epochs: int
    out: str

    @property
    def num_rows(self) -> int:
        return int(self.inner.num_rows)

    def batches(self, *, batch_size: int, seed: int, epoch: int, shuffle: bool) -> Any:
        return self.rank_batches(
            rank=0, world=1, batch_size=batch_size, seed=seed, epoch=epoch, shuffle=shuffle
        )

    def rank_batches(
        self, *, rank: int, world: int, batch_size: int, seed: int, epoch: int, shuffle: bool
    ) -> Any:
        if rank == 0 and epoch == 0:
            _started[:] = [time.monotonic()]
        yield from self.inner.rank_batches(
            rank=rank, world=world, batch_size=batch_size, seed=seed, epoch=epoch, shuffle=shuffle
        )
        if rank == 0 and epoch == self.epochs - 1:
            Path(self.out).write_text(f"{time.monotonic() - _started[0]:.6f}")

    def loop_seconds(self) -> float:
        return float(Path(self.out).read_text())


def _dataset(tmp: Path, rows: int, seed: int) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fedseal.client.data.prepare import PrepareOptions, prepare_dataset
    from fedseal.client.site_data import load_site_data

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=rows, dtype=np.int64)
    pixels = rng.integers(0, 256, size=rows * 784, dtype=np.uint8)
    table = pa.table(
        {"pixels": pa.FixedSizeListArray.from_arrays(pa.array(pixels), 784), "label": pa.array(y)}
    )
    pq.write_table(table, tmp / "source.parquet")
    prepare_dataset(
        tmp / "source.parquet",
        tmp / "dataset",
        salt=bytes(32),
        options=PrepareOptions(row_group_rows=2048),
    )
    return load_site_data(tmp / "dataset", validation_fraction=0.01, seed=seed)


def _bare_rank(
    rank: int, world: int, port: int, devices: list[str], source: Any, model: Any, args: Any
) -> None:
    """One rank of the bare loop: DDP, plain steps, ``join()`` for uneven shards."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from fedseal.client.distributed import rank_batches

    device = torch.device(devices[rank])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=600),
    )
    model = model.to(device).train()
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    with ddp.join():
        for epoch in range(args.epochs):
            for xb, yb in rank_batches(
                source,
                rank=rank,
                world=world,
                batch_size=max(1, args.batch_size // world),
                seed=args.seed,
                epoch=epoch,
                shuffle=True,
            ):
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    loss = torch.nn.functional.cross_entropy(ddp(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.destroy_process_group()


def bare_loop(devices: list[str], source: Any, model: Any, args: Any) -> Run:
    import torch.multiprocessing as tmp

    from fedseal.client.distributed import _free_port

    ctx = tmp.get_context("spawn")
    port = _free_port()
    world = len(devices)
    t0 = time.perf_counter()
    procs = [
        ctx.Process(target=_bare_rank, args=(r, world, port, devices, source, model, args))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    seconds = time.perf_counter() - t0
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"bare DDP loop: a rank exited with {[p.exitcode for p in procs]}")
    return Run(seconds, source.loop_seconds())


def fedseal_ranks(devices: list[str], source: Any, model: Any, args: Any) -> Run:
    import torch

    from fedseal.client.distributed import train_ranks
    from fedseal.client.training import TrainRequest

    req = TrainRequest(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr)
    t0 = time.perf_counter()
    train_ranks(model, source, req, seed=args.seed, devices=[torch.device(d) for d in devices])
    return Run(time.perf_counter() - t0, source.loop_seconds())


def fedseal_one(device: str, source: Any, model: Any, args: Any) -> Run:
    import torch

    from fedseal.client.distributed import Devices
    from fedseal.client.training import TrainRequest, train_stream

    req = TrainRequest(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr)
    spec = Devices.parse("cpu" if device == "cpu" else device)
    t0 = time.perf_counter()
    train_stream(model, source, req, seed=args.seed, devices=spec)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return Run(time.perf_counter() - t0, source.loop_seconds())


def _devices(text: str) -> list[str]:

    from fedseal.client.distributed import Devices

    if "," in text:
        spec = Devices.parse([t.strip() for t in text.split(",")])
    else:
        spec = Devices.parse(text)
    return [str(d) for d in spec.resolve()]


def main(argv: list[str]) -> None:
    import platform

    import torch

    from fedseal.client.models import build_model

    parser = argparse.ArgumentParser(prog="python -m bench ddp")
    parser.add_argument("--devices", default="cpu:2", help='"cpu:N", "cuda", "cuda:0,cuda:1"')
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256, help="global batch")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (a site's default: 1)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # as fl-client run (FEDSEAL_TORCH_THREADS); ranks inherit
    devices = _devices(args.devices)
    world = len(devices)
    with tempfile.TemporaryDirectory(prefix="fedseal-bench-ddp-") as tmp:
        data = _dataset(Path(tmp), args.rows, args.seed)
        source = TimedSource(data.train, args.epochs, str(Path(tmp) / "loop-seconds"))
        rows = source.num_rows * args.epochs
        runs: dict[str, list[Run]] = {k: [] for k in ("fedseal", "bare", "one")}
        for _ in range(args.repeats):
            model = build_model(args.model, seed=0)
            runs["bare"].append(bare_loop(devices, source, model, args))
            runs["fedseal"].append(fedseal_ranks(devices, source, model, args))
            runs["one"].append(fedseal_one(devices[0], source, model, args))
    loop = {k: statistics.median(r.loop_seconds for r in v) for k, v in runs.items()}
    e2e = {k: statistics.median(r.seconds for r in v) for k, v in runs.items()}
    card = torch.cuda.get_device_name(0) if devices[0].startswith("cuda") else platform.processor()
    print(
        f"devices: {', '.join(devices)} ({card or platform.machine()}, {os.cpu_count()} CPUs); "
        f"torch {torch.__version__}; {args.model}, {source.num_rows:,} training rows x "
        f"{args.epochs} epochs, global batch {args.batch_size} ({max(1, args.batch_size // world)}"
        f" per rank); {args.threads} torch thread(s) per process; median of {args.repeats}\n"
    )
    print("| arm | loop s | samples/s | samples/s per rank | vs bare DDP | spawn to exit s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    arms = (
        (f"fedseal `train_stream`, {world} ranks", "fedseal", world),
        (f"bare DDP loop, {world} ranks", "bare", world),
        (f"fedseal `train_stream`, one process on {devices[0]}", "one", 1),
    )
    for label, key, ranks in arms:
        rate = rows / loop[key]
        ratio = loop["bare"] / loop[key]
        print(
            f"| {label} | {loop[key]:.2f} | {rate:,.0f} | {rate / ranks:,.0f} | {ratio:.2f} | "
            f"{e2e[key]:.2f} |"
        )
