"""Data-parallel training inside a site: ``[training] devices``, one process per rank, DDP.

Usage::

    from fedseal.client.distributed import Devices
    devices = Devices.parse("cpu:2")          # or "auto", "cpu", "cuda", "cuda:1", ["cuda:0", "cuda:1"]
    devices.resolve()                         # (device(type='cpu'), device(type='cpu'))
    train_stream(model, data.train, req, seed=s, devices=devices)   # 2 gloo ranks, weights in model

``[training] devices`` (client.toml) takes one of:

=========================  =========================================================================
``"auto"`` (default)       every local GPU, one rank each (one GPU: one process); no GPU: one CPU
                           process
``"cpu"``                  one CPU process
``"cpu:N"``                N CPU ranks (gloo), 1 <= N <= 64
``"cuda"``                 every local GPU, one rank each
``"cuda:I"``               GPU I alone, in the site process
``["cuda:0", "cuda:2"]``   those GPUs, one rank each (NCCL)
=========================  =========================================================================

``[training] rank_timeout_s`` (default 600) bounds how long a rank waits for the others in a
collective (rendezvous included) before the whole training fails.

Rules of a training with several ranks (:func:`train_ranks`, which ``train_stream`` calls):

1. **Processes.** The site process spawns one fresh interpreter per rank (the ``spawn`` start
   method: CUDA cannot be forked) with a torchrun-style environment (``RANK``, ``WORLD_SIZE``,
   ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT`` a free
   loopback port); rank ``r`` runs on ``devices[r]`` under NCCL (CUDA) or gloo (CPU), with the
   site process's ``torch`` intra-op thread count (``FEDSEAL_TORCH_THREADS``). The site
   process is no rank: it alone holds the site's keys and talks to the coordinator. A rank gets
   the model, the data source, the request, the seed and the recipe's training parts, pickled;
   never a key, a secret or a message. Ranks exit when the site process dies.
2. **Data.** Each epoch, rank ``r`` of ``W`` reads the row groups ``order[r::W]`` of the
   seeded row-group order of the source (:func:`rank_batches`): the shards are disjoint and
   together are the whole pass, each read once. Rank ``r`` batches its rows ``max(1, b // W)``
   at a time, for the request's batch size ``b``.
3. **Steps.** Global step ``k`` is the ``k``-th batch of every rank. The ranks sum their batch
   sizes ``n_r`` (a 2-integer all-reduce on a gloo group of its own, started one step ahead so
   that it travels while the previous step computes): ``N = sum n_r``; the epoch ends when
   ``N == 0``. Rank ``r`` scales its batch's mean loss by ``n_r * W / N`` and
   DDP averages the gradients over ``W``, so the gradient is that of the mean loss over the
   ``N`` rows of the step, exactly what one process computes on that global batch. A rank whose
   shard ran out before the others' joins the step with its last batch at weight 0 (DDP needs
   every rank in every step; a model with batch statistics sees that batch again). Clipping (of
   the averaged gradient), the optimizer, FedProx, the recipe's hooks and autocast are the
   single-process loop's (:func:`~.training.train_step`); a recipe's ``step`` gets the DDP
   wrapper as its model (call it; its attributes are under ``.module``). Each rank keeps its own
   shuffle buffer: the loader's memory is W times one process's.
4. **Equivalence.** For a model without randomness in training (no dropout), with a mean-reduced
   loss and without batch statistics (no BatchNorm: each rank normalises over its own rows), W
   ranks give the weights one process gives when it trains on the global batches of step 3 (the
   concatenation of the ranks' ``k``-th batches) with the same seed, up to floating-point
   reduction order. ``tests/client/test_ddp.py`` checks it for 2 gloo ranks: max |Δw| <= 1e-5.
   Rank 0 seeds ``torch`` with the training seed, rank ``r > 0`` with a seed derived from it.
5. **Result.** Every rank counts the rows of every step (``sum N``); an epoch of another count
   than ``source.num_rows`` fails. Rank 0 sends its state dict (rows, mean loss: the mean over
   global steps of the global batch's mean loss) to the site process, which loads it into the
   caller's model: the model the site masks, signs and sends.
6. **Failure.** A rank that raises sends one line (its error's type and message) and exits; the
   site process then ends every rank and raises :class:`RankError` naming the rank. A rank
   that dies without a word (killed, out of memory) is named with its exit code. A rank stuck
   in a collective fails after ``rank_timeout_s``. The site process never waits on a collective.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from types import MappingProxyType
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fedseal.client.errors import SiteError
from fedseal.client.recipe import Recipe, Transform
from fedseal.client.training import (
    Batch,
    BatchSource,
    TrainRequest,
    TrainResult,
    _Hooks,
    _Proximal,
    _seeded,
    train_step,
)

__all__ = [
    "MAX_CPU_RANKS",
    "Devices",
    "DevicesError",
    "RankError",
    "RankSharded",
    "rank_batches",
    "train_ranks",
]

MAX_CPU_RANKS = 64
"""Most CPU ranks ``"cpu:N"`` may ask for."""
DEFAULT_RANK_TIMEOUT_S = 600.0
"""Seconds a rank waits for the others in a collective before the training fails."""
_KEY = "training.devices"
_GRACE_S = 2.0  # after a first failure: how long to wait for a rank's own error line


class DevicesError(SiteError, ValueError):
    """``[training] devices`` is malformed, or names a device this machine does not have."""


class RankError(SiteError, RuntimeError):
    """A rank of a multi-process training failed; the training ended (one line).

    Attributes:
        rank: The rank that failed first.
        world: The number of ranks.
        reason: Its error (``"Type: message"``) or how it exited.
    """

    def __init__(self, rank: int, world: int, reason: str) -> None:
        super().__init__(f"training rank {rank} of {world} failed: {reason}")
        self.rank = rank
        self.world = world
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Devices:
    """What ``[training] devices`` asks for (module docstring); resolved when training starts.

    Attributes:
        kind: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        cpu_ranks: CPU ranks (``kind == "cpu"``).
        gpus: The GPUs named (``kind == "cuda"``; empty: every local GPU).
        timeout_s: Process-group timeout of the ranks, seconds.
    """

    kind: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_ranks: int = 1
    gpus: tuple[int, ...] = ()
    timeout_s: float = DEFAULT_RANK_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "cpu", "cuda"):
            raise DevicesError(f"{_KEY}: unknown kind {self.kind!r}")
        if not 1 <= self.cpu_ranks <= MAX_CPU_RANKS:
            raise DevicesError(f"{_KEY}: cpu ranks must be in [1, {MAX_CPU_RANKS}]")
        if len(set(self.gpus)) != len(self.gpus) or any(i < 0 for i in self.gpus):
            raise DevicesError(f"{_KEY}: GPUs must be distinct indices >= 0")
        if not 1.0 <= self.timeout_s <= 86400.0:
            raise DevicesError("training.rank_timeout_s: must be in [1, 86400] seconds")

    @classmethod
    def parse(cls, value: object, *, timeout_s: float = DEFAULT_RANK_TIMEOUT_S) -> Devices:
        """The devices ``value`` (a TOML string or list of strings) names.

        Raises:
            DevicesError: One line naming ``training.devices`` and what is wrong.
        """
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("auto", "cpu", "cuda"):
                return cls(text, timeout_s=timeout_s)  # type: ignore[arg-type]
            kind, sep, num = text.partition(":")
            if sep and kind in ("cpu", "cuda") and num.isdigit() and num.isascii():
                if kind == "cpu":
                    return cls("cpu", cpu_ranks=int(num), timeout_s=timeout_s)
                return cls("cuda", gpus=(int(num),), timeout_s=timeout_s)
            raise DevicesError(
                f'{_KEY}: {value!r} is not "auto", "cpu", "cpu:N", "cuda", "cuda:I" '
                'or a list like ["cuda:0", "cuda:1"]'
            )
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            gpus: list[int] = []
            for item in value:
                kind, sep, num = item.strip().lower().partition(":")
                if kind != "cuda" or not sep or not (num.isdigit() and num.isascii()):
                    raise DevicesError(f'{_KEY}: list entry {item!r} is not "cuda:I"')
                gpus.append(int(num))
            if len(set(gpus)) != len(gpus):
                raise DevicesError(f"{_KEY}: a GPU is named twice")
            return cls("cuda", gpus=tuple(gpus), timeout_s=timeout_s)
        raise DevicesError(f"{_KEY}: must be a string or a non-empty list of strings")

    def resolve(self) -> tuple[torch.device, ...]:
        """One torch device per rank, on this machine.

        Raises:
            DevicesError: CUDA is asked for and torch sees no GPU, or a named GPU does not exist.
        """
        if self.kind == "cpu":
            return (torch.device("cpu"),) * self.cpu_ranks
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if self.kind == "auto":
            if count == 0:
                return (torch.device("cpu"),)
            return tuple(torch.device("cuda", i) for i in range(count))
        if count == 0:
            raise DevicesError(f"{_KEY}: asks for CUDA, and torch sees no GPU on this machine")
        missing = [i for i in self.gpus if i >= count]
        if missing:
            raise DevicesError(
                f"{_KEY}: cuda:{missing[0]} does not exist (this machine has {count} GPU(s))"
            )
        return tuple(torch.device("cuda", i) for i in (self.gpus or range(count)))


@runtime_checkable
class RankSharded(Protocol):
    """A :class:`~.training.BatchSource` that can read one rank's disjoint share of a pass.

    ``rank_batches(rank=r, world=W, ...)`` over ``r = 0..W-1`` yields every row of the pass
    once, each row in exactly one rank's share; deterministic for its arguments.
    """

    @property
    def num_rows(self) -> int: ...

    def batches(
        self, *, batch_size: int, seed: int, epoch: int, shuffle: bool
    ) -> Iterable[Batch]: ...

    def rank_batches(
        self, *, rank: int, world: int, batch_size: int, seed: int, epoch: int, shuffle: bool
    ) -> Iterable[Batch]: ...


def rank_batches(
    source: BatchSource,
    *,
    rank: int,
    world: int,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool,
) -> Iterator[Batch]:
    """Rank ``rank`` of ``world``'s share of one pass over ``source`` (rule 2).

    The source shards itself (:class:`RankSharded`: a site's
    :class:`~fedseal.client.site_data.SiteSplit` deals its row groups ``order[rank::world]``).

    Raises:
        ValueError: ``rank`` not in ``[0, world)``, or ``source`` cannot be sharded.
        fedseal.client.data.DatasetError: A shard fails mid-stream (raised by the source).
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    if isinstance(source, RankSharded):
        yield from source.rank_batches(
            rank=rank, world=world, batch_size=batch_size, seed=seed, epoch=epoch, shuffle=shuffle
        )
        return
    raise ValueError(
        f"{_KEY}: several ranks need data that can be sharded by rank (a site's dataset "
        f"split); a {type(source).__name__} cannot"
    )


# -- the site process ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Job:
    """Everything a rank gets (pickled once in the site process): no key, no message."""

    model: nn.Module
    source: BatchSource
    req: TrainRequest
    seed: int
    recipe: Recipe | None
    transform: Transform | None
    devices: tuple[torch.device, ...]
    timeout_s: float
    parent_pid: int
    threads: int


def _mappingproxy(items: dict[str, Any]) -> MappingProxyType[str, Any]:
    return MappingProxyType(items)


class _JobPickler(pickle.Pickler):
    """Pickle, plus the read-only mappings a :class:`Recipe` keeps its metrics in."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is MappingProxyType:
            return _mappingproxy, (dict(obj),)
        return NotImplemented


def _dumps(job: _Job) -> bytes:
    buf = io.BytesIO()
    try:
        _JobPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(job)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise DevicesError(
            f"{_KEY}: the model, data or recipe cannot be sent to the training ranks "
            f"({type(exc).__name__}: {exc}); define the recipe's parts at module level, or "
            'train in one process (devices = "cpu" or one GPU)'
        ) from exc
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_ranks(
    model: nn.Module,
    source: BatchSource,
    req: TrainRequest,
    *,
    seed: int,
    devices: Sequence[torch.device],
    recipe: Recipe | None = None,
    transform: Transform | None = None,
    timeout_s: float = DEFAULT_RANK_TIMEOUT_S,
) -> TrainResult:
    """Train ``model`` in place with one process per device (module docstring, rules 1-6).

    Args:
        model: The model (on the CPU); rank 0's trained weights are loaded into it.
        source: The training rows; sharded by :func:`rank_batches`.
        req: Hyper-parameters, already clamped; ``batch_size`` is the global batch.
        seed: The training seed.
        devices: One device per rank, all CPU or all CUDA (``train_stream`` calls this for
            two or more; one rank runs the same machinery, e.g. to check NCCL on one GPU).
        recipe: The site's recipe (``None``: fedseal's default training).
        transform: The recipe's fitted preprocessing.
        timeout_s: Process-group timeout of the ranks.

    Returns:
        ``num_examples``: the rows of one epoch over all ranks; ``steps``: global steps.

    Raises:
        DevicesError: No device, CPU and CUDA mixed, or the job cannot be pickled.
        RankError: A rank failed (names it and its error); every rank has been ended.
        ValueError: The source is empty.
    """
    world = len(devices)
    if world < 1:
        raise DevicesError(f"{_KEY}: no device to train on")
    if len({d.type for d in devices}) != 1:
        raise DevicesError(f"{_KEY}: ranks cannot mix CPU and CUDA devices")
    if source.num_rows <= 0:
        raise ValueError("bad training data: the stream has no rows")
    _Hooks.of(recipe, transform)  # a missing or unexpected transform fails here, not in a rank
    job = _Job(
        model=model,
        source=source,
        req=req,
        seed=seed,
        recipe=recipe,
        transform=transform,
        devices=tuple(devices),
        timeout_s=timeout_s,
        parent_pid=os.getpid(),
        threads=torch.get_num_threads(),
    )
    payload = _dumps(job)
    port = _free_port()
    ctx = tmp.get_context("spawn")
    procs: list[Any] = []
    conns: list[Connection] = []
    try:
        for rank in range(world):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_rank_main,
                args=(rank, world, port, payload, send),
                name=f"fedseal-train-rank-{rank}",
            )
            proc.start()
            send.close()
            procs.append(proc)
            conns.append(recv)
        done = _collect(procs, conns)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join()
        for conn in conns:
            conn.close()
    state = torch.load(io.BytesIO(done.state), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return TrainResult(num_examples=done.rows, mean_loss=done.mean_loss, steps=done.steps)


@dataclass(frozen=True, slots=True)
class _Done:
    rows: int
    mean_loss: float
    steps: int
    state: bytes = field(repr=False)


def _collect(procs: Sequence[Any], conns: Sequence[Connection]) -> _Done:
    """Wait for every rank; the first failure ends the wait (after a short grace in which a
    rank's own error line is preferred over a peer's broken collective)."""
    world = len(procs)
    open_conns = dict(enumerate(conns))
    exited: set[int] = set()
    results: dict[int, _Done] = {}
    failures: list[tuple[int, str, bool]] = []  # (rank, reason, the rank's own error)
    deadline: float | None = None

    def read(rank: int) -> None:
        conn = open_conns.get(rank)
        while conn is not None and conn.poll():
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                del open_conns[rank]
                return
            if msg[0] == "error":
                failures.append((rank, str(msg[1]), bool(msg[2])))
            elif msg[0] == "done":
                results[rank] = _Done(rows=msg[1], mean_loss=msg[2], steps=msg[3], state=msg[4])

    while len(exited) < world and (deadline is None or time.monotonic() < deadline):
        running = [r for r in range(world) if r not in exited]
        waitables: list[Any] = [*open_conns.values(), *(procs[r].sentinel for r in running)]
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = wait(waitables, timeout=timeout)
        for rank in range(world):
            if open_conns.get(rank) in ready:
                read(rank)
            if rank in running and procs[rank].sentinel in ready:
                procs[rank].join()
                read(rank)  # what it wrote before it exited
                exited.add(rank)
                if not any(f[0] == rank for f in failures) and rank not in results:
                    failures.append((rank, _exit_reason(procs[rank].exitcode), False))
        if failures and deadline is None:
            deadline = time.monotonic() + _GRACE_S
    if failures:
        rank, reason, _ = next((f for f in failures if f[2]), failures[0])
        raise RankError(rank, world, reason)
    return results[0]


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {-code} (out of memory, or ended from outside)"
    return f"exited with code {code} without sending its result or an error"


# -- a rank -------------------------------------------------------------------------------------


def _watch_parent(parent_pid: int) -> None:
    """End this rank when the site process is gone (re-parented: the site was killed)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, name="fedseal-parent-watch", daemon=True).start()


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:500]


def _is_peer_failure(exc: BaseException) -> bool:
    """A collective that failed, most likely because a peer did (not this rank's own error)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return type(exc) is RuntimeError and any(w in text for w in ("gloo", "nccl", "connection"))


def _rank_main(rank: int, world: int, port: int, payload: bytes, conn: Connection) -> None:
    """A rank's process: rendezvous, train its shard under DDP, report, exit."""
    try:
        job: _Job = pickle.loads(payload)  # noqa: S301  (bytes the site process just pickled)
        _watch_parent(job.parent_pid)
        device = job.devices[rank]
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        torch.set_num_threads(job.threads)  # the site's (FEDSEAL_TORCH_THREADS), per rank
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=job.timeout_s),
        )
        try:
            rows, mean_loss, steps, model = _train_rank(job, rank, world, device)
            state = b""
            if rank == 0:
                buf = io.BytesIO()
                torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
                state = buf.getvalue()
            conn.send(("done", rows, mean_loss, steps, state))
        finally:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    except BaseException as exc:  # report every failure, then exit without hanging on teardown
        with contextlib.suppress(Exception):
            conn.send(("error", _one_line(exc), not _is_peer_failure(exc)))
            conn.close()
        sys.stderr.flush()
        os._exit(1)
    conn.close()


def _rank_seed(seed: int, rank: int) -> int:
    if rank == 0:
        return seed
    tag = b"fedseal/v1/rank-seed\x00" + seed.to_bytes(8, "big") + rank.to_bytes(4, "big")
    return int.from_bytes(hashlib.sha256(tag).digest()[:8], "big") & ((1 << 63) - 1)


class _Counts:
    """One step's ``(rows over all ranks, ranks that never had a batch)``, being all-reduced."""

    def __init__(self, counts: torch.Tensor, work: Any) -> None:
        self.counts = counts
        self.work = work

    def wait(self) -> tuple[int, int]:
        self.work.wait()
        return int(self.counts[0]), int(self.counts[1])


def _post_counts(batch: Batch | None, last: Batch | None, group: Any) -> _Counts:
    """Start the all-reduce of a step's counts (rule 3) without waiting for it."""
    n = 0 if batch is None else len(batch[1])
    counts = torch.tensor([n, int(batch is None and last is None)], dtype=torch.int64)
    return _Counts(counts, dist.all_reduce(counts, group=group, async_op=True))


def _train_rank(
    job: _Job, rank: int, world: int, device: torch.device
) -> tuple[int, float, int, nn.Module]:
    """Rules 2-5 on this rank: returns (rows per epoch, mean loss, global steps, model)."""
    req, source = job.req, job.source
    expected = source.num_rows
    hooks = _Hooks.of(job.recipe, job.transform)
    model = job.model.to(device).train()
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    counts_group = dist.new_group(backend="gloo")  # rule 3's counts, beside DDP's all-reduces
    opt = hooks.optimizer(model, req, device)
    prox = _Proximal.of(model, req)
    batch_size = max(1, req.batch_size // world)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    steps = 0
    last: Batch | None = None
    with _seeded(_rank_seed(job.seed, rank), device):
        for epoch in range(req.epochs):
            rows = 0
            stream = iter(
                rank_batches(
                    source, rank=rank, world=world, batch_size=batch_size, seed=job.seed,
                    epoch=epoch, shuffle=True,
                )
            )  # fmt: skip
            batch = next(stream, None)
            counted = _post_counts(batch, last, counts_group)
            while True:
                total, starved = counted.wait()
                if total == 0:
                    break
                n = 0 if batch is None else len(batch[1])
                last = batch if batch is not None else last
                if starved or last is None:  # the same on every rank: all raise it
                    raise ValueError(
                        f"bad training data: a rank of {world} has no rows in epoch {epoch} "
                        "(fewer row groups than ranks: use fewer ranks or smaller row groups)"
                    )
                # the next step's counts travel while this step computes
                batch = None if batch is None else next(stream, None)
                counted = _post_counts(batch, last, counts_group)
                xb = hooks.features(last[0].to(device, non_blocking=True))
                yb = last[1].to(device, non_blocking=True)
                data_loss = train_step(
                    ddp, opt, xb, yb, req.clip_norm, device, prox,
                    objective=hooks.objective, loss_scale=n * world / total,
                )  # fmt: skip
                loss_sum += data_loss.double() * (n / total)
                steps += 1
                rows += total
            if rows != expected:
                raise ValueError(
                    f"bad training data: epoch {epoch} streamed {rows} rows over {world} ranks, "
                    f"the source has {expected}"
                )
    dist.all_reduce(loss_sum)
    mean_loss = float(loss_sum) / steps if steps else 0.0
    return expected, mean_loss, steps, model
