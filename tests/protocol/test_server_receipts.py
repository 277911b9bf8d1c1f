"""What the coordinator's state machine checked travels with its receipts: an accepted masked
input carries its signed facts, a rejection the frame as received (parsed when it parsed), so
the audit hook never decodes a reply again."""

from __future__ import annotations

from collections.abc import Sequence

from fedseal.protocol import Accepted, Packet, Rejection
from fedseal.protocol.envelope import Envelope
from fedseal.protocol.errors import DecodeError, StaleMessageError
from fedseal.protocol.messages import MaskedInput, decode_payload
from fedseal.protocol.server import ServerStage
from fedseal.protocol.types import MessageKind, SiteId
from fedseal.sim.inmemory import Behaviour, Federation

from ._support import LIMITS_DEFAULT, make_fed


def test_an_accepted_masked_input_carries_the_facts_its_payload_signed() -> None:
    fed, _ = make_fed(5)
    outcome = fed.run_round()
    masked = [r for r in outcome.receipts if isinstance(r, Accepted) and r.kind is MessageKind.MASKED_INPUT]
    assert len(masked) == 5
    for r in masked:
        msg = decode_payload(r.kind, r.payload, LIMITS_DEFAULT)
        assert isinstance(msg, MaskedInput) and r.masked_input is not None
        assert r.masked_input.dataset_root == msg.dataset_root
        assert r.masked_input.example_count == msg.example_count
        assert r.masked_input.bulk_digest == msg.bulk_digest
        assert r.masked_input.model_digest == msg.header.model_digest == fed.model_digest_for(1)
        assert r.envelope == Envelope(r.kind, r.payload, r.signature, r.signer)
    others = [r for r in outcome.receipts if isinstance(r, Accepted) and r.kind is not MessageKind.MASKED_INPUT]
    assert others and all(r.masked_input is None for r in others)


class _Garbage(Behaviour):
    """site-000 answers the share stage with bytes that are no envelope; site-001 answers it
    with the coordinator's own (well-formed, signed) message of another kind."""

    def coordinator_sends(self, fed: Federation, stage: ServerStage, site: SiteId, packet: Packet) -> Packet | None:
        if stage is ServerStage.SHARE and site == "site-001":
            self.theirs = packet
        return packet

    def site_replies(self, fed: Federation, stage: ServerStage, site: SiteId, packet: Packet) -> Sequence[Packet]:
        if stage is ServerStage.SHARE and site == "site-000":
            return (Packet(b"\x00not an envelope"),)
        if stage is ServerStage.SHARE and site == "site-001":
            return (self.theirs,)
        return (packet,)


def test_a_rejection_keeps_the_frame_it_rejected_parsed_or_raw() -> None:
    garbage = _Garbage()
    fed, _ = make_fed(7, behaviour=garbage)
    outcome = fed.run_round()
    rejected = {str(r.site): r for r in outcome.receipts if isinstance(r, Rejection)}
    raw = rejected["site-000"]
    assert isinstance(raw.error, DecodeError)
    assert raw.envelope is None and raw.frame == b"\x00not an envelope"
    wrong = rejected["site-001"]
    assert isinstance(wrong.error, StaleMessageError)
    sent = Envelope.from_bytes(garbage.theirs.payload, LIMITS_DEFAULT)
    expected = MessageKind.ENCRYPTED_SHARES.type_name
    assert f"message kind {sent.kind.type_name} where {expected} was expected" in wrong.reason
    assert wrong.frame is None and wrong.envelope == sent
