"""Local training checkpoints (issue 20.3): written atomically, read back exactly, never a
half-written one, only safetensors and JSON."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fedseal.client.errors import SiteError
from fedseal.client.train_checkpoint import Progress, TrainingCheckpoint, training_identity


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    for i in range(n):
        x = torch.randn(4, 6)
        loss = nn.functional.cross_entropy(nn.functional.dropout(model(x), 0.3), torch.tensor([0, 1, 2, i % 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01),
    ],
)
def test_a_resumed_training_continues_exactly_as_the_uninterrupted_one(tmp_path: Path, make_opt) -> None:  # type: ignore[no-untyped-def]
    ref = _model()
    ref_opt = make_opt(ref.parameters())
    torch.manual_seed(5)
    _steps(ref, ref_opt, 3)
    ckpt = TrainingCheckpoint(tmp_path / "training" / "abc")
    ckpt.save(ref, ref_opt, Progress(epoch=0, batch=3, steps=3, loss_sum=1.5, rows=12))
    _steps(ref, ref_opt, 4)  # the uninterrupted training goes on

    resumed = _model()
    opt = make_opt(resumed.parameters())
    progress = TrainingCheckpoint(tmp_path / "training" / "abc").load(resumed, opt)
    assert progress == Progress(epoch=0, batch=3, steps=3, loss_sum=1.5, rows=12)
    _steps(resumed, opt, 4)  # the torch RNG (dropout) was restored with the weights
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_no_checkpoint_reads_none_and_a_half_written_one_is_ignored(tmp_path: Path) -> None:
    ckpt = TrainingCheckpoint(tmp_path / "training" / "x")
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert ckpt.load(model, opt) is None
    tmp = tmp_path / "training" / ".x.tmp"  # a crash mid-save leaves only this
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"partial")
    assert ckpt.load(model, opt) is None


def test_a_crash_between_the_renames_resumes_from_the_previous_checkpoint(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ckpt = TrainingCheckpoint(tmp_path / "training" / "x")
    ckpt.save(model, opt, Progress(0, 2, 2, 0.5, 8))
    (tmp_path / "training" / "x").rename(tmp_path / "training" / ".x.old")  # what save does first
    assert ckpt.load(_model(), torch.optim.SGD(_model().parameters(), lr=0.1, momentum=0.9)) == Progress(0, 2, 2, 0.5, 8)


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    TrainingCheckpoint(tmp_path / "x").save(model, opt, Progress(0, 1, 1, 0.1, 4))
    other = nn.Linear(6, 3)
    with pytest.raises(SiteError, match=r"training checkpoint .* cannot be resumed"):
        TrainingCheckpoint(tmp_path / "x").load(other, torch.optim.SGD(other.parameters(), lr=0.1))


def test_the_checkpoint_is_private_to_the_site_and_cleared_with_its_round(tmp_path: Path) -> None:
    model = _model()
    ckpt = TrainingCheckpoint(tmp_path / "training" / "x")
    ckpt.save(model, torch.optim.SGD(model.parameters(), lr=0.1), Progress(0, 1, 1, 0.1, 4))
    assert (tmp_path / "training" / "x").stat().st_mode & 0o077 == 0
    assert sorted(p.name for p in (tmp_path / "training" / "x").iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "progress.json"
    ]
    ckpt.clear()
    assert not (tmp_path / "training" / "x").exists()


def test_every_input_of_a_training_changes_its_identity() -> None:
    base = (b"run", 3, b"model-digest", "mlp", 1.0, 42)
    ids = {training_identity(*base)}
    for i in range(len(base)):
        changed = list(base)
        changed[i] = b"other" if isinstance(base[i], bytes) else ("x" if isinstance(base[i], str) else 7)
        ids.add(training_identity(*changed))
    assert len(ids) == len(base) + 1
    assert training_identity(b"ab", b"c") != training_identity(b"a", b"bc")  # length-prefixed


# -- through the site's training loop ------------------------------------------------------------

import numpy as np  # noqa: E402

from fedseal.client.train_checkpoint import Preempted, Preemption  # noqa: E402
from fedseal.client.training import TrainRequest, train_stream  # noqa: E402


class Rows:
    """A BatchSource: 70 rows of 6 features, 3 classes, an order drawn from (seed, epoch)."""

    def __init__(self) -> None:
        rng = np.random.default_rng(1)
        self.x = rng.standard_normal((70, 6)).astype(np.float32)
        self.y = rng.integers(0, 3, 70).astype(np.int64)

    @property
    def num_rows(self) -> int:
        return len(self.y)

    def batches(self, *, batch_size: int, seed: int, epoch: int, shuffle: bool):  # type: ignore[no-untyped-def]
        order = np.random.default_rng([seed, epoch]).permutation(len(self.y)) if shuffle else np.arange(len(self.y))
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield torch.from_numpy(self.x[idx]), torch.from_numpy(self.y[idx])


REQ = TrainRequest(epochs=3, batch_size=8, learning_rate=0.1)  # 9 batches per epoch, 27 steps


class StopAt:
    """The site's stop request, set once the loop has made ``steps`` steps (counted by saves)."""

    def __init__(self, ckpt: TrainingCheckpoint, steps: int) -> None:
        self.event = Preemption()
        self.ckpt, self.steps = ckpt, steps
        self.calls = 0

    @property
    def requested(self) -> bool:
        self.calls += 1
        return self.calls >= self.steps


@pytest.mark.parametrize("stop_after", [1, 9, 13, 27])
def test_a_training_preempted_mid_round_and_resumed_ends_with_the_uninterrupted_weights(
    tmp_path: Path, stop_after: int
) -> None:
    reference = _model()
    done = train_stream(reference, Rows(), REQ, seed=11)

    ckpt = TrainingCheckpoint(tmp_path / "training" / "t", every_steps=5)
    ckpt.preemption = StopAt(ckpt, stop_after)  # type: ignore[assignment]
    first = _model()
    with pytest.raises(Preempted, match=f"training paused at epoch {(stop_after - 1) // 9 + 1}"):
        train_stream(first, Rows(), REQ, seed=11, checkpoint=ckpt)

    resumed = _model()  # a restarted site: the global weights again, then the checkpoint
    again = TrainingCheckpoint(tmp_path / "training" / "t", every_steps=5)
    result = train_stream(resumed, Rows(), REQ, seed=11, checkpoint=again)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert (result.num_examples, result.steps) == (done.num_examples, done.steps)
    assert result.mean_loss == pytest.approx(done.mean_loss, rel=1e-12)


def test_checkpoints_are_written_every_n_steps_without_changing_the_training(tmp_path: Path) -> None:
    plain, checked = _model(), _model()
    train_stream(plain, Rows(), REQ, seed=3)
    ckpt = TrainingCheckpoint(tmp_path / "t", every_steps=4)
    train_stream(checked, Rows(), REQ, seed=3, checkpoint=ckpt)
    assert ckpt.saved == 27 // 4
    for a, b in zip(plain.state_dict().values(), checked.state_dict().values(), strict=True):
        assert torch.equal(a, b)
