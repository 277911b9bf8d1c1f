"""Fuzzing: random and byte-mutated messages into every decoder and both state machines.

Only our typed errors may come out: never a crash, never an unbounded allocation.
"""

from __future__ import annotations

import dataclasses
import struct
import tracemalloc
from functools import cache

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedseal.protocol import DecodeError, Packet, ProtocolError
from fedseal.protocol.config import Limits
from fedseal.protocol.encoding import Reader
from fedseal.protocol.envelope import Envelope, seal
from fedseal.protocol.messages import decode_payload
from fedseal.protocol.server import Accepted, Rejection, ServerStage
from fedseal.protocol.types import MessageKind, SiteId
from fedseal.sim.inmemory import Behaviour
from tests.protocol._support import LIMITS_DEFAULT, make_fed

STAGES = [
    ServerStage.ADVERTISE,
    ServerStage.SHARE,
    ServerStage.MASKED_INPUT,
    ServerStage.CONSISTENCY,
    ServerStage.UNMASK,
]


class Recorder(Behaviour):
    def __init__(self) -> None:
        self.sent: dict[ServerStage, bytes] = {}
        self.replies: dict[ServerStage, bytes] = {}

    def coordinator_sends(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
        self.sent.setdefault(stage, packet.payload)
        return packet

    def site_replies(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
        self.replies.setdefault(stage, packet.payload)
        return (packet,)


@cache
def corpus() -> tuple[bytes, ...]:
    """Every kind of envelope from one honest round (setup .. result notice)."""
    rec = Recorder()
    fed, _ = make_fed(4, length=6, behaviour=rec)
    outcome = fed.run_round(1)
    assert outcome.result is not None
    notices = fed.server.result_notices() if fed.server else {}
    return (*rec.sent.values(), *rec.replies.values(), *(p.payload for p in notices.values()))


def mutate(data: bytes, ops: list[tuple[int, float, int]]) -> bytes:
    buf = bytearray(data)
    for op, where, value in ops:
        pos = int(where * len(buf)) if buf else 0
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= value or 1
        elif op == 1:
            del buf[pos:]
        elif op == 2:
            buf[pos:pos] = bytes([value])
        elif op == 3 and buf:
            del buf[min(pos, len(buf) - 1)]
        elif op == 4:
            buf[pos : pos + 4] = b"\xff\xff\xff\xff"
    return bytes(buf)


MUTATIONS = st.lists(
    st.tuples(st.integers(0, 4), st.floats(0, 1, allow_nan=False), st.integers(0, 255)),
    min_size=1,
    max_size=4,
)


def test_the_corpus_covers_every_message_kind() -> None:
    kinds = {Envelope.from_bytes(e, LIMITS_DEFAULT).kind for e in corpus()}
    assert kinds == set(MessageKind)


@given(kind=st.sampled_from(list(MessageKind)), data=st.binary(max_size=600))
def test_every_payload_decoder_raises_only_decode_errors_on_random_bytes(
    kind: MessageKind, data: bytes
) -> None:
    try:
        decode_payload(kind, data, LIMITS_DEFAULT)
    except DecodeError:
        pass


@given(data=st.binary(max_size=600))
def test_the_envelope_decoder_raises_only_decode_errors_on_random_bytes(data: bytes) -> None:
    try:
        Envelope.from_bytes(data, LIMITS_DEFAULT)
    except DecodeError:
        pass


@given(index=st.integers(0, 10), ops=MUTATIONS)
def test_mutated_payloads_decode_or_raise_decode_error(
    index: int, ops: list[tuple[int, float, int]]
) -> None:
    envelopes = corpus()
    env = Envelope.from_bytes(envelopes[index % len(envelopes)], LIMITS_DEFAULT)
    try:
        message = decode_payload(env.kind, mutate(env.payload, ops), LIMITS_DEFAULT)
    except DecodeError:
        return
    # Whatever decodes re-encodes canonically (one encoding per value).
    assert decode_payload(env.kind, message.to_payload(), LIMITS_DEFAULT) == message


@given(index=st.integers(0, 10), ops=MUTATIONS)
def test_mutated_envelopes_decode_or_raise_decode_error(
    index: int, ops: list[tuple[int, float, int]]
) -> None:
    envelopes = corpus()
    try:
        Envelope.from_bytes(mutate(envelopes[index % len(envelopes)], ops), LIMITS_DEFAULT)
    except DecodeError:
        pass


def test_huge_claimed_lengths_are_refused_before_allocating() -> None:
    limits = Limits()
    header = bytes(16) + struct.pack(">I", 1) + b"\x00\x00" + b"\x00\x00" + bytes(64)
    crafted = {
        MessageKind.ADVERT_BUNDLE: header + struct.pack(">I", 0xFFFFFFFF),
        MessageKind.SURVIVOR_SET: header + struct.pack(">I", 999),
        MessageKind.CONSISTENCY_SIGNATURE: header + struct.pack(">I", 0xFFFFFFF0) + b"x" * 16,
        MessageKind.ENCRYPTED_SHARES: header
        + struct.pack(">I", 1)
        + b"\x00\x01a"
        + struct.pack(">I", 0x7FFFFFFF),
    }
    tracemalloc.start()
    try:
        for kind, payload in crafted.items():
            try:
                decode_payload(kind, payload, limits)
            except DecodeError:
                pass
            else:
                raise AssertionError(f"{kind} accepted an impossible length")
        envelope = b"FSE1\x06" + struct.pack(">I", 0xFFFFFFFF) + b"\x00" * 8
        try:
            Envelope.from_bytes(envelope, limits)
        except DecodeError:
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


def test_a_reader_rejects_counts_larger_than_the_input() -> None:
    r = Reader(struct.pack(">I", 50) + b"ab", what="t")
    try:
        r.count(1000)
    except DecodeError as exc:
        assert "longer than the input" in exc.message
    else:
        raise AssertionError("count accepted")


class MutateReplies(Behaviour):
    """Mutate one site's reply at one stage; optionally re-sign so the decoder is reached."""

    def __init__(
        self, stage: ServerStage, ops: list[tuple[int, float, int]], resign: bool, bulk_op: int
    ) -> None:
        self.stage, self.ops, self.resign, self.bulk_op = stage, ops, resign, bulk_op
        self.receipts: list[object] = []

    def site_replies(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
        if stage is not self.stage or site != "site-001":
            return (packet,)
        env = Envelope.from_bytes(packet.payload, LIMITS_DEFAULT)
        if self.resign:
            from fedseal.crypto.signing import sign

            payload = mutate(env.payload, self.ops)
            sig = sign(fed.site_keys[SiteId(site)], env.kind.type_name, payload)
            data = dataclasses.replace(env, payload=payload, signature=sig).to_bytes()
        else:
            data = mutate(packet.payload, self.ops)
        bulk = packet.bulk
        if bulk is not None and self.bulk_op == 1:
            bulk = bulk[::2]
        elif bulk is not None and self.bulk_op == 2:
            bulk = bulk.astype(np.float32)
        return (Packet(data, bulk), packet)


@settings(max_examples=25)
@given(
    stage=st.sampled_from(STAGES), ops=MUTATIONS, resign=st.booleans(), bulk_op=st.integers(0, 2)
)
def test_the_server_turns_mutated_replies_into_typed_rejections(
    stage, ops, resign, bulk_op
) -> None:  # type: ignore[no-untyped-def]
    fed, _ = make_fed(4, length=6, behaviour=MutateReplies(stage, ops, resign, bulk_op))
    outcome = fed.run_round(1)  # raises if anything but a ProtocolError escapes
    for receipt in outcome.receipts:
        assert isinstance(receipt, (Accepted, Rejection))
        if isinstance(receipt, Rejection):
            assert isinstance(receipt.error, ProtocolError)
    assert outcome.failure is None or isinstance(outcome.failure, ProtocolError)


class MutateCoordinator(Behaviour):
    def __init__(self, stage: ServerStage, ops: list[tuple[int, float, int]], resign: bool) -> None:
        self.stage, self.ops, self.resign = stage, ops, resign

    def coordinator_sends(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
        if stage is not self.stage or site != "site-002":
            return packet
        env = Envelope.from_bytes(packet.payload, LIMITS_DEFAULT)
        if not self.resign:
            return Packet(mutate(packet.payload, self.ops))
        from fedseal.crypto.signing import sign

        payload = mutate(env.payload, self.ops)
        sig = sign(fed.coordinator_key, env.kind.type_name, payload)
        return Packet(dataclasses.replace(env, payload=payload, signature=sig).to_bytes())


@settings(max_examples=25)
@given(stage=st.sampled_from(STAGES), ops=MUTATIONS, resign=st.booleans())
def test_sites_raise_only_protocol_errors_on_mutated_coordinator_messages(
    stage, ops, resign
) -> None:  # type: ignore[no-untyped-def]
    fed, _ = make_fed(4, length=6, behaviour=MutateCoordinator(stage, ops, resign))
    outcome = fed.run_round(1)  # any non-ProtocolError from a site would propagate here
    for error in outcome.client_errors.values():
        assert isinstance(error, ProtocolError)


def test_a_correctly_signed_but_undecodable_message_is_a_decode_error_at_the_site() -> None:
    fed, _ = make_fed(3)
    server_packets = corpus()
    env = Envelope.from_bytes(server_packets[0], LIMITS_DEFAULT)
    assert env.kind is MessageKind.ROUND_SETUP
    session = fed.make_session(SiteId("site-000"), 1, now=1_700_000_000.0)
    from fedseal.crypto.signing import sign

    payload = env.payload[:-3]
    bad = dataclasses.replace(
        env, payload=payload, signature=sign(fed.coordinator_key, env.kind.type_name, payload)
    )
    try:
        session.handle(bad.to_bytes())
    except DecodeError:
        pass
    else:
        raise AssertionError("accepted a truncated setup")
    assert seal  # the public sealing helper stays importable
