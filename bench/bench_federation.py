"""Federation on Flower's simulation engine: fedseal secure rounds vs plain FedAvg vs Flower's
own SecAgg+ (issue 5, "Benchmark" and "Quality").

Scale (default)::

    .venv/bin/python -m bench federation [--quick] [--sites=10,100] [--params=100000,1000000]
                                         [--rounds=3] [--arms=plain,fedseal,flower-fedavg,flower-secagg]
                                         [--actors=1]

For every N (sites) and M (parameters), four arms run one after the other in this process, each
on Flower 1.42's simulation engine (in-memory link state, Ray backend with one actor holding
every virtual site, :mod:`fedseal.sim.simulate`; ``--actors=K`` runs the sites in K actors,
fedseal's pinned one site per actor for the whole run, Flower's arms in any idle one), over the same split of MNIST-5k, with an MLP
784-H-10 whose H gives about M parameters, 1 local epoch (batch 32, lr 0.05):

* ``plain``: fedseal's ServerApp and ClientApp with ``run.secure = false`` (updates in the
  clear): **the baseline**;
* ``fedseal``: the same apps with secure rounds (SecAgg+ with signed envelopes, dataset roots,
  audit log);
* ``flower-fedavg``: Flower's legacy ``DefaultWorkflow`` + ``FedAvg`` + ``NumPyClient``;
* ``flower-secagg``: the same with ``SecAggPlusWorkflow(num_shares=3,
  reconstruction_threshold=2)`` and ``secaggplus_mod`` on the client.

Measured per arm: round time (median of rounds 2..R; fedseal's federated evaluation excluded, Flower's
arms evaluate nothing), for fedseal's two arms also round + evaluation time (with
``run.setup_with_evaluation``, the default, a secure round's setup rides on the previous round's
evaluation messages, so only this column compares the secure and plain arms' whole work), bytes each site uploads per round (array buffers + bytes/strings of its
replies to training messages, :func:`fedseal.sim.sites.message_bytes`, the same count for
every arm), and the coordinator's peak memory: the peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` before each arm) of this process, which runs the ServerApp and Flower's
in-memory link state (all messages in flight) but not the sites (they run in the Ray actor),
minus its RSS just before the arm. The sites' ClientApp time per round is given as wall seconds
and as CPU seconds of the thread running the ClientApp (``time.thread_time``); for fedseal's arms
they include the evaluation messages (which carry the next round's setup with
``run.setup_with_evaluation``), for Flower's arms only the training messages; on a shared
machine the wall seconds include waiting for a core, the CPU seconds do not, so the CPU column
is the one to compare the sites' work across arms and runs.

Last, with the plain arm in the run (``--no-floor`` skips it): the least any secure round +
evaluation could take on this engine, from the same run's numbers: plain's round + evaluation,
plus each site's cryptography that fedseal's protocol (DESIGN.md section 3) cannot skip for
that N and M (``bench.bench_protocol.site_floor``: key agreements, signatures, Shamir, share
encryption, quantization, mask keystreams, digest; signature checks left out) summed over the
sites and divided over the actors, plus three times what one exchange of N near-empty messages
takes on the same engine (:func:`noop_exchange_s`: SecAgg+'s share, consistency and unmask
exchanges, which plain does not have). A goal below that ratio cannot be met on this engine by
any implementation of this protocol.

Quality::

    .venv/bin/python -m bench federation --quality [--rounds=10] [--seed=1]

MNIST-5k over 10 sites, Dirichlet(alpha=0.5), same split and seeds: plain FedAvg vs secure
FedAvg, plus a centrally trained baseline (same MLP, same seed, the union of the sites'
training parts, as many epochs as the federation had rounds x local epochs). All three final
models are scored on the union of the sites' local validation parts (the rows federated
evaluation uses), next to the federated evaluation the runs printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedseal.sim.demo import Federation
from fedseal.sim.engine import DEFAULT_BATCH, run_apps_on_engine
from fedseal.sim.simulate import prepare_simulation, run_fedseal_simulation
from fedseal.sim.sites import SimulatedSites

ARMS = ("plain", "fedseal", "flower-fedavg", "flower-secagg", "fedseal-setup-exchange")
FEDSEAL_ARMS = ("plain", "fedseal", "fedseal-setup-exchange")
DEFAULT_ARMS = ARMS[:4]
BASELINE = "plain"
NUM_FEATURES = 784
NUM_CLASSES = 10
EPOCHS, BATCH, LR, CLIP = 1, 32, 0.05, 5.0
MAX_WEIGHT = 5000
"""``run.max_weight``: bounds a site's example count; MNIST-5k has 5,000 rows in all. With the
default 100,000, N x 4096 levels x max_weight overflows Z_2^32 from N = 6 on and the coordinator
falls back to 64-bit masked vectors (2x the upload of a float32 model)."""


# --------------------------------------------------------------------------- models


def hidden_for(params: int) -> int:
    """Hidden width H of a 784-H-10 MLP with about ``params`` parameters (795 H + 10)."""
    return max(1, round((params - NUM_CLASSES) / (NUM_FEATURES + 1 + NUM_CLASSES)))


def sized_mlp(params: int) -> Callable[..., Any]:
    """A model factory (``num_features``, ``num_classes``) for a 784-H-10 MLP of ~``params``."""

    def factory(num_features: int = NUM_FEATURES, num_classes: int = NUM_CLASSES) -> Any:
        from torch import nn

        h = hidden_for(params)
        return nn.Sequential(nn.Linear(num_features, h), nn.ReLU(), nn.Linear(h, num_classes))

    return factory


def __getattr__(name: str) -> Any:
    """``sized_mlp_<M>`` (a model the sites build by ``module:callable``) and
    ``flower_site_app__<secagg|fedavg>__<M>`` (a Flower ClientApp factory for one site dir)."""
    if name.startswith("sized_mlp_") and name[10:].isdigit():
        return sized_mlp(int(name[10:]))
    if name.startswith("flower_site_app__"):
        _, kind, size = name.split("__")
        return lambda site_dir: flower_site_app(Path(site_dir), secagg=kind == "secagg", params=int(size))
    raise AttributeError(name)


def model_name(params: int) -> str:
    return f"bench.bench_federation:sized_mlp_{params}"


# --------------------------------------------------------------------------- Flower's arms


def flower_site_app(site_dir: Path, *, secagg: bool, params: int) -> Any:
    """Flower 1.42 legacy ClientApp for one prepared site: NumPyClient training the same MLP on
    the same local data, with ``secaggplus_mod`` when ``secagg``."""
    import numpy as np
    import torch
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod

    from fedseal.client.config import load_client_config
    from fedseal.client.models import load_numpy_state_dict, state_dict_to_numpy
    from fedseal.client.site_data import load_site_data
    from fedseal.client.training import TrainRequest, train

    torch.set_num_threads(1)  # as the fedseal sites (fl-client run, fl-server simulate)
    cfg = load_client_config(site_dir / "client.toml")
    data = load_site_data(cfg.dataset_dir, validation_fraction=cfg.validation_fraction, seed=7)
    model = sized_mlp(params)()
    names = list(state_dict_to_numpy(model))

    class Site(NumPyClient):  # type: ignore[misc]
        def get_parameters(self, config: dict[str, Any]) -> list[Any]:
            weights = state_dict_to_numpy(model)
            return [weights[k] for k in names]

        def fit(self, parameters: list[Any], config: dict[str, Any]) -> tuple[list[Any], int, dict[str, Any]]:
            load_numpy_state_dict(model, dict(zip(names, parameters, strict=True)))
            rnd = int(config.get("round", 1))
            res = train(model, data.x_train, data.y_train, TrainRequest(EPOCHS, BATCH, LR, CLIP), seed=rnd)
            weights = state_dict_to_numpy(model)
            return [np.asarray(weights[k], np.float32) for k in names], res.num_examples, {}

    def client_fn(context: Any) -> Any:
        return Site().to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secagg else [])


def flower_server_app(num_sites: int, rounds: int, *, secagg: bool, round_times: list[float]) -> Any:
    """Flower 1.42 legacy ServerApp: DefaultWorkflow(+SecAggPlusWorkflow(3, 2)), FedAvg over all
    sites, no evaluation; appends each round's fit time (configure -> aggregated) to
    ``round_times``."""
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    class TimedFedAvg(FedAvg):  # type: ignore[misc]
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            self._t0 = time.monotonic()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            out = super().aggregate_fit(server_round, results, failures)
            round_times.append(time.monotonic() - self._t0)
            return out

    app = ServerApp()

    @app.main()  # type: ignore[misc]
    def _main(grid: Any, context: Any) -> None:
        strategy = TimedFedAvg(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=num_sites,
            min_available_clients=num_sites, min_evaluate_clients=0,
            on_fit_config_fn=lambda rnd: {"round": rnd},
        )
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        fit = SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2) if secagg else None
        DefaultWorkflow(fit_workflow=fit)(grid, legacy)

    return app


# --------------------------------------------------------------------------- measurement


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _median_after_first(times: list[float]) -> float:
    """Median round time of rounds 2..R (round 1 pays one-off costs: first model, warm-up)."""
    import statistics

    return statistics.median(times[1:] if len(times) > 1 else times)


def _uploads(traffic: Path, sites: int, rounds: int) -> tuple[float, float, float]:
    """Bytes per site per round of the replies to training messages, and the wall and CPU
    seconds all sites' ClientApps spent on those messages per round (with one actor they run one
    after another; median of rounds 2..R like the round time, when every round had the same
    replies). CPU seconds (of the thread running the ClientApp) leave out waiting for a core."""
    recs = [json.loads(line) for line in traffic.read_text().splitlines()]
    recs = [r for r in recs if str(r["type"]).startswith("train")]
    total = sum(int(r["bytes"]) for r in recs)
    out = [total / (sites * rounds)]
    for key in ("seconds", "cpu_seconds"):
        seconds = [float(r.get(key, "nan")) for r in recs]
        if rounds > 1 and len(seconds) % rounds == 0:  # every round had the same replies, in order
            per = len(seconds) // rounds
            out.append(_median_after_first([sum(seconds[i * per : (i + 1) * per]) for i in range(rounds)]))
        else:
            out.append(sum(seconds) / rounds)
    return out[0], out[1], out[2]


SECURE_STAGES = ("advertise", "share", "masked-input", "consistency", "unmask")
"""A secure round's exchanges in order (``<stage>_s`` in rounds.jsonl); plain rounds have one, ``train``."""


def _stage_breakdown(traffic: Path, done: list[dict[str, Any]], stages: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per exchange of a round, median of rounds 2..R: its wall seconds as the coordinator saw
    them (``<stage>_s``: first message out to last reply in and checked) and the sites' ClientApp
    wall and CPU seconds on its messages, summed over sites. A round whose setup rode on the
    previous evaluation (``setup_with_evaluation``) has no setup exchange: its ``advertise``
    row counts only the coordinator taking the adverts, and the sites' setup work is in the
    previous round's evaluation. Empty when a round had dropouts or a second setup attempt (a
    site's n-th training message is then not the n-th stage)."""
    by_site: dict[int, list[dict[str, Any]]] = {}
    evals: dict[int, list[dict[str, Any]]] = {}
    for line in traffic.read_text().splitlines():
        rec = json.loads(line)
        if str(rec["type"]).startswith("train"):
            by_site.setdefault(int(rec["site"]), []).append(rec)
        elif rec["type"] == "evaluate":
            evals.setdefault(int(rec["site"]), []).append(rec)
    per_round = [stages[1:] if r.get("setup_with_evaluation") else stages for r in done]
    if not by_site or any(len(v) != sum(len(p) for p in per_round) for v in by_site.values()):
        return {}
    series: dict[str, dict[str, list[float]]] = {
        stage: {"stage_s": [], "site_s": [], "site_cpu_s": []} for stage in stages
    }
    offset = 0
    for rnd, names in enumerate(per_round):
        for stage in stages:
            recs = [v[offset + names.index(stage)] for v in by_site.values()] if stage in names else []
            series[stage]["stage_s"].append(float(done[rnd].get(f"{stage}_s", float("nan"))))
            series[stage]["site_s"].append(sum(float(r["seconds"]) for r in recs))
            series[stage]["site_cpu_s"].append(sum(float(r["cpu_seconds"]) for r in recs))
        offset += len(names)
    if evals and all(len(v) == len(done) for v in evals.values()):  # the evaluation exchange
        series["evaluate"] = {
            "stage_s": [float(r.get("evaluate_s", float("nan"))) for r in done],
            "site_s": [sum(float(v[i]["seconds"]) for v in evals.values()) for i in range(len(done))],
            "site_cpu_s": [sum(float(v[i]["cpu_seconds"]) for v in evals.values()) for i in range(len(done))],
        }
    return {stage: {k: _median_after_first(v) for k, v in vals.items()} for stage, vals in series.items()}


def run_arm(
    arm: str, fed: Federation, params: int, rounds: int, workdir: Path, actors: int = 1,
    batch: int = DEFAULT_BATCH,
) -> dict[str, Any]:
    """One arm on the engine; returns round time, uploads per site and peak RSS growth."""
    state = fed.server_toml.parent / "state"
    shutil.rmtree(state, ignore_errors=True)
    traffic = workdir / f"traffic-{arm}.jsonl"
    traffic.unlink(missing_ok=True)
    traffic.touch()
    n = len(fed.sites)
    _set_secure(fed, arm != "plain", params, rounds, setup_with_evaluation=arm != "fedseal-setup-exchange")
    reset = _reset_peak()
    before = _rss_kib("VmRSS")
    t0 = time.monotonic()
    if arm in FEDSEAL_ARMS:
        outcome = run_fedseal_simulation(
            fed, extra_models=(model_name(params),), traffic_log=traffic, actors=actors, batch=batch
        )
        done = [r for r in outcome.rounds if r.get("outcome") == "committed"]
        if len(done) != rounds:
            raise RuntimeError(f"{arm}: only {len(done)} of {rounds} rounds committed: {outcome.rounds}")
        round_s = _median_after_first([float(r["seconds"]) - float(r.get("evaluate_s", 0.0)) for r in done])
        # With run.setup_with_evaluation (default) a secure round's setup exchange rides on the
        # previous round's evaluation, so the fair comparison of fedseal with plain includes it.
        round_eval_s: float | None = _median_after_first([float(r["seconds"]) for r in done])
        accuracy: float | None = float(done[-1].get("accuracy", float("nan")))
        stages = _stage_breakdown(traffic, done, SECURE_STAGES if arm != "plain" else ("train",))
    else:
        times: list[float] = []
        kind = "secagg" if arm == "flower-secagg" else "fedavg"
        server = flower_server_app(n, rounds, secagg=kind == "secagg", round_times=times)
        client = SimulatedSites(
            tuple(str(p) for p in fed.sites), (), str(traffic),
            factory=f"bench.bench_federation:flower_site_app__{kind}__{params}",
        )
        run_apps_on_engine(server, client, n, actors=actors, pin_sites=False)  # Flower's own pool
        if len(times) != rounds:
            raise RuntimeError(f"{arm}: {len(times)} of {rounds} rounds finished")
        round_s, accuracy = _median_after_first(times), None
        round_eval_s = None  # Flower's arms evaluate nothing
        stages = {}
    wall = time.monotonic() - t0
    peak = _rss_kib("VmHWM")
    upload, site_s, site_cpu_s = _uploads(traffic, n, rounds)
    if stages:  # fedseal's arms: training and evaluation messages, exchange by exchange
        site_s = sum(v["site_s"] for v in stages.values())
        site_cpu_s = sum(v["site_cpu_s"] for v in stages.values())
    return {
        "arm": arm, "sites": n, "params": params, "actors": actors, "round_s": round_s,
        "round_eval_s": round_eval_s, "site_s": site_s,
        "site_cpu_s": site_cpu_s, "wall_s": wall,
        "upload_bytes": upload, "peak_mib": peak / 1024,
        "growth_mib": (peak - before) / 1024 if reset else float("nan"), "accuracy": accuracy,
        "stages": stages,
    }


# --------------------------------------------------------------------------- the engine's floor

NOOP_EXCHANGES = 6
"""Exchanges of the no-op measurement (the first is left out of the median, as a round 1)."""


def noop_site_app(site_dir: str) -> Any:
    """A ClientApp that answers a query with a one-entry record and does nothing else."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.query()  # type: ignore[misc]
    def _answer(msg: Message, context: Any) -> Message:
        return Message(RecordDict({"ack": ConfigRecord({"ok": 1})}), reply_to=msg)

    return app


def noop_exchange_s(fed: Federation, *, actors: int, batch: int) -> float:
    """Median seconds of one exchange of N near-empty messages on this engine, as fedseal's
    ServerApp exchanges them (:func:`fedseal.server.exchange.exchange`), with the sites pinned
    to ``actors`` Ray actors as in fedseal's arms: what any exchange costs on this engine before
    the sites or the coordinator do any work."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.serverapp import ServerApp

    from fedseal.server.exchange import exchange

    n = len(fed.sites)
    times: list[float] = []
    app = ServerApp()

    @app.main()  # type: ignore[misc]
    def _main(grid: Any, context: Any) -> None:
        nodes = list(grid.get_node_ids())
        for i in range(NOOP_EXCHANGES):
            msgs = [
                Message(RecordDict({"q": ConfigRecord({"i": i})}), dst_node_id=node, message_type="query")
                for node in nodes
            ]
            t0 = time.monotonic()
            replies = exchange(grid, msgs, timeout=300.0)
            times.append(time.monotonic() - t0)
            failed = [r for r in replies if r.has_error()]
            if len(replies) != len(nodes) or failed:
                raise RuntimeError(f"no-op exchange {i}: {len(replies)} replies, {len(failed)} errors")

    sites = SimulatedSites(tuple(str(p) for p in fed.sites), (), None, factory="bench.bench_federation:noop_site_app")
    run_apps_on_engine(app, sites, n, actors=actors, pin_sites=True, batch=batch)
    if len(times) != NOOP_EXCHANGES:
        raise RuntimeError(f"no-op exchanges: {len(times)} of {NOOP_EXCHANGES} finished")
    return _median_after_first(times)


def _set_secure(fed: Federation, secure: bool, params: int, rounds: int, *, setup_with_evaluation: bool = True) -> None:
    from fedseal.server.cli import write_server_toml
    from fedseal.server.config import load_server_config
    from fedseal.sim.demo import set_allow_plain

    set_allow_plain(fed.sites, not secure)  # sites refuse plain training unless they opt in
    cfg = load_server_config(fed.server_toml)
    write_server_toml(
        fed.server_toml, fleet_port=cfg.network.fleet_port, internal_port=cfg.network.internal_port,
        metrics_port=0, fleet_host="127.0.0.1", audit_host="127.0.0.1", audit_port=cfg.network.audit_port,
        run_overrides={
            "rounds": rounds, "secure": secure, "model": model_name(params), "min_sites": 2, "seed": 1,
            "max_weight": MAX_WEIGHT,
            "epochs": EPOCHS, "batch_size": BATCH, "learning_rate": LR, "clip_norm": CLIP,
            "stage_timeout_s": 600.0, "sites_wait_timeout_s": 120.0,
            "setup_with_evaluation": setup_with_evaluation,
        },
    )


def _fmt_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| N sites | M params | arm | round s | vs plain | vs Flower FedAvg | round + evaluation s | vs plain | "
        "sites' ClientApp s / round | "
        "sites' ClientApp CPU s / round | vs plain | upload / site | vs plain | coordinator peak RSS MiB | "
        "growth MiB | wall s |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = {(r["sites"], r["params"]): r for r in results if r["arm"] == BASELINE}
    flwr = {(r["sites"], r["params"]): r for r in results if r["arm"] == "flower-fedavg"}
    for r in results:
        b = base.get((r["sites"], r["params"]))
        f = flwr.get((r["sites"], r["params"]))
        rt = f"{r['round_s'] / b['round_s']:.2f}x" if b else "-"
        rf = f"{r['round_s'] / f['round_s']:.2f}x" if f else "-"
        up = f"{r['upload_bytes'] / b['upload_bytes']:.3f}x" if b else "-"
        cpu = r.get("site_cpu_s", float("nan"))
        rc = f"{cpu / b['site_cpu_s']:.2f}x" if b and b.get("site_cpu_s") else "-"
        re_s = r.get("round_eval_s")
        re_txt = f"{re_s:.2f}" if re_s is not None else "-"
        re_x = f"{re_s / b['round_eval_s']:.2f}x" if re_s is not None and b and b.get("round_eval_s") else "-"
        lines.append(
            f"| {r['sites']} | {r['params']:,} | {r['arm']} | {r['round_s']:.2f} | {rt} | {rf} | {re_txt} | {re_x} | "
            f"{r['site_s']:.2f} | "
            f"{cpu:.2f} | {rc} | {r['upload_bytes'] / 1e6:.3f} MB | {up} | {r['peak_mib']:.0f} | {r['growth_mib']:.0f} | "
            f"{r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def _fmt_stages(results: list[dict[str, Any]]) -> str:
    """Where the fedseal and plain rounds' seconds go, exchange by exchange."""
    lines = [
        "| N sites | M params | arm | exchange | stage s | sites' ClientApp s | sites' ClientApp CPU s | "
        "stage s - sites' ClientApp s / actors |",
        "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        actors = max(1, int(r.get("actors", 1)))
        for stage, v in (r.get("stages") or {}).items():
            rest = v["stage_s"] - v["site_s"] / actors
            lines.append(
                f"| {r['sites']} | {r['params']:,} | {r['arm']} | {stage} | {v['stage_s']:.2f} | "
                f"{v['site_s']:.2f} | {v['site_cpu_s']:.2f} | {rest:.2f} |"
            )
    return "\n".join(lines)


#: Exchanges a secure round + evaluation has beyond plain's train + evaluate: share, consistency,
#: unmask (the key adverts ride on the evaluation, the masked input on the training exchange).
EXTRA_EXCHANGES = 3


def _fmt_floor(
    results: list[dict[str, Any]], floors: dict[tuple[int, int], dict[str, float]], noop: dict[int, float]
) -> str:
    """How close a secure round could come to plain's, from this run's own measurements: plain's
    round + evaluation, plus every site's cryptography that fedseal's protocol cannot skip
    (``bench.bench_protocol.site_floor``, signature checks left out) run site after site on the
    actors, plus what the engine takes for each of the three extra exchanges before anybody
    works (``noop``: the median exchange of N near-empty messages, by N)."""
    lines = [
        "| N sites | M params | plain round + evaluation s | no-op exchange s | "
        "site floor ms (no signature checks) | floor over the actors s | lowest secure round + evaluation s | "
        "lowest vs plain | fedseal measured vs plain |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        floor = floors.get((r["sites"], r["params"]))
        engine = noop.get(r["sites"])
        if r["arm"] != BASELINE or floor is None or engine is None or not r.get("round_eval_s"):
            continue
        actors = max(1, int(r.get("actors", 1)))
        spread = r["sites"] * floor["total, no verification"] / 1000 / actors
        lowest = r["round_eval_s"] + spread + EXTRA_EXCHANGES * engine
        secure = next(
            (x for x in results if x["arm"] == "fedseal" and (x["sites"], x["params"]) == (r["sites"], r["params"])),
            None,
        )
        measured = f"{secure['round_eval_s'] / r['round_eval_s']:.2f}x" if secure and secure.get("round_eval_s") else "-"
        lines.append(
            f"| {r['sites']} | {r['params']:,} | {r['round_eval_s']:.2f} | {engine:.3f} | "
            f"{floor['total, no verification']:.1f} | {spread:.2f} | {lowest:.2f} | "
            f"{lowest / r['round_eval_s']:.2f}x | {measured} |"
        )
    return "\n".join(lines)


def _fmt_floor_pieces(floors: dict[tuple[int, int], dict[str, float]]) -> str:
    lines = ["| N sites | M params | piece | CPU ms per site |", "| ---: | ---: | --- | ---: |"]
    for (n, m), floor in floors.items():
        for piece, ms in floor.items():
            lines.append(f"| {n} | {m:,} | {piece} | {ms:.2f} |")
    return "\n".join(lines)


def table_from_log(path: Path) -> str:
    """Rebuild the table from the JSON result lines a run printed (``  {...}``)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("  {")]
    return _fmt_table(rows)


def scale(args: argparse.Namespace) -> None:
    sites = [int(s) for s in args.sites.split(",")]
    sizes = [int(s) for s in args.params.split(",")]
    arms = args.arms.split(",")
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; known: {', '.join(ARMS)}")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="fedseal-bench-fed-"))
    results: list[dict[str, Any]] = []
    # Imported up front so the first arm's memory growth is not the import of Ray and the engine.
    import flwr.server.workflow
    import flwr.simulation.run_simulation  # noqa: F401
    import ray  # noqa: F401

    import fedseal.server.flower_app  # noqa: F401

    print(f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; workdir {root}", flush=True)
    feds: dict[int, Federation] = {}
    for n in sites:
        fed = feds[n] = prepare_simulation(root / f"n{n}", sites=n, scheme="iid", seed=1)
        for m in sizes:
            for arm in arms:
                res = run_arm(arm, fed, m, args.rounds, root / f"n{n}", actors=args.actors, batch=args.batch)
                results.append(res)
                print(f"  {json.dumps(res)}", flush=True)
    print()
    print(_fmt_table(results))
    print()
    print(_fmt_stages(results))
    if BASELINE in arms and not args.no_floor:
        from bench.bench_protocol import site_floor

        floors = {(n, m): site_floor(n, m) for n in sites for m in sizes}
        noop = {n: noop_exchange_s(feds[n], actors=args.actors, batch=args.batch) for n in sites}
        print("\nThe least a secure round + evaluation could take on this engine (same run):\n")
        print(_fmt_floor(results, floors, noop))
        print()
        print(_fmt_floor_pieces(floors))
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- quality


def quality(args: argparse.Namespace) -> None:
    import numpy as np
    from safetensors.numpy import load_file

    from fedseal.client.config import load_client_config
    from fedseal.client.models import build_model, load_numpy_state_dict
    from fedseal.client.site_data import load_site_data
    from fedseal.client.training import TrainRequest, evaluate, train

    root = Path(args.workdir or tempfile.mkdtemp(prefix="fedseal-bench-quality-"))
    fed = prepare_simulation(root, sites=10, scheme="dirichlet", alpha=0.5, seed=args.seed)
    parts = [
        load_site_data(c.dataset_dir, validation_fraction=c.validation_fraction, seed=7)
        for c in (load_client_config(s / "client.toml") for s in fed.sites)
    ]
    # np.asarray materialises a site's (possibly streamed) part; MNIST-5k is small.
    x_val = np.concatenate([np.asarray(p.x_val, np.float32) for p in parts])
    y_val = np.concatenate([np.asarray(p.y_val, np.int64) for p in parts])
    rows: list[tuple[str, list[float], float, float, float]] = []
    for arm in ("plain", "fedseal"):
        state = fed.server_toml.parent / "state"
        shutil.rmtree(state, ignore_errors=True)
        from fedseal.server.cli import write_server_toml
        from fedseal.server.config import load_server_config
        from fedseal.sim.demo import set_allow_plain

        set_allow_plain(fed.sites, arm == "plain")  # sites refuse plain training unless they opt in
        cfg = load_server_config(fed.server_toml)
        write_server_toml(
            fed.server_toml, fleet_port=cfg.network.fleet_port, internal_port=cfg.network.internal_port,
            metrics_port=0, fleet_host="127.0.0.1", audit_host="127.0.0.1", audit_port=cfg.network.audit_port,
            run_overrides={
                "rounds": args.rounds, "secure": arm == "fedseal", "model": "mlp", "seed": args.seed,
                "max_weight": MAX_WEIGHT,
                "min_sites": 2, "epochs": EPOCHS, "batch_size": BATCH, "learning_rate": LR,
                "clip_norm": CLIP, "stage_timeout_s": 600.0, "sites_wait_timeout_s": 120.0,
            },
        )
        t0 = time.monotonic()
        out = run_fedseal_simulation(fed)
        wall = time.monotonic() - t0
        accs = [float(r["accuracy"]) for r in out.rounds if r.get("outcome") == "committed"]
        if len(accs) != args.rounds or out.model is None:
            raise RuntimeError(f"{arm}: not every round committed: {out.rounds}")
        model = build_model("mlp", seed=args.seed)
        load_numpy_state_dict(model, load_file(out.model))
        pooled = evaluate(model, x_val, y_val, num_classes=NUM_CLASSES)
        rows.append((f"{arm} FedAvg" if arm == "plain" else "fedseal secure FedAvg", accs, pooled.accuracy, pooled.macro_f1, wall))
        print(f"  {arm}: federated accuracy per round {[round(a, 4) for a in accs]}; pooled {pooled.accuracy:.4f}", flush=True)
    x_tr = np.concatenate([np.asarray(p.x_train, np.float32) for p in parts])
    y_tr = np.concatenate([np.asarray(p.y_train, np.int64) for p in parts])
    central = build_model("mlp", seed=args.seed)
    t0 = time.monotonic()
    for epoch in range(1, args.rounds * EPOCHS + 1):
        train(central, x_tr, y_tr, TrainRequest(1, BATCH, LR, CLIP), seed=epoch)
    res = evaluate(central, x_val, y_val, num_classes=NUM_CLASSES)
    rows.append(("central (all data at once)", [], res.accuracy, res.macro_f1, time.monotonic() - t0))
    print()
    print(
        f"MNIST-5k, 10 sites, Dirichlet(0.5), split seed {args.seed}, MLP seed {args.seed}, {args.rounds} rounds x "
        f"{EPOCHS} local epoch (central: {args.rounds * EPOCHS} epochs), batch {BATCH}, lr {LR}; pooled validation: "
        f"{len(y_val)} rows (the sites' local validation parts)\n"
    )
    print("| run | federated accuracy per round | final, pooled validation | macro-F1 | vs plain | wall s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    base = rows[0][2]
    for name, accs, acc, f1, wall in rows:
        per_round = ", ".join(f"{a:.3f}" for a in accs) or "-"
        print(f"| {name} | {per_round} | {acc:.4f} | {f1:.4f} | {100 * (acc - base):+.1f} pt | {wall:.0f} |")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str]) -> None:
    import sys

    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:  # the Ray actor imports bench.bench_federation (models, Flower arms)
        sys.path.insert(0, repo)
    p = argparse.ArgumentParser(prog="python -m bench federation", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="N=10, M=100k, 2 rounds (a smoke run, ~3 min)")
    p.add_argument("--quality", action="store_true", help="the 10-site Dirichlet(0.5) quality comparison")
    p.add_argument("--sites", default="10,100")
    p.add_argument("--params", default="100000,1000000")
    p.add_argument("--rounds", type=int, default=None, help="default: 3 (scale; median of rounds 2..R), 10 (quality)")
    p.add_argument(
        "--arms", default=",".join(DEFAULT_ARMS),
        help=f"of {', '.join(ARMS)} (fedseal-setup-exchange: secure rounds with run.setup_with_evaluation = false)",
    )
    p.add_argument(
        "--actors", type=int, default=1,
        help="Ray actors (processes) running the sites; fedseal pins each site to one, Flower's arms use any",
    )
    p.add_argument(
        "--batch", type=int, default=DEFAULT_BATCH,
        help="fedseal's arms (plain included): messages per Ray call to a site actor (1: one per message, as Flower)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--no-floor", action="store_true",
        help="skip the closing table of the least a secure round could take (the per-site cryptography floor)",
    )
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    args = p.parse_args(argv)
    if args.quality:
        args.rounds = args.rounds or 10
        quality(args)
        return
    if args.quick:
        args.sites, args.params = "10", "100000"
        args.rounds = args.rounds or 2
    args.rounds = args.rounds or 3
    scale(args)
