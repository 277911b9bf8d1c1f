"""Every change the coordinator makes to Flower's internals, behind one version gate.

The coordinator runs on a pinned Flower (``flwr==1.42.*``, :data:`FLOWER_VERSIONS`). Each
function here replaces or reaches into one private piece of it; each first checks the
installed version (:func:`require_flower_version`, once per process) and that what it replaces
is there, and raises :class:`FlowerVersionError` naming it otherwise, so an upgrade fails
loudly instead of running unpatched. ``tests/server/test_flower_patches.py`` checks, per patch,
that the patched attribute exists with the signature and behaviour assumed here.

Patches:

* :func:`fast_reply_pulls` (the ServerApp): ``flwr.superlink.grid.http_grid.pull_objects``
  rebound with a shorter back-off for reply objects not yet uploaded.
* :func:`throttle_task_token_cleanup` (the SuperLink launcher, :mod:`fedseal.server.superlink`):
  ``SqlCoreState._cleanup_expired_task_tokens`` run at most once per interval per state.
* :func:`serve_superlink_http_api_with` and :func:`add_superexec_arguments` (the control
  socket): Flower's ``_run_superlink_http_api`` replaced by the launcher's two-listener server;
  ``_get_superexec_command`` extended (the SuperExec's secret file). :func:`superlink_app`
  builds Flower's SuperLink FastAPI app as Flower's own function does.
* :func:`control_client_on_socket`: Flower's ``ControlHttpClient`` with its private httpx
  client replaced by one on a Unix socket.
"""

from __future__ import annotations

import functools
import importlib
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedseal.server.errors import CoordinatorError

if TYPE_CHECKING:
    from flwr.supercore.control import ControlHttpClient

__all__ = [
    "FLOWER_VERSIONS",
    "FlowerVersionError",
    "add_superexec_arguments",
    "control_client_on_socket",
    "fast_reply_pulls",
    "require_flower_version",
    "serve_superlink_http_api_with",
    "superlink_app",
    "throttle_task_token_cleanup",
    "throttled",
]

#: The Flower minor versions these patches were written for and are tested against.
FLOWER_VERSIONS = ("1.42",)

_CLEANUP_CLASS = "flwr.supercore.corestate.sql_corestate:SqlCoreState"
_CLEANUP_METHOD = "_cleanup_expired_task_tokens"
_HTTP_GRID = "flwr.superlink.grid.http_grid"
_SUPERLINK_CLI = "flwr.superlink.cli.flower_superlink"
_SUPERLINK_MAIN = "flwr.superlink.main"


class FlowerVersionError(CoordinatorError, RuntimeError):
    """The installed Flower is not one these patches were written for (or lacks what one of
    them replaces). The message names the version or the missing piece."""


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


@functools.cache
def require_flower_version() -> str:
    """The installed Flower's version, if its minor version is in :data:`FLOWER_VERSIONS`.

    Raises:
        FlowerVersionError: Another version (checked once per process).
    """
    import flwr

    version = str(getattr(flwr, "__version__", "unknown"))
    if _minor(version) not in FLOWER_VERSIONS:
        supported = ", ".join(f"{v}.*" for v in FLOWER_VERSIONS)
        raise FlowerVersionError(
            f"flwr {version} is installed; fedseal's coordinator patches Flower internals "
            f"written for flwr {supported} only (pip install 'flwr=={FLOWER_VERSIONS[-1]}.*')"
        )
    return version


def _missing(what: str) -> FlowerVersionError:
    return FlowerVersionError(
        f"Flower has no {what}: this Flower version is not the one fedseal was written for "
        f"(flwr=={FLOWER_VERSIONS[-1]}.*)"
    )


# -- the ServerApp: reply objects re-pulled sooner ------------------------------------------------


def fast_reply_pulls(initial: float, cap: float) -> None:
    """Make the deployment grid re-pull a not-yet-available reply object after ``initial`` s.

    A SuperNode's reply is listed by the SuperLink as soon as it is registered, before its
    objects are pushed, so the grid's first ``PullObject`` usually finds it unavailable and
    Flower's ``pull_objects`` waits a fixed 1 s before asking again. ``HttpGrid.pull_messages``
    calls the module-level ``pull_objects`` of ``flwr.superlink.grid.http_grid``; that name is
    rebound to one with a shorter back-off (idempotent: an earlier rebinding is replaced).

    Raises:
        FlowerVersionError: Another Flower, or ``http_grid`` has no ``pull_objects``.
    """
    require_flower_version()
    http_grid = importlib.import_module(_HTTP_GRID)
    current = getattr(http_grid, "pull_objects", None)
    if not callable(current):
        raise _missing(f"{_HTTP_GRID}.pull_objects")
    if getattr(current, "fedseal_backoff", None) == (initial, cap):
        return
    original = getattr(current, "__wrapped__", current)

    def pull_objects(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("initial_backoff", initial)
        kwargs.setdefault("backoff_cap", cap)
        return original(*args, **kwargs)

    pull_objects.__wrapped__ = original  # type: ignore[attr-defined]
    pull_objects.fedseal_backoff = (initial, cap)  # type: ignore[attr-defined]
    http_grid.pull_objects = pull_objects  # type: ignore[attr-defined]


# -- the SuperLink: task-token clean-up throttled -------------------------------------------------


def throttled(
    method: Callable[[Any], None], interval_s: float, clock: Callable[[], float] = time.monotonic
) -> Callable[[Any], None]:
    """``method`` (taking only ``self``) run at most once per ``interval_s`` seconds per object.

    A call inside the interval returns at once. The first call on each object runs; a call
    that raises still counts as run (the next one comes after the interval).
    """
    last: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
    lock = threading.Lock()

    def run_if_due(self: Any) -> None:
        now = clock()
        with lock:
            previous = last.get(self)
            if previous is not None and now - previous < interval_s:
                return
            last[self] = now
        method(self)

    run_if_due.__wrapped__ = method  # type: ignore[attr-defined]
    return run_if_due


def throttle_task_token_cleanup(interval_s: float) -> None:
    """Run the SuperLink's SQL task-token clean-up at most once per ``interval_s`` per state
    object (0: leave Flower's method as it is). Re-installing wraps Flower's method, not an
    earlier wrapper.

    Raises:
        FlowerVersionError: Another Flower, or ``SqlCoreState`` has no such method.
    """
    require_flower_version()
    module_name, cls_name = _CLEANUP_CLASS.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    method = getattr(cls, _CLEANUP_METHOD, None) if cls is not None else None
    if not callable(method):
        raise _missing(f"{_CLEANUP_CLASS}.{_CLEANUP_METHOD}")
    if interval_s > 0:
        setattr(cls, _CLEANUP_METHOD, throttled(getattr(method, "__wrapped__", method), interval_s))


# -- the SuperLink: its HTTP API served by fedseal's launcher -------------------------------------


def _superlink_modules() -> tuple[Any, Any]:
    """Flower's SuperLink CLI module and ``flwr.superlink.main``, checked for what is used."""
    require_flower_version()
    cli = importlib.import_module(_SUPERLINK_CLI)
    main_mod = importlib.import_module(_SUPERLINK_MAIN)
    needed = {
        "_run_superlink_http_api": cli,
        "_get_superexec_command": cli,
        "SuperLinkLifespan": cli,
        "create_app": main_mod,
    }
    missing = [name for name, mod in needed.items() if not callable(getattr(mod, name, None))]
    if missing:
        raise _missing(f"SuperLink {', '.join(missing)}")
    return cli, main_mod


def require_superlink_internals() -> None:
    """Check, before anything is bound or written, that the SuperLink patches can be applied.

    Raises:
        FlowerVersionError: Another Flower, or a piece the patches replace is gone.
    """
    _superlink_modules()


def serve_superlink_http_api_with(run_http_api: Callable[[Any], None]) -> None:
    """Make ``flower-superlink`` call ``run_http_api(lifespan_config)`` instead of Flower's
    ``_run_superlink_http_api`` (one uvicorn server on the TCP port).

    Raises:
        FlowerVersionError: Another Flower, or a piece the patches replace is gone.
    """
    cli, _ = _superlink_modules()
    cli._run_superlink_http_api = run_http_api


def add_superexec_arguments(extra: Sequence[str]) -> None:
    """Append ``extra`` to the command Flower's SuperLink starts its SuperExec with
    (``_get_superexec_command``; idempotent for the same arguments).

    Raises:
        FlowerVersionError: Another Flower, or a piece the patches replace is gone.
    """
    cli, _ = _superlink_modules()
    current = cli._get_superexec_command
    if getattr(current, "fedseal_extra", None) == tuple(extra):
        return
    original = getattr(current, "__wrapped__", current)

    def superexec_command(*args: Any, **kwargs: Any) -> list[str]:
        return [*original(*args, **kwargs), *extra]

    superexec_command.__wrapped__ = original  # type: ignore[attr-defined]
    superexec_command.fedseal_extra = tuple(extra)  # type: ignore[attr-defined]
    cli._get_superexec_command = superexec_command


def superlink_app(lifespan_config: Any) -> Any:
    """Flower's SuperLink FastAPI app, built as ``_run_superlink_http_api`` builds it.

    Raises:
        FlowerVersionError: Another Flower, or a piece the patches replace is gone.
    """
    cli, main_mod = _superlink_modules()
    return main_mod.create_app(lifespan_config, cli.SuperLinkLifespan)


# -- the coordinator's Control API client on the control socket -----------------------------------


def control_client_on_socket(
    client: ControlHttpClient, socket_path: Path, timeout: float
) -> ControlHttpClient:
    """``client`` with its private httpx client replaced by one on the Unix socket
    ``socket_path`` (the same settings: ``timeout``, redirects followed).

    Raises:
        FlowerVersionError: Another Flower, or the client has no httpx client to replace.
    """
    import httpx

    require_flower_version()
    tcp_client = getattr(client, "_client", None)
    if not isinstance(tcp_client, httpx.Client):
        raise _missing("httpx client in ControlHttpClient to replace")
    tcp_client.close()
    client._client = httpx.Client(
        transport=httpx.HTTPTransport(uds=str(socket_path)), timeout=timeout, follow_redirects=True
    )
    return client
