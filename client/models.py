"""Built-in models for the demo, nanoGPT style: one file, shapes in comments; and how a
model name becomes a :class:`~fedseal.client.recipe.Recipe`.

Usage::

    from fedseal.client.models import build_model, resolve_recipe
    model = build_model("cnn", seed=0)        # MNIST-5k: 784 features, 10 classes
    logits = model(torch.zeros(32, 784))      # (B, 10)
    recipe = resolve_recipe("my_package:recipe")   # installed at this site

A name is ``"mlp"``, ``"cnn"`` (the built-in recipes: a model, fedseal's default training) or
``"package.module:attribute"``, resolved only against code installed at the site (importlib),
never against code shipped by the coordinator. The attribute is a
:class:`~fedseal.client.recipe.Recipe` (the site's model, preprocessing, loss, optimizer,
training step and metrics: see :mod:`fedseal.client.recipe`), or a plain model factory called
as ``factory(num_features=..., num_classes=...)``, which becomes ``Recipe(model=factory)``.
A factory says "not a shape I take" by raising ``ValueError`` (:class:`ModelShapeError`: a site
whose dataset does not fit it skips it at start-up; ``SmallCNN`` takes square images only).

The coordinator never imports torch: weights cross the wire and the disk as a state dict of
numpy arrays (``state_dict_to_numpy`` / ``load_numpy_state_dict``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedseal.client.recipe import Recipe, RecipeError

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_RECIPES",
    "MLP",
    "ModelResolutionError",
    "ModelShapeError",
    "SmallCNN",
    "build_model",
    "load_numpy_state_dict",
    "resolve_recipe",
    "state_dict_to_numpy",
]

NUM_FEATURES = 784  # 28 x 28 pixels, flattened
NUM_CLASSES = 10


class ModelResolutionError(RecipeError):
    """A model name names no built-in recipe and no installed ``module:attribute``, or its
    model factory fails or returns no ``torch.nn.Module``."""


class ModelShapeError(ModelResolutionError):
    """A model factory does not take this dataset's shape: it raised ``ValueError`` for
    ``(num_features, num_classes)``, the way a factory says "not a shape I take" (:class:`SmallCNN`
    for a feature count that is not a square). Any other exception is a broken factory.

    Attributes:
        num_features: The dataset's feature count.
        num_classes: The dataset's class count.
    """

    def __init__(self, name: str, reason: str, *, num_features: int, num_classes: int) -> None:
        super().__init__(name, reason)
        self.num_features = num_features
        self.num_classes = num_classes


class MLP(nn.Module):
    """Two hidden layers with ReLU: 784 -> 128 -> 64 -> 10 (about 109k parameters)."""

    def __init__(self, num_features: int = NUM_FEATURES, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_features, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)  # (B, F) -> (B, C)
        return out


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks and a linear head for 28x28 digits (about 51k parameters)."""

    def __init__(self, num_features: int = NUM_FEATURES, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        side = round(num_features**0.5)
        if side * side != num_features:
            raise ValueError(f"SmallCNN needs square images, got {num_features} features")
        self.side = side
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)  # (B, 1, 28, 28) -> (B, 16, 28, 28)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)  # pooled (B, 16, 14, 14) -> (B, 32, 14, 14)
        self.pool = nn.MaxPool2d(2)
        pooled = side // 4  # two 2x2 pools: 28 -> 14 -> 7
        self.head = nn.Linear(32 * pooled * pooled, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = x.view(b, 1, self.side, self.side)  # (B, 784) -> (B, 1, 28, 28)
        x = self.pool(torch.relu(self.conv1(x)))  # (B, 16, 14, 14)
        x = self.pool(torch.relu(self.conv2(x)))  # (B, 32, 7, 7)
        out: torch.Tensor = self.head(x.flatten(1))  # (B, 10)
        return out


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": SmallCNN}
BUILTIN_RECIPES: Mapping[str, Recipe] = MappingProxyType(
    {k: Recipe(model=f) for k, f in BUILTIN_MODELS.items()}
)
"""The built-in models as recipes: fedseal's default preprocessing (none), loss
(cross-entropy), optimizer (SGD, momentum 0.9) and training step."""


def resolve_recipe(name: str) -> Recipe:
    """The recipe a model name names (module docstring).

    Raises:
        ModelResolutionError: Not a built-in name nor ``module:attribute``; the module is not
            installed or fails to import; the attribute is missing or neither a ``Recipe`` nor
            callable.
    """
    builtin = BUILTIN_RECIPES.get(name)
    if builtin is not None:
        return builtin
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ModelResolutionError(
            name,
            f"not a built-in model ({', '.join(sorted(BUILTIN_RECIPES))}) nor module:attribute",
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (
            module_name == exc.name or module_name.startswith(exc.name + ".")
        ):
            raise ModelResolutionError(
                name, f"module {module_name!r} is not installed at this site"
            ) from exc
        raise ModelResolutionError(
            name, f"module {module_name!r} fails to import: {_one_line(exc)}"
        ) from exc
    except Exception as exc:  # the package's own import-time error: named, not a traceback
        raise ModelResolutionError(
            name, f"module {module_name!r} fails to import: {_one_line(exc)}"
        ) from exc
    found = getattr(module, attr, None)
    if isinstance(found, Recipe):
        return found
    if found is None or not callable(found):
        raise ModelResolutionError(
            name, f"{attr!r} in {module_name!r} is neither a Recipe nor a model factory"
        )
    return Recipe(model=found)


def _one_line(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text[:300]


def build_model(
    name: str,
    *,
    seed: int,
    num_features: int = NUM_FEATURES,
    num_classes: int = NUM_CLASSES,
    recipe: Recipe | None = None,
) -> nn.Module:
    """Build a model with deterministic initial weights.

    Args:
        name: ``"mlp"``, ``"cnn"`` or ``"module:attribute"`` (installed at this site).
        seed: Seed for the weight initialisation (the coordinator sends it, so every
            site would build the same initial model).
        num_features: Input width.
        num_classes: Number of output logits.
        recipe: ``name``'s recipe, if already resolved.

    Raises:
        ModelShapeError: The model factory raised ``ValueError``: it does not take this shape.
        ModelResolutionError: ``name`` cannot be resolved, or its model factory raises
            anything else or returns no ``torch.nn.Module``.
    """
    factory = (recipe if recipe is not None else resolve_recipe(name)).model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = factory(num_features=num_features, num_classes=num_classes)
        except ValueError as exc:
            raise ModelShapeError(
                name,
                f"the model does not take {num_features} features, {num_classes} classes: {_one_line(exc)}",
                num_features=num_features,
                num_classes=num_classes,
            ) from exc
        except Exception as exc:
            raise ModelResolutionError(
                name,
                f"the model factory failed for {num_features} features, {num_classes} classes: {_one_line(exc)}",
            ) from exc
    if not isinstance(model, nn.Module):
        raise ModelResolutionError(name, "the model factory did not return a torch.nn.Module")
    return model


def state_dict_to_numpy(model: nn.Module) -> dict[str, npt.NDArray[np.float32]]:
    """Return the model's parameters and buffers as float32 numpy arrays (copies)."""
    return {
        k: v.detach().to("cpu", dtype=torch.float32).numpy().copy()
        for k, v in model.state_dict().items()
    }


def load_numpy_state_dict(model: nn.Module, arrays: Mapping[str, npt.NDArray[np.generic]]) -> None:
    """Load numpy arrays into ``model``, checking names and shapes strictly.

    Raises:
        ValueError: If a name is missing or unexpected, or a shape differs.
    """
    own = model.state_dict()
    if set(own) != set(arrays):
        missing = sorted(set(own) - set(arrays))
        extra = sorted(set(arrays) - set(own))
        raise ValueError(f"state dict mismatch: missing={missing[:5]} unexpected={extra[:5]}")
    checked = {}
    for k, ref in own.items():
        arr = np.asarray(arrays[k])
        if tuple(arr.shape) != tuple(ref.shape):
            raise ValueError(
                f"shape mismatch for {k}: got {arr.shape}, expected {tuple(ref.shape)}"
            )
        checked[k] = arr
    if all(_numpy_view(ref) is not None for ref in own.values()):
        # CPU tensors numpy can address: copy each array straight into the model's storage
        # (one copy; the arrays may be read-only views of a received message).
        for k, ref in own.items():
            np.copyto(_numpy_view(ref), checked[k], casting="unsafe")  # type: ignore[arg-type]
        return
    model.load_state_dict(
        {
            k: torch.from_numpy(np.array(arr, copy=True, order="C")).to(ref.dtype)
            for (k, ref), arr in zip(own.items(), checked.values(), strict=True)
        }
    )


def _numpy_view(tensor: torch.Tensor) -> npt.NDArray[Any] | None:
    """A writable numpy view of ``tensor``'s storage, or None (not on the CPU, a dtype numpy
    lacks, or not contiguous)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.dtype in _NO_NUMPY:
        return None
    try:
        view: npt.NDArray[Any] = tensor.detach().numpy()
    except (TypeError, RuntimeError):
        return None
    return view


_NO_NUMPY = frozenset({torch.bfloat16, torch.complex32})
