"""The reporter's Prometheus metrics, read at scrape time: what was reported, what waits, what
was dropped (the memory bound, or refused reports), and failed sends."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.usage.reporter import UsageReporter


class UsageMetrics(Collector):
    """spauth_usage_reported_total, spauth_usage_pending, spauth_usage_dropped_total,
    spauth_usage_report_failures_total."""

    def __init__(self, reporter: UsageReporter) -> None:
        self._reporter = reporter

    def collect(self) -> Iterator[Metric]:
        stats = self._reporter.stats()
        yield CounterMetricFamily(
            "spauth_usage_reported",
            "Credential uses acknowledged by the control plane (last used, daily counts).",
            value=stats.reported,
        )
        yield GaugeMetricFamily(
            "spauth_usage_pending",
            "Credential uses counted but not yet acknowledged by the control plane.",
            value=stats.pending,
        )
        yield CounterMetricFamily(
            "spauth_usage_dropped",
            "Credential uses not reported: over the memory bound, or refused by the control plane.",
            value=stats.dropped,
        )
        yield CounterMetricFamily(
            "spauth_usage_report_failures",
            "Usage reports that failed to send (resent later).",
            value=stats.failures,
        )
