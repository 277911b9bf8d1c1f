"""Property tests: generated messages round-trip canonically; masks cancel in the sum."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedseal.crypto.agreement import AgreementKey
from fedseal.crypto.prg import add_mask_into
from fedseal.protocol.config import Limits, QuantizationConfig, RoundParameters
from fedseal.protocol.masking import PAIR_DOMAIN, pair_sign_negative, pairwise_seed, seed_commitment
from fedseal.protocol.messages import (
    CohortMember,
    ConsistencySignature,
    EncryptedShares,
    Header,
    KeyAdvert,
    MaskedInput,
    RoundResultNotice,
    RoundSetup,
    ShareKind,
    SurvivorSet,
    UnmaskRequest,
    UnmaskResponse,
    decode_payload,
)
from fedseal.protocol.types import SiteId, site_sort_key
from fedseal.sim.inmemory import DeterministicRandom

LIMITS = Limits()
site_ids = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12
).filter(lambda s: len(s.encode()) <= LIMITS.max_site_id_bytes)
sorted_sites = st.lists(site_ids, max_size=8, unique_by=site_sort_key).map(
    lambda xs: tuple(SiteId(s) for s in sorted(xs, key=site_sort_key))
)
digests = st.binary(min_size=32, max_size=32)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
headers = st.builds(
    Header,
    run_id=st.binary(min_size=16, max_size=16),
    round=u32,
    sender=site_ids.map(SiteId) | st.just(SiteId("")),
    recipient=site_ids.map(SiteId) | st.just(SiteId("")),
    model_digest=digests,
    setup_digest=digests,
)


def keyed(values):  # type: ignore[no-untyped-def]
    return sorted_sites.flatmap(
        lambda sites: st.tuples(*[values.map(lambda v, s=s: (s, v)) for s in sites])
    )


messages = st.one_of(
    st.builds(SurvivorSet, header=headers, survivors=sorted_sites),
    st.builds(
        KeyAdvert,
        header=headers,
        share_public=st.binary(min_size=65, max_size=65),
        mask_public=st.binary(min_size=65, max_size=65),
        seed_commitment=digests,
    ),
    st.builds(EncryptedShares, header=headers, items=keyed(st.binary(max_size=100))),
    st.builds(
        MaskedInput,
        header=headers,
        dataset_root=digests,
        example_count=u64,
        vector_length=u64,
        modulus_bits=st.sampled_from([32, 64]),
        clipped=u64,
        bulk_digest=digests,
    ),
    st.builds(ConsistencySignature, header=headers, signature=st.binary(max_size=72)),
    st.builds(
        UnmaskRequest,
        header=headers,
        survivors=sorted_sites,
        signatures=keyed(st.binary(max_size=72)),
        alive=sorted_sites,
        dropped=sorted_sites,
    ),
    st.builds(
        UnmaskResponse,
        header=headers,
        shares=keyed(st.tuples(st.sampled_from(list(ShareKind)), st.binary(max_size=50))).map(
            lambda items: tuple((s, k, b) for s, (k, b) in items)
        ),
    ),
    st.builds(
        RoundResultNotice,
        header=headers,
        survivors=sorted_sites,
        total_weight=u64,
        aggregate_digest=digests,
    ),
    st.builds(
        RoundSetup,
        header=headers,
        cohort=keyed(st.binary(max_size=91)).map(
            lambda items: tuple(CohortMember(s, d) for s, d in items)
        ),
        params=st.builds(
            RoundParameters,
            vector_length=u64,
            quantization=st.builds(
                QuantizationConfig,
                clip_micros=st.integers(1, 2**63 - 1),
                levels=st.integers(1, 2**31 - 1),
                modulus_bits=st.sampled_from([32, 64]),
            ),
            max_weight=u64,
            degree=st.integers(0, 2**16 - 1),
            threshold=st.integers(0, 2**16 - 1),
            min_survivors=st.integers(0, 2**16 - 1),
        ),
        expires_at=u64,
        attempt=st.integers(0, 2**16 - 1),
    ),
)


@given(message=messages)
def test_generated_messages_round_trip_through_their_canonical_payload(message) -> None:  # type: ignore[no-untyped-def]
    payload = message.to_payload()
    decoded = decode_payload(message.KIND, payload, LIMITS)
    assert decoded == message
    assert decoded.to_payload() == payload


@given(message=messages, cut=st.integers(1, 40))
def test_every_truncation_of_a_generated_message_is_refused(message, cut) -> None:  # type: ignore[no-untyped-def]
    payload = message.to_payload()
    try:
        decode_payload(message.KIND, payload[: max(0, len(payload) - cut)], LIMITS)
    except Exception as exc:
        from fedseal.protocol import DecodeError

        assert isinstance(exc, DecodeError)
    else:
        raise AssertionError("a truncated payload decoded")


@settings(max_examples=15)
@given(
    n=st.integers(2, 6),
    length=st.integers(1, 300),
    seed=st.binary(min_size=4, max_size=4),
    bits=st.sampled_from([32, 64]),
)
def test_pairwise_masks_cancel_exactly_in_the_sum(n, length, seed, bits) -> None:  # type: ignore[no-untyped-def]
    rand = DeterministicRandom(seed)
    sites = [SiteId(f"s{i}") for i in range(n)]
    keys = {s: AgreementKey.generate(rand) for s in sites}
    dtype = np.uint32 if bits == 32 else np.uint64
    total = np.zeros(length, dtype=dtype)
    for i in sites:
        for j in sites:
            if i == j:
                continue
            s_ij = pairwise_seed(keys[i], keys[j].public_bytes(), b"r" * 16, 1, i, j)
            assert s_ij == pairwise_seed(keys[j], keys[i].public_bytes(), b"r" * 16, 1, j, i)
            add_mask_into(total, s_ij, domain=PAIR_DOMAIN, negate=pair_sign_negative(i, j))
    assert not total.any()


def test_seed_commitments_bind_run_round_site_and_seed() -> None:
    base = seed_commitment(b"r" * 16, 1, SiteId("a"), b"s" * 32)
    assert base != seed_commitment(b"q" * 16, 1, SiteId("a"), b"s" * 32)
    assert base != seed_commitment(b"r" * 16, 2, SiteId("a"), b"s" * 32)
    assert base != seed_commitment(b"r" * 16, 1, SiteId("b"), b"s" * 32)
    assert base != seed_commitment(b"r" * 16, 1, SiteId("a"), b"t" * 32)
