"""The two worked examples (examples/tabular, examples/image) end to end at one site: data
prepared as ``fl-client data prepare`` prepares it, streamed through fedseal's training and
evaluation with the example's recipe, named exactly as a coordinator names it."""

from __future__ import annotations

import csv
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedseal.client.cli import app as fl_client
from fedseal.client.models import build_model, resolve_recipe
from fedseal.client.site_data import SiteData, load_site_data
from fedseal.client.training import TrainRequest, check_recipe, evaluate, fit_preprocessing, train

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TABULAR, IMAGE = "fedseal_example_tabular:recipe", "fedseal_example_image:recipe"


def prepare(source: str, out: Path, *extra: str) -> SiteData:
    result = CliRunner().invoke(fl_client, ["data", "prepare", source, str(out), *extra, "--json"])
    assert result.exit_code == 0, result.output
    return load_site_data(out, validation_fraction=0.2, seed=7)


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("folder", ["tabular", "image"])
def test_each_example_is_a_package_a_site_installs_and_its_recipe_checks_out(folder: str) -> None:
    meta = tomllib.loads((EXAMPLES / folder / "pyproject.toml").read_text())
    (package,) = meta["tool"]["setuptools"]["packages"]
    assert (EXAMPLES / folder / package / "__init__.py").is_file()
    assert meta["project"]["name"] == f"fedseal-example-{folder}"
    features, classes = (30, 2) if folder == "tabular" else (784, 10)
    recipe = check_recipe(f"{package}:recipe", num_features=features, num_classes=classes)
    assert recipe is resolve_recipe(f"{package}:recipe")


def test_the_tabular_generator_writes_a_30_feature_csv_that_fl_client_prepares(
    tmp_path: Path,
) -> None:
    from fedseal_example_tabular.data import COLUMNS, LABEL, main

    assert (
        main([str(tmp_path / "site.csv"), "--rows", "300", "--seed", "4", "--prevalence", "0.4"])
        == 0
    )
    with (tmp_path / "site.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == [*COLUMNS, LABEL] and len(COLUMNS) == 30 and len(rows) == 301
    labels = np.array([int(r[-1]) for r in rows[1:]])
    assert set(labels) == {0, 1} and 0.3 < labels.mean() < 0.5
    data = prepare(str(tmp_path / "site.csv"), tmp_path / "data", "--label", LABEL)
    assert (data.num_features, data.num_classes) == (30, 2)
    assert data.train.num_rows + data.validation.num_rows == 300


def test_the_tabular_recipe_learns_where_the_built_in_mlp_cannot_and_reports_clinical_metrics(
    tmp_path: Path,
) -> None:
    from fedseal_example_tabular.data import LABEL, write_csv

    csv_path = write_csv(tmp_path / "site.csv", 1200, seed=21)
    data = prepare(str(csv_path), tmp_path / "data", "--label", LABEL)
    recipe = resolve_recipe(TABULAR)
    model = build_model(
        TABULAR, seed=0, num_features=data.num_features, num_classes=data.num_classes
    )
    transform = fit_preprocessing(recipe, data.x_train)  # streamed: the site's training part
    req = TrainRequest(epochs=10, batch_size=32, learning_rate=0.005)
    train(model, data.x_train, data.y_train, req, seed=1, recipe=recipe, transform=transform)
    ours = evaluate(
        model, data.x_val, data.y_val, num_classes=2, recipe=recipe, transform=transform
    )

    builtin = build_model(
        "mlp", seed=0, num_features=data.num_features, num_classes=data.num_classes
    )
    train(builtin, data.x_train, data.y_train, TrainRequest(epochs=10, batch_size=32), seed=1)
    plain = evaluate(builtin, data.x_val, data.y_val, num_classes=2)

    assert ours.accuracy > 0.9 and ours.accuracy > plain.accuracy + 0.1
    assert set(ours.extra) == {"sensitivity", "specificity", "auroc"}
    assert ours.extra["auroc"] > 0.95
    assert min(ours.extra["sensitivity"], ours.extra["specificity"]) > 0.8


def test_the_tabular_auroc_counts_tied_scores_as_half() -> None:
    from fedseal_example_tabular import AUROC

    metric = AUROC()
    # label-1 scores: positives 0.9, 0.5; negatives 0.5, 0.1 -> pairs won 1, 1, 0.5, 1 of 4
    scores = torch.tensor([0.9, 0.5, 0.5, 0.1])
    logits = torch.stack([torch.zeros(4), torch.log(scores / (1 - scores))], dim=1)
    metric.update(logits[:2], torch.tensor([1, 1]))
    metric.update(logits[2:], torch.tensor([0, 0]))
    assert metric.compute() == pytest.approx(3.5 / 4)
    only_one_class = AUROC()
    only_one_class.update(logits, torch.ones(4, dtype=torch.int64))
    assert np.isnan(only_one_class.compute())


def test_the_image_recipe_learns_mnist_5k_with_its_own_step_optimizer_and_metrics(
    tmp_path: Path,
) -> None:
    data = prepare("mnist-5k", tmp_path / "mnist")
    recipe = resolve_recipe(IMAGE)
    model = build_model(IMAGE, seed=0, num_features=data.num_features, num_classes=data.num_classes)
    transform = fit_preprocessing(recipe, data.x_train)
    req = TrainRequest(epochs=2, batch_size=64, learning_rate=0.002)
    result = train(
        model, data.x_train, data.y_train, req, seed=3, recipe=recipe, transform=transform
    )
    res = evaluate(
        model, data.x_val, data.y_val, num_classes=10, recipe=recipe, transform=transform
    )
    assert result.num_examples == data.train.num_rows
    assert res.accuracy > 0.9
    assert res.extra["top2-accuracy"] >= res.accuracy
    assert 0.5 < res.extra["worst-class-recall"] <= res.accuracy


def test_the_image_step_shifts_each_batch_by_at_most_two_pixels() -> None:
    from fedseal_example_image import shift_step

    images = torch.zeros(3, 28, 28)
    images[:, 14, 14] = 1.0
    seen: list[torch.Tensor] = []

    class Recording(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.detach().clone())
            return torch.zeros(len(x), 10, requires_grad=True)

    recording = Recording()

    shifts = set()
    for seed in range(12):
        torch.manual_seed(seed)
        shift_step(
            recording,
            images.reshape(3, -1),
            torch.zeros(3, dtype=torch.int64),
            torch.nn.functional.cross_entropy,
        )
        ((row, col),) = torch.nonzero(seen[-1][0].view(28, 28)).tolist()
        assert abs(row - 14) <= 2 and abs(col - 14) <= 2
        shifts.add((row, col))
    assert len(shifts) > 3  # drawn from torch's RNG, which fedseal seeds per round
