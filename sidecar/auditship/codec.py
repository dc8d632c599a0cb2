"""Spool payloads are serialized ``AuditRecord`` messages (protos/.../audit.proto), so a batch
is shipped by concatenating bytes into an ``IngestAuditRecordsRequest``, never re-encoded."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from sidecar._gen.statuspulse.auth.v1 import audit_pb2 as pb
from sidecar.auditship import gil
from sidecar.core.audit import AuditEvent
from sidecar.core.audit_chain import time_us
from sidecar.core.native import optional_module
from sidecar.protowire import ld, uint

# The shipper's message building in C (sidecar/auditship/_frames.c), where it was built.
_native, _ = optional_module("sidecar.auditship._frames")

# IngestAuditRecordsRequest.report_refused = true (field 2), appended to a request's bytes.
REPORT_REFUSED = uint(2, 1)


def to_pb(ev: AuditEvent) -> pb.AuditRecord:
    """An event as an AuditRecord, its time to the microsecond (the precision the chain covers)."""
    us = time_us(ev.time)
    return pb.AuditRecord(
        id=ev.id,
        time=Timestamp(seconds=us // 1_000_000, nanos=us % 1_000_000 * 1000),
        actor=ev.actor,
        action=ev.action,
        workspace=ev.workspace,
        target=ev.target,
        outcome=ev.outcome,
        reason=ev.reason,
        request_id=ev.request_id,
        metadata=ev.metadata,
    )


def encode(ev: AuditEvent) -> bytes:
    """The spool payload of an event: its AuditRecord, serialized."""
    return bytes(to_pb(ev).SerializeToString())


def decode(payload: bytes) -> AuditEvent:
    """The event in a spool payload; ValueError when it is not one."""
    try:
        msg = pb.AuditRecord.FromString(payload)
    except DecodeError as exc:
        raise ValueError(f"not an audit spool record: {exc}") from None
    return AuditEvent(
        id=msg.id,
        time=msg.time.ToMicroseconds() / 1_000_000,
        actor=msg.actor,
        action=msg.action,
        workspace=msg.workspace,
        target=msg.target,
        outcome=msg.outcome,
        reason=msg.reason,
        request_id=msg.request_id,
        metadata=dict(msg.metadata),
    )


def ingest_request(payloads: Sequence[bytes]) -> bytes:
    """A serialized IngestAuditRecordsRequest holding ``payloads`` (its ``records``, field 1:
    each repeated message is tag, length, bytes)."""
    if _native is not None:
        built: bytes = _native.ingest_request(payloads)
        return built
    return b"".join(ld(1, p) for p in payloads)


def ingest_request_sliced(payloads: Sequence[bytes]) -> bytes:
    """:func:`ingest_request`'s bytes for the shipper: in C where built (one call, copying
    64 KiB or more without the GIL), else built a slice at a time with the GIL let go in
    between (sidecar.auditship.gil): a repeated field's encodings concatenate."""
    if _native is not None:
        return ingest_request(payloads)
    return b"".join(ingest_request(piece) for piece in gil.slices(payloads))
