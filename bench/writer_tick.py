"""The audit writer's 10 ms tick as a paced check sees it (``python -m bench.writer_tick``).

A real ``AuditPipeline`` (the compiled Check path's ``AuditBuffer`` as its store, the writer
thread as shipped, ``write_interval`` 10 ms, no shipper) in this process, pinned to CPU 0; one
thread queues a ``--bytes``-byte encoded record (a denial, as the C path queues them)
``--rate`` times a second from its due time (``bench.tail_inprocess.paced``: ten records a tick
at 1,000/s). Per run: the writer thread's whole CPU per tick (its ``schedstat``: waking, the
flush, going back to sleep), the flush's CPU p50 (it includes the ``os.write``, which lets go of
the GIL), how many checks were due during a flush and how late they ran against the others.

It uses only what main has too, so the A/B of docs/performance.md ("The audit writer's tick")
runs this file against either tree: ``PYTHONPATH=<tree> <tree>/.venv/bin/python
bench/writer_tick.py``. Not a test: timings on a shared machine are noise; nothing asserts on
them."""

from __future__ import annotations

import argparse
import bisect
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.tail_inprocess import paced

SERVER_CPU = 0


def run(seconds: float, rate: float, size: int) -> dict[str, Any]:
    from sidecar.auditship.pipeline import AuditPipeline, ShipConfig

    _fastcheck: Any = importlib.import_module("sidecar.dataplane._fastcheck")
    pipeline = AuditPipeline(ShipConfig(spool_dir=Path(tempfile.mkdtemp())), None)
    buffer = _fastcheck.AuditBuffer(pipeline.queue.capacity, pipeline.queue.deny_limit)
    pipeline.queue.use_store(buffer)
    cpu: list[float] = []
    spans: list[tuple[float, float]] = []
    flush = pipeline.flush

    def timed(*, sync: bool = True) -> int:
        c0, t0 = time.thread_time(), time.perf_counter()
        try:
            return flush(sync=sync)
        finally:
            spans.append((t0, time.perf_counter()))
            cpu.append((time.thread_time() - c0) * 1e6)

    pipeline.flush = timed  # type: ignore[method-assign]
    pipeline.start()
    writer = pipeline._threads[0]

    def writer_ns() -> int:
        with open(f"/proc/self/task/{writer.native_id}/schedstat") as fh:
            return int(fh.read().split()[0])

    record = os.urandom(size)

    def check() -> object:
        return buffer.put(record, False)

    try:
        paced(check, rate, 1.0)  # warm
        cpu.clear()
        spans.clear()
        e0 = writer_ns()
        samples = paced(check, rate, seconds)
        e1 = writer_ns()
        ticks = len(cpu)
    finally:
        pipeline.close(timeout=2.0)
    starts = [start for start, _ in spans]
    during: list[float] = []
    others: list[float] = []
    for due, wait in zip(samples.due, samples.late, strict=True):
        i = bisect.bisect_right(starts, due) - 1
        (during if i >= 0 and due <= spans[i][1] else others).append(wait)
    late = sorted(samples.late)
    return {
        "writer cpu per tick": round((e1 - e0) / 1e3 / max(ticks, 1), 1),
        "flush cpu p50": round(statistics.median(cpu), 1),
        "ticks": ticks,
        "checks due during a flush": len(during),
        "their late mean": round(statistics.mean(during), 1) if during else None,
        "others' late median": round(statistics.median(others), 1),
        "late p99": round(late[int(len(late) * 0.99)], 1),
        "load": round(os.getloadavg()[0], 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.writer_tick", description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--bytes", type=int, default=330, help="one encoded record's size")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {SERVER_CPU})
    print(json.dumps(run(args.seconds, args.rate, args.bytes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
