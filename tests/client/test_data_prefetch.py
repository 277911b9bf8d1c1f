"""The loader's read-ahead: order kept, bounded in items and bytes, errors surface, closing stops it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import pytest

from fedseal.client.data.prefetch import nbytes, read_ahead


def _counted(n: int, produced: list[int], *, fail_at: int = -1) -> Iterator[int]:
    for i in range(n):
        if i == fail_at:
            raise ValueError(f"item {i} is corrupt")
        produced[0] += 1
        yield i


@pytest.mark.parametrize("max_items", [0, 1, 3])
def test_items_come_out_in_the_sources_order(max_items: int) -> None:
    produced = [0]
    got = list(
        read_ahead(
            _counted(50, produced), max_items=max_items, max_bytes=1 << 20, size=lambda _i: 1
        )
    )
    assert got == list(range(50))


def test_the_reader_never_runs_more_than_max_items_ahead_of_the_consumer() -> None:
    produced, ahead = [0], []
    stream = read_ahead(_counted(200, produced), max_items=3, max_bytes=1 << 20, size=lambda _i: 1)
    for consumed, _item in enumerate(stream, start=1):
        time.sleep(0.0005)  # let the reader run ahead as far as it may
        ahead.append(produced[0] - consumed)
    # queued items + the one the reader has produced and waits to queue
    assert max(ahead) <= 3 + 1
    assert max(ahead) >= 2  # it does read ahead


def test_the_queued_bytes_stay_under_max_bytes_but_one_large_item_always_passes() -> None:
    produced = [0]
    arrays = (np.zeros(1000, np.uint8) for _ in range(20))  # 1,000 bytes each
    ahead = []
    consumed = 0

    def source() -> Iterator[tuple[npt.NDArray[np.uint8]]]:
        for a in arrays:
            produced[0] += 1
            yield (a,)

    for _item in read_ahead(source(), max_items=100, max_bytes=2500, size=nbytes):
        consumed += 1
        time.sleep(0.001)
        ahead.append(produced[0] - consumed)
    assert consumed == 20
    assert max(ahead) <= 2 + 1  # two 1,000-byte items fit in 2,500 bytes, plus the one waiting
    big = list(
        read_ahead(iter([(np.zeros(10_000, np.uint8),)]), max_items=2, max_bytes=10, size=nbytes)
    )
    assert len(big) == 1


def test_an_error_in_the_source_is_raised_in_the_consumer_after_the_items_before_it() -> None:
    produced = [0]
    got: list[int] = []
    with pytest.raises(ValueError, match="item 7 is corrupt"):
        for item in read_ahead(
            _counted(20, produced, fail_at=7), max_items=4, max_bytes=1 << 20, size=lambda _i: 1
        ):
            got.append(item)
    assert got == list(range(7))


def test_leaving_the_stream_early_stops_the_reader_and_closes_the_source() -> None:
    closed = threading.Event()

    def source() -> Iterator[int]:
        try:
            yield from range(10_000)
        finally:
            closed.set()

    before = threading.active_count()
    stream = read_ahead(source(), max_items=2, max_bytes=1 << 20, size=lambda _i: 1)
    assert next(stream) == 0
    stream.close()
    assert closed.is_set()
    assert threading.active_count() == before
