"""Shared helpers for the protocol tests: small federations, expected sums, re-signing."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from fedseal.protocol import LocalUpdate, QuantizationConfig, RoundConfig
from fedseal.protocol.envelope import Envelope, seal
from fedseal.protocol.messages import Message, decode_payload
from fedseal.protocol.quantize import quantize
from fedseal.protocol.server import ServerStage
from fedseal.protocol.types import SiteId
from fedseal.sim.inmemory import Behaviour, Federation, dataset_root_for

LIMITS_DEFAULT = RoundConfig(
    vector_length=1, quantization=QuantizationConfig(1, 1), max_weight=1
).limits


def site_names(n: int) -> list[str]:
    return [f"site-{i:03d}" for i in range(n)]


def weight_of(site: str) -> int:
    return 1 + (int(site.rsplit("-", 1)[1]) * 7) % 50


class Updates:
    """Deterministic float updates per site (some values beyond the clip bound)."""

    def __init__(self, sites: Sequence[str], length: int, seed: int, scale: float = 0.4) -> None:
        rng = np.random.default_rng(seed)
        self.vectors = {SiteId(s): rng.standard_normal(length) * scale for s in sites}
        self.calls: list[SiteId] = []

    def __call__(self, site: SiteId, info: object) -> LocalUpdate:
        self.calls.append(site)
        return LocalUpdate(self.vectors[site], weight_of(site), dataset_root_for(site))


def rounding_rng_factory(seed: int):  # type: ignore[no-untyped-def]
    def make(site: SiteId) -> np.random.Generator:
        return np.random.default_rng([seed, int(site.rsplit("-", 1)[1])])

    return make


def make_config(
    length: int = 16, *, levels: int = 1 << 10, clip: float = 1.0, bits: int = 32, **kw: object
) -> RoundConfig:
    return RoundConfig(
        vector_length=length,
        quantization=QuantizationConfig.from_clip(clip, levels, bits),
        max_weight=64,
        **kw,  # type: ignore[arg-type]
    )


def make_fed(
    n: int = 5,
    *,
    length: int = 16,
    seed: int = 1,
    config: RoundConfig | None = None,
    dropouts: Mapping[ServerStage, Collection[str]] | None = None,
    behaviour: Behaviour | None = None,
    **kw: object,
) -> tuple[Federation, Updates]:
    sites = site_names(n)
    cfg = config if config is not None else make_config(length)
    updates = Updates(sites, cfg.vector_length, seed)
    fed = Federation(
        cfg,
        sites,
        seed=b"test-%d" % seed,
        updates=updates,
        rounding_rng=rounding_rng_factory(seed),
        dropouts=dropouts,
        behaviour=behaviour,
        **kw,  # type: ignore[arg-type]
    )
    return fed, updates


def expected_sum(
    fed: Federation, updates: Updates, survivors: Sequence[str], seed: int
) -> np.ndarray:
    """The plain modular sum of the survivors' quantized (unmasked) vectors."""
    q = fed.config.quantization
    make = rounding_rng_factory(seed)
    dtype = np.uint32 if q.modulus_bits == 32 else np.uint64
    total = np.zeros(fed.config.vector_length, dtype=dtype)
    for s in survivors:
        enc = quantize(updates.vectors[SiteId(s)], weight_of(s), q, make(SiteId(s)))
        np.add(total, enc.vector, out=total)
    return total


def precommit(fed: Federation, round: int = 1) -> dict[SiteId, bytes]:
    """Each site commits to a graph nonce as in an earlier round of the run (in its guard,
    ``fed.guards``); the commitments are what a coordinator then lists (``fed.commitments``)."""
    run_id = fed.run_id_for(round)
    for s in fed.sites:
        fed.commitments[s] = fed.guards[s].new_commitment(run_id, s, os.urandom)
    return dict(fed.commitments)


def open_any(data: bytes) -> tuple[Envelope, Message]:
    env = Envelope.from_bytes(data, LIMITS_DEFAULT)
    return env, decode_payload(env.kind, env.payload, LIMITS_DEFAULT)


def resign(message: Message, key) -> bytes:  # type: ignore[no-untyped-def]
    return seal(message, key)


def replace(message: Message, **changes: object) -> Message:
    return dataclasses.replace(message, **changes)  # type: ignore[arg-type]
