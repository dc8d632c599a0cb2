"""Sidecar side of the audit trail: decision records go ``record()`` → bounded queue → spool file
(batched fsync) → control plane (at-least-once, de-duplicated by id). The Check path only ever
calls ``AuditPipeline.record``, which never waits."""

from sidecar.auditship.pipeline import AuditPipeline, PipelineStats, ShipConfig
from sidecar.auditship.queue import AuditQueue
from sidecar.auditship.records import decision_event
from sidecar.auditship.shipper import Backoff, Shipper
from sidecar.auditship.spool import Spool
from sidecar.auditship.transport import (
    GrpcTransport,
    RecordsRefused,
    TrailTransport,
    Transport,
    TransportError,
)

__all__ = [
    "AuditPipeline",
    "AuditQueue",
    "Backoff",
    "GrpcTransport",
    "PipelineStats",
    "RecordsRefused",
    "ShipConfig",
    "Shipper",
    "Spool",
    "TrailTransport",
    "Transport",
    "TransportError",
    "decision_event",
]
