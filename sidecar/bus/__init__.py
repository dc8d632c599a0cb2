"""Redis between sidecars and control planes in scale-out: the audit stream. (The change bus
that wakes replication streams across replicas is ``sidecar.replication.bus``.)"""

from sidecar.bus.audit_dead_letter import DEAD_LETTER_STREAM, DeadLetterStream
from sidecar.bus.audit_ingest import AuditStreamConsumer
from sidecar.bus.audit_stream import RedisStreamTransport

__all__ = ["DEAD_LETTER_STREAM", "AuditStreamConsumer", "DeadLetterStream", "RedisStreamTransport"]
