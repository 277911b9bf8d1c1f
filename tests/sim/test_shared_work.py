"""Shared decoding for simulations (fedseal.sim.shared_work through the seam of
fedseal.protocol.seams): same answers, failures never kept."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from fedseal.protocol import DecodeError, ThresholdError, seams
from fedseal.protocol import graph as graph_mod
from fedseal.protocol import messages as messages_mod
from fedseal.protocol.client import ClientSession
from fedseal.protocol.config import Limits
from fedseal.protocol.envelope import Envelope
from fedseal.protocol.errors import CoordinatorMisbehaviourError
from fedseal.protocol.graph import build_graph
from fedseal.protocol.messages import AdvertBundle, Header, SurvivorSet, decode_payload
from fedseal.protocol.server import ServerStage
from fedseal.protocol.types import MessageKind, SiteId
from fedseal.sim.shared_work import SharedWork
from tests.protocol._support import expected_sum, make_fed

HEADER = Header(
    run_id=bytes(16), round=3, sender=SiteId(""), recipient=SiteId("a"),
    model_digest=bytes(32), setup_digest=bytes(32),
)
SITES = tuple(SiteId(s) for s in ("a", "b", "c", "d"))


def survivor_payload(sites: tuple[SiteId, ...] = SITES) -> bytes:
    return SurvivorSet(header=HEADER, survivors=sites).to_payload()


@pytest.fixture
def work() -> SharedWork:
    """Shared work with room for 2 results per table."""
    return SharedWork(capacity=2)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """Records every real decode."""
    seen: list[bytes] = []
    real = messages_mod._decode_payload

    def counted(kind: MessageKind, payload: bytes, limits: Limits) -> object:
        seen.append(payload)
        return real(kind, payload, limits)

    monkeypatch.setattr(messages_mod, "_decode_payload", counted)
    yield seen


def test_production_paths_share_nothing_unless_given_shared_work() -> None:
    code = (
        "import sys, inspect\n"
        "from fedseal.protocol import seams, client, graph, messages, envelope\n"
        "defaults = [inspect.signature(f).parameters['shared'].default for f in (\n"
        "    client.ClientSession, graph.build_graph, messages.decode_payload,\n"
        "    envelope.open_envelope)]\n"
        "print(all(d is seams.NO_SHARING for d in defaults), seams.NoSharing.__slots__,\n"
        "      'fedseal.sim.shared_work' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True () False"


def test_when_off_every_payload_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = messages_mod._decode_payload
    monkeypatch.setattr(
        messages_mod, "_decode_payload", lambda k, p, lim: (calls.append(p), real(k, p, lim))[1]
    )
    for _ in range(3):
        decode_payload(MessageKind.SURVIVOR_SET, survivor_payload(), Limits())
    assert len(calls) == 3


def test_a_payload_decoded_once_gives_the_same_frozen_message(
    decodes: list[bytes], work: SharedWork
) -> None:
    first = decode_payload(MessageKind.SURVIVOR_SET, survivor_payload(), Limits(), work)
    again = decode_payload(MessageKind.SURVIVOR_SET, bytearray(survivor_payload()), Limits(), work)
    assert again is first
    assert len(decodes) == 1
    assert first == messages_mod._decode_payload(MessageKind.SURVIVOR_SET, survivor_payload(), Limits())
    with pytest.raises(AttributeError):
        first.survivors = ()  # type: ignore[misc]


def test_the_limits_are_part_of_the_key(decodes: list[bytes], work: SharedWork) -> None:
    payload = survivor_payload()
    decode_payload(MessageKind.SURVIVOR_SET, payload, Limits(), work)
    with pytest.raises(DecodeError):  # decoded under loose limits before: still refused here
        decode_payload(MessageKind.SURVIVOR_SET, payload, Limits(max_cohort=2), work)


def test_a_malformed_payload_is_decoded_and_refused_every_time(
    decodes: list[bytes], work: SharedWork
) -> None:
    bad = survivor_payload()[:-1]
    for _ in range(3):
        with pytest.raises(DecodeError):
            decode_payload(MessageKind.SURVIVOR_SET, bad, Limits(), work)
    assert len(decodes) == 3
    assert len(work.table("decoded")) == 0


def test_memory_is_bounded_and_large_payloads_are_never_kept(
    decodes: list[bytes], work: SharedWork, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(2, 5):
        decode_payload(MessageKind.SURVIVOR_SET, survivor_payload(SITES[:n]), Limits(), work)
    assert len(work.table("decoded")) == 2  # capacity 2: the oldest was dropped
    monkeypatch.setattr(messages_mod, "MAX_KEY_BYTES", 8)
    decodes.clear()
    for _ in range(2):
        decode_payload(MessageKind.SURVIVOR_SET, survivor_payload(), Limits(), work)
    assert len(decodes) == 2


def test_sites_sharing_one_instance_share_what_is_remembered_and_a_new_one_starts_empty() -> None:
    work = SharedWork(capacity=8)
    decode_payload(MessageKind.SURVIVOR_SET, survivor_payload(), Limits(), work)
    decode_payload(MessageKind.SURVIVOR_SET, survivor_payload(), Limits(), work)  # another site
    assert len(work.table("decoded")) == 1
    fresh = SharedWork(capacity=8)
    assert len(fresh.table("decoded")) == 0 and len(fresh.table("graphs")) == 0
    with pytest.raises(ValueError):
        SharedWork(capacity=0)
    with pytest.raises(ValueError):
        work.table("other")
    with pytest.raises(ValueError):
        work.remembered("other", b"k", lambda: 1)


def test_graphs_are_built_once_per_seed_and_are_read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[bytes] = []
    real = graph_mod._build_graph
    monkeypatch.setattr(
        graph_mod, "_build_graph", lambda m, s, d, t: (builds.append(s), real(m, s, d, t))[1]
    )
    work = SharedWork()
    sites = [SiteId(f"s{i:02d}") for i in range(40)]
    g1 = build_graph(sites, b"\x01" * 32, 6, 4, work)
    g2 = build_graph(list(reversed(sites)), b"\x01" * 32, 6, 4, work)  # same set, other order
    g3 = build_graph(sites, b"\x02" * 32, 6, 4, work)
    assert g2 is g1 and g3 is not g1 and g3 != g1
    assert len(builds) == 2
    with pytest.raises(TypeError):
        g1.neighbours[sites[0]] = ()  # type: ignore[index]
    for _ in range(2):  # a refusal is made again each time, never remembered
        with pytest.raises(ThresholdError):
            build_graph(sites[:3], b"\x01" * 32, 6, 4, work)
    assert len(builds) == 4


@pytest.mark.parametrize("share", [False, True])
def test_a_round_with_dropouts_sums_the_same_with_shared_work(share: bool) -> None:
    shared = SharedWork() if share else seams.NO_SHARING
    fed, updates = make_fed(
        40, length=64, seed=5, dropouts={ServerStage.MASKED_INPUT: ["site-007", "site-021"]},
        shared=shared,
    )
    for rnd in (1, 2):  # round 2 meets a warm memo (same cohort and keys, other messages)
        outcome = fed.run_round(rnd)
        result = outcome.result
        assert result is not None, outcome.failure
        survivors = sorted(result.survivors)
        assert "site-007" not in survivors and len(survivors) == 38
        np.testing.assert_array_equal(result.aggregate, expected_sum(fed, updates, survivors, 5))


@pytest.mark.parametrize("share", [False, True])
def test_each_key_advert_is_opened_once_per_process_with_shared_work(
    monkeypatch: pytest.MonkeyPatch, share: bool
) -> None:
    opened: list[bytes] = []
    real = ClientSession._open_advert

    def counted(self: ClientSession, data: bytes) -> object:
        opened.append(bytes(data))
        return real(self, data)

    monkeypatch.setattr(ClientSession, "_open_advert", counted)
    fed, updates = make_fed(12, length=32, seed=7, shared=SharedWork() if share else seams.NO_SHARING)
    outcome = fed.run_round(1)
    result = outcome.result
    assert result is not None, outcome.failure
    assert len(set(opened)) == 12
    assert len(opened) == (12 if share else 12 * 12)
    survivors = sorted(result.survivors)
    np.testing.assert_array_equal(result.aggregate, expected_sum(fed, updates, survivors, 7))


def test_a_remembered_advert_must_still_name_a_member_of_the_sites_own_cohort(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    work = SharedWork()
    seen: list[tuple[ClientSession, AdvertBundle]] = []
    real = ClientSession._on_adverts

    def spy(self: ClientSession, bundle: AdvertBundle) -> object:
        seen.append((self, bundle))
        return real(self, bundle)

    monkeypatch.setattr(ClientSession, "_on_adverts", spy)
    fed, _ = make_fed(5, seed=3, shared=work)
    assert fed.run_round(1).result is not None
    session, bundle = seen[-1]
    data = bundle.adverts[0]
    assert session._verify_advert(data)[1] is memo_entry(work, data, session)[1]  # a memo hit
    signer = Envelope.from_bytes(data, session.limits).signer
    del session._by_key_id[signer]  # this site's cohort no longer holds the advert's signer
    with pytest.raises(CoordinatorMisbehaviourError, match="outside the cohort"):
        session._verify_advert(data)


def test_a_remembered_advert_is_opened_again_under_other_limits_and_keeps_its_sender(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[ClientSession, AdvertBundle]] = []
    opened: list[bytes] = []
    real_adverts, real_open = ClientSession._on_adverts, ClientSession._open_advert

    def spy(self: ClientSession, bundle: AdvertBundle) -> object:
        seen.append((self, bundle))
        return real_adverts(self, bundle)

    def counted(self: ClientSession, data: bytes) -> object:
        opened.append(bytes(data))
        return real_open(self, data)

    monkeypatch.setattr(ClientSession, "_on_adverts", spy)
    monkeypatch.setattr(ClientSession, "_open_advert", counted)
    fed, _ = make_fed(5, seed=4, shared=SharedWork())
    assert fed.run_round(1).result is not None
    session, bundle = seen[-1]
    data = bundle.adverts[0]
    before = len(opened)
    session._verify_advert(data)
    assert len(opened) == before  # remembered under these limits
    session.limits = Limits(max_message_bytes=len(data) - 1)
    with pytest.raises(DecodeError):  # other limits: opened again, and refused by them
        session._verify_advert(data)
    assert len(opened) == before + 1

    # A cohort that lists the advert's key under another site's name: the remembered advert
    # still names its own sender, so this site refuses it.
    session.limits = Limits()
    owner, _, _ = session._verify_advert(data)
    signer = Envelope.from_bytes(data, session.limits).signer
    other = next(s for s in session._by_key_id.values() if s != owner)
    session._by_key_id[signer] = other
    with pytest.raises(CoordinatorMisbehaviourError, match="wrong sender"):
        session._verify_advert(data)


def memo_entry(work: SharedWork, data: bytes, session: ClientSession) -> tuple[object, ...]:
    adverts = work.table("adverts")
    assert adverts is not None
    entry = adverts.get((bytes(data), session.limits), lambda: pytest.fail("advert not remembered"))
    assert isinstance(entry, tuple)
    return entry
