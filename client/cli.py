"""``fl-client``: the partner-site command line.

Commands are contributed by the modules that own them (``register(app)``), so each
area of the site keeps its commands next to its code.
"""

from __future__ import annotations

import os

# gRPC's fork handlers restart its event-engine threads in a forked child; this process forks
# children with a preexec_fn (SuperNode / SuperLink / sites, for PR_SET_PDEATHSIG), and the
# child's close_fds then closed the restarted poller's epoll fd under it: the child aborted
# ("epoll_wait error: Bad file descriptor", SIGABRT) before exec. The children exec at once
# and need nothing of the parent's gRPC state, so the handlers are off (before grpc loads).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import typer

from fedseal.client import roster_cli, site_cli
from fedseal.client.data import cli as data_cli

app = typer.Typer(
    name="fl-client",
    help="fedseal partner site: prepare and attest data, manage the site key, join a federation.",
    no_args_is_help=True,
    add_completion=False,
)
data_cli.register(app)
site_cli.register(app)
roster_cli.register(app)


def main() -> None:
    app()
