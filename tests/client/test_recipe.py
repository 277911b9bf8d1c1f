"""A site's own recipe (fedseal.client.recipe): each piece changes what the real training loop
and evaluation do; the site's limits, clipping and seeding still apply; names resolve only to
installed code; a missing or broken recipe is named in one line through the ClientApp."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch import nn

from fedseal.client.flower_app import SiteRuntime, make_client_app
from fedseal.client.models import (
    BUILTIN_RECIPES,
    MLP,
    ModelResolutionError,
    build_model,
    resolve_recipe,
    state_dict_to_numpy,
)
from fedseal.client.policy import SitePrivacy, SiteRefusal
from fedseal.client.recipe import LossFn, Recipe, RecipeError, Standardize
from fedseal.client.site_data import SiteData, load_site_data
from fedseal.client.training import (
    SiteLimits,
    TrainRequest,
    check_recipe,
    evaluate,
    fit_preprocessing,
    train,
)
from tests.client import _recipes
from tests.client._data_support import make_dataset

FEATURES, CLASSES = 6, 3


def blobs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes around fixed centres, on very different scales per feature; only the two
    smallest-scale features (0 and 3) tell the classes apart."""
    centres = np.zeros((CLASSES, FEATURES))
    centres[:, [0, 3]] = [[0.0, 2.0], [2.0, -1.0], [-2.0, -1.0]]
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n).astype(np.int64)
    scale = np.array([1.0, 10.0, 100.0, 0.01, 1000.0, 5.0])
    x = (centres[y] + 0.3 * rng.normal(0, 1, (n, FEATURES))) * scale
    return x.astype(np.float32), y


def weights(model: nn.Module) -> dict[str, np.ndarray]:
    return state_dict_to_numpy(model)


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def model(seed: int = 0) -> nn.Module:
    return build_model(
        "tests.client._recipes:small_mlp", seed=seed, num_features=FEATURES, num_classes=CLASSES
    )


# -- each piece changes the loop ----------------------------------------------------------------


def test_the_recipes_loss_is_what_training_minimises_and_what_evaluation_reports() -> None:
    x, y = blobs(96)
    seen: list[tuple[tuple[int, ...], float]] = []

    def doubled(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = 2 * nn.functional.cross_entropy(logits, labels)
        seen.append((tuple(logits.shape), float(loss.detach())))
        return loss

    recipe = Recipe(model=_recipes.small_mlp, loss=doubled)
    m = model()
    result = train(m, x, y, TrainRequest(epochs=2, batch_size=32), seed=1, recipe=recipe)
    assert [shape for shape, _ in seen] == [(32, CLASSES)] * result.steps == [(32, CLASSES)] * 6
    assert result.mean_loss == pytest.approx(np.mean([v for _, v in seen]), rel=1e-6)
    seen.clear()
    with_recipe = evaluate(m, x, y, num_classes=CLASSES, recipe=recipe)
    default = evaluate(m, x, y, num_classes=CLASSES)
    assert seen  # evaluation called it too
    assert with_recipe.loss == pytest.approx(2 * default.loss, rel=1e-5)
    assert with_recipe.accuracy == default.accuracy


def test_the_recipes_optimizer_gets_the_learning_rate_the_sites_limits_allow_and_drives_every_step() -> (
    None
):
    x, y = blobs(64)
    made: list[float] = []
    steps: list[int] = []

    def plain_sgd(m: nn.Module, lr: float) -> torch.optim.Optimizer:
        made.append(lr)
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        opt.register_step_post_hook(lambda *_: steps.append(1))
        return opt

    req = SiteLimits(max_learning_rate=0.1).clamp(
        TrainRequest(epochs=1, batch_size=16, learning_rate=5.0)
    )
    mine, default = model(), model()
    result = train(
        mine, x, y, req, seed=1, recipe=Recipe(model=_recipes.small_mlp, optimizer=plain_sgd)
    )
    train(default, x, y, req, seed=1)
    assert made == [0.1]
    assert len(steps) == result.steps == 4
    assert not same(weights(mine), weights(default))  # plain SGD, not fedseal's momentum SGD


def test_the_sites_gradient_clipping_bounds_a_recipes_step_whatever_loss_it_returns() -> None:
    x, y = blobs(32)

    def huge(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor, loss: LossFn) -> torch.Tensor:
        return 1e6 * loss(m(xb), yb)

    recipe = Recipe(
        model=_recipes.small_mlp,
        step=huge,
        optimizer=lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr),
    )
    m = model()
    before = np.concatenate([v.ravel() for v in weights(m).values()])
    train(
        m,
        x,
        y,
        TrainRequest(epochs=1, batch_size=32, learning_rate=0.5, clip_norm=0.2),
        seed=1,
        recipe=recipe,
    )
    after = np.concatenate([v.ravel() for v in weights(m).values()])
    assert (
        0 < np.linalg.norm(after - before) <= 0.5 * 0.2 * (1 + 1e-4)
    )  # one step of lr * clip_norm


def test_a_recipes_step_sees_the_batch_after_its_preprocessing() -> None:
    x, y = blobs(200)
    batches: list[torch.Tensor] = []

    def watching(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor, loss: LossFn) -> torch.Tensor:
        batches.append(xb.detach().clone())
        return loss(m(xb), yb)

    recipe = Recipe(model=_recipes.small_mlp, preprocess=Standardize(), step=watching)
    transform = fit_preprocessing(recipe, x)
    train(
        model(),
        x,
        y,
        TrainRequest(epochs=1, batch_size=50),
        seed=2,
        recipe=recipe,
        transform=transform,
    )
    seen = torch.cat(batches).double()
    assert len(seen) == 200
    assert torch.allclose(seen.mean(0), torch.zeros(FEATURES, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(
        seen.std(0, unbiased=False), torch.ones(FEATURES, dtype=torch.float64), atol=1e-4
    )


def test_standardisation_makes_features_of_wildly_different_scales_learnable() -> None:
    x, y = blobs(600, seed=3)
    xv, yv = blobs(300, seed=4)
    req = TrainRequest(epochs=3, batch_size=32, learning_rate=0.05)
    raw = Recipe(model=_recipes.small_mlp, loss=nn.functional.cross_entropy)
    scaled = Recipe(model=_recipes.small_mlp, preprocess=Standardize())
    m_raw, m_scaled = model(), model()
    train(m_raw, x, y, req, seed=1, recipe=raw)
    transform = fit_preprocessing(scaled, x)
    train(m_scaled, x, y, req, seed=1, recipe=scaled, transform=transform)
    acc_raw = evaluate(m_raw, xv, yv, num_classes=CLASSES, recipe=raw).accuracy
    acc_scaled = evaluate(
        m_scaled, xv, yv, num_classes=CLASSES, recipe=scaled, transform=transform
    ).accuracy
    assert acc_scaled > 0.95 > acc_raw


def test_standardize_fits_each_features_mean_and_std_and_only_centres_a_constant_feature() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal([1.0, -50.0, 3e4], [2.0, 0.5, 1e3], (1000, 3))
    x[:, 1] = 7.0  # constant
    chunks = (torch.from_numpy(x[i : i + 128].astype(np.float32)) for i in range(0, 1000, 128))
    transform = Standardize().fit(chunks)
    out = transform(torch.from_numpy(x.astype(np.float32))).double().numpy()
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-3)
    np.testing.assert_allclose(out[:, [0, 2]].std(0), 1.0, rtol=1e-3)
    assert np.all(out[:, 1] == 0.0)


def test_a_recipe_that_preprocesses_must_be_given_its_fitted_transform() -> None:
    x, y = blobs(40)
    recipe = Recipe(model=_recipes.small_mlp, preprocess=Standardize())
    with pytest.raises(ValueError, match="fit_preprocessing"):
        train(model(), x, y, TrainRequest(), seed=0, recipe=recipe)
    with pytest.raises(ValueError, match="fit_preprocessing"):
        evaluate(model(), x, y, num_classes=CLASSES, recipe=recipe)
    transform = fit_preprocessing(recipe, x)
    with pytest.raises(ValueError, match="without"):
        train(model(), x, y, TrainRequest(), seed=0, transform=transform)


def test_the_recipes_metrics_are_reported_beside_loss_accuracy_and_macro_f1() -> None:
    x, y = blobs(70)
    recipe = Recipe(model=_recipes.small_mlp, metrics={"rows-seen": _recipes.RowCount})
    result = evaluate(model(), x, y, num_classes=CLASSES, recipe=recipe, batch_size=16)
    assert result.extra == {"rows-seen": 70.0}
    assert evaluate(model(), x, y, num_classes=CLASSES).extra == {}


def test_training_seeds_torchs_rng_so_dropout_is_reproducible_per_seed_and_leaves_the_callers_rng_alone() -> (
    None
):
    x, y = blobs(64)

    def dropout_model(num_features: int, num_classes: int) -> nn.Module:
        return nn.Sequential(
            nn.Linear(num_features, 16), nn.Dropout(0.5), nn.Linear(16, num_classes)
        )

    recipe = Recipe(model=dropout_model, loss=nn.functional.cross_entropy)

    def trained(seed: int) -> dict[str, np.ndarray]:
        m = build_model(
            "dropout", seed=0, num_features=FEATURES, num_classes=CLASSES, recipe=recipe
        )
        train(
            m,
            x,
            y,
            TrainRequest(epochs=1, batch_size=16, learning_rate=0.1),
            seed=seed,
            recipe=recipe,
        )
        return weights(m)

    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first, again, other = trained(7), trained(7), trained(8)
    assert same(first, again) and not same(first, other)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_recipe_of_only_a_model_trains_bit_for_bit_as_the_default_loop() -> None:
    x, y = blobs(128)
    req = TrainRequest(epochs=2, batch_size=32, proximal_mu=0.01)
    a, b, c = (
        build_model("mlp", seed=4, num_features=FEATURES, num_classes=CLASSES) for _ in range(3)
    )
    ra = train(a, x, y, req, seed=9)
    rb = train(b, x, y, req, seed=9, recipe=BUILTIN_RECIPES["mlp"])
    rc = train(c, x, y, req, seed=9, recipe=Recipe(model=MLP))
    assert same(weights(a), weights(b)) and same(weights(a), weights(c))
    assert ra == rb == rc


@pytest.mark.parametrize(
    ("metrics", "error", "match"),
    [
        ({"accuracy": _recipes.RowCount}, ValueError, "reported by fedseal"),
        ({"Bad Name": _recipes.RowCount}, ValueError, "not"),
        ({"ok": 3}, TypeError, "factory"),
    ],
)
def test_a_recipe_refuses_metric_names_fedseal_reports_or_cannot_carry(
    metrics: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Recipe(model=_recipes.small_mlp, metrics=metrics)


# -- names resolve only to installed code -------------------------------------------------------


def test_a_name_resolves_to_the_installed_recipe_a_plain_factory_or_a_builtin() -> None:
    assert resolve_recipe("tests.client._recipes:counted") is _recipes.counted
    wrapped = resolve_recipe("tests.client._recipes:small_mlp")
    assert (
        wrapped.model is _recipes.small_mlp and wrapped.loss is None and wrapped.preprocess is None
    )
    assert resolve_recipe("cnn") is BUILTIN_RECIPES["cnn"]


def test_a_name_that_cannot_be_resolved_says_which_and_why_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('no licence file\\nfound')\n")
    (tmp_path / "needs_a_dependency.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {
        "no_such_package_xyz:recipe": "module 'no_such_package_xyz' is not installed at this site",
        "raises_on_import:recipe": "module 'raises_on_import' fails to import: RuntimeError: no licence file found",
        "needs_a_dependency:recipe": (
            "module 'needs_a_dependency' fails to import: ModuleNotFoundError: No module named 'no_such_dependency_xyz'"
        ),
        "tests.client._recipes:missing": "'missing' in 'tests.client._recipes' is neither a Recipe nor a model factory",
        "tests.client._recipes:not_a_recipe": (
            "'not_a_recipe' in 'tests.client._recipes' is neither a Recipe nor a model factory"
        ),
        "resnet": "not a built-in model (cnn, mlp) nor module:attribute",
    }
    for name, why in cases.items():
        with pytest.raises(ModelResolutionError) as err:
            resolve_recipe(name)
        assert str(err.value) == f"recipe {name!r}: {why}"
    for name in ("raises_on_import", "needs_a_dependency"):
        sys.modules.pop(name, None)


def test_check_recipe_runs_every_part_once_and_names_a_broken_one() -> None:
    assert (
        check_recipe("tests.client._recipes:counted", num_features=FEATURES, num_classes=CLASSES)
        is _recipes.counted
    )
    with pytest.raises(RecipeError) as err:
        check_recipe(
            "tests.client._recipes:wrong_width", num_features=FEATURES, num_classes=CLASSES
        )
    message = str(err.value)
    assert message.startswith(
        "recipe 'tests.client._recipes:wrong_width': fails on 6 features, 3 classes: RuntimeError"
    )
    assert "\n" not in message


# -- through the site's ClientApp ---------------------------------------------------------------


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):  # what a SuperNode sets for its ClientApp
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> SiteData:
    """500 rows x = [id, 2 id, 3 id], label = id % 5 (tests/client/_data_support.py)."""
    d = tmp_path_factory.mktemp("recipe-app") / "d"
    make_dataset(d, [300, 200])
    return load_site_data(d, validation_fraction=0.2, seed=7)


def site(data: SiteData, *names: str) -> Any:
    runtime = SiteRuntime(
        name="site-a",
        data=data,
        allowed_models=("mlp", *names),
        privacy=SitePrivacy(allow_plain=True),
    )
    return make_client_app(runtime)


def config(name: str) -> ConfigRecord:
    return ConfigRecord(
        {
            "run-id": "ab" * 16, "round": 1, "model": name, "seed": 0, "epochs": 1, "batch-size": 32,
            "learning-rate": 0.05, "clip-norm": 5.0,
        }
    )  # fmt: skip


def ask(app: Any, kind: str, name: str, init: dict[str, np.ndarray] | None = None) -> Message:
    content: dict[str, Any] = {"config": config(name)}
    if init is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in init.items()})
    msg = Message(RecordDict(content), dst_node_id=1, message_type=kind)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply: Message = app(msg, context)
    return reply


def arrays_of(reply: Message) -> dict[str, np.ndarray]:
    record = reply.content["arrays"]
    assert isinstance(record, ArrayRecord)
    return {k: v.numpy() for k, v in record.items()}


def initial(app: Any, name: str) -> dict[str, np.ndarray]:
    return arrays_of(ask(app, "query.initial_model", name))


def test_a_recipe_the_site_does_not_allow_is_refused_naming_the_setting(data: SiteData) -> None:
    with pytest.raises(SiteRefusal) as err:
        ask(site(data), "query.initial_model", "tests.client._recipes:counted")
    assert str(err.value) == (
        "refused: model 'tests.client._recipes:counted' is not in this site's [limits] allowed_models (mlp)"
    )


def test_an_allowed_recipe_that_is_not_installed_is_named_in_one_line(data: SiteData) -> None:
    with pytest.raises(RecipeError) as err:
        ask(site(data, "hospital_model:recipe"), "query.initial_model", "hospital_model:recipe")
    assert (
        str(err.value)
        == "recipe 'hospital_model:recipe': module 'hospital_model' is not installed at this site"
    )


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("tests.client._recipes:broken_loss", "failed in training: RuntimeError: boom in the loss"),
        (
            "tests.client._recipes:wrong_width",
            "failed in training: RuntimeError: mat1 and mat2 shapes cannot be multiplied",
        ),
    ],
)
def test_a_recipe_that_fails_in_training_is_named_with_its_error_in_one_line(
    data: SiteData, name: str, why: str
) -> None:
    app = site(data, name)
    init = initial(app, name)
    with pytest.raises(RecipeError) as err:
        ask(app, "train", name, init)
    message = str(err.value)
    assert message.startswith(f"recipe {name!r}: {why}") and "\n" not in message
    assert err.value.__cause__ is not None  # the traceback stays available to the site's log


def test_the_site_trains_and_evaluates_with_its_recipe_fitting_the_preprocessing_once(
    data: SiteData,
) -> None:
    name = "tests.client._recipes:counted"
    _recipes.CountingStandardize.fits = 0
    app = site(data, name)
    init = initial(app, name)
    trained = ask(app, "train", name, init)
    assert trained.content["metrics"]["num-examples"] == data.train.num_rows
    new = arrays_of(trained)
    assert not same(new, init)
    metrics = ask(app, "evaluate", name, new).content["metrics"]
    assert metrics["rows-seen"] == float(data.validation.num_rows) == metrics["num-examples"]
    assert {"loss", "accuracy", "macro-f1"} <= set(metrics)
    assert _recipes.CountingStandardize.fits == 1


def test_fl_client_run_names_a_missing_allowed_recipe_before_the_first_round(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from fedseal.client.node import SiteRunError, _check_recipes

    cfg = SimpleNamespace(allowed_models=("mlp", "no_such_package.models:net"), path=tmp_path / "client.toml")
    with pytest.raises(SiteRunError) as err:
        _check_recipes(cfg, 30, 2)  # type: ignore[arg-type]
    assert "no_such_package.models:net" in str(err.value) and "[limits] allowed_models in client.toml" in str(err.value)
    _check_recipes(SimpleNamespace(allowed_models=("mlp",), path=cfg.path), 30, 2)  # type: ignore[arg-type]
