"""Check counters kept per thread and summed when Prometheus scrapes.

prometheus_client's Counter and Histogram take a lock and walk the buckets in Python on every
observation (≈ 1.5 µs per check measured); inside a loaded one-core server every microsecond on
the RPC thread costs two or three. Here each RPC thread owns a plain list it alone writes, so an
observation is a few list increments with no lock and no lost updates; the collector adds the
lists up at scrape time, under the names and labels the dashboards use
(``spauth_decisions_total{outcome,reason}``, ``spauth_check_duration_seconds``)."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

DECISIONS_NAME = "spauth_decisions"
DURATION_NAME = "spauth_check_duration_seconds"


class CheckTally(Collector):
    """Counts by (outcome, reason) label pair and a latency histogram, one slot list per
    thread. ``labels`` fixes the exported series (all exported from the first scrape, so
    ``rate()`` has a baseline); ``index(outcome, reason)`` gives the slot to pass to ``count``."""

    def __init__(self, labels: Sequence[tuple[str, str]], buckets: Sequence[float]) -> None:
        self._labels = tuple(labels)
        self._slot = {pair: i for i, pair in enumerate(self._labels)}
        self._bounds = tuple(buckets)
        # Per thread: [count per label pair..., count per bucket..., +Inf count, sum].
        self._width = len(self._labels) + len(self._bounds) + 2
        self._local = threading.local()
        self._lists: list[list[float]] = []
        self._sources: list[Callable[[], Sequence[float] | None]] = []
        self._lock = threading.Lock()  # guards _lists (a thread's first check; scrapes)

    @property
    def bounds(self) -> tuple[float, ...]:
        return self._bounds

    @property
    def width(self) -> int:
        """Slots per list: label pairs, buckets, +Inf, sum."""
        return self._width

    def add_source(self, source: Callable[[], Sequence[float] | None]) -> None:
        """Counts kept elsewhere in this layout (the compiled Check path's, kept in C), added
        to every scrape; ``source`` returns None when it counts nothing."""
        with self._lock:
            self._sources.append(source)

    def index(self, outcome: str, reason: str) -> int:
        return self._slot[(outcome, reason)]

    def _mine(self) -> list[float]:
        try:
            mine: list[float] = self._local.slots
        except AttributeError:
            mine = [0.0] * self._width
            self._local.slots = mine
            with self._lock:
                self._lists.append(mine)
        return mine

    def count(self, slot: int, elapsed: float) -> None:
        """One check under label pair ``slot``; ``elapsed`` > 0 also goes in the histogram."""
        try:
            mine: list[float] = self._local.slots
        except AttributeError:
            mine = self._mine()
        mine[slot] += 1
        if elapsed > 0.0:
            base = len(self._labels)
            mine[base + bisect_left(self._bounds, elapsed)] += 1
            mine[-1] += elapsed

    def totals(self) -> list[float]:
        """Every thread's slots added up (what a scrape reports)."""
        with self._lock:
            lists: list[Sequence[float]] = list(self._lists)
            sources = list(self._sources)
        lists += [counted for counted in (source() for source in sources) if counted is not None]
        out = [0.0] * self._width
        for slots in lists:
            for i, value in enumerate(slots[:]):  # a copy: the owner may be writing
                out[i] += value
        return out

    def collect(self) -> Iterator[Metric]:
        totals = self.totals()
        decisions = CounterMetricFamily(
            DECISIONS_NAME,
            "Checks decided, by outcome (allow|deny|error) and reason code.",
            labels=("outcome", "reason"),
        )
        for i, pair in enumerate(self._labels):
            decisions.add_metric(pair, totals[i])
        yield decisions
        base = len(self._labels)
        cumulative, running = [], 0.0
        for i, bound in enumerate((*self._bounds, float("inf"))):
            running += totals[base + i]
            cumulative.append((_le(bound), running))
        yield HistogramMetricFamily(
            DURATION_NAME,
            "Time to decide and answer one Envoy Check, in the sidecar.",
            buckets=cumulative,
            sum_value=totals[-1],
        )


def _le(bound: float) -> str:
    """Bucket bounds as prometheus_client writes them (``+Inf``, ``0.0005``)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))
