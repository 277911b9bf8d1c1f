"""Crypto benchmark: mask PRG, Shamir sharing and Merkle roots vs baselines in the same run.

``python -m bench crypto [--repeat N]``

* PRG: values/s of ``fedseal.crypto.prg.expand`` / ``add_mask_into`` for 10M uint32 values vs
  the raw AES-256-CTR keystream they are built on (``cryptography`` ``update_into`` into a
  preallocated buffer, one call and in chunks) and vs Flower 1.42's
  ``secaggplus_utils.pseudo_rand_gen``.
* Shamir: split a 32-byte secret into 100 shares, threshold 51, and combine, vs Flower's
  ``secure_aggregation.crypto.shamir``.
* Merkle: root over 1M leaf hashes vs the bare loop of the same number of ``hashlib.sha256``
  calls (the floor for any hashlib-based implementation).

Timings are best-of-N wall-clock times.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import time
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedseal.crypto import merkle, prg, shamir

N_VALUES = 10_000_000
CHUNK = prg.CHUNK_BYTES  # the same chunk size as fedseal.crypto.prg


def race(repeat: int, fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Best-of-``repeat`` times, running the candidates round-robin so that load changes on a
    shared machine hit all of them alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def bench_prg(repeat: int) -> list[tuple[str, float, float]]:
    seed = os.urandom(32)
    key = prg.derive_stream_key(seed, b"bench")
    out = np.empty(N_VALUES, dtype=np.uint32)
    acc = np.zeros(N_VALUES, dtype=np.uint32)
    nbytes = N_VALUES * 4
    full_zeros = bytes(nbytes)
    chunk_zeros = memoryview(bytes(CHUNK))

    def raw_one_call() -> None:
        enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        enc.update_into(full_zeros, out.data.cast("B"))

    def raw_chunked() -> None:
        enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        view = out.data.cast("B")
        for start in range(0, nbytes, CHUNK):
            end = min(start + CHUNK, nbytes)
            enc.update_into(chunk_zeros[: end - start], view[start:end])

    fns: dict[str, Callable[[], object]] = {
        "raw AES-256-CTR keystream, one update_into": raw_one_call,
        f"raw AES-256-CTR keystream, {CHUNK // 1024} KiB chunks": raw_chunked,
        "fedseal prg.expand(out=preallocated)": lambda: prg.expand(
            seed, N_VALUES, domain=b"bench", out=out
        ),
        "fedseal prg.expand (allocates)": lambda: prg.expand(seed, N_VALUES, domain=b"bench"),
        "fedseal prg.add_mask_into": lambda: prg.add_mask_into(acc, seed, domain=b"bench"),
    }
    try:
        from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

        fns["Flower 1.42 pseudo_rand_gen (MT19937)"] = lambda: pseudo_rand_gen(
            seed, 1 << 32, [(N_VALUES,)]
        )
    except ImportError:
        print("(flwr not installed: Flower baseline skipped)")
    rows = list(race(repeat, fns).items())
    raw = min(rows[0][1], rows[1][1])
    return [(name, N_VALUES / t, raw / t) for name, t in rows]


def bench_shamir(repeat: int) -> list[tuple[str, float, float, float]]:
    secret = os.urandom(32)
    shares = shamir.split(secret, 51, 100)
    if shamir.combine(shares[:51], 51, 32) != secret:
        raise RuntimeError("fedseal shamir round trip failed")
    fns: dict[str, Callable[[], object]] = {
        "split": lambda: shamir.split(secret, 51, 100),
        "combine": lambda: shamir.combine(shares[:51], 51, 32),
        "combine_all": lambda: shamir.combine(shares, 51, 32),
    }
    try:
        from flwr.common.secure_aggregation.crypto import shamir as flwr_shamir

        fshares = flwr_shamir.create_shares(secret, 51, 100)
        if flwr_shamir.combine_shares(fshares[:51]) != secret:
            raise RuntimeError("Flower shamir round trip failed")
        fns["f_split"] = lambda: flwr_shamir.create_shares(secret, 51, 100)
        fns["f_combine"] = lambda: flwr_shamir.combine_shares(fshares[:51])
    except ImportError:
        print("(flwr not installed: Flower baseline skipped)")
    t = race(repeat, fns)
    rows = [
        ("fedseal split / combine(51 shares)", t["split"], t["combine"], 1.0),
        ("fedseal split / combine(all 100, checked)", t["split"], t["combine_all"], 1.0),
    ]
    if "f_split" in t:
        rows.append(
            ("Flower 1.42 create_shares / combine_shares(51)", t["f_split"], t["f_combine"], 1.0)
        )
        flower_total = t["f_split"] + t["f_combine"]
        rows = [(n, s, c, flower_total / (s + c)) for n, s, c, _ in rows]
    return rows


def bench_merkle(repeat: int) -> tuple[float, float]:
    n = 1 << 20
    hashes = [hashlib.sha256(i.to_bytes(8, "little")).digest() for i in range(n)]
    sha = hashlib.sha256
    msg = b"\x01" + bytes(64)
    rng = range(n - 1)

    def bare() -> None:
        for _ in rng:
            sha(msg).digest()

    t = race(
        max(1, repeat // 2), {"ours": lambda: merkle.root_from_leaf_hashes(hashes), "bare": bare}
    )
    return t["ours"], t["bare"]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench crypto")
    parser.add_argument("--repeat", type=int, default=5, help="best of N runs (default 5)")
    args = parser.parse_args(argv)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}\n"
    )

    prg_rows = bench_prg(args.repeat)
    print(f"### PRG: {N_VALUES:,} uint32 values\n")
    print("| generator | M values/s | vs raw keystream |")
    print("| --- | ---: | ---: |")
    for name, rate, ratio in prg_rows:
        print(f"| {name} | {rate / 1e6:,.0f} | {ratio:.2f}x |")
    by_name = {name: rate for name, rate, _ in prg_rows}
    flower = next((r for n, r, _ in prg_rows if n.startswith("Flower")), None)
    if flower:
        print(
            f"\nfedseal expand vs Flower: {by_name['fedseal prg.expand(out=preallocated)'] / flower:.1f}x; "
            f"add_mask_into vs Flower: {by_name['fedseal prg.add_mask_into'] / flower:.1f}x"
        )

    print("\n### Shamir: 32-byte secret, 100 shares, threshold 51\n")
    print("| implementation | split ms | combine ms | speed-up vs Flower (split+combine) |")
    print("| --- | ---: | ---: | ---: |")
    for name, s, c, ratio in bench_shamir(args.repeat):
        print(f"| {name} | {s * 1e3:.2f} | {c * 1e3:.2f} | {ratio:.0f}x |")

    ours, bare = bench_merkle(args.repeat)
    print("\n### Merkle root over 1,048,576 leaf hashes\n")
    print("| implementation | seconds | vs bare hashlib loop |")
    print("| --- | ---: | ---: |")
    print(f"| fedseal merkle.root_from_leaf_hashes | {ours:.3f} | {bare / ours:.2f}x |")
    print(f"| bare loop: 1,048,575 x sha256(65 bytes).digest() | {bare:.3f} | 1.00x |")
