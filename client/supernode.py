"""``flower-supernode`` with the site's Flower patches installed and their settings read from
the environment.

This launcher runs the unchanged ``flower-supernode`` CLI after
:func:`fedseal.client.flower_patches.install` (one module for every patch of Flower's internals
the site applies, each explained there): the SuperNode loop's idle poll is capped at
``FEDSEAL_SUPERNODE_POLL_S`` seconds (default :data:`fedseal.settings.DEFAULT_POLL_S`; Flower sleeps a
hard-coded 3 s, and every protocol message cost up to that much idle latency: ~20 s of a ~31 s
round in the demo), its waits for the site's own executor at
:data:`fedseal.client.flower_patches.LOCAL_WAIT_S`, and its object pulls start at
``FEDSEAL_OBJECT_PULL_BACKOFF_S`` (default :data:`fedseal.settings.DEFAULT_PULL_BACKOFF_S`,
50 ms; ``1`` gives Flower's first retry after 1 s) instead of Flower's 1 s, capped at
:attr:`fedseal.settings.PullBackoff.cap_s`;
the executor (:mod:`fedseal.client.executor`) and the coordinator's ServerApp pull with the
same setting (the executor, on loopback, caps its retries at 0.1 s). The other patches keep a
site from wedging when the coordinator restarts or a link is cut mid-round. The settings are
read once, with every ``FEDSEAL_*`` variable, by :meth:`fedseal.settings.Environment.read`.

Cost: an idle site issues one small authenticated HTTPS pull per interval (at 0.25 s, 4 per
second per site) instead of one per 3 s.

Run as ``python -m fedseal.client.supernode <flower-supernode arguments>``; a Flower other than
the one the patches were written for, or a bad setting, exits with code 2 and one line.
"""

from __future__ import annotations

import sys

from fedseal.client.flower_patches import LOCAL_WAIT_S, install
from fedseal.settings import Environment, PullBackoff

__all__ = ["loopback_backoff", "main"]


def loopback_backoff(backoff: PullBackoff) -> PullBackoff:
    """``backoff`` with its cap lowered to 0.1 s (or the initial wait, if longer).

    For the executor's pulls from its own SuperNode: loopback, no TLS, in-memory state, so
    retrying often is cheap, and the cap is the longest the site may idle after the message's
    objects reached its SuperNode.
    """
    return PullBackoff(initial_s=backoff.initial_s, cap_s=max(backoff.initial_s, min(backoff.cap_s, 0.1)))


def main() -> None:
    """The launcher's process: its ``FEDSEAL_*`` variables read once, the patches installed,
    then ``flower-supernode``."""
    try:
        environment = Environment.read()
        install(environment.supernode_poll_s, environment.pull_backoff, LOCAL_WAIT_S)
    except (ValueError, RuntimeError) as err:
        print(f"fedseal supernode: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli import flower_supernode

    # The site's supernode.log is a file: timestamps help an operator, colour codes do not.
    update_console_handler(timestamps=True, colored=False)
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
