"""An in-process federation for driving the real ServerApp (``run_federation``) in tests.

:class:`FedGrid` stands in for Flower's ``Grid``: every pushed message is answered at once by
a :class:`FakeSite`, whose secure-round side is the protocol's own client session
(:meth:`fedseal.sim.inmemory.Federation.make_session`, keyed with the sites' enrolled
keys and the coordinator's real key), and whose plain side returns the global model plus a
small step. Sites can refuse plain training with a Flower error reply, answer a stage with an
error, or tamper with their masked input (re-signed with their own key).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedseal.crypto.keys import load_private_key
from fedseal.protocol import LocalUpdate, Packet, QuantizationConfig, RoundConfig
from fedseal.protocol.envelope import Envelope, seal
from fedseal.protocol.errors import ProtocolError
from fedseal.protocol.messages import decode_payload
from fedseal.protocol.types import SiteId
from fedseal.server import flower_app, rundir
from fedseal.server.cli import init as init_cmd
from fedseal.server.cli import write_server_toml
from fedseal.server.config import ServerConfig, load_server_config
from fedseal.server.metrics import Metrics
from fedseal.server.roster import Enrolment
from fedseal.sim.inmemory import Federation, dataset_root_for

MODEL_SIZE = 12
STEP = 0.01
EXAMPLES = 50
PLAIN_REFUSAL = "refused: plain training is disabled at this site ([privacy] allow_plain = false)"

#: ``(site, round, packet) -> packet``: what a site does to its masked input before sending it.
Tamper = Callable[[SiteId, int, Packet], Packet]


class Reply:
    """A site's reply as the grid hands it back (Flower's own reply, with the message id the
    coordinator pushed: Flower computes that id only when a real link stores the message)."""

    def __init__(self, message: Message, reply_to: str) -> None:
        self._message = message
        self.metadata = SimpleNamespace(
            reply_to_message_id=reply_to, src_node_id=message.metadata.src_node_id
        )

    def has_error(self) -> bool:
        return self._message.has_error()

    @property
    def content(self) -> RecordDict:
        return self._message.content

    @property
    def error(self) -> Error:
        return self._message.error


class FakeSite:
    """One site: plain training, a secure round's client session, evaluation."""

    def __init__(
        self,
        name: str,
        fed: Federation,
        *,
        refuse_plain: bool = False,
        withhold_evaluation: str = "",
        error_at: tuple[int, str, str] | None = None,
        tamper: Tamper | None = None,
        floor: tuple[int, bool, bool] | None = None,
        contract: str | None = None,
    ) -> None:
        self.name = SiteId(name)
        self.fed = fed
        self.refuse_plain = refuse_plain
        self.withhold_evaluation = withhold_evaluation  # a reason: no metrics, as a site
        # without an audit address answers (client/flower_app.py)
        self.error_at = error_at  # (round, message type, reason): answered with an error reply
        self.tamper = tamper
        self.floor = floor  # (min_cohort, allow_plain, dp_required) for query.policy; None: no answer
        self.contract = contract  # with a floor: its dataset's contract digest (hex, "" none); None: not said
        self.session: Any = None
        self.round = 0
        self.model: np.ndarray | None = None

    def answer(self, msg: Message) -> RecordDict | Error:
        kind = msg.metadata.message_type
        content = msg.content
        rnd = int(content["config"].get("round", self.round)) if "config" in content else self.round
        if self.error_at is not None and self.error_at[:2] == (rnd, kind):
            return Error(code=0, reason=self.error_at[2])
        if kind == "query.initial_model":
            return RecordDict(
                {"arrays": ArrayRecord({"w": Array(np.zeros(MODEL_SIZE, np.float32))})}
            )
        if kind == "query.policy" and self.floor is not None:
            cohort, plain, dp = self.floor
            values = {"site": str(self.name), "min-cohort": cohort, "allow-plain": int(plain), "dp-required": int(dp)}
            if self.contract is not None:
                values["contract"] = self.contract
            return RecordDict({"policy": ConfigRecord(values)})
        if kind == "query.ping":
            return RecordDict({"metrics": MetricRecord({"pong": 1})})
        if kind == "train":
            if self.refuse_plain:
                return Error(code=0, reason=PLAIN_REFUSAL)
            w = content["arrays"]["w"].numpy()
            return RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array((w + STEP).astype(np.float32))}),
                    "metrics": MetricRecord({"num-examples": EXAMPLES}),
                    "site": ConfigRecord({"dataset-root": dataset_root_for(self.name).hex()}),
                }
            )
        if kind == "train.secagg":
            return self._secure(content)
        if kind == "evaluate" and self.withhold_evaluation:
            return RecordDict(
                {"evaluation-refused": ConfigRecord({"reason": self.withhold_evaluation})}
            )
        if kind == "evaluate":
            metrics = {"num-examples": EXAMPLES, "loss": 0.5, "accuracy": 0.75, "macro-f1": 0.7}
            return RecordDict({"metrics": MetricRecord(metrics)})
        return Error(code=0, reason=f"unexpected message type {kind}")

    def _secure(self, content: RecordDict) -> RecordDict | Error:
        if "arrays" in content:  # the setup: a new round
            self.round = int(content["config"]["round"])
            self.model = content["arrays"]["w"].numpy()
            self.session = self.fed.make_session(self.name, self.round, time.time())
        try:
            packet = self.session.handle(content["secagg"]["payload"])
        except ProtocolError as exc:
            return Error(code=0, reason=f"{type(exc).__name__}: {exc}")
        if packet is None:
            return RecordDict({})
        if packet.bulk is not None and self.tamper is not None:
            packet = self.tamper(self.name, self.round, packet)
        out = RecordDict({"secagg": ConfigRecord({"payload": packet.payload})})
        if packet.bulk is not None:
            out["bulk"] = ArrayRecord({"masked": Array(np.ascontiguousarray(packet.bulk))})
        return out


class FedGrid:
    """The ``Grid`` the ServerApp drives: answers each pushed message at once."""

    def __init__(self, sites: dict[int, FakeSite]) -> None:
        self.sites = sites
        self._replies: dict[str, Reply] = {}
        self._count = 0
        self.sent: list[tuple[int, str]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def push_messages(self, messages: Sequence[Message]) -> list[str]:
        ids = []
        for m in messages:
            self._count += 1
            mid = f"msg-{self._count}"
            ids.append(mid)
            node = int(m.metadata.dst_node_id)
            self.sent.append((node, m.metadata.message_type))
            answer = self.sites[node].answer(m)
            self._replies[mid] = Reply(Message(answer, reply_to=m), mid)
        return ids

    def pull_messages(self, ids: Sequence[str]) -> list[Reply]:
        return [self._replies.pop(i) for i in ids if i in self._replies]


def shift_masked_input(
    offset: int, element: int = 0, rounds: frozenset[int] = frozenset({1})
) -> Callable[[Federation], Tamper]:
    """A tamper that adds ``offset`` (mod 2^b) to one element of the masked vector and re-signs
    the masked input with the site's own key (``fed.site_keys``) after fixing its bulk digest."""

    def tamper_with(fed: Federation) -> Tamper:
        def tamper(site: SiteId, rnd: int, packet: Packet) -> Packet:
            if rnd not in rounds:
                return packet
            env = Envelope.from_bytes(packet.payload, fed.config.limits)
            message = decode_payload(env.kind, env.payload, fed.config.limits)
            bulk = np.array(packet.bulk, copy=True)
            modulus = 1 << (8 * bulk.dtype.itemsize)
            bulk[element] = (int(bulk[element]) + offset) % modulus
            forged = dataclasses.replace(message, bulk_digest=hashlib.sha256(bulk.data).digest())  # type: ignore[call-arg]
            return Packet(seal(forged, fed.site_keys[site]), bulk)

        return tamper

    return tamper_with


class Federated:
    """A coordinator directory (``fl-server init``), its enrolled sites and the grid."""

    def __init__(
        self,
        tmp: Path,
        names: Sequence[str],
        *,
        secure: bool,
        rounds: int = 2,
        min_sites: int = 2,
        run_contract: Mapping[str, Any] | None = None,
        **site_options: dict[str, Any],
    ) -> None:
        init_cmd(tmp / "coord", san=["localhost"], passphrase_env=None)
        path = tmp / "coord" / "server.toml"
        extra: dict[str, object] = {}
        if run_contract is not None:  # server.toml [run] contract = "contract.json"
            (tmp / "coord" / "contract.json").write_text(json.dumps(run_contract))
            extra["contract"] = "contract.json"
        write_server_toml(
            path, metrics_port=0, audit_port=0,
            run_overrides={
                "rounds": rounds, "secure": secure, "min_sites": min_sites,
                "setup_with_evaluation": False, "stage_timeout_s": 30.0, "sites_wait_timeout_s": 5.0,
                **extra,
            },
        )  # fmt: skip
        self.cfg: ServerConfig = load_server_config(path)
        config = RoundConfig(
            vector_length=MODEL_SIZE,
            quantization=QuantizationConfig.from_clip(1.0, 4096),
            max_weight=1,
        )
        self.fed = Federation(
            config, list(names), seed=b"fedgrid", updates=self._update,
            rounding_rng=lambda site: np.random.default_rng(abs(hash(site)) % 2**32),
        )  # fmt: skip
        self.fed.coordinator_key = load_private_key(self.cfg.coordinator.key, None)
        roster = Enrolment.load_or_create(self.cfg.coordinator.roster)
        for name in names:
            key = self.fed.site_keys[SiteId(name)]
            roster = roster.enroll(name, key.public_key(), [dataset_root_for(name).hex()], now_ms=1)
        roster.save(self.cfg.coordinator.roster)
        state = self.cfg.coordinator.state_dir
        state.mkdir(parents=True, exist_ok=True)
        nodes = {100 + i: name for i, name in enumerate(names)}
        (state / rundir.NODES_FILE).write_text(
            json.dumps({str(n): s for n, s in nodes.items()})
        )
        self.sites = {}
        for node, name in nodes.items():
            options = dict(site_options.get(name, {}))
            tamper = options.pop("tamper", None)
            site = FakeSite(name, self.fed, **options)
            site.tamper = tamper(self.fed) if tamper is not None else None
            self.sites[node] = site
        self.grid = FedGrid(self.sites)
        self.metrics: list[Metrics] = []

    def _update(self, site: SiteId, info: Any) -> LocalUpdate:
        return LocalUpdate(np.full(info.vector_length, STEP), EXAMPLES, dataset_root_for(site))

    def run(self, monkeypatch: Any) -> None:
        """``run_federation`` on the grid (keeps the run's :class:`Metrics` in ``metrics``)."""
        real = Metrics.start.__func__  # type: ignore[attr-defined]

        def start(cls: type[Metrics], port: int, host: str = "127.0.0.1") -> Metrics:
            m: Metrics = real(cls, port, host)
            self.metrics.append(m)
            return m

        monkeypatch.setattr(Metrics, "start", classmethod(start))
        flower_app.run_federation(self.grid, self.cfg, resume=False)  # type: ignore[arg-type]

    def rounds(self) -> list[dict[str, Any]]:
        return rundir.read_rounds(self.cfg.coordinator.state_dir / rundir.ROUNDS_FILE)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        value = self.metrics[-1].registry.get_sample_value(name, labels or {})
        return None if value is None else float(value)
