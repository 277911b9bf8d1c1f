"""Distributed DP, quality and cost (issue 17): fedseal's distributed discrete Gaussian against
Flower's central DP on the same splits, in the same run.

Usage::

    .venv/bin/python -m bench dp [--quick] [--rounds=10] [--seeds=1,2,3] [--epsilons=1,3,8]
                                 [--clip=1.0] [--actors=2] [--no-matched] [--workdir=D] [--keep]

MNIST-5k over 10 sites, Dirichlet(0.5), δ = 1e-5, fedseal's ``mlp`` (109,386 values), 1 local
epoch, batch 32, lr 0.05, gradient-norm clip 5 (fedseal's defaults, :data:`EPOCHS` ...). For
every seed (the split, the initial model and the run seed), one after the other on Flower 1.42's
simulation engine (:func:`fedseal.sim.engine.run_apps_on_engine`), over the same site datasets:

* ``secure``: fedseal's ServerApp and ClientApp, secure rounds without DP;
* ``fedseal ε``: the same with ``server.toml [dp]`` (ε, δ, clip): each site clips its model
  delta to ``clip``, adds its discrete Gaussian share inside the secure sum, the coordinator
  derives the noise so that ``--rounds`` rounds spend (ε, δ) (server/dp_round.py) and takes the
  unweighted mean (docs/dp.md);
* ``central``: Flower's ``FedAvg`` (new strategy API) over the same sites, the same model and
  local training (:func:`fedseal.client.training.train` on the site's own training part), each
  site reporting weight 1: the unweighted mean, as fedseal's DP rounds take it;
* ``central ε``: the same wrapped in Flower's ``DifferentialPrivacyServerSideFixedClipping``
  (it clips each reply's model minus the current global model to ``clip``, averages, adds
  N(0, (z clip / n)²) per coordinate to the mean), z calibrated by
  :func:`central_noise_multiplier`: full participation, no amplification, each round a
  Gaussian mechanism of sensitivity ``clip`` on the sum (add/remove one site, the relation
  fedseal accounts), ρ = R / (2 z²) in total, converted by the same accountant as fedseal's
  (:func:`fedseal.privacy.epsilon`); Flower's own ``RdpAccountant`` is attached and its ε
  printed as a cross-check;
* ``central ε, fedseal's noise`` (the largest ε; ``--no-matched`` skips it): Flower's wrapper
  with z set to the noise fedseal's run actually added, ``sqrt(N) σ γ / clip`` from its
  ``rounds.jsonl``: every site adds σ, calibrated for the ``n_h = min_survivors -
  floor(N/3)`` honest survivors docs/dp.md §4 counts on. Equal accuracy to fedseal there
  means the whole gap to central DP is that inflation, not the mechanism.

Every final model (and every round's) is scored the same way, here, on the union of the sites'
local validation parts (``client.toml`` ``validation_fraction``, split seed 7, the rows federated
evaluation uses; no site trains on them). Why DP costs what it costs: the per-round step of the
global model (checkpoints for fedseal, the strategy's arrays for Flower) against the clip, the
noise norm each arm's parameters predict, and the sites' unclipped update norms (Flower's arms).

Cost (fedseal's arms): round time (``rounds.jsonl``: ``seconds`` minus ``evaluate_s``, and
``seconds``, which includes the evaluation exchange that carries the next round's setup; median
of rounds 2..R, engine start-up excluded) and bytes each site uploads per round (every reply
but the initial model, :func:`fedseal.sim.sites.message_bytes`), DP against secure without DP;
the arms alternate within a seed. Bits per coordinate: the DP round's field and the rotation's
padded dimension against the model length (:class:`fedseal.server.dp_round.DpPlan`).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SITES = 10
ALPHA = 0.5
DELTA = 1e-5
MODEL = "mlp"
EPOCHS, BATCH, LR, GRAD_CLIP = 1, 32, 0.05, 5.0
MAX_WEIGHT = 5000
"""``run.max_weight`` for the secure arm (MNIST-5k has 5,000 rows): with the default 100,000 the
weighted sum of 10 sites overflows Z_2^32 and the coordinator falls back to a 64-bit field, which
would make secure rounds without DP look 2x as heavy as DP rounds (unweighted, 32 bits)."""
SITE_BUDGET = 1e4
"""Each site's ``[privacy] epsilon_budget``: the ledger charges every DP run of a seed's
workdir; the benchmark measures quality at the run's ε, not the site's refusal."""
SPLIT_SEED = 7  # load_site_data's train/validation split, as every fedseal site uses it


# --------------------------------------------------------------------------- calibration


def central_noise_multiplier(epsilon: float, delta: float, rounds: int) -> float:
    """The least noise multiplier z for which ``rounds`` full-participation Gaussian releases
    (sensitivity 1, std z on the sum) are (ε, δ)-DP by fedseal's accountant.

    Each release is ρ = 1/(2 z²)-zCDP (its Rényi divergence is exactly α/(2 z²)); they compose
    by adding ρ and convert with :func:`fedseal.privacy.epsilon` (dp-accounting's RDP, CKS20's
    conversion), as fedseal's DP rounds are accounted. Bisection on the total ρ.
    """
    from fedseal.privacy import epsilon as eps_of

    if not (epsilon > 0 and 0 < delta < 1 and rounds >= 1):
        raise ValueError(
            f"need epsilon > 0, 0 < delta < 1, rounds >= 1: {epsilon}, {delta}, {rounds}"
        )
    low, high = 0.0, 1.0
    while eps_of([high], delta) <= epsilon:
        low, high = high, high * 2.0
    for _ in range(100):  # eps(rho) is increasing; keep eps(low) <= epsilon < eps(high)
        mid = 0.5 * (low + high)
        if eps_of([mid], delta) <= epsilon:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * high:
            break
    return math.sqrt(rounds / (2.0 * low))


def flower_epsilon(noise_multiplier: float, rounds: int, sites: int, delta: float) -> float:
    """ε that Flower 1.42's own ``RdpAccountant`` gives ``rounds`` releases of its fixed-clipping
    wrapper (no amplification, add-or-remove-one, every site every round)."""
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    acc = RdpAccountant(flower_privacy_config(sites, delta))
    acc.compose(GaussianPrivacyEvent(noise_multiplier, sites, sites), rounds)
    return acc.get_epsilon(delta)


def flower_privacy_config(sites: int, delta: float) -> Any:
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod

    return PrivacyConfig(
        target_delta=delta,
        population_size=sites,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    )


def noise_inflation(sites: int, honest: int) -> float:
    """Std of the noise fedseal adds when every one of ``sites`` sites survives, over the std
    its accounting counts on (``honest`` shares): sqrt(N / n_h) (docs/dp.md §4)."""
    if not 1 <= honest <= sites:
        raise ValueError(f"honest shares must be in [1, {sites}], got {honest}")
    return math.sqrt(sites / honest)


def predicted_noise_norm(noise_multiplier: float, clip: float, sites: int, length: int) -> float:
    """Expected L2 norm of the noise in one round's mean: z clip / n per coordinate."""
    return noise_multiplier * clip / sites * math.sqrt(length)


# --------------------------------------------------------------------------- arms


@dataclass(frozen=True, slots=True)
class Arm:
    """One configuration. ``kind``: ``secure``, ``fedseal`` (distributed DP), ``central``
    (Flower FedAvg, DP when ``epsilon``), ``matched`` (Flower's DP wrapper at the noise of the
    fedseal run of the same seed and ``epsilon``)."""

    kind: str
    epsilon: float | None = None

    @property
    def label(self) -> str:
        eps = f" ε={self.epsilon:g}" if self.epsilon is not None else ""
        return {
            "secure": "fedseal secure, no DP",
            "fedseal": f"fedseal distributed DP{eps}",
            "central": f"Flower central DP{eps}"
            if self.epsilon is not None
            else "Flower FedAvg, no DP",
            "matched": f"Flower central DP{eps}, fedseal's noise",
        }[self.kind]


def arm_order(epsilons: Sequence[float], matched: bool) -> list[Arm]:
    """One seed's arms: no-DP first, then each ε (largest first) fedseal then central, DP and
    no-DP fedseal arms apart by one Flower arm at most (the cost comparison alternates)."""
    eps = sorted(epsilons, reverse=True)
    arms = [Arm("secure"), Arm("central")]
    for i, e in enumerate(eps):
        arms += [Arm("fedseal", e), Arm("central", e)]
        if matched and i == 0:
            arms.append(Arm("matched", e))
    return arms


@dataclass
class RunResult:
    arm: Arm
    seed: int
    accuracy: float  # final model, pooled validation
    per_round: list[float]  # pooled validation accuracy after each round
    steps: list[float]  # ||w_t - w_{t-1}|| per round
    wall_s: float
    noise_multiplier: float | None = None  # the z of the noise actually added to the sum
    accounted_z: float | None = None  # the z the arm's accounting counts on
    epsilon_spent: float | None = None
    flower_epsilon: float | None = None
    update_norms: list[float] = field(default_factory=list)  # mean unclipped site update norm
    round_s: float | None = None
    round_eval_s: float | None = None
    masked_input_s: float | None = None
    upload_bytes: float | None = None
    site_cpu_s: float | None = None  # all sites' ClientApp CPU seconds per round
    dp: Mapping[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- evaluation


@dataclass
class Pooled:
    """The union of the sites' validation parts, and a model to score weights on."""

    x: Any
    y: Any

    def score(self, weights: Mapping[str, Any], seed: int) -> float:
        from fedseal.client.models import build_model, load_numpy_state_dict
        from fedseal.client.training import evaluate

        model = build_model(MODEL, seed=seed)
        load_numpy_state_dict(model, dict(weights))
        return float(evaluate(model, self.x, self.y, num_classes=10).accuracy)


def pooled_validation(sites: Sequence[Path]) -> Pooled:
    import numpy as np

    from fedseal.client.config import load_client_config
    from fedseal.client.site_data import load_site_data

    parts = [
        load_site_data(c.dataset_dir, validation_fraction=c.validation_fraction, seed=SPLIT_SEED)
        for c in (load_client_config(Path(s) / "client.toml") for s in sites)
    ]
    x = np.concatenate([np.asarray(p.x_val, np.float32) for p in parts])
    y = np.concatenate([np.asarray(p.y_val, np.int64) for p in parts])
    return Pooled(x, y)


def _flat_norm(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    import numpy as np

    return math.sqrt(sum(float(np.sum((np.asarray(a[k], np.float64) - b[k]) ** 2)) for k in a))


# --------------------------------------------------------------------------- Flower's arms


def central_site_app(site_dir: str) -> Any:
    """Flower 1.42 ClientApp (new Message API) for one prepared site: fedseal's local training on
    the site's training part, replying the trained weights with weight 1 (``num-examples``) and
    the norm of its unclipped update (``update-norm``)."""
    import dataclasses

    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fedseal.client.config import load_client_config
    from fedseal.client.models import build_model, load_numpy_state_dict, state_dict_to_numpy
    from fedseal.client.training import SiteLimits, TrainRequest, train

    torch.set_num_threads(1)  # as fedseal's simulated sites
    cfg = load_client_config(Path(site_dir) / "client.toml")
    from fedseal.client.site_data import load_site_data

    data = load_site_data(
        cfg.dataset_dir, validation_fraction=cfg.validation_fraction, seed=SPLIT_SEED
    )
    rows = len(data.y_train)
    # What fedseal's site does with the coordinator's request (SiteRuntime.train_request).
    req = SiteLimits().clamp(TrainRequest(EPOCHS, BATCH, LR, GRAD_CLIP))
    req = dataclasses.replace(req, batch_size=max(1, min(req.batch_size, rows // 2)))
    site_index = int(Path(site_dir).name.rsplit("-", 1)[-1])
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        record = msg.content.array_records["arrays"]
        config: Any = msg.content.config_records["config"]
        seed, rnd = int(config["seed"]), int(config["server-round"])
        start = {k: np.asarray(v.numpy(), np.float32) for k, v in record.items()}
        model = build_model(MODEL, seed=seed)
        load_numpy_state_dict(model, start)
        train(
            model, data.x_train, data.y_train, req, seed=seed * 1_000_003 + rnd * 101 + site_index
        )
        out = state_dict_to_numpy(model)
        norm = _flat_norm(out, start)
        reply = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(out[k]) for k in start}),
                "metrics": MetricRecord({"num-examples": 1, "update-norm": norm}),
            }
        )
        return Message(reply, reply_to=msg)

    return app


@dataclass
class CentralLog:
    """What the Flower ServerApp hands back to the benchmark."""

    weights: list[dict[str, Any]] = field(default_factory=list)  # after round 0..R
    update_norms: list[float] = field(default_factory=list)
    flower_epsilon: float | None = None


def central_server_app(
    *, rounds: int, seed: int, noise_multiplier: float | None, clip: float, log: CentralLog
) -> Any:
    """Flower 1.42 ServerApp: ``FedAvg`` over every site, wrapped in
    ``DifferentialPrivacyServerSideFixedClipping(z, clip)`` with Flower's RDP accountant when
    ``noise_multiplier`` is given; the global weights of every round go to ``log``."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    from fedseal.client.models import build_model, state_dict_to_numpy

    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        strategy: Any = FedAvg(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=SITES,
            min_available_nodes=SITES,
        )  # fmt: skip
        if noise_multiplier is not None:
            from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

            strategy = DifferentialPrivacyServerSideFixedClipping(
                strategy, noise_multiplier, clip, SITES,
                accountant=RdpAccountant(flower_privacy_config(SITES, DELTA)),
            )  # fmt: skip
        initial = state_dict_to_numpy(build_model(MODEL, seed=seed))

        def keep(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
            log.weights.append({k: np.asarray(v.numpy(), np.float32) for k, v in arrays.items()})
            return None

        result = strategy.start(
            grid, ArrayRecord({k: Array(v) for k, v in initial.items()}), num_rounds=rounds, train_config=ConfigRecord({"seed": seed}),
            evaluate_fn=keep,
        )  # fmt: skip
        log.update_norms = [
            float(result.train_metrics_clientapp[r]["update-norm"])
            for r in sorted(result.train_metrics_clientapp)
        ]
        if noise_multiplier is not None:
            log.flower_epsilon = float(strategy.privacy_spent().epsilon)

    return app


def run_central(
    sites: Sequence[Path],
    arm: Arm,
    *,
    rounds: int,
    seed: int,
    clip: float,
    z: float | None,
    pooled: Pooled,
    actors: int,
) -> RunResult:
    """A Flower arm on the engine, over the prepared sites' datasets."""
    from fedseal.sim.engine import run_apps_on_engine
    from fedseal.sim.sites import SimulatedSites

    log = CentralLog()
    server = central_server_app(rounds=rounds, seed=seed, noise_multiplier=z, clip=clip, log=log)
    client = SimulatedSites(
        tuple(str(s) for s in sites), (), None, factory="bench.bench_dp:central_site_app"
    )
    t0 = time.monotonic()
    run_apps_on_engine(server, client, len(sites), actors=actors, pin_sites=False)
    wall = time.monotonic() - t0
    if len(log.weights) != rounds + 1:
        raise RuntimeError(f"{arm.label}: {len(log.weights) - 1} of {rounds} rounds finished")
    per_round = [pooled.score(w, seed) for w in log.weights[1:]]
    steps = [_flat_norm(b, a) for a, b in itertools.pairwise(log.weights)]
    return RunResult(
        arm, seed, per_round[-1], per_round, steps, wall, noise_multiplier=z, accounted_z=z,
        epsilon_spent=None if z is None else _central_epsilon(z, rounds),
        flower_epsilon=log.flower_epsilon, update_norms=log.update_norms,
    )  # fmt: skip


def _central_epsilon(z: float, rounds: int) -> float:
    from fedseal.privacy import epsilon

    return float(epsilon([1.0 / (2.0 * z * z)] * rounds, DELTA))


# --------------------------------------------------------------------------- fedseal's arms


def run_overrides(rounds: int, seed: int, epochs: int = EPOCHS) -> dict[str, object]:
    return {
        "rounds": rounds, "secure": True, "model": MODEL, "seed": seed, "min_sites": 2,
        "epochs": epochs, "batch_size": BATCH, "learning_rate": LR, "clip_norm": GRAD_CLIP,
        "max_weight": MAX_WEIGHT, "stage_timeout_s": 300.0, "sites_wait_timeout_s": 120.0,
    }  # fmt: skip


def run_fedseal(
    workdir: Path, arm: Arm, *, rounds: int, seed: int, clip: float, pooled: Pooled, actors: int,
    epochs: int = EPOCHS,
) -> RunResult:
    """A fedseal arm: ``prepare_simulation`` rewrites the seed's server.toml and client.toml
    (data, keys, enrolment and the sites' ledgers are reused), fresh coordinator state."""
    from safetensors.numpy import load_file

    from fedseal.sim.simulate import prepare_simulation, run_fedseal_simulation

    dp = None if arm.epsilon is None else {"epsilon": arm.epsilon, "delta": DELTA, "clip": clip}
    fed = prepare_simulation(
        workdir, sites=SITES, scheme="dirichlet", alpha=ALPHA, seed=seed,
        run_overrides=run_overrides(rounds, seed, epochs), dp=dp, dp_site_budget=SITE_BUDGET,
    )  # fmt: skip
    shutil.rmtree(fed.server_toml.parent / "state", ignore_errors=True)
    traffic = workdir / f"traffic-{arm.kind}-{arm.epsilon}.jsonl"
    traffic.unlink(missing_ok=True)
    t0 = time.monotonic()
    out = run_fedseal_simulation(fed, actors=actors, traffic_log=traffic)
    wall = time.monotonic() - t0
    done = [r for r in out.rounds if r.get("outcome") == "committed"]
    if len(done) != rounds:
        failures = sorted(
            {str(r.get("failure", r.get("outcome")))[:200] for r in out.rounds} - {"committed"}
        )
        raise RuntimeError(f"{arm.label}: {len(done)} of {rounds} rounds committed: {failures}")
    ckpt = Path(str(done[0]["checkpoint"])).parent
    weights = [load_file(str(ckpt / f"round-{r:06d}.safetensors")) for r in range(rounds + 1)]
    per_round = [pooled.score(w, seed) for w in weights[1:]]
    steps = [_flat_norm(b, a) for a, b in itertools.pairwise(weights)]
    result = RunResult(arm, seed, per_round[-1], per_round, steps, wall)
    result.round_s = _median_after_first(
        [float(r["seconds"]) - float(r.get("evaluate_s", 0.0)) for r in done]
    )
    result.round_eval_s = _median_after_first([float(r["seconds"]) for r in done])
    result.masked_input_s = _median_after_first([float(r.get("masked-input_s", 0.0)) for r in done])
    result.upload_bytes, result.site_cpu_s = upload_per_site_round(traffic, SITES, rounds)
    if dp is not None:
        last = done[-1]
        sigma, gamma = float(last["dp_local_stddev"]), float(last["dp_gamma"])
        honest = int(last["dp_honest_survivors"])
        result.noise_multiplier = math.sqrt(SITES) * sigma * gamma / clip
        result.accounted_z = math.sqrt(honest) * sigma * gamma / clip
        result.epsilon_spent = float(last["dp_epsilon"])
        result.dp = {
            "local_stddev": sigma,
            "gamma": gamma,
            "honest": honest,
            "rho": float(last["dp_rho"]),
        }
    return result


def _median_after_first(times: Sequence[float]) -> float:
    """Median of rounds 2..R (round 1 pays one-off costs: first model, warm-up, site start)."""
    return statistics.median(times[1:] if len(times) > 1 else times)


def upload_per_site_round(traffic: Path, sites: int, rounds: int) -> tuple[float, float]:
    """Bytes each site uploads per round, and all sites' ClientApp CPU seconds per round: every
    reply but the initial model's (training exchanges, and the evaluation replies that carry
    the next round's key adverts). The CPU is that of rounds 2..R (from the first training
    reply after round 1's evaluation), as the round times are: round 1 pays one-off costs in
    each site process (model build, torch warm-up)."""
    recs = [json.loads(line) for line in traffic.read_text().splitlines() if line.strip()]
    recs = sorted((r for r in recs if not str(r["type"]).startswith("query")), key=lambda r: float(r["start"]))
    total = sum(int(r["bytes"]) for r in recs)
    first_eval = next((i for i, r in enumerate(recs) if r["type"] == "evaluate"), None)
    later = recs
    if first_eval is not None and rounds > 1:
        start = next((i for i in range(first_eval, len(recs)) if recs[i]["type"] != "evaluate"), len(recs))
        later = recs[start:]
    cpu = sum(float(r.get("cpu_seconds", 0.0)) for r in later)
    return total / (sites * rounds), cpu / (rounds - 1 if later is not recs else rounds)


MODEL_LENGTH = 109_386  # fedseal's mlp, 784-128-64-10


def _min_survivors() -> int:
    """``min_survivors`` of a secure round of :data:`SITES` sites, as the coordinator resolves
    it for a DP round (``SecureCoordinator.dp_params``)."""
    from fedseal.protocol import QuantizationConfig, RoundConfig

    base = RoundConfig(
        vector_length=MODEL_LENGTH,
        quantization=QuantizationConfig.from_clip(1.0, levels=4096, modulus_bits=64),
        max_weight=MAX_WEIGHT,
    )
    return int(base.resolve(SITES).min_survivors)


def shape_params(epsilon: float, rounds: int, clip: float) -> Any:
    """The ``DpParams`` the coordinator plans for a round of this benchmark."""
    from fedseal.server.config import DpSection
    from fedseal.server.dp_round import DpPlan

    plan = DpPlan(DpSection(enabled=True, epsilon=epsilon, delta=DELTA, clip=clip), rounds=rounds)
    return plan.params(length=MODEL_LENGTH, cohort=SITES, min_survivors=_min_survivors())


def dp_shape(epsilon: float, rounds: int, clip: float) -> dict[str, float]:
    """The DP round's field and rotation for this model and cohort, as the coordinator plans
    them (:class:`fedseal.server.dp_round.DpPlan`, ``min_survivors`` as a secure round resolves
    it): padded dimension, modulus bits, bits the noisy sum needs (wrap <= 2^-40)."""
    from fedseal.protocol.dp import bits_needed
    from fedseal.server.config import DpSection
    from fedseal.server.dp_round import WRAP_PROBABILITY, DpPlan

    length, survivors = MODEL_LENGTH, _min_survivors()
    dp = shape_params(epsilon, rounds, clip)
    # The coarsest grid c/γ = 2^k whose rounding inflates the norm bound by <= 1 % (docs/dp.md
    # §5), and the field its noisy sum needs: the bits per coordinate DP needs, not the field
    # the plan fills (it picks the finest γ that fits the configured 32 bits).
    coarse = dp
    for k in range(4, 27):
        section = DpSection(
            enabled=True, epsilon=epsilon, delta=DELTA, clip=clip, granularity=clip / 2.0**k
        )
        coarse = DpPlan(section, rounds=rounds).params(
            length=length, cohort=SITES, min_survivors=survivors
        )
        if coarse.norm_bound / coarse.scaled_clip <= 1.01:
            break
    return {
        "length": length, "dimension": dp.dimension, "modulus_bits": dp.modulus_bits,
        "bits_needed": bits_needed(dp, SITES, WRAP_PROBABILITY), "min_survivors": survivors,
        "honest": dp.honest_survivors, "coarse_scaled_clip": coarse.scaled_clip,
        "coarse_bits": bits_needed(coarse, SITES, WRAP_PROBABILITY),
    }  # fmt: skip


# --------------------------------------------------------------------------- tables


def mean_spread(values: Sequence[float]) -> str:
    """``mean ± sample std`` in percent points (accuracies in [0, 1]); one value: no spread."""
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def quality_table(results: Sequence[RunResult], epsilons: Sequence[float]) -> str:
    """Accuracy per configuration over the seeds, fedseal against central DP at each ε."""
    by: dict[tuple[str, float | None], list[RunResult]] = {}
    for r in results:
        by.setdefault((r.arm.kind, r.arm.epsilon), []).append(r)

    def acc(kind: str, eps: float | None) -> list[float]:
        return [r.accuracy for r in by.get((kind, eps), [])]

    lines = [
        "| ε (δ = 1e-5) | fedseal distributed DP, % | Flower central DP, % | fedseal − central, pt "
        "| z accounted (fedseal / central) | z added (fedseal / central) |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for eps in [None, *sorted(epsilons, reverse=True)]:
        f, c = acc("secure" if eps is None else "fedseal", eps), acc("central", eps)
        gap = f"{100 * (statistics.fmean(f) - statistics.fmean(c)):+.1f}" if f and c else "-"
        fz = by.get(("fedseal", eps), [])
        cz = by.get(("central", eps), [])

        def z_of(rs: list[RunResult], attr: str) -> str:
            vals = [getattr(r, attr) for r in rs if getattr(r, attr) is not None]
            return f"{statistics.fmean(vals):.2f}" if vals else "-"

        accounted = (
            f"{z_of(fz, 'accounted_z')} / {z_of(cz, 'accounted_z')}" if eps is not None else "-"
        )
        added = (
            f"{z_of(fz, 'noise_multiplier')} / {z_of(cz, 'noise_multiplier')}"
            if eps is not None
            else "-"
        )
        name = "no DP (secure / FedAvg)" if eps is None else f"{eps:g}"
        lines.append(
            f"| {name} | {mean_spread(f)} | {mean_spread(c)} | {gap} | {accounted} | {added} |"
        )
    for (kind, eps), rs in sorted(by.items(), key=lambda kv: str(kv[0])):
        if kind == "matched":
            lines.append(
                f"| {eps:g}, central at fedseal's noise | - | {mean_spread([r.accuracy for r in rs])} | "
                f"{100 * (statistics.fmean(acc('fedseal', eps)) - statistics.fmean([r.accuracy for r in rs])):+.1f} "
                f"| - | - / {statistics.fmean([r.noise_multiplier or 0.0 for r in rs]):.2f} |"
            )
    return "\n".join(lines)


def noise_table(results: Sequence[RunResult], clip: float, length: int) -> str:
    """Per arm: the global model's step per round (median over rounds and seeds) against the
    noise norm its z predicts and the clip; the sites' mean unclipped update norm."""
    lines = [
        "| arm | z added | predicted noise norm of the mean | measured step norm per round | "
        "clip | sites' unclipped update norm | ε spent (fedseal's accountant / Flower's) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    seen: dict[str, list[RunResult]] = {}
    for r in results:
        seen.setdefault(r.arm.label, []).append(r)
    for label, rs in seen.items():
        z = rs[0].noise_multiplier
        predicted = f"{predicted_noise_norm(z, clip, SITES, length):.2f}" if z else "0"
        step = statistics.median([s for r in rs for s in r.steps])
        upd = [u for r in rs for u in r.update_norms]
        eps = [r.epsilon_spent for r in rs if r.epsilon_spent is not None]
        feps = [r.flower_epsilon for r in rs if r.flower_epsilon is not None]
        spent = (
            (f"{statistics.fmean(eps):.3f}" if eps else "-")
            + " / "
            + (f"{statistics.fmean(feps):.3f}" if feps else "-")
        )
        lines.append(
            f"| {label} | {f'{z:.2f}' if z else '-'} | {predicted} | {step:.3f} | {clip:g} | "
            f"{f'{statistics.median(upd):.3f}' if upd else '-'} | {spent} |"
        )
    return "\n".join(lines)


def cost_table(results: Sequence[RunResult]) -> str:
    """fedseal's secure rounds with DP against without: medians over the runs, and ratios."""
    base = [r for r in results if r.arm.kind == "secure"]
    dp = [r for r in results if r.arm.kind == "fedseal"]
    if not base or not dp:
        return "(needs a secure and a DP run)"

    def med(rs: list[RunResult], attr: str) -> float:
        return statistics.median(float(getattr(r, attr)) for r in rs)

    cols = ("round_s", "round_eval_s", "masked_input_s", "site_cpu_s", "upload_bytes")
    lines = [
        "| fedseal arm | runs | round s | round + evaluation s | masked-input exchange s | "
        "sites' CPU s per round (all 10) | upload per site per round, bytes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, rs in (("secure, no DP", base), ("distributed DP (all ε)", dp)):
        cells = [f"{med(rs, c):.3f}" for c in cols[:-1]] + [f"{med(rs, cols[-1]):,.0f}"]
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    ratios = [f"{med(dp, c) / med(base, c):.2f}x" for c in cols[:-1]]
    ratios.append(f"{med(dp, cols[-1]) / med(base, cols[-1]):.3f}x")
    lines.append("| DP / no DP | | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def encode_seconds(epsilon: float, rounds: int, clip: float, repeat: int = 3) -> dict[str, float]:
    """One site's DP work on the model vector, timed alone (best of ``repeat``): the whole
    encode (clip, rotation, conditional rounding, discrete Gaussian noise, wrap) and the
    noise sampling by itself, at the coordinator's planned parameters."""
    import numpy as np

    from fedseal.protocol.discrete_gaussian import sample_discrete_gaussian, system_noise
    from fedseal.protocol.dp import encode

    shape = dp_shape(epsilon, rounds, clip)
    dp = shape_params(epsilon, rounds, clip)
    update = np.random.default_rng(0).normal(0.0, 0.01, int(shape["length"]))
    seed = bytes(32)
    out = {"encode": float("inf"), "noise": float("inf")}
    for _ in range(repeat):
        t0 = time.perf_counter()
        encode(update, dp, seed)
        out["encode"] = min(out["encode"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        sample_discrete_gaussian(dp.local_stddev, dp.dimension, system_noise())
        out["noise"] = min(out["noise"], time.perf_counter() - t0)
    return out


def per_round_table(results: Sequence[RunResult]) -> str:
    lines = [
        "| arm | seed | pooled accuracy after each round | wall s |",
        "| --- | ---: | --- | ---: |",
    ]
    for r in results:
        accs = ", ".join(f"{100 * a:.1f}" for a in r.per_round)
        lines.append(f"| {r.arm.label} | {r.seed} | {accs} | {r.wall_s:.0f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def run_cost(args: argparse.Namespace, echo: Callable[[str], None] = print) -> list[RunResult]:
    """``--cost-only``: fedseal's secure arm and its DP arm at the largest ε, alternating
    ``--repeats`` times (drift cancels), at ``--epochs`` local epochs; no central arms."""
    from fedseal.sim.simulate import prepare_simulation

    root = Path(args.workdir or tempfile.mkdtemp(prefix="fedseal-bench-dp-cost-"))
    seed = args.seeds[0]
    workdir = root / f"seed-{seed}"
    fed = prepare_simulation(
        workdir, sites=SITES, scheme="dirichlet", alpha=ALPHA, seed=seed,
        run_overrides=run_overrides(args.rounds, seed, args.epochs),
    )  # fmt: skip
    pooled = pooled_validation(fed.sites)
    results: list[RunResult] = []
    for i in range(args.repeats):
        for arm in (Arm("secure", None), Arm("fedseal", max(args.epsilons))):
            res = run_fedseal(
                workdir, arm, rounds=args.rounds, seed=seed, clip=args.clip, pooled=pooled,
                actors=args.actors, epochs=args.epochs,
            )  # fmt: skip
            results.append(res)
            echo(f"  repeat {i + 1} {arm.label}: round {res.round_s:.3f} s, sites' CPU {res.site_cpu_s:.3f} s")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return results


def run_all(args: argparse.Namespace, echo: Callable[[str], None] = print) -> list[RunResult]:
    from fedseal.sim.simulate import prepare_simulation

    root = Path(args.workdir or tempfile.mkdtemp(prefix="fedseal-bench-dp-"))
    results: list[RunResult] = []
    z_central = {e: central_noise_multiplier(e, DELTA, args.rounds) for e in args.epsilons}
    for seed in args.seeds:
        workdir = root / f"seed-{seed}"
        fed = prepare_simulation(
            workdir, sites=SITES, scheme="dirichlet", alpha=ALPHA, seed=seed,
            run_overrides=run_overrides(args.rounds, seed),
        )  # fmt: skip
        pooled = pooled_validation(fed.sites)
        args.pooled_rows = getattr(args, "pooled_rows", None) or len(pooled.y)
        for arm in arm_order(args.epsilons, not args.no_matched):
            common: dict[str, Any] = {
                "rounds": args.rounds, "seed": seed, "clip": args.clip, "pooled": pooled, "actors": args.actors,
            }  # fmt: skip
            if arm.kind in ("secure", "fedseal"):
                res = run_fedseal(workdir, arm, **common)
            else:
                if arm.kind == "matched":
                    (twin,) = [
                        r
                        for r in results
                        if r.seed == seed and r.arm == Arm("fedseal", arm.epsilon)
                    ]
                    z = twin.noise_multiplier
                else:
                    z = None if arm.epsilon is None else z_central[arm.epsilon]
                res = run_central(fed.sites, arm, z=z, **common)
            results.append(res)
            echo(
                f"  seed {seed} {arm.label}: accuracy {100 * res.accuracy:.1f}% "
                f"(rounds: {', '.join(f'{100 * a:.0f}' for a in res.per_round)}), {res.wall_s:.0f} s"
                + (f", z {res.noise_multiplier:.2f}" if res.noise_multiplier else "")
                + (f", eps {res.epsilon_spent:.3f}" if res.epsilon_spent else "")
                + (f" (Flower's accountant {res.flower_epsilon:.3f})" if res.flower_epsilon else "")
            )
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return results


def report(args: argparse.Namespace, results: Sequence[RunResult], seconds: float) -> str:
    shape = dp_shape(max(args.epsilons), args.rounds, args.clip)
    length = int(shape["length"])
    z_central = {e: central_noise_multiplier(e, DELTA, args.rounds) for e in sorted(args.epsilons)}
    calib = ", ".join(
        f"ε={e:g}: z={z:.3f} (Flower's accountant: ε={flower_epsilon(z, args.rounds, SITES, DELTA):.3f})"
        for e, z in z_central.items()
    )
    dp_runs = [r for r in results if r.arm.kind == "fedseal"]
    upload = (
        statistics.median(float(r.upload_bytes or 0.0) for r in dp_runs)
        if dp_runs
        else float("nan")
    )
    honest = int(shape["honest"])
    parts = [
        f"MNIST-5k, {SITES} sites, Dirichlet({ALPHA}), {args.rounds} rounds, clip {args.clip:g}, δ = {DELTA:g}, "
        f"seeds {', '.join(map(str, args.seeds))}; scored on the {args.pooled_rows} rows of the sites' "
        f"validation parts (seed 1's split); {seconds / 60:.1f} min, load average {os.getloadavg()[0]:.1f} at the end",
        "",
        quality_table(results, args.epsilons),
        "",
        f"Central z calibration (same accountant, ρ = R/(2z²), no amplification): {calib}. fedseal's "
        f"accounting counts n_h = {honest} honest shares of {SITES} (min_survivors {int(shape['min_survivors'])} "
        f"- floor({SITES}/3)): every site adds σ for n_h, so with all {SITES} in the sum the noise is "
        f"sqrt({SITES}/{honest}) = {noise_inflation(SITES, honest):.3f}x the accounted std.",
        "",
        noise_table(results, args.clip, length),
        "",
        cost_table(results),
        "",
        f"Bits per coordinate: a DP round sends a {int(shape['modulus_bits'])}-bit field element per "
        f"coordinate of the rotated vector, {int(shape['dimension']):,} coordinates for the model's "
        f"{length:,} values ({shape['dimension'] / length:.3f}x); the noisy sum needs "
        f"{int(shape['bits_needed'])} bits at the plan's granularity (the finest that fits the field), "
        f"{int(shape['coarse_bits'])} bits at the coarsest grid with <= 1 % rounding inflation "
        f"(c/γ = {shape['coarse_scaled_clip']:,.0f}; wrap <= 2^-40, ε = {max(args.epsilons):g}); measured upload "
        f"{8 * upload / length:.2f} bits per model value per round (all messages of a DP round).",
        "",
        per_round_table(results),
    ]
    enc = encode_seconds(max(args.epsilons), args.rounds, args.clip)
    parts.insert(
        -2,
        f"One site's DP encode of the model vector, timed alone in this process: "
        f"{enc['encode']:.3f} s (of which the discrete Gaussian noise for {int(shape['dimension']):,} "
        f"coordinates {enc['noise']:.3f} s); 10 sites on this machine's cores pay it every round.\n",
    )
    return "\n".join(parts)


def main(argv: list[str]) -> None:
    import sys

    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:  # the Ray actors import bench.bench_dp (the Flower ClientApp)
        sys.path.insert(0, repo)
    p = argparse.ArgumentParser(prog="python -m bench dp", description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="1 seed, ε = 8, 5 rounds, no matched arm (~1.5 min)"
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="rounds per run (default 10; --quick 5)"
    )
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 1,2,3; --quick 1)")
    p.add_argument("--epsilons", default=None, help="comma-separated ε (default 1,3,8; --quick 8)")
    p.add_argument(
        "--clip", type=float, default=1.0, help="L2 clip of a site's model delta (both DP arms)"
    )
    p.add_argument("--actors", type=int, default=2, help="Ray actors running the sites")
    p.add_argument("--no-matched", action="store_true", help="skip central DP at fedseal's noise")
    p.add_argument("--save", default=None, help="write every run's results to this JSON file")
    p.add_argument(
        "--report-from", default=None, help="print the tables from a --save file, run nothing"
    )
    p.add_argument("--epochs", type=int, default=EPOCHS, help="local epochs per round (fedseal's arms)")
    p.add_argument(
        "--cost-only", action="store_true",
        help="only fedseal without and with DP (largest ε), alternating --repeats times, and the cost table",
    )
    p.add_argument("--repeats", type=int, default=3, help="--cost-only: alternations")
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (5 if args.quick else 10)
    args.seeds = [int(s) for s in (args.seeds or ("1" if args.quick else "1,2,3")).split(",")]
    args.epsilons = [
        float(e) for e in (args.epsilons or ("8" if args.quick else "1,3,8")).split(",")
    ]
    args.no_matched = args.no_matched or args.quick
    if args.report_from:
        doc = json.loads(Path(args.report_from).read_text())
        for key in ("rounds", "seeds", "epsilons", "clip", "pooled_rows"):
            setattr(args, key, doc[key])
        print(report(args, load_results(doc["results"]), float(doc["seconds"])))
        return
    logging.getLogger("flwr").setLevel(logging.WARNING)
    print(f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.monotonic()
    if args.cost_only:
        results = run_cost(args)
        print(
            f"\n{len(results)} runs, {args.rounds} rounds, {args.epochs} local epoch(s), seed "
            f"{args.seeds[0]}, {time.monotonic() - t0:.0f} s, load average after "
            f"{os.getloadavg()[0]:.1f}\n\n{cost_table(results)}"
        )
        return
    results = run_all(args)
    seconds = time.monotonic() - t0
    if args.save:
        doc = {k: getattr(args, k) for k in ("rounds", "seeds", "epsilons", "clip", "pooled_rows")}
        doc |= {"seconds": seconds, "results": [dataclasses.asdict(r) for r in results]}
        Path(args.save).write_text(json.dumps(doc, indent=1))
    print()
    print(report(args, results, seconds))


def load_results(docs: Sequence[Mapping[str, Any]]) -> list[RunResult]:
    """:class:`RunResult` values back from ``--save``'s JSON."""
    return [RunResult(**{**d, "arm": Arm(**d["arm"])}) for d in docs]
