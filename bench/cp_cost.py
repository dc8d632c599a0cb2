"""Control-plane CPU per stored decision record (``cp_cpu_us_per_record``).

A sidecar as shipped sends a decision record for every check to its control plane, which runs
off the server CPUs, so its work shows in no row's server CPU. Around each saturation rep the
runner reads the control plane's CPU (utime + stime of its process tree, as for the server) and
its own ingest counters from its ``/metrics`` (``spauth_audit_ingested_records_total`` and
``spauth_audit_ingest_refused_records_total{reason}``, docs/operating.md), and waits, after the
load, until the records the rep produced have arrived (:func:`settle`): records still in the
sidecar's spool would otherwise be counted in the next window, or not at all, and their ingest
would run during the next ceiling rep. The database's count (the highest ``seq``) is what the
wait polls (:func:`progress`) and a cross-check (``cp_db_records``: it should equal
``cp_records``).

Its CPU per record splits in two (:func:`background_util`): the control plane's work with no
records arriving (its sweeper, webhook polling, replication heartbeats, usage reports, gRPC's
own timers), read once per control plane for BACKGROUND_S before its first window, and what is
left, charged to ingest (``cp_ingest_cpu_us_per_record``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.cpu import tree_cpu_seconds
from bench.targets import IngestCount, IngestMeter

INGESTED = "spauth_audit_ingested_records"  # counters, as families (without _total)
REFUSED = "spauth_audit_ingest_refused_records"
# The shipper sends everything spooled, then sleeps 0.5 s when the spool is empty
# (sidecar.auditship.pipeline ship_interval): a count unchanged for twice that is settled.
QUIET_S = 1.0
# Never wait longer than this for a backlog (a control plane that stopped ingesting).
SETTLE_LIMIT_S = 30.0
# Each poll is a /metrics scrape the control plane serves (CPU counted in the window): few.
POLL_S = 0.1
# How long the background is read, once per control plane (CPU ticks are 10 ms: ±0.5 %).
BACKGROUND_S = 2.0
_background: dict[tuple[int, ...], float] = {}


def scrape(http: str) -> IngestCount:
    """The ingest counters on the control plane's ``/metrics`` at ``http`` (host:port)."""
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    stored, refused = 0, {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            if family.name == INGESTED:
                stored = int(sample.value)
            elif family.name == REFUSED:
                refused[sample.labels["reason"]] = int(sample.value)
    return IngestCount(stored, refused)


def db_records(db: Path) -> int:
    """Audit records ever stored in a control plane's SQLite file: the highest ``seq`` (an
    AUTOINCREMENT key, so deletions cannot lower it; one index lookup, however large the
    table). Read-only: the bench must not take the writer's lock."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        (seq,) = conn.execute("SELECT coalesce(max(seq), 0) FROM audit_events").fetchone()
    return int(seq)


def meter(pid: int, http: str, db: Path | None = None) -> IngestMeter:
    """The control plane ``pid`` serving ``/metrics`` on ``http``, its SQLite file ``db`` as the
    cross-check."""
    return IngestMeter([pid], lambda: scrape(http), None if db is None else lambda: db_records(db))


def arrived(count: IngestCount) -> int:
    """Records the control plane has handled: stored or refused (a refused one arrived too)."""
    return count.stored + sum(count.refused.values())


def progress(meter: IngestMeter) -> int:
    """How far ingest has got, for waiting on it: the database's count when the meter has one,
    since polling it costs the control plane nothing, while each ``/metrics`` scrape costs it
    ≈ 2.2-2.8 ms of CPU (measured here), charged to the records of the window it falls in."""
    return meter.cross_check() if meter.cross_check is not None else arrived(meter.read())


def settle(meter: IngestMeter, expected: int) -> tuple[int, bool, float]:
    """Wait until :func:`progress` reaches ``expected``, or stops moving for QUIET_S (records
    sampled out, dropped or refused never reach the database), or SETTLE_LIMIT_S passed; return
    (the last progress, whether ``expected`` was reached, seconds waited)."""
    start = time.monotonic()
    done = progress(meter)
    changed = start
    while done < expected:
        now = time.monotonic()
        if now - changed >= QUIET_S or now - start >= SETTLE_LIMIT_S:
            break
        time.sleep(POLL_S)
        latest = progress(meter)
        if latest != done:
            done, changed = latest, time.monotonic()
    return done, done >= expected, round(time.monotonic() - start, 3)


def background_util(meter: IngestMeter, seconds: float = BACKGROUND_S) -> float:
    """The control plane's CPU (in cores) while no records arrive, read over ``seconds`` the
    first time it is asked for a meter's processes and remembered: the first window opens
    after the warm-up's records have all arrived (:func:`after_load`), so nothing is being
    ingested then, and the sidecar is connected (its heartbeats and usage reports count)."""
    key = tuple(meter.pids)
    if key not in _background:
        cpu, start = tree_cpu_seconds(meter.pids), time.monotonic()
        time.sleep(seconds)
        _background[key] = (tree_cpu_seconds(meter.pids) - cpu) / (time.monotonic() - start)
    return _background[key]


class IngestWindow:
    """The control plane's CPU and ingest counters from construction to :meth:`close`. Its
    ``/metrics`` is scraped just outside the CPU window (before it opens, after it closes)."""

    def __init__(self, meter: IngestMeter) -> None:
        self._background = background_util(meter)
        self._meter = meter
        self._count = meter.read()
        self._progress = progress(meter)
        self._db = meter.cross_check() if meter.cross_check is not None else None
        self._start = time.monotonic()
        self._cpu = tree_cpu_seconds(meter.pids)

    def close(self, checks: int) -> dict[str, Any]:
        """Settle (``checks`` records are expected: one per check), then the figures."""
        _, settled, waited = settle(self._meter, self._progress + checks)
        cpu = tree_cpu_seconds(self._meter.pids) - self._cpu
        elapsed = time.monotonic() - self._start
        count = self._meter.read()
        records = count.stored - self._count.stored
        refused = {
            reason: n - self._count.refused.get(reason, 0)
            for reason, n in count.refused.items()
            if n != self._count.refused.get(reason, 0)
        }
        ingest = max(cpu - self._background * elapsed, 0.0)
        out: dict[str, Any] = {
            "cp_records": records,
            "cp_refused": refused,
            "cp_cpu_us_per_record": round(cpu / records * 1e6, 1) if records else None,
            # The same without the background's share of the window.
            "cp_ingest_cpu_us_per_record": round(ingest / records * 1e6, 1) if records else None,
            "cp_cpu_util": round(cpu / elapsed, 3),
            "cp_background_cpu_util": round(self._background, 4),
            "cp_settle_s": waited,
            # Records reached the control plane (stored or refused) before the figures were read.
            "cp_settled": settled or arrived(count) - arrived(self._count) >= checks,
        }
        if self._db is not None and self._meter.cross_check is not None:
            out["cp_db_records"] = self._meter.cross_check() - self._db
        return out


def after_load(meter: IngestMeter | None, before: int | None, checks: int) -> None:
    """After an unmetered load run (warm-up, fixed rate, one at a time): let its records
    arrive before the next measurement starts."""
    if meter is not None and before is not None:
        settle(meter, before + checks)


def count_now(meter: IngestMeter | None) -> int | None:
    """The meter's :func:`progress`, or None without a meter."""
    return None if meter is None else progress(meter)


def summary(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """The row's figures: the median CPU per record over the reps, total records stored and
    refused, and whether every rep's records had all arrived before it was read."""
    refused: dict[str, int] = {}
    for r in reps:
        for reason, n in r["cp_refused"].items():
            refused[reason] = refused.get(reason, 0) + n
    out = {
        "cp_cpu_us_per_record": _median(reps, "cp_cpu_us_per_record"),
        "cp_ingest_cpu_us_per_record": _median(reps, "cp_ingest_cpu_us_per_record"),
        "cp_cpu_util": round(statistics.median(r["cp_cpu_util"] for r in reps), 3),
        "cp_background_cpu_util": reps[0]["cp_background_cpu_util"],
        "cp_records": sum(r["cp_records"] for r in reps),
        "cp_refused": refused,
        "cp_settled": all(r["cp_settled"] for r in reps),
    }
    if all("cp_db_records" in r for r in reps):
        out["cp_db_records"] = sum(r["cp_db_records"] for r in reps)
    return out


def _median(reps: list[dict[str, Any]], key: str) -> float | None:
    # 0.0 is a measurement (the CPU clock ticks every 10 ms: a short rep can see none).
    values = [r[key] for r in reps if r.get(key) is not None]
    return round(statistics.median(values), 1) if values else None
