"""Every ``FEDSEAL_*`` environment variable, read and checked once when a process starts.

Usage::

    from fedseal.settings import Environment, SettingsError
    environment = Environment.read()     # raises SettingsError naming the variable and its range
    environment.pull_backoff             # PullBackoff(initial_s=0.05, cap_s=0.25)
    environment.unknown                  # ("FEDSEAL_SUPERNODE_POL_S",): a typo, otherwise silent

Each process's entry point reads the environment once (the SuperLink launcher, the SuperNode
launcher, the coordinator's start, the ServerApp, a site's start, the simulation's site
builder) and passes the values it needs down; nothing below an entry point reads ``os.environ``
for a ``FEDSEAL_*`` variable.

Variables (unset: the default):

* ``FEDSEAL_OBJECT_PULL_BACKOFF_S`` (0.01 to 1, default 0.05): how long an object pull waits
  before asking again for an object not yet available (coordinator and sites); the cap is
  five times that, at least 0.25 s (:attr:`Environment.pull_backoff`).
* ``FEDSEAL_SUPERLINK_CLEANUP_S`` (0 to 10, default 1): minimum seconds between two clean-ups
  of the SuperLink's expired task tokens (0: every call, as Flower does).
* ``FEDSEAL_SUPERNODE_POLL_S`` (0.05 to 3, default 0.25): the SuperNode loop's idle poll.
* ``FEDSEAL_TORCH_THREADS`` (1 to 1024, default 1): torch's intra-op threads of a site.
* ``FEDSEAL_SIM_SHARE_VERIFIED`` (``0`` or ``1``, default ``1``): the simulation's virtual
  sites of one process share their signature checks and decodes.
* ``FEDSEAL_SIM_PROFILE`` (a directory, default none): profile the simulation's virtual sites.
* ``FEDSEAL_COORDINATOR_PASSPHRASE`` (default none): decrypts the coordinator's identity key
  (never printed: it is left out of the ``repr``).

Other ``FEDSEAL_*`` names are listed in :attr:`Environment.unknown`, except those that tools
outside this package read (:data:`OTHER_TOOLS`: the container health check, the network
namespace test harness, the test suite).

This package imports only the standard library: it is the lowest floor, beside
``fedseal.crypto``, and every other layer may import it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "CLEANUP_RANGE_S",
    "COORDINATOR_PASSPHRASE",
    "DEFAULT_CLEANUP_S",
    "DEFAULT_POLL_S",
    "DEFAULT_PULL_BACKOFF_S",
    "DEFAULT_TORCH_THREADS",
    "KNOWN",
    "OBJECT_PULL_BACKOFF",
    "OTHER_TOOLS",
    "POLL_RANGE_S",
    "PREFIX",
    "PULL_BACKOFF_RANGE_S",
    "SIM_PROFILE",
    "SIM_SHARE_VERIFIED",
    "SUPERLINK_CLEANUP",
    "SUPERNODE_POLL",
    "TORCH_THREADS",
    "TORCH_THREADS_RANGE",
    "Environment",
    "PullBackoff",
    "SettingsError",
    "unknown_name",
]

PREFIX = "FEDSEAL_"

OBJECT_PULL_BACKOFF = "FEDSEAL_OBJECT_PULL_BACKOFF_S"
SUPERLINK_CLEANUP = "FEDSEAL_SUPERLINK_CLEANUP_S"
SUPERNODE_POLL = "FEDSEAL_SUPERNODE_POLL_S"
TORCH_THREADS = "FEDSEAL_TORCH_THREADS"
SIM_SHARE_VERIFIED = "FEDSEAL_SIM_SHARE_VERIFIED"
SIM_PROFILE = "FEDSEAL_SIM_PROFILE"
COORDINATOR_PASSPHRASE = "FEDSEAL_COORDINATOR_PASSPHRASE"  # noqa: S105 (a variable's name)

#: Every variable :meth:`Environment.read` parses.
KNOWN = frozenset({
    OBJECT_PULL_BACKOFF, SUPERLINK_CLEANUP, SUPERNODE_POLL, TORCH_THREADS,
    SIM_SHARE_VERIFIED, SIM_PROFILE, COORDINATOR_PASSPHRASE,
})
#: ``FEDSEAL_*`` variables read by tools outside this package (set in the same containers and
#: test harnesses): neither parsed nor reported as unknown.
OTHER_TOOLS = frozenset({
    # deploy/docker/healthcheck.py (the images set FEDSEAL_HEALTH_ROLE; compose and Helm the rest)
    "FEDSEAL_HEALTH_ROLE", "FEDSEAL_HEALTH_TIMEOUT", "FEDSEAL_FLEET_ADDR", "FEDSEAL_METRICS_URL",
    "FEDSEAL_SUPERLINK", "FEDSEAL_CA", "FEDSEAL_TLS_SERVER_NAME",
    # deploy/netns: the multi-host test harness and its clock-skew sitecustomize
    "FEDSEAL_NETNS_PREFIX", "FEDSEAL_NETNS_FULL", "FEDSEAL_CLOCK_SKEW_S",
    # tests/audit/test_audit_mutations.py
    "FEDSEAL_MUTATION_SEED",
})

DEFAULT_PULL_BACKOFF_S = 0.05
PULL_BACKOFF_RANGE_S = (0.01, 1.0)
DEFAULT_CLEANUP_S = 1.0
CLEANUP_RANGE_S = (0.0, 10.0)
DEFAULT_POLL_S = 0.25
POLL_RANGE_S = (0.05, 3.0)
DEFAULT_TORCH_THREADS = 1
TORCH_THREADS_RANGE = (1, 1024)


class SettingsError(ValueError):
    """A ``FEDSEAL_*`` variable holds a value outside what it allows.

    Attributes:
        variable: The variable's name (the message names it and the allowed values too).
    """

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(message)
        self.variable = variable


@dataclass(frozen=True, slots=True)
class PullBackoff:
    """How long an object pull waits before asking again for an object not yet available.

    The wait starts at ``initial_s`` and doubles (with Flower's +-20 % jitter) up to ``cap_s``.
    """

    initial_s: float
    cap_s: float

    def kwargs(self) -> dict[str, float]:
        """Keyword arguments for Flower's ``pull_objects``/``pull_and_inflate_object_from_tree``."""
        return {"initial_backoff": self.initial_s, "backoff_cap": self.cap_s}


@dataclass(frozen=True)
class Environment:
    """The ``FEDSEAL_*`` settings of this process (the defaults: ``Environment()``)."""

    #: ``FEDSEAL_OBJECT_PULL_BACKOFF_S``: the first wait of an object pull, seconds.
    object_pull_backoff_s: float = DEFAULT_PULL_BACKOFF_S
    #: ``FEDSEAL_SUPERLINK_CLEANUP_S``: minimum seconds between two task-token clean-ups.
    superlink_cleanup_s: float = DEFAULT_CLEANUP_S
    #: ``FEDSEAL_SUPERNODE_POLL_S``: the SuperNode loop's idle poll, seconds.
    supernode_poll_s: float = DEFAULT_POLL_S
    #: ``FEDSEAL_TORCH_THREADS``: torch's intra-op threads of a site.
    torch_threads: int = DEFAULT_TORCH_THREADS
    #: ``FEDSEAL_SIM_SHARE_VERIFIED``: virtual sites of one process share checks and decodes.
    sim_share_verified: bool = True
    #: ``FEDSEAL_SIM_PROFILE``: where the simulation's site processes write their profiles.
    sim_profile_dir: str | None = None
    #: ``FEDSEAL_COORDINATOR_PASSPHRASE``: decrypts the coordinator key (not in the repr).
    coordinator_passphrase: str | None = field(default=None, repr=False)
    #: ``FEDSEAL_*`` names set but neither known here nor in :data:`OTHER_TOOLS` (sorted).
    unknown: tuple[str, ...] = ()

    @classmethod
    def read(cls, env: Mapping[str, str] = os.environ) -> Environment:
        """Parse and check every ``FEDSEAL_*`` variable of ``env``.

        Raises:
            SettingsError: A variable's value is not allowed (the message names the variable
                and its range).
        """
        return cls(
            object_pull_backoff_s=_seconds(env, OBJECT_PULL_BACKOFF, DEFAULT_PULL_BACKOFF_S, *PULL_BACKOFF_RANGE_S),
            superlink_cleanup_s=_seconds(env, SUPERLINK_CLEANUP, DEFAULT_CLEANUP_S, *CLEANUP_RANGE_S),
            supernode_poll_s=_seconds(env, SUPERNODE_POLL, DEFAULT_POLL_S, *POLL_RANGE_S),
            torch_threads=_count(env, TORCH_THREADS, DEFAULT_TORCH_THREADS, *TORCH_THREADS_RANGE),
            sim_share_verified=_flag(env, SIM_SHARE_VERIFIED, default="1"),
            sim_profile_dir=env.get(SIM_PROFILE) or None,
            coordinator_passphrase=env.get(COORDINATOR_PASSPHRASE) or None,
            unknown=tuple(sorted(
                name for name in env if name.startswith(PREFIX) and name not in KNOWN | OTHER_TOOLS
            )),
        )

    @property
    def pull_backoff(self) -> PullBackoff:
        """The object-pull back-off: ``FEDSEAL_OBJECT_PULL_BACKOFF_S``, capped at five times
        that, at least 0.25 s (the default 0.05 s gives 0.05/0.25 s; ``1`` gives Flower's first
        retry after 1 s, capped at 5 s; Flower: 10 s)."""
        value = self.object_pull_backoff_s
        return PullBackoff(initial_s=value, cap_s=max(0.25, 5 * value))


def _seconds(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    """A number of seconds from the variable ``name`` (``default`` when unset), within ``[lo, hi]``."""
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(name, f"{name} must be a number of seconds, got {raw!r}") from None
    if not lo <= value <= hi:
        raise SettingsError(name, f"{name} must be between {lo:g} and {hi:g} seconds, got {value}")
    return value


def _flag(env: Mapping[str, str], name: str, default: str) -> bool:
    """``1`` (yes) or ``0`` (no) from the variable ``name`` (``default`` when unset)."""
    value = env.get(name, default)
    if value not in ("0", "1"):
        raise SettingsError(name, f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _count(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    """A whole number from the variable ``name`` (``default`` when unset), within ``[lo, hi]``."""
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(name, f"{name} must be a whole number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise SettingsError(name, f"{name} must be between {lo} and {hi}, got {value}")
    return value


def unknown_name(name: str, known: Iterable[str]) -> str:
    """``"unknown key"``, with the closest known name when there is one (``"unknown key (did
    you mean 'authority'?)"``): what a configuration reader says of a key it does not know."""
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    if not close:  # "roster_authority" for "authority": a known name inside the typo
        close = sorted(k for k in known if len(k) >= 4 and k in name)[:1]
    return f"unknown key (did you mean {close[0]!r}?)" if close else "unknown key"
