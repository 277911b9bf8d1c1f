"""Training on several ranks inside a site: DDP over gloo on CPU, sharded data, one result.

The equivalence tests state the claim of :mod:`fedseal.client.distributed` (rule 4): W ranks,
each batching ``b // W`` of its own shard, end with the weights one process gets when it trains
on the same global batches (the ranks' k-th batches concatenated) with the same seed. Both runs
do the same float32 arithmetic except the order of two sums (the gradient as a weighted sum of
the ranks' partial gradients instead of one sum over the global batch, and DDP's bucketed
all-reduce), each exact to about 1e-7 relative; over one epoch of a few dozen SGD steps
(momentum 0.9, lr 0.05) with weights of order 0.1-1 the differences stay near float32's
resolution (measured: max |dw| = 1.2e-7 for the MLP test below), so ``atol = 1e-5`` leaves two
orders of magnitude of margin and still fails on any real difference: without the per-rank loss
weight of rule 3 (the tail steps, where one rank has run out, averaged over 2 instead of 1) the
same test gives max |dw| = 1.4e-2.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from fedseal.client.config import ClientConfigError, load_client_config
from fedseal.client.data import PrepareOptions, prepare_dataset
from fedseal.client.distributed import (
    Devices,
    DevicesError,
    RankError,
    rank_batches,
)
from fedseal.client.flower_app import SiteRuntime
from fedseal.client.models import build_model
from fedseal.client.recipe import Recipe, Standardize
from fedseal.client.site_data import load_site_data
from fedseal.client.training import (
    BatchSource,
    StreamedFeatures,
    TrainRequest,
    fit_preprocessing,
    train_stream,
)
from tests.client._data_support import make_dataset
from tests.client._recipes import RowCount, small_mlp

Batch = tuple[torch.Tensor, torch.Tensor]
ATOL = 1e-5
CPU2 = Devices.parse("cpu:2")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _ranks_import_this_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ranks unpickle this module's sources by name: give them the repository on sys.path
    (spawned interpreters start from the parent's sys.path)."""
    monkeypatch.syspath_prepend(str(ROOT))


@dataclass(frozen=True)
class ArraySource:
    """In-memory rows sharded unevenly by rank: rank 0 gets 60% of each epoch's permutation, the
    other ranks share the rest (so the ranks run out at different steps). ``fail_rank`` raises
    after its first batch; ``kill_rank`` kills its own process there."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]
    fail_rank: int = -1
    kill_rank: int = -1

    @property
    def num_rows(self) -> int:
        return len(self.y)

    def batches(self, *, batch_size: int, seed: int, epoch: int, shuffle: bool) -> Iterator[Batch]:
        yield from self.rank_batches(
            rank=0, world=1, batch_size=batch_size, seed=seed, epoch=epoch, shuffle=shuffle
        )

    def rank_batches(
        self, *, rank: int, world: int, batch_size: int, seed: int, epoch: int, shuffle: bool
    ) -> Iterator[Batch]:
        n = len(self.y)
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        head = n if world == 1 else int(n * 0.6)
        bounds = [0, head, *(head + (n - head) * k // (world - 1) for k in range(1, world))]
        mine = order[bounds[rank] : bounds[rank + 1]]
        for i, start in enumerate(range(0, len(mine), batch_size)):
            if i == 1 and rank == self.fail_rank:
                raise ValueError("shard-00003.parquet: row group 2 is corrupt")
            if i == 1 and rank == self.kill_rank:
                os.kill(os.getpid(), signal.SIGKILL)
            idx = mine[start : start + batch_size]
            yield torch.from_numpy(self.x[idx]), torch.from_numpy(self.y[idx])


class GlobalBatches:
    """One process's view of W ranks' steps: batch k is the ranks' k-th batches concatenated."""

    def __init__(self, inner: BatchSource, world: int) -> None:
        self.inner = inner
        self.world = world

    @property
    def num_rows(self) -> int:
        return self.inner.num_rows

    def batches(self, *, batch_size: int, seed: int, epoch: int, shuffle: bool) -> Iterator[Batch]:
        streams = [
            rank_batches(
                self.inner, rank=r, world=self.world, batch_size=max(1, batch_size // self.world),
                seed=seed, epoch=epoch, shuffle=shuffle,
            )
            for r in range(self.world)
        ]  # fmt: skip
        while True:
            parts = [b for b in (next(s, None) for s in streams) if b is not None]
            if not parts:
                return
            yield torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _synthetic(n: int = 1000, features: int = 20, classes: int = 4) -> ArraySource:
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(classes, features)).astype(np.float32)
    y = rng.integers(0, classes, size=n).astype(np.int64)
    x = (centres[y] + rng.normal(scale=0.8, size=(n, features))).astype(np.float32)
    return ArraySource(x, y)


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


@pytest.mark.parametrize("proximal_mu", [0.0, 0.5])
def test_two_gloo_ranks_end_with_the_weights_one_process_gets_on_the_same_global_batches(
    proximal_mu: float,
) -> None:
    source = _synthetic()
    req = TrainRequest(epochs=1, batch_size=32, learning_rate=0.05, proximal_mu=proximal_mu)
    one = build_model("mlp", seed=3, num_features=20, num_classes=4)
    ranks = build_model("mlp", seed=3, num_features=20, num_classes=4)
    start = {k: v.clone() for k, v in ranks.state_dict().items()}

    expected = train_stream(one, GlobalBatches(source, 2), req, seed=11)
    result = train_stream(ranks, source, req, seed=11, devices=CPU2)

    assert result.num_examples == expected.num_examples == 1000
    assert result.steps == expected.steps  # 600 / 16 rows on rank 0: 38 global steps
    assert result.mean_loss == pytest.approx(expected.mean_loss, rel=1e-5)
    assert _max_diff(one, ranks) <= ATOL
    moved = max(float((ranks.state_dict()[k] - v).abs().max()) for k, v in start.items())
    assert moved > 1e-2  # the ranks' weights came back into the caller's model


def test_a_site_trains_its_attested_parquet_split_on_two_ranks_as_one_process_would(
    tmp_path: Path,
) -> None:
    """Through the site's own call (SiteRuntime.train with [training] devices = "cpu:2"): the
    MNIST-5k shards are dealt to the ranks by row group, and the result is the one-process
    result on the same global batches, with the split's exact row count."""
    directory = tmp_path / "mnist"
    prepare_dataset(
        "mnist-5k", directory, salt=bytes(32),
        options=PrepareOptions(target_shard_bytes=256 << 10, row_group_rows=256),
    )  # fmt: skip
    data = load_site_data(directory, validation_fraction=0.2, seed=7)
    req = TrainRequest(epochs=1, batch_size=64, learning_rate=0.05)
    runtime = SiteRuntime(name="site-a", data=data, devices=CPU2)
    ranks = runtime.model("mlp", seed=0)
    one = build_model("mlp", seed=0)

    result = runtime.train("mlp", ranks, req, seed=99)
    expected = train_stream(one, GlobalBatches(data.train, 2), req, seed=99)

    assert result.num_examples == expected.num_examples == data.train.num_rows
    assert result.steps == expected.steps
    assert _max_diff(one, ranks) <= ATOL


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_the_ranks_shards_of_a_site_split_are_disjoint_and_together_the_whole_pass(
    tmp_path: Path, world: int, shuffle: bool
) -> None:
    make_dataset(tmp_path / "d", [700, 450, 900, 260], row_group_rows=64)
    data = load_site_data(tmp_path / "d", validation_fraction=0.2, seed=1)
    whole = sorted(
        int(v) for x, _ in data.train.batches(batch_size=97, seed=4, epoch=1, shuffle=False)
        for v in x[:, 0]
    )  # fmt: skip
    shares = [
        [
            int(v)
            for x, _ in rank_batches(
                data.train, rank=r, world=world, batch_size=50, seed=4, epoch=1, shuffle=shuffle
            )
            for v in x[:, 0]
        ]
        for r in range(world)
    ]
    assert all(shares)
    assert sorted(v for share in shares for v in share) == whole  # nothing skipped or doubled
    assert len(whole) == data.train.num_rows


def test_a_rank_that_raises_ends_the_training_with_one_error_naming_it() -> None:
    source = _synthetic()
    failing = ArraySource(source.x, source.y, fail_rank=1)
    model = build_model("mlp", seed=3, num_features=20, num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.monotonic()
    with pytest.raises(RankError) as caught:
        train_stream(model, failing, TrainRequest(batch_size=32), seed=1, devices=CPU2)
    assert caught.value.rank == 1
    assert "row group 2 is corrupt" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert time.monotonic() - t0 < 120  # ended by the error, not by the ranks' timeout (600 s)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_rank_killed_mid_training_ends_the_training_with_its_exit_named() -> None:
    source = _synthetic()
    dying = ArraySource(source.x, source.y, kill_rank=1)
    model = build_model("mlp", seed=3, num_features=20, num_classes=4)
    with pytest.raises(RankError, match=r"rank 1 of 2 failed: killed by signal 9"):
        train_stream(model, dying, TrainRequest(batch_size=32), seed=1, devices=CPU2)


def _adam(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr / 10)


def _smoothed(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)


#: A site's recipe whose parts are module-level (so the ranks can be sent it): preprocessing,
#: loss, optimizer and a metric (kept in a read-only mapping).
RECIPE = Recipe(
    model=small_mlp, preprocess=Standardize(), loss=_smoothed, optimizer=_adam,
    metrics={"rows-seen": RowCount},
)  # fmt: skip


def test_a_recipes_preprocessing_loss_and_optimizer_run_on_every_rank_as_in_one_process() -> None:
    source = _synthetic()
    req = TrainRequest(epochs=2, batch_size=40, learning_rate=0.05, clip_norm=0.5)
    transform = fit_preprocessing(RECIPE, StreamedFeatures(source))
    one = build_model("r", seed=2, num_features=20, num_classes=4, recipe=RECIPE)
    ranks = build_model("r", seed=2, num_features=20, num_classes=4, recipe=RECIPE)

    args = {"seed": 5, "recipe": RECIPE, "transform": transform}
    expected = train_stream(one, GlobalBatches(source, 2), req, **args)  # type: ignore[arg-type]
    result = train_stream(ranks, source, req, devices=CPU2, **args)  # type: ignore[arg-type]

    assert (result.num_examples, result.steps) == (expected.num_examples, expected.steps)
    assert _max_diff(one, ranks) <= ATOL


def test_a_recipe_that_cannot_be_sent_to_the_ranks_is_refused_before_any_rank_starts() -> None:
    recipe = Recipe(
        model=lambda num_features, num_classes: torch.nn.Linear(num_features, num_classes),
        optimizer=lambda model, lr: torch.optim.SGD(model.parameters(), lr=lr),
    )
    model = torch.nn.Linear(20, 4)
    with pytest.raises(DevicesError, match=r"training.devices: .*cannot be sent to the training"):
        train_stream(model, _synthetic(), TrainRequest(), seed=1, recipe=recipe, devices=CPU2)


def test_a_source_that_cannot_be_sharded_is_refused_with_the_key_named() -> None:
    class Plain:
        num_rows = 4

        def batches(self, **_: object) -> Iterator[Batch]:
            yield torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64)

    with pytest.raises(ValueError, match=r"training\.devices: several ranks need data"):
        next(rank_batches(Plain(), rank=0, world=2, batch_size=2, seed=0, epoch=0, shuffle=True))


@pytest.mark.parametrize(
    ("value", "kind", "cpu_ranks", "gpus"),
    [
        ("auto", "auto", 1, ()),
        ("cpu", "cpu", 1, ()),
        ("cpu:4", "cpu", 4, ()),
        ("cuda", "cuda", 1, ()),
        ("CUDA:1", "cuda", 1, (1,)),
        (["cuda:0", "cuda:3"], "cuda", 1, (0, 3)),
    ],
)
def test_training_devices_accepts_its_documented_forms(
    value: object, kind: str, cpu_ranks: int, gpus: tuple[int, ...]
) -> None:
    d = Devices.parse(value)
    assert (d.kind, d.cpu_ranks, d.gpus) == (kind, cpu_ranks, gpus)


@pytest.mark.parametrize(
    "value",
    [
        "gpu",
        "cpu:0",
        "cpu:65",
        "cpu:x",
        "cuda:-1",
        [],
        ["cuda:0", "cuda:0"],
        ["cpu"],
        2,
        {"cpu": 2},
    ],
)
def test_a_malformed_training_devices_fails_at_start_naming_the_key(
    tmp_path: Path, value: object
) -> None:
    toml = value if not isinstance(value, str | list) else repr(value).replace("'", '"')
    if isinstance(value, dict):
        toml = "{ cpu = 2 }"
    config = tmp_path / "client.toml"
    config.write_text(
        '[site]\nname = "site-a"\n[coordinator]\nsuperlink = "localhost:9092"\n'
        f'[data]\ndataset_dir = "data"\napproved_root = "{"ab" * 32}"\n'
        f"[training]\ndevices = {toml}\n"
    )
    with pytest.raises(ClientConfigError) as caught:
        load_client_config(config)
    assert caught.value.key == "training.devices"
    assert "\n" not in str(caught.value)


def test_client_toml_training_table_reaches_the_site_config(tmp_path: Path) -> None:
    config = tmp_path / "client.toml"
    base = (
        '[site]\nname = "site-a"\n[coordinator]\nsuperlink = "localhost:9092"\n'
        f'[data]\ndataset_dir = "data"\napproved_root = "{"ab" * 32}"\n'
    )
    config.write_text(base)
    assert load_client_config(config).devices == Devices()
    config.write_text(base + '[training]\ndevices = "cpu:2"\nrank_timeout_s = 30\n')
    assert load_client_config(config).devices == Devices("cpu", cpu_ranks=2, timeout_s=30.0)
    config.write_text(base + "[training]\nrank_timeout_s = 0\n")
    with pytest.raises(ClientConfigError, match=r"training\.rank_timeout_s"):
        load_client_config(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_asking_for_cuda_on_a_machine_without_a_gpu_fails_naming_the_key() -> None:
    assert Devices().resolve() == (torch.device("cpu"),)
    with pytest.raises(DevicesError, match=r"training\.devices: asks for CUDA"):
        Devices.parse(["cuda:0", "cuda:1"]).resolve()
