"""Control-plane CPU per stored decision record (``cp_cpu_us_per_record``).

A sidecar as shipped sends a decision record for every check to its control plane, which runs
off the server CPUs, so its work shows in no row's server CPU. Around each saturation rep the
runner reads the control plane's CPU (utime + stime of its process tree, as for the server) and
how many records it has stored, and waits, after the load, until the records the rep produced
are stored (:func:`settle`): records still in the sidecar's spool would otherwise be counted in
the next window, or not at all, and their ingest would run during the next ceiling rep.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.cpu import tree_cpu_seconds
from bench.targets import IngestMeter

# The shipper sends everything spooled, then sleeps 0.5 s when the spool is empty
# (sidecar.auditship.pipeline ship_interval): a count unchanged for twice that is settled.
QUIET_S = 1.0
# Never wait longer than this for a backlog (a control plane that stopped ingesting).
SETTLE_LIMIT_S = 30.0
POLL_S = 0.05


def settle(meter: IngestMeter, expected: int) -> tuple[int, bool, float]:
    """Wait until ``meter`` has stored ``expected`` records, or its count stopped moving for
    QUIET_S (records sampled out or dropped never arrive), or SETTLE_LIMIT_S passed; return
    (stored, whether ``expected`` was reached, seconds waited)."""
    start = time.monotonic()
    stored = meter.stored()
    changed = start
    while stored < expected:
        now = time.monotonic()
        if now - changed >= QUIET_S or now - start >= SETTLE_LIMIT_S:
            break
        time.sleep(POLL_S)
        count = meter.stored()
        if count != stored:
            stored, changed = count, time.monotonic()
    return stored, stored >= expected, round(time.monotonic() - start, 3)


class IngestWindow:
    """The control plane's CPU and stored records from construction to :meth:`close`."""

    def __init__(self, meter: IngestMeter) -> None:
        self._meter = meter
        self._start = time.monotonic()
        self._cpu = tree_cpu_seconds(meter.pids)
        self._stored = meter.stored()

    def close(self, checks: int) -> dict[str, Any]:
        """Settle (``checks`` records are expected: one per check), then the figures."""
        stored, settled, waited = settle(self._meter, self._stored + checks)
        cpu = tree_cpu_seconds(self._meter.pids) - self._cpu
        records = stored - self._stored
        return {
            "cp_records": records,
            "cp_cpu_us_per_record": round(cpu / records * 1e6, 1) if records else None,
            "cp_cpu_util": round(cpu / (time.monotonic() - self._start), 3),
            "cp_settle_s": waited,
            "cp_settled": settled,
        }


def after_load(meter: IngestMeter | None, stored_before: int | None, checks: int) -> None:
    """After an unmetered load run (warm-up, fixed rate, one at a time): let its records be
    stored before the next measurement starts."""
    if meter is not None and stored_before is not None:
        settle(meter, stored_before + checks)


def stored_now(meter: IngestMeter | None) -> int | None:
    """The meter's count, or None without a meter."""
    return None if meter is None else meter.stored()


def summary(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """The row's figures: the median CPU per record over the reps, total records and whether
    every rep's records were all stored before it was read."""
    per_record = [r["cp_cpu_us_per_record"] for r in reps if r["cp_cpu_us_per_record"]]
    return {
        "cp_cpu_us_per_record": round(statistics.median(per_record), 1) if per_record else None,
        "cp_cpu_util": round(statistics.median(r["cp_cpu_util"] for r in reps), 3),
        "cp_records": sum(r["cp_records"] for r in reps),
        "cp_settled": all(r["cp_settled"] for r in reps),
    }
