"""Redis between control-plane replicas and sidecars in scale-out: the change bus that wakes
replication streams across replicas, and the audit stream (sidecar/bus/audit_stream.py)."""

from sidecar.bus.changes import RedisChangeBus

__all__ = ["RedisChangeBus"]
