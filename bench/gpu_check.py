"""GPU check: fedseal's site training path vs a bare PyTorch loop, plus one secure round.

Run through ``bench/gpu_check.sh`` (or ``python -m bench.gpu_check``). On a CUDA machine both
loops train the demo CNN under bf16 autocast on the GPU; elsewhere they run on the CPU (the CI
smoke test). Output: a Markdown table, then one ``gpu_check-json: {...}`` line for scripts.

1. **Training throughput.** The same tensors (seeded synthetic 28x28 digits, N x 784 float32 and
   int64 labels), the same model (``build_model("cnn", seed=0)``), the same optimizer (SGD,
   momentum 0.9), batch size and epochs, one untimed warm-up epoch each:
   - fedseal: :func:`fedseal.client.training.train` (what ``fl-client`` runs each round: device
     selection, host->device copy, shuffling, autocast, gradient clipping, per-step loss).
   - baseline: a bare PyTorch loop over the same tensors (host->device copy included, no
     clipping, no per-step host synchronisation).
   Reported: samples/s of both and fedseal / baseline (goal >= 0.90). Then the path as
   ``fl-client`` runs it on a site's data: the same tensors written as Parquet shards and
   streamed by the site's loader (``--stream-workers``), each against the same baseline.
2. **Secure round.** Three in-process sites (:class:`fedseal.sim.inmemory.Federation`)
   each train the CNN on their third of the tensors through the same training path, then run a
   full SecAgg+ round (key adverts, encrypted shares, masked inputs, consistency check, unmask)
   on the flattened weight deltas. Checked: the unmasked weighted mean equals the plain weighted
   mean of the three deltas within the quantization bound.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Throughput:
    samples: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("inf")


def make_tensors(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded synthetic digits: (n, 784) float32 in [0, 1) and (n,) int64 labels in 0..9."""
    rng = np.random.default_rng(seed)
    return rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, size=n, dtype=np.int64)


def _sync() -> None:
    """Wait for queued GPU work, so a timer measures work done, not work launched."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median(runs: list[Throughput]) -> Throughput:
    """The run with the median samples/s (the lower middle one of an even count)."""
    return sorted(runs, key=lambda t: t.per_second)[(len(runs) - 1) // 2]


def bare_loop(x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int, lr: float, seed: int) -> Throughput:
    """The baseline: a plain PyTorch training loop on the same tensors."""
    import torch
    from torch import nn

    from fedseal.client.models import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model("cnn", seed=0).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    use_amp = device.type == "cuda"

    def epoch(xt: torch.Tensor, yt: torch.Tensor) -> None:
        order = torch.randperm(len(xt), generator=gen).to(device)
        for start in range(0, len(xt), batch_size):
            idx = order[start : start + batch_size]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    warm = min(len(x), 4 * batch_size)
    epoch(torch.from_numpy(x[:warm]).to(device), torch.from_numpy(y[:warm]).to(device))
    _sync()
    t0 = time.perf_counter()
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    for _ in range(epochs):
        epoch(xt, yt)
    _sync()
    return Throughput(len(x) * epochs, time.perf_counter() - t0)


def fedseal_loop(x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int, lr: float, seed: int) -> Throughput:
    """fedseal's site training path (fedseal.client.training.train)."""
    from fedseal.client.models import build_model
    from fedseal.client.training import TrainRequest, train

    model = build_model("cnn", seed=0)
    warm = min(len(x), 4 * batch_size)
    train(model, x[:warm], y[:warm], TrainRequest(epochs=1, batch_size=batch_size, learning_rate=lr), seed)
    _sync()
    t0 = time.perf_counter()
    result = train(model, x, y, TrainRequest(epochs=epochs, batch_size=batch_size, learning_rate=lr), seed)
    _sync()
    return Throughput(result.num_examples * epochs, time.perf_counter() - t0)


def streamed_loop(
    x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int, lr: float, seed: int, workers: int
) -> Throughput:
    """fedseal's site training path as ``fl-client`` runs it: the same tensors written as a
    site dataset (zstd Parquet shards + manifest), attested, split, and streamed by the site's
    loader (shuffle buffer, pinned memory and non-blocking copies on CUDA) with ``workers``
    DataLoader worker processes. Writing and attesting the dataset is not timed."""
    import tempfile
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from fedseal.client.data.prepare import PrepareOptions, prepare_dataset
    from fedseal.client.models import build_model
    from fedseal.client.site_data import load_site_data
    from fedseal.client.training import TrainRequest, train

    with tempfile.TemporaryDirectory(prefix="fedseal-gpu-check-") as tmp:
        source = Path(tmp) / "tensors.parquet"
        width = int(x.shape[1])
        # Stored as MNIST's pixels are, one uint8 per value (0..255; the loader's scale is left
        # at 1, the values do not change the work), in row groups of 2,048 rows so that
        # loader workers have row groups to share.
        stored = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8).reshape(-1)
        pixels = pa.FixedSizeListArray.from_arrays(pa.array(stored), width)
        pq.write_table(pa.table({"pixels": pixels, "label": pa.array(y)}), source)
        prepare_dataset(source, Path(tmp) / "dataset", salt=bytes(32), options=PrepareOptions(row_group_rows=2048))
        data = load_site_data(Path(tmp) / "dataset", validation_fraction=0.01, seed=seed, num_workers=workers)
        model = build_model("cnn", seed=0)
        _sync()
        t0 = time.perf_counter()
        result = train(model, data.x_train, data.y_train, TrainRequest(epochs=epochs, batch_size=batch_size, learning_rate=lr), seed)
        _sync()
        return Throughput(result.num_examples * epochs, time.perf_counter() - t0)


@dataclass(frozen=True, slots=True)
class RoundCheck:
    ok: bool
    survivors: int
    parameters: int
    seconds: float
    max_abs_error: float
    bound: float
    failure: str


def secure_round(x: np.ndarray, y: np.ndarray, batch_size: int, lr: float, seed: int) -> RoundCheck:
    """Three in-process sites train through fedseal's path and run one full secure round."""
    import torch

    from fedseal.client.models import build_model, state_dict_to_numpy
    from fedseal.client.training import TrainRequest, train
    from fedseal.protocol.client import LocalUpdate, RoundInfo
    from fedseal.protocol.config import QuantizationConfig, RoundConfig
    from fedseal.sim.inmemory import Federation, dataset_root_for

    sites = ["site-a", "site-b", "site-c"]
    shares = dict(zip(sites, np.array_split(np.arange(len(x)), len(sites)), strict=True))
    global_model = build_model("cnn", seed=0)

    def flat(model: torch.nn.Module) -> np.ndarray:
        arrays = state_dict_to_numpy(model)
        return np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays.values()])

    start = flat(global_model)
    deltas: dict[str, np.ndarray] = {}

    def updates(site: str, info: RoundInfo) -> LocalUpdate:
        idx = shares[site]
        model = build_model("cnn", seed=0)
        train(model, x[idx], y[idx], TrainRequest(epochs=1, batch_size=batch_size, learning_rate=lr), seed)
        deltas[site] = flat(model) - start
        return LocalUpdate(deltas[site], len(idx), dataset_root_for(site))

    clip = 1.0
    quant = QuantizationConfig.from_clip(clip, 1 << 16)
    config = RoundConfig(vector_length=start.size, quantization=quant, max_weight=max(len(v) for v in shares.values()))
    fed = Federation(
        config,
        sites,
        seed=hashlib.sha256(b"gpu_check" + seed.to_bytes(4, "big")).digest(),
        updates=updates,
        rounding_rng=lambda s: np.random.default_rng([seed, sites.index(s)]),
    )
    t0 = time.perf_counter()
    outcome = fed.run_round(1, now=time.time())
    seconds = time.perf_counter() - t0
    if outcome.result is None:
        return RoundCheck(False, 0, start.size, seconds, float("nan"), 0.0, repr(outcome.failure))
    res = outcome.result
    weights = {s: len(shares[s]) for s in sites}
    plain = sum(np.clip(deltas[s], -clip, clip).astype(np.float64) * weights[s] for s in sites) / sum(weights.values())
    secure = res.weighted_sum / res.total_weight
    err = float(np.max(np.abs(secure - plain)))
    bound = clip / (1 << 16)  # one quantization step (stochastic rounding error per element)
    return RoundCheck(err <= bound and len(res.survivors) == 3, len(res.survivors), start.size, seconds, err, bound, "")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=50_000, help="training tensors (N)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--round-samples", type=int, default=6_000, help="tensors split over 3 sites for the secure round")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each in-memory loop, alternating (median reported)")
    parser.add_argument(
        "--stream-workers", type=int, nargs="*", default=[0, 4], metavar="W",
        help="also train streamed from Parquet shards with W DataLoader workers (none: skip)",
    )
    args = parser.parse_args(argv)
    if min(args.samples, args.epochs, args.batch_size, args.round_samples, args.repeats) < 1:
        parser.error("sizes must be positive")
    if any(not 0 <= w <= 64 for w in args.stream_workers):
        parser.error("--stream-workers must be in 0..64")
    try:
        import torch

        from fedseal.client import training  # noqa: F401
        from fedseal.sim import inmemory  # noqa: F401
    except ImportError as exc:
        print(f"gpu_check: SKIP: fedseal's training path or protocol simulator is missing ({exc})")
        return 0

    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine()
    amp = "bf16 autocast" if device == "cuda" else "fp32 (no autocast on CPU)"
    x, y = make_tensors(args.samples, args.seed)
    base_runs: list[Throughput] = []
    our_runs: list[Throughput] = []
    for _ in range(args.repeats):  # alternating, so a slow spell of a shared machine hits both
        base_runs.append(bare_loop(x, y, args.epochs, args.batch_size, args.lr, args.seed))
        our_runs.append(fedseal_loop(x, y, args.epochs, args.batch_size, args.lr, args.seed))
    base, ours = median(base_runs), median(our_runs)
    ratio = ours.per_second / base.per_second
    streamed = {w: streamed_loop(x, y, args.epochs, args.batch_size, args.lr, args.seed, w) for w in args.stream_workers}
    xr, yr = make_tensors(args.round_samples, args.seed + 1)
    rnd = secure_round(xr, yr, args.batch_size, args.lr, args.seed)

    print(f"device: {device} ({card}); torch {torch.__version__}; {amp}; demo CNN, "
          f"N={args.samples:,} x {args.epochs} epochs, batch {args.batch_size}; in-memory loops: median of "
          f"{args.repeats} alternating runs\n")
    print("| loop | samples/s | seconds |")
    print("| --- | ---: | ---: |")
    print(f"| bare PyTorch (baseline) | {base.per_second:,.0f} | {base.seconds:.2f} |")
    print(f"| fedseal client training path | {ours.per_second:,.0f} | {ours.seconds:.2f} |")
    print(f"| **fedseal / baseline** | **{ratio:.2f}** | goal >= 0.90 |")
    for w, t in streamed.items():
        print(f"| fedseal streamed from Parquet shards, {w} loader workers | {t.per_second:,.0f} | {t.seconds:.2f} |")
        print(f"| streamed / baseline ({w} workers) | {t.per_second / base.per_second:.2f} | |")
    print()
    verdict = "ok" if rnd.ok else "FAILED"
    print(f"secure round: {verdict}: 3 in-process sites, {rnd.survivors} survivors, {rnd.parameters:,} parameters, "
          f"{rnd.seconds:.2f} s (training included); max |secure - plain| = {rnd.max_abs_error:.2e} "
          f"(bound {rnd.bound:.2e}){' ' + rnd.failure if rnd.failure else ''}")
    summary = {
        "device": device,
        "card": card,
        "torch": torch.__version__,
        "samples": args.samples,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "baseline_samples_per_s": round(base.per_second, 1),
        "fedseal_samples_per_s": round(ours.per_second, 1),
        "ratio": round(ratio, 4),
        "repeats": args.repeats,
        "runs_samples_per_s": {
            "baseline": [round(t.per_second, 1) for t in base_runs],
            "fedseal": [round(t.per_second, 1) for t in our_runs],
        },
        "streamed": {
            str(w): {"samples_per_s": round(t.per_second, 1), "ratio": round(t.per_second / base.per_second, 4)}
            for w, t in streamed.items()
        },
        "secure_round": asdict(rnd),
    }
    print(f"gpu_check-json: {json.dumps(summary, sort_keys=True)}")
    return 0 if rnd.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
