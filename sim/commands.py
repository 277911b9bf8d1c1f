"""``fl-server``'s full command set: the coordinator's commands plus ``demo`` and ``simulate``.

The coordinator's own commands live in :mod:`fedseal.server.cli`; the two commands that start
sites as well as a coordinator (the real-process demo and the simulation engine) sit on this top
floor, which may import both adapters, so ``fedseal.server`` never imports ``fedseal.sim`` and the
layering runs one way. ``fl-server`` is this module's :func:`main`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedseal.server.cli import app, console, usage_error


@app.command("demo")
def demo(
    workdir: Annotated[
        Path | None, typer.Option(help="Where to put keys, data, state (default: a temp dir).")
    ] = None,
    rounds: Annotated[int, typer.Option(min=1, max=100)] = 5,
    sites: Annotated[int, typer.Option(min=3, max=10, help="Partner sites (a secure round needs at least 3: with 2 the sum reveals the other site's update).")] = 3,
    secure: Annotated[
        bool, typer.Option("--secure/--plain", help="Secure rounds (default) or plain FedAvg for comparison.")
    ] = True,
    setup_with_evaluation: Annotated[
        bool,
        typer.Option(
            "--setup-with-evaluation/--setup-exchange",
            help="A secure round's setup rides on the previous round's evaluation (default), or "
            "every round starts with a setup exchange of its own (run.setup_with_evaluation).",
        ),
    ] = True,
    dp: Annotated[
        bool,
        typer.Option(
            "--dp",
            help="Distributed differential privacy: server.toml \\[dp] with epsilon 8 at delta "
            "1e-6 for the run, and every site requires DP (client.toml \\[privacy] dp = "
            '"required", epsilon_budget 10). Secure rounds only.',
        ),
    ] = False,
) -> None:
    """Prepare MNIST-5k for 3 sites, start coordinator + sites on loopback with TLS, train."""
    from fedseal.sim.demo import run_demo

    if dp and not secure:
        raise usage_error("--dp: distributed DP adds its noise inside the secure sum (drop --plain)")
    raise typer.Exit(
        run_demo(
            workdir=workdir, rounds=rounds, num_sites=sites, console=console, secure=secure,
            setup_with_evaluation=setup_with_evaluation, dp=dp,
        )
    )


@app.command("simulate")
def simulate(
    sites: Annotated[int, typer.Option("--sites", min=2, max=10_000, help="Number of virtual sites N.")] = 10,
    rounds: Annotated[int, typer.Option(min=1, max=1000)] = 5,
    scheme: Annotated[str, typer.Option(help="Split of MNIST-5k: iid or dirichlet.")] = "iid",
    alpha: Annotated[float, typer.Option(min=0.0, help="Dirichlet concentration (--scheme dirichlet).")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the split, the initial model and training.")] = 1,
    model: Annotated[str, typer.Option(help="mlp, cnn or an installed module:callable.")] = "mlp",
    secure: Annotated[
        bool, typer.Option("--secure/--plain", help="Secure rounds (default) or plain FedAvg for comparison.")
    ] = True,
    workdir: Annotated[
        Path | None, typer.Option(help="Where to put keys, data, state (default: a temp dir).")
    ] = None,
    actors: Annotated[
        int,
        typer.Option(
            min=1, max=64,
            help="Ray actors running the virtual sites (each site pinned to one actor, so its "
            "round session never leaves its process).",
        ),
    ] = 2,
    batch: Annotated[
        int,
        typer.Option(
            min=1, max=256,
            help="Messages handed to a site actor in one Ray call, at most (1: one call per "
            "message). Each reply of a batch is a model-sized vector held at once: lower it "
            "for large models.",
        ),
    ] = 8,
    strategy: Annotated[
        str, typer.Option(help="The Flower strategy (server.toml \\[run] strategy): FedAvg, FedAvgM, FedProx, "
                          "FedAdam, FedAdagrad or FedYogi.")
    ] = "FedAvg",
    strategy_option: Annotated[
        list[str] | None,
        typer.Option(
            "--strategy-option", metavar="KEY=NUMBER",
            help="A keyword argument of the strategy (\\[run.strategy_options]), e.g. proximal_mu=0.1 "
            "for FedProx or eta=0.05 for FedAdam; repeat for more.",
        ),
    ] = None,
    dp: Annotated[
        bool,
        typer.Option(
            "--dp",
            help="Distributed differential privacy (server.toml \\[dp] with --epsilon, --delta, --clip; "
            "every site requires DP). The run stops, committed, when the next round would pass the "
            "budget. Secure rounds only.",
        ),
    ] = False,
    epsilon: Annotated[float, typer.Option(min=0.01, help="--dp: the run's epsilon budget.")] = 8.0,
    delta: Annotated[float, typer.Option(min=1e-15, max=0.1, help="--dp: the run's delta.")] = 1e-5,
    clip: Annotated[float, typer.Option(min=1e-9, help="--dp: each site's L2 clip of its update.")] = 1.0,
) -> None:
    """The same ServerApp and ClientApp on Flower's simulation engine, N virtual sites over split
    MNIST-5k; prints accuracy per round and verifies the audit log (secure runs).

    Exit codes: 0 every round committed, or a --dp run stopped at its budget (and the audit log
    verifies); 1 a round failed, the run failed or the log does not verify; 2 bad arguments.
    """
    from fedseal.sim.simulate import run_simulate_command

    if dp and not secure:
        raise usage_error("--dp: distributed DP adds its noise inside the secure sum (drop --plain)")
    options = _strategy_options(strategy_option or [])
    if secure and sites < 3:
        raise usage_error("--sites: a secure round needs at least 3 sites (with 2, each site could tell "
                    "the other's update from the sum; sites refuse smaller cohorts)")
    raise typer.Exit(
        run_simulate_command(
            sites=sites, rounds=rounds, scheme=scheme, alpha=alpha, seed=seed, model=model,
            secure=secure, workdir=workdir, echo=lambda s: console.print(s, markup=False, highlight=False),
            actors=actors, batch=batch, strategy=strategy, strategy_options=options,
            dp={"epsilon": epsilon, "delta": delta, "clip": clip} if dp else None,
        )
    )


def _strategy_options(pairs: list[str]) -> dict[str, float]:
    options: dict[str, float] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            options[key.strip()] = float(value)
        except ValueError:
            raise usage_error(f"--strategy-option {pair!r}: expected KEY=NUMBER, e.g. proximal_mu=0.1") from None
    return options


def main() -> None:
    app()
