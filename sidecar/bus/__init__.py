"""Redis between control-plane replicas and sidecars in scale-out: the change bus that wakes
replication streams across replicas, and the audit stream from sidecars to control planes."""

from sidecar.bus.audit_ingest import AuditStreamConsumer
from sidecar.bus.audit_stream import RedisStreamTransport
from sidecar.bus.changes import RedisChangeBus

__all__ = ["AuditStreamConsumer", "RedisChangeBus", "RedisStreamTransport"]
