"""The site pays for DP rounds from its privacy ledger, through the real ClientApp path.

Every message goes through the pinned executor's task path (as in
``tests/client/test_site_trust_app.py``, whose helpers and fixtures this reuses); the rounds are
real: a :class:`SecAggServer` signing with the coordinator's key, honest peers as
:class:`ClientSession` objects, the site under test as the ClientApp with a
:class:`PrivacyLedger` in its state directory. The rules (docs/dp.md §7,
:meth:`SiteRuntime.charge_privacy`): a DP round is charged once, before the site trains and
before its noised input exists; a round past the budget is refused with a one-line reason
naming it, nothing is sent and the ledger is unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedseal.client import flower_app
from fedseal.client.flower_app import SiteRuntime, make_client_app
from fedseal.client.policy import SitePrivacy, SiteRefusal
from fedseal.client.privacy_ledger import LEDGER_FILE, PrivacyLedger, dp_round_noise
from fedseal.client.site_data import SiteData
from fedseal.privacy import epsilon, round_rho
from fedseal.protocol import (
    ProtocolError,
    QuantizationConfig,
    RoundConfig,
)
from fedseal.protocol.dp import DpParams
from fedseal.protocol.model import flatten
from fedseal.protocol.records import SETUP_RECORD
from fedseal.sim.inmemory import deterministic_key
from tests.client import test_site_trust_app as trust_app
from tests.client.test_site_trust_app import (
    COORDINATOR,
    PEER_KEYS,
    RUN_1,
    RUN_2,
    SITE,
    SITE_KEY,
    Deliver,
    Reply,
    initial_model,
    kid,
    message,
    train_config,
)

# The fixtures of the site-trust tests: the dataset, the executor's task path, one torch thread.
data = trust_app.data
deliver = trust_app.deliver
_task_identity = trust_app._task_identity
_one_torch_thread = trust_app._one_torch_thread

CLIP = 1.0
GAMMA = 1e-4
DELTA = 1e-6
#: A fourth member, for a round whose first setup attempt loses one.
PEER_D = deterministic_key(b"dp-site/site-d")
MEMBERS_4 = {**PEER_KEYS, "site-d": PEER_D}
TRUSTED_4 = {s: kid(k) for s, k in MEMBERS_4.items()}


# -- a DP round --------------------------------------------------------------------------------


def flat_size(weights: Mapping[str, npt.NDArray[np.float32]]) -> int:
    return sum(int(np.asarray(v).size) for v in weights.values())


def dp_config(length: int, sites: int, *, noise_multiplier: float = 2.0) -> RoundConfig:
    """A DP round for ``sites`` members whose noise counts the resolved round's honest survivors."""
    base = RoundConfig(
        vector_length=length, quantization=QuantizationConfig.from_clip(CLIP, 1, 64), max_weight=64
    )
    params = DpParams.from_noise_multiplier(
        noise_multiplier,
        length=length,
        clip=CLIP,
        gamma=GAMMA,
        sites=sites,
        min_survivors=base.resolve(sites).min_survivors,
        colluding_fraction=base.max_colluding_fraction,
        modulus_bits=64,
    )
    return dataclasses.replace(base, dp=params)


def round_cost(config: RoundConfig) -> float:
    """The ρ the site is to be charged for a round of ``config``."""
    assert config.dp is not None
    return round_rho(dp_round_noise(config.dp))


@dataclasses.dataclass
class DpRun:
    replies: dict[str, list[Reply]] = dataclasses.field(default_factory=dict)
    failure: Exception | None = None
    completed: bool = False
    restarts: int = 0

    @property
    def errors(self) -> dict[str, str]:
        return {s: r.error for s, rs in self.replies.items() for r in rs if r.error}


def dp_round(
    deliver: Deliver,
    app: Any,
    data: SiteData,
    *,
    config: RoundConfig,
    run_id: bytes = RUN_1,
    rnd: int = 1,
    members: Mapping[str, ec.EllipticCurvePrivateKey] = PEER_KEYS,
    silent_at: Mapping[str, Collection[str]] | None = None,
    before: Mapping[str, Callable[[], object]] | None = None,
) -> DpRun:
    """Round ``rnd`` of ``run_id`` from the initial model: the coordinator's roster enrols the
    site and ``members`` (honest sessions with zero updates); ``silent_at[stage]`` lists the
    members that do not answer that coordinator stage (a new setup attempt follows one silent
    at ``advertise``); ``before[stage]`` runs before that stage's messages are sent. The
    site's replies are kept per stage, in order."""
    weights = initial_model(data)
    flat = flatten(weights)
    roster = trust_app.cohort_roster(data, members)
    server, sessions = trust_app.coordinator_and_peers(config, roster, members, run_id, rnd, flat)
    out = DpRun()
    cfg = train_config(run_id, rnd)
    outbound = server.start()
    first = True
    while outbound:
        stage = "advertise" if server.stage.value == "commit" else server.stage.value
        silent = (silent_at or {}).get(stage, ())
        if before and stage in before:
            before[stage]()
        for site, packet in outbound.items():
            if site == SITE:
                extra: dict[str, Any] = {SETUP_RECORD: ConfigRecord({"payload": packet.payload})}
                msg = message("train.secagg", *((weights, cfg) if first else (None, None)), **extra)
                reply = deliver(app, msg)
                out.replies.setdefault(stage, []).append(reply)
                if reply.payload:
                    server.receive(site, reply.payload, reply.bulk)
            elif site not in silent or server.stage.value == "commit":
                try:
                    answer = sessions[site].handle(packet.payload)
                except ProtocolError:
                    continue
                if answer is not None:
                    server.receive(site, answer.payload, answer.bulk)
        first = False
        try:
            outbound = server.advance()
        except Exception as exc:  # the coordinator fails the round
            out.failure = exc
            return out
    out.restarts = len(server.result.restarts) if server.result is not None else 0
    out.completed = server.result is not None and SITE in server.result.survivors
    return out


@dataclasses.dataclass
class Trainings:
    """How many charges the ledger held each time the site trained."""

    charges_seen: list[int] = dataclasses.field(default_factory=list)


def watch_training(monkeypatch: pytest.MonkeyPatch, ledger: PrivacyLedger) -> Trainings:
    seen = Trainings()
    real = flower_app.train

    def recording(model: Any, x: Any, y: Any, req: Any, seed: int, **loop: Any) -> Any:
        seen.charges_seen.append(len(ledger.charges()))
        return real(model, x, y, req, seed=seed, **loop)

    monkeypatch.setattr(flower_app, "train", recording)
    return seen


def site(data: SiteData, state: Path | None, **privacy: Any) -> SiteRuntime:
    privacy.setdefault("dp", "required")
    privacy.setdefault("epsilon_budget", 1e6)
    return SiteRuntime(
        name=SITE,
        data=data,
        identity_key=SITE_KEY,
        coordinator_key=COORDINATOR.public_key(),
        trusted_peers=dict(TRUSTED_4),
        privacy=SitePrivacy(delta=DELTA, **privacy),
        ledger=None if state is None else PrivacyLedger(state),
    )


# -- charged once, before training, in the state directory ------------------------------------


def test_a_dp_round_is_charged_once_before_training_in_the_ledger_of_the_state_directory(
    data: SiteData, deliver: Deliver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = site(data, tmp_path / "state")
    assert rt.ledger is not None
    trainings = watch_training(monkeypatch, rt.ledger)
    config = dp_config(flat_size(initial_model(data)), 3)
    run = dp_round(deliver, make_client_app(rt), data, config=config)
    assert run.completed and not run.errors, (run.errors, run.failure)
    assert trainings.charges_seen == [1]  # the charge was on disk when training started
    (charge,) = rt.ledger.charges()
    assert (charge.run_id, charge.round) == (RUN_1.hex(), 1)
    assert charge.rho == pytest.approx(round_cost(config), rel=1e-12)
    assert rt.ledger.path == tmp_path / "state" / LEDGER_FILE and rt.ledger.path.is_file()


def test_a_round_whose_first_setup_attempt_lost_a_member_is_charged_once(
    data: SiteData, deliver: Deliver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = site(data, tmp_path / "state")
    assert rt.ledger is not None
    trainings = watch_training(monkeypatch, rt.ledger)
    config = dp_config(flat_size(initial_model(data)), 4)
    run = dp_round(
        deliver,
        make_client_app(rt),
        data,
        config=config,
        members=MEMBERS_4,
        silent_at={"advertise": ["site-d"]},
    )
    assert run.completed and not run.errors, (run.errors, run.failure)
    assert run.restarts == 1 and len(run.replies["advertise"]) >= 2  # two setups answered
    assert trainings.charges_seen == [1]
    assert [(c.run_id, c.round) for c in rt.ledger.charges()] == [(RUN_1.hex(), 1)]


def test_rounds_of_two_runs_are_both_charged_and_add_up(
    data: SiteData, deliver: Deliver, tmp_path: Path
) -> None:
    rt = site(data, tmp_path / "state")
    assert rt.ledger is not None
    config = dp_config(flat_size(initial_model(data)), 3)
    app = make_client_app(rt)
    for run_id in (RUN_1, RUN_2):
        run = dp_round(deliver, app, data, config=config, run_id=run_id)
        assert run.completed and not run.errors, (run.errors, run.failure)
    assert [c.run_id for c in rt.ledger.charges()] == [RUN_1.hex(), RUN_2.hex()]
    assert rt.ledger.spent(DELTA) == pytest.approx(epsilon([round_cost(config)] * 2, DELTA))


# -- refused past the budget: nothing sent, nothing charged ------------------------------------


def past_budget(ledger: PrivacyLedger, rho: float) -> tuple[float, float, float]:
    """Charge an earlier run so that one more round of ``rho`` goes past a budget: returns
    (epsilon spent, epsilon after the round, the budget between them)."""
    ledger.charge("earlier-run", 1, 4 * rho, "ab" * 32)
    before = epsilon([4 * rho], DELTA)
    after = epsilon([4 * rho, rho], DELTA)
    budget = round((before + after) / 2, 3)
    assert before < budget < after
    return before, after, budget


def budget_reason(before: float, after: float, budget: float) -> str:
    return (
        f"refused: privacy budget: epsilon {before:.4g} of {budget:g} spent at delta 1e-06; "
        f"this round would bring it to {after:.4g} ([privacy] epsilon_budget, all runs together)"
    )


def test_a_round_past_the_budget_is_refused_at_the_setup_naming_the_budget(
    data: SiteData, deliver: Deliver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = dp_config(flat_size(initial_model(data)), 3)
    ledger = PrivacyLedger(tmp_path / "state")
    before, after, budget = past_budget(ledger, round_cost(config))
    rt = site(data, tmp_path / "state", epsilon_budget=budget)
    trainings = watch_training(monkeypatch, ledger)
    on_disk = ledger.path.read_bytes()
    run = dp_round(deliver, make_client_app(rt), data, config=config)

    # Before its key advert: the coordinator can start a new setup attempt without the site.
    reply = run.replies["advertise"][-1]
    assert reply.error == budget_reason(before, after, budget)
    assert reply.details == reply.error and "\n" not in reply.error  # one line, a refusal
    assert reply.payload == b"" and set(run.replies) == {"advertise"}
    assert not run.completed and trainings.charges_seen == []
    assert ledger.path.read_bytes() == on_disk  # the ledger is unchanged


def test_a_round_the_budget_cannot_pay_for_at_the_masked_input_is_refused_and_nothing_sent(
    data: SiteData, deliver: Deliver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another run of this site spends the budget while this round exchanges keys.
    config = dp_config(flat_size(initial_model(data)), 3)
    ledger = PrivacyLedger(tmp_path / "state")
    scratch = PrivacyLedger(tmp_path / "scratch")
    before, after, budget = past_budget(scratch, round_cost(config))
    rt = site(data, tmp_path / "state", epsilon_budget=budget)
    trainings = watch_training(monkeypatch, ledger)
    on_disk: list[bytes] = []

    def other_run() -> None:
        ledger.charge("earlier-run", 1, 4 * round_cost(config), "ab" * 32)
        on_disk.append(ledger.path.read_bytes())

    run = dp_round(
        deliver, make_client_app(rt), data, config=config, before={"masked-input": other_run}
    )
    assert not any(r.error for r in run.replies["advertise"])  # the setup was accepted
    (reply,) = run.replies["masked-input"]
    assert reply.error == budget_reason(before, after, budget)
    assert reply.details == reply.error
    assert reply.payload == b"" and reply.bulk is None  # no masked input left the site
    assert not run.completed and trainings.charges_seen == []  # refused before training
    assert ledger.path.read_bytes() == on_disk[0]  # the refusal changed nothing


def test_a_corrupt_ledger_refuses_the_round_and_is_left_as_it_is(
    data: SiteData, deliver: Deliver, tmp_path: Path
) -> None:
    rt = site(data, tmp_path / "state")
    assert rt.ledger is not None
    rt.ledger.path.parent.mkdir(parents=True)
    rt.ledger.path.write_bytes(b'{"format": "fedseal/privacy-ledger/v1", "charges": [')
    run = dp_round(
        deliver, make_client_app(rt), data, config=dp_config(flat_size(initial_model(data)), 3)
    )
    reply = run.replies["advertise"][-1]
    assert reply.error.startswith(f"refused: privacy ledger {rt.ledger.path} is unreadable")
    assert "restore it from a backup" in reply.error and reply.payload == b""
    assert rt.ledger.path.read_bytes().endswith(b'"charges": [') and not run.completed


def test_without_an_epsilon_budget_a_dp_round_is_charged_and_never_refused(
    data: SiteData, deliver: Deliver, tmp_path: Path
) -> None:
    rt = site(data, tmp_path / "state", dp="off", epsilon_budget=None)
    assert rt.ledger is not None
    rt.ledger.charge("earlier-run", 1, 1e3, "ab" * 32)  # epsilon in the hundreds already
    config = dp_config(flat_size(initial_model(data)), 3)
    run = dp_round(deliver, make_client_app(rt), data, config=config)
    assert run.completed and not run.errors, (run.errors, run.failure)
    assert [c.run_id for c in rt.ledger.charges()] == ["earlier-run", RUN_1.hex()]


@pytest.mark.parametrize("budget", [None, 10.0], ids=["no-budget", "budget"])
def test_a_site_without_a_ledger_takes_part_uncharged_only_without_a_budget(
    data: SiteData, deliver: Deliver, budget: float | None
) -> None:
    rt = site(data, None, dp="off", epsilon_budget=budget)
    run = dp_round(
        deliver, make_client_app(rt), data, config=dp_config(flat_size(initial_model(data)), 3)
    )
    if budget is None:
        assert run.completed and not run.errors, (run.errors, run.failure)
    else:
        reply = run.replies["advertise"][-1]
        assert reply.error.startswith("refused: privacy budget: [privacy] epsilon_budget 10 is set")
        assert not run.completed and reply.payload == b""


# -- the DP policy's refusals read as refusals -------------------------------------------------


def test_a_site_requiring_dp_refuses_a_round_without_it_in_one_line(
    data: SiteData, deliver: Deliver, tmp_path: Path
) -> None:
    rt = site(data, tmp_path / "state")
    plain = RoundConfig(
        vector_length=flat_size(initial_model(data)),
        quantization=QuantizationConfig.from_clip(10.0, levels=1 << 10),
        max_weight=1000,
    )
    run = dp_round(deliver, make_client_app(rt), data, config=plain)
    reply = run.replies["advertise"][-1]
    assert reply.error == (
        "refused: differential privacy: this site takes part only in rounds with distributed "
        'DP, the setup has none (parameter dp) ([privacy] dp = "required")'
    )
    assert reply.details == reply.error and not run.completed
    assert rt.ledger is not None and not rt.ledger.path.exists()


def test_dp_noise_below_the_sites_floor_is_refused_naming_the_parameter(
    data: SiteData, deliver: Deliver, tmp_path: Path
) -> None:
    rt = site(data, tmp_path / "state", min_noise_multiplier=5.0)
    run = dp_round(
        deliver,
        make_client_app(rt),
        data,
        config=dp_config(flat_size(initial_model(data)), 3, noise_multiplier=1.0),
    )
    reply = run.replies["advertise"][-1]
    assert reply.error.startswith("refused: differential privacy: central noise multiplier")
    assert reply.error.endswith("below this site's floor 5 (parameter local_stddev)")
    assert rt.ledger is not None and not rt.ledger.path.exists()


# -- the charge rule on its own ------------------------------------------------------------------


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    earlier=st.floats(1e-4, 5.0),
    budget=st.floats(0.5, 60.0),
    noise=st.floats(0.5, 8.0),
)
def test_a_charge_is_recorded_within_the_budget_or_refused_as_the_setup_check_said(
    data: SiteData,
    tmp_path_factory: pytest.TempPathFactory,
    earlier: float,
    budget: float,
    noise: float,
) -> None:
    state = tmp_path_factory.mktemp("ledger")
    rt = site(data, state, epsilon_budget=budget)
    assert rt.ledger is not None
    rt.ledger.charge("earlier-run", 1, earlier, "cd" * 32)
    dp = dp_config(64, 3, noise_multiplier=noise).dp
    assert dp is not None
    on_disk = rt.ledger.path.read_bytes()
    try:
        rt.check_privacy(RUN_1, 1, dp, honest_sites=dp.honest_survivors)
    except SiteRefusal as exc:
        checked: str | None = str(exc)
    else:
        checked = None
    try:
        rt.charge_privacy(RUN_1, 1, dp, honest_sites=dp.honest_survivors)
    except SiteRefusal as exc:
        assert checked == str(exc)  # the setup's check decides as the charge does
        assert str(exc).startswith("refused: privacy budget: epsilon ") and "\n" not in str(exc)
        assert rt.ledger.path.read_bytes() == on_disk
        assert epsilon([earlier, round_rho(dp_round_noise(dp))], DELTA) > budget
    else:
        assert checked is None
        assert len(rt.ledger.charges()) == 2 and rt.ledger.spent(DELTA) <= budget
        rt.charge_privacy(RUN_1, 1, dp, honest_sites=dp.honest_survivors)  # a retry: free
        assert len(rt.ledger.charges()) == 2


def test_a_site_assuming_fewer_honest_survivors_is_charged_for_those(
    data: SiteData, tmp_path: Path
) -> None:
    rt = site(data, tmp_path)
    assert rt.ledger is not None
    dp = dp_config(64, 4).dp
    assert dp is not None and dp.honest_survivors == 2
    rt.charge_privacy(RUN_1, 1, dp, honest_sites=1)
    assert rt.ledger.rhos() == [pytest.approx(round_rho(dp_round_noise(dp, honest_sites=1)))]
    assert rt.ledger.rhos()[0] > round_rho(dp_round_noise(dp))


# -- where the ledger lives ----------------------------------------------------------------------


def test_a_simulated_site_keeps_its_ledger_in_its_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedseal.client.config import load_client_config
    from fedseal.sim.simulate import prepare_simulation
    from fedseal.sim.sites import SimulatedSites

    runtimes: list[SiteRuntime] = []
    real = flower_app.make_client_app

    def spy(runtime: SiteRuntime) -> object:
        runtimes.append(runtime)
        return real(runtime)

    monkeypatch.setattr(flower_app, "make_client_app", spy)
    fed = prepare_simulation(tmp_path / "sim", sites=2, scheme="iid", seed=2)
    SimulatedSites(tuple(str(p) for p in fed.sites)).site_app(0)
    (rt,) = runtimes
    cfg = load_client_config(fed.sites[0] / "client.toml")
    assert rt.ledger is not None and rt.ledger.path == cfg.state_dir / LEDGER_FILE
