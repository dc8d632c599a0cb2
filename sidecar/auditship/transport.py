"""How shipped records reach the control plane: an injected ``Transport``. ``GrpcTransport``
uses the IngestAuditRecords client stream; ``TrailTransport`` calls the trail in-process (the
all-in-one ``spauth serve``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import grpc

from sidecar._gen.statuspulse.auth.v1 import audit_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import audit_pb2_grpc as pb_grpc
from sidecar.admin.audit_convert import event_record
from sidecar.core.audit import AuditEvent
from sidecar.core.audit_trail import AuditTrail
from sidecar.core.errors import InvalidArgument, SpauthError
from sidecar.core.models import RequestContext

MESSAGE_RECORDS = 500  # per IngestAuditRecordsRequest (the server takes up to 1000)


class TransportError(Exception):
    """Sending failed. ``rejected``: the control plane refused the records themselves (retrying
    the same records cannot succeed); otherwise it was unreachable or refused us (retry)."""

    def __init__(self, message: str, *, rejected: bool = False) -> None:
        super().__init__(message)
        self.rejected = rejected


class Transport(Protocol):
    def send(self, events: Sequence[AuditEvent]) -> set[str]:
        """Deliver ``events``; returns the ids the control plane acknowledged (stored now or
        before). Raises TransportError."""
        ...


class GrpcTransport:
    """IngestAuditRecords over one channel, authenticated with the sidecar's key."""

    def __init__(self, target: str, api_key: str, *, timeout: float = 10.0) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.AuditServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._timeout = timeout

    def send(self, events: Sequence[AuditEvent]) -> set[str]:
        def messages() -> Iterator[pb.IngestAuditRecordsRequest]:
            for start in range(0, len(events), MESSAGE_RECORDS):
                chunk = events[start : start + MESSAGE_RECORDS]
                yield pb.IngestAuditRecordsRequest(records=[event_record(e) for e in chunk])

        try:
            resp = self._stub.IngestAuditRecords(
                messages(), metadata=self._metadata, timeout=self._timeout
            )
        except grpc.RpcError as exc:
            code = exc.code()
            raise TransportError(
                f"ingest failed: {code.name}: {exc.details()}",
                rejected=code is grpc.StatusCode.INVALID_ARGUMENT,
            ) from None
        return set(resp.acknowledged_ids)

    def close(self) -> None:
        self._channel.close()


class TrailTransport:
    """Straight into the trail, for a sidecar running in the control plane's process."""

    def __init__(self, trail: AuditTrail, ctx: RequestContext) -> None:
        self._trail = trail
        self._ctx = ctx

    def send(self, events: Sequence[AuditEvent]) -> set[str]:
        try:
            return set(self._trail.ingest(self._ctx, events).acknowledged)
        except InvalidArgument as exc:
            raise TransportError(exc.message, rejected=True) from None
        except SpauthError as exc:
            raise TransportError(exc.message) from None
