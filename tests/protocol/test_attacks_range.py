"""An out-of-range input must not wrap the field unnoticed: the coordinator range-checks the
unmasked aggregate against ``levels * (sum of the survivors' signed example counts)``.

The attack reproduced on main before the check: one enrolled site added ``2**31`` to one
element of its masked vector and re-signed it with its own key; every signature and digest
verified, the masks cancelled, and the round committed a mean of thousands of clip units.
"""

from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
import pytest

from fedseal.protocol import LocalUpdate, Packet
from fedseal.protocol.errors import AggregateOutOfRangeError
from fedseal.protocol.messages import MaskedInput
from fedseal.protocol.server import ServerStage, check_aggregate_range
from fedseal.protocol.types import SiteId
from fedseal.sim.inmemory import Behaviour, dataset_root_for
from tests.protocol._support import (
    expected_sum,
    make_config,
    make_fed,
    open_any,
    replace,
    resign,
    weight_of,
)

ATTACKER = "site-001"


class ShiftMaskedInput(Behaviour):
    """``site`` adds ``offsets[i]`` (mod 2^b) to element ``i`` of the masked vector its honest
    session produced, then re-signs the masked input (new bulk digest) with its real key."""

    def __init__(self, site: str, offsets: dict[int, int]) -> None:
        self.site, self.offsets = site, offsets

    def site_replies(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
        if stage is not ServerStage.MASKED_INPUT or site != self.site:
            return (packet,)
        _, message = open_any(packet.payload)
        assert isinstance(message, MaskedInput)
        bulk = packet.bulk.copy()
        modulus = 1 << (8 * bulk.dtype.itemsize)
        for i, offset in self.offsets.items():
            bulk[i] = (int(bulk[i]) + offset) % modulus
        forged = replace(message, bulk_digest=hashlib.sha256(bulk.data).digest())
        return (Packet(resign(forged, fed.site_keys[SiteId(site)]), bulk),)


def _signed(values: np.ndarray) -> np.ndarray:
    return values.view(np.int32 if values.dtype == np.uint32 else np.int64).astype(np.int64)


def _bound(fed, survivors) -> int:  # type: ignore[no-untyped-def]
    return fed.config.quantization.levels * sum(weight_of(s) for s in survivors)


@pytest.mark.parametrize("bits", [32, 64])
def test_a_site_that_adds_half_the_modulus_and_re_signs_makes_the_round_abandoned(
    bits: int,
) -> None:
    offset = 1 << (bits - 1)
    fed, _ = make_fed(
        5, config=make_config(16, bits=bits), behaviour=ShiftMaskedInput(ATTACKER, {3: offset})
    )
    outcome = fed.run_round(1)
    # Every message verified: the attacker's forged input was accepted like an honest one ...
    assert not [r for r in outcome.server.rejections if r.site == ATTACKER]
    assert ATTACKER in outcome.server.survivors
    # ... and the round is abandoned by the range check, with no result.
    assert outcome.result is None
    assert isinstance(outcome.failure, AggregateOutOfRangeError)
    assert outcome.server.stage is ServerStage.FAILED
    err = outcome.failure
    assert err.count == 1
    assert err.bound == _bound(fed, fed.sites)
    assert abs(err.worst) > err.bound and abs(err.worst) >= (1 << (bits - 1)) - err.bound
    assert err.round == 1 and err.stage == ServerStage.UNMASK.value
    assert "1 of 16 elements" in err.message
    with pytest.raises(AggregateOutOfRangeError):
        outcome.server.result  # the property re-raises the failure


def test_every_offending_element_is_counted_and_the_worst_one_named() -> None:
    fed, _ = make_fed(
        5, behaviour=ShiftMaskedInput(ATTACKER, {0: 1 << 31, 5: 1 << 30, 9: -(1 << 30)})
    )
    outcome = fed.run_round(1)
    assert isinstance(outcome.failure, AggregateOutOfRangeError)
    assert outcome.failure.count == 3
    assert abs(outcome.failure.worst) > (1 << 30)


def test_one_past_the_bound_is_caught_and_exactly_the_bound_passes() -> None:
    """The check is on the sum: an offset that lands an element just past the bound is caught;
    one that lands exactly on it is indistinguishable from honest inputs (documented)."""
    fed, updates = make_fed(5)
    honest = _signed(expected_sum(fed, updates, fed.sites, 1))
    bound = _bound(fed, fed.sites)

    fed, updates = make_fed(
        5, behaviour=ShiftMaskedInput(ATTACKER, {2: bound + 1 - int(honest[2])})
    )
    outcome = fed.run_round(1)
    assert isinstance(outcome.failure, AggregateOutOfRangeError)
    assert (outcome.failure.count, outcome.failure.worst) == (1, bound + 1)

    fed, updates = make_fed(5, behaviour=ShiftMaskedInput(ATTACKER, {2: -bound - int(honest[2])}))
    outcome = fed.run_round(1)
    assert outcome.result is not None, outcome.failure
    assert int(_signed(outcome.result.aggregate)[2]) == -bound


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["plus-clip", "minus-clip"])
def test_an_honest_round_at_the_exact_bound_edge_passes(sign: float) -> None:
    """Every site at +-clip (and beyond: clipped) with the maximum weight, with the levels chosen
    so that n * levels * max_weight is as close to 2^31 as the parameters allow."""
    n, length = 5, 40
    config = make_config(length, levels=((1 << 31) - 1) // (n * 64), clip=1.0)
    fed, _ = make_fed(n, config=config)
    values = np.full(length, sign, np.float64)
    values[::3] *= 7.5  # beyond the clip bound: clipped to +-clip, counted
    fed.updates = lambda site, info: LocalUpdate(values, config.max_weight, dataset_root_for(site))
    outcome = fed.run_round(1)
    assert outcome.result is not None, outcome.failure
    bound = config.quantization.levels * n * config.max_weight
    assert bound == 2_147_483_520
    assert np.array_equal(_signed(outcome.result.aggregate), np.full(length, int(sign) * bound))
    np.testing.assert_allclose(outcome.result.weighted_mean, np.full(length, sign))
    assert outcome.result.clipped_total == n * len(values[::3])


def test_the_checker_reads_the_sum_as_signed() -> None:
    total = np.array([5, (1 << 32) - 5, 0, 6], np.uint32)
    check_aggregate_range(total[:3], 5)
    with pytest.raises(AggregateOutOfRangeError) as err:
        check_aggregate_range(total, 5)
    assert (err.value.count, err.value.worst, err.value.bound) == (1, 6, 5)
    with pytest.raises(AggregateOutOfRangeError) as err:
        check_aggregate_range(np.array([1 << 63, 3], np.uint64), 3)
    assert (err.value.count, err.value.worst) == (1, -(1 << 63))
    with pytest.raises(ValueError):
        check_aggregate_range(np.zeros(3, np.int32), 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("in_range", [True, False])
def test_the_check_of_a_large_aggregate_allocates_no_copy_of_it(in_range: bool) -> None:
    total = np.zeros(1 << 22, np.uint32)  # 16 MiB
    total[::7] = 1000
    if not in_range:
        total[123_456] = 1 << 31
    tracemalloc.start()
    try:
        if in_range:
            check_aggregate_range(total, 1000)
        else:
            with pytest.raises(AggregateOutOfRangeError):
                check_aggregate_range(total, 1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < total.nbytes // 16  # chunk-sized temporaries at most
