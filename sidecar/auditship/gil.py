"""The audit pipeline's long loops hand the GIL over between slices.

A Python thread keeps the GIL until it blocks or another thread has waited a switch interval
(5 ms) for it. The shipper's loops over a batch (parsing ≈ 500 spool frames, framing them into
an ingest request) held it ≈ 1 ms each in one go, twice a second at 1,000 checks/s: a check that
arrived meanwhile waited for the rest (docs/performance.md, "The sidecar's own tail"). Between
slices of ``SLICE_RECORDS`` records these loops call :func:`let_go`, which releases the GIL so a
waiting RPC thread takes it. Same bytes, same total work."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

# Records per slice: ≈ 100-130 µs of Python on this machine's loaded 2 cores (≈ 2 µs a record
# unloaded to parse a frame, ≈ 1 µs to frame one). 0 never lets go (one slice per loop).
SLICE_RECORDS = 64


def let_go() -> None:
    """Release the GIL and take it back: a thread waiting for it runs first."""
    time.sleep(0)


def slices(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """``items`` in slices of ``SLICE_RECORDS``, letting go of the GIL between two slices."""
    size = SLICE_RECORDS or len(items) or 1
    for start in range(0, len(items), size):
        if start:
            let_go()
        yield items[start : start + size]
