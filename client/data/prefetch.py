"""Bounded read-ahead: run an iterator in a background thread, a bounded queue in between.

Example::

    for x, y in read_ahead(decoded_batches(), max_items=4, max_bytes=64 << 20, size=nbytes):
        ...   # the next batches are read and decoded while this one is used

The reader thread pulls items from the source while fewer than ``max_items`` are queued and the
queued items total at most ``max_bytes`` (:func:`nbytes` of each); one item always fits, however
large. So what is in flight is at most ``max_items`` queued items (at most ``max_bytes``, or one
item), plus the one item the reader is producing, plus the one the consumer holds. pyarrow and
numpy release the GIL while they decompress and convert, so reading and decoding overlap with
the consumer's work (shuffling, batching, training). Items come out in the source's order; an
error in the source is raised in the consumer at the point it happened; closing the consumer
(``break``, garbage collection) stops the reader and closes the source before returning.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator
from typing import TypeVar

import numpy as np
import numpy.typing as npt

__all__ = ["nbytes", "read_ahead"]

T = TypeVar("T")


def nbytes(item: tuple[npt.NDArray[np.generic], ...]) -> int:
    """Bytes of a tuple of numpy arrays (the loader's decoded ``(features, labels)``)."""
    return sum(int(a.nbytes) for a in item)


class _State:
    """What the reader and the consumer share (guarded by their condition variable)."""

    def __init__(self) -> None:
        self.queued = 0  # bytes of the queued items
        self.done = False  # the reader has finished (source exhausted, failed or stopped)
        self.stop = False  # the consumer has gone
        self.error: BaseException | None = None


def read_ahead(
    source: Iterator[T], *, max_items: int, max_bytes: int, size: Callable[[T], int]
) -> Generator[T, None, None]:
    """``source``'s items, produced up to ``max_items`` / ``max_bytes`` ahead by a thread.

    ``max_items == 0`` reads synchronously (no thread, nothing ahead).

    Raises:
        ValueError: ``max_items`` or ``max_bytes`` is negative.
        Exception: Whatever ``source`` raises, re-raised here.
    """
    if max_items < 0 or max_bytes < 0:
        raise ValueError("max_items and max_bytes must be >= 0")
    if max_items == 0:
        yield from source
        return
    cond = threading.Condition()
    queue: deque[tuple[T, int]] = deque()
    state = _State()

    def room(need: int) -> bool:
        return not queue or (len(queue) < max_items and state.queued + need <= max_bytes)

    def produce() -> None:
        try:
            for item in source:
                need = size(item)
                with cond:
                    cond.wait_for(lambda: state.stop or room(need))  # noqa: B023
                    if state.stop:
                        return
                    queue.append((item, need))
                    state.queued += need
                    cond.notify_all()
        except BaseException as exc:  # re-raised in the consumer
            with cond:
                state.error = exc
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
            with cond:
                state.done = True
                cond.notify_all()

    thread = threading.Thread(target=produce, name="fedseal-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            with cond:
                cond.wait_for(lambda: bool(queue) or state.done)
                if queue:
                    item, need = queue.popleft()
                    state.queued -= need
                    cond.notify_all()
                elif state.error is not None:
                    raise state.error
                else:
                    return
            yield item
    finally:
        with cond:
            state.stop = True
            cond.notify_all()
        thread.join()
