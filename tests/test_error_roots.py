"""Each adapter has one error root: every exception class ``fedseal.server`` defines derives
from ``CoordinatorError``, every one ``fedseal.client`` defines from ``SiteError``."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from fedseal.client.errors import SiteError
from fedseal.server.errors import CoordinatorError

ROOTS = {"fedseal.server": CoordinatorError, "fedseal.client": SiteError}


def _defined_exceptions(package: str) -> list[type[BaseException]]:
    found = []
    pkg = importlib.import_module(package)
    for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found.append(obj)
    return found


@pytest.mark.parametrize("package", sorted(ROOTS))
def test_every_error_an_adapter_defines_derives_from_its_one_root(package: str) -> None:
    found = _defined_exceptions(package)
    assert len(found) >= 5  # the walk really found the adapter's errors
    strays = [f"{e.__module__}.{e.__qualname__}" for e in found if not issubclass(e, ROOTS[package])]
    assert strays == []


def test_the_two_roots_are_distinct() -> None:
    assert not issubclass(CoordinatorError, SiteError) and not issubclass(SiteError, CoordinatorError)
