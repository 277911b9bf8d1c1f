"""The federation benchmark's closing floor table: the arithmetic of the least a secure round
could take, and the per-site floor's pieces."""

from __future__ import annotations

import pytest

from bench.bench_federation import EXTRA_EXCHANGES, _fmt_floor
from bench.bench_protocol import site_floor


def test_site_floor_prices_every_piece_and_adds_them_up() -> None:
    floor = site_floor(40, 2_000)
    pieces = {k: v for k, v in floor.items() if k not in ("total, no verification", "verify one")}
    assert len(pieces) == 7
    assert any(k.startswith("2 key pairs + 64 ECDH") for k in pieces)  # degree 32 at N = 40 (the floor)
    assert all(v > 0 for v in floor.values())
    assert floor["total, no verification"] == pytest.approx(sum(pieces.values()))


def test_the_lowest_ratio_adds_the_spread_floor_and_the_extra_exchanges() -> None:
    plain = {"arm": "plain", "sites": 100, "params": 1000, "actors": 2, "round_eval_s": 2.0}
    secure = {"arm": "fedseal", "sites": 100, "params": 1000, "round_eval_s": 5.0}
    floors = {(100, 1000): {"total, no verification": 10.0}}
    table = _fmt_floor([plain, secure], floors, {100: 0.2, 10: 9.9})
    (row,) = [line for line in table.splitlines() if line.startswith("| 100 |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    lowest = 2.0 + 100 * 10.0 / 1000 / 2 + EXTRA_EXCHANGES * 0.2  # 2.0 + 0.5 + 0.6
    assert cells[3] == "0.200" and cells[5] == "0.50"
    assert cells[6] == f"{lowest:.2f}" and cells[7] == f"{lowest / 2.0:.2f}x"
    assert cells[8] == "2.50x"


def test_no_plain_arm_no_row() -> None:
    secure = {"arm": "fedseal", "sites": 10, "params": 10, "round_eval_s": 1.0}
    assert len(_fmt_floor([secure], {(10, 10): {"total, no verification": 1.0}}, {10: 0.1}).splitlines()) == 2


def test_no_noop_measurement_no_row() -> None:
    plain = {"arm": "plain", "sites": 10, "params": 10, "actors": 1, "round_eval_s": 1.0}
    assert len(_fmt_floor([plain], {(10, 10): {"total, no verification": 1.0}}, {}).splitlines()) == 2
