"""The pipeline's Prometheus metrics, read at scrape time (nothing is counted twice)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.auditship.pipeline import AuditPipeline


class AuditMetrics(Collector):
    """spauth_audit_queue_depth, spauth_audit_spool_bytes, spauth_audit_dropped_total."""

    def __init__(self, pipeline: AuditPipeline) -> None:
        self._pipeline = pipeline

    def collect(self) -> Iterator[Metric]:
        stats = self._pipeline.stats()
        yield GaugeMetricFamily(
            "spauth_audit_queue_depth",
            "Audit records waiting for the spool writer.",
            value=stats.queue.depth,
        )
        yield GaugeMetricFamily(
            "spauth_audit_spool_bytes",
            "Spooled audit bytes not yet acknowledged.",
            value=stats.spool_bytes,
        )
        dropped = CounterMetricFamily(
            "spauth_audit_dropped",
            "Audit records dropped (queue or spool full, write error).",
            labels=["outcome"],
        )
        q = stats.queue
        dropped.add_metric(["allow"], q.dropped_allows + stats.spool_dropped_allows)
        dropped.add_metric(["deny"], q.dropped_denials)
        dropped.add_metric(["error"], stats.write_errors)
        yield dropped
        yield CounterMetricFamily(
            "spauth_audit_refused",
            "Audit records the control plane refused, kept in the spool's dead-letter file.",
            value=stats.shipper.rejected if stats.shipper is not None else 0,
        )
