"""How shipped records reach the control plane: an injected ``Transport``. ``GrpcTransport``
uses the IngestAuditRecords client stream; ``TrailTransport`` calls the trail in-process."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import grpc

from sidecar._gen.statuspulse.auth.v1 import audit_pb2 as pb
from sidecar.auditship.codec import decode, ingest_request
from sidecar.core.audit_trail import AuditTrail
from sidecar.core.errors import InvalidArgument, SpauthError
from sidecar.core.models import RequestContext

INGEST_METHOD = "/statuspulse.auth.v1.AuditService/IngestAuditRecords"
MESSAGE_RECORDS = 500  # per IngestAuditRecordsRequest (the server takes up to 1000)


class TransportError(Exception):
    """Sending failed. ``rejected``: the control plane refused the records themselves (retrying
    the same records cannot succeed); otherwise it was unreachable or refused us (retry)."""

    def __init__(self, message: str, *, rejected: bool = False) -> None:
        super().__init__(message)
        self.rejected = rejected


class Transport(Protocol):
    def send(self, records: Sequence[bytes]) -> int:
        """Deliver serialized AuditRecords; returns how many the control plane acknowledged
        (stored now or before). Raises TransportError."""
        ...

    def close(self) -> None: ...


class GrpcTransport:
    """IngestAuditRecords over one channel. ``token`` is the sidecar's sync token (or an
    ``admin:full`` key); empty when the control plane runs without one."""

    def __init__(self, target: str, token: str = "", *, timeout: float = 10.0) -> None:
        self._channel = grpc.insecure_channel(target)
        # Requests are built from spool bytes (no serializer); responses are parsed as usual.
        self._ingest = self._channel.stream_unary(
            INGEST_METHOD,
            request_serializer=None,
            response_deserializer=pb.IngestAuditRecordsResponse.FromString,
        )
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout

    def send(self, records: Sequence[bytes]) -> int:
        def messages() -> Iterator[bytes]:
            for start in range(0, len(records), MESSAGE_RECORDS):
                yield ingest_request(records[start : start + MESSAGE_RECORDS])

        try:
            resp = self._ingest(messages(), metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            raise TransportError(
                f"ingest failed: {code.name}: {exc.details()}",
                rejected=code is grpc.StatusCode.INVALID_ARGUMENT,
            ) from None
        return len(resp.acknowledged_ids)

    def close(self) -> None:
        self._channel.close()


class TrailTransport:
    """Straight into the trail, for a sidecar running in the control plane's process."""

    def __init__(self, trail: AuditTrail, ctx: RequestContext) -> None:
        self._trail = trail
        self._ctx = ctx

    def send(self, records: Sequence[bytes]) -> int:
        try:
            events = [decode(r) for r in records]
            return len(self._trail.ingest(self._ctx, events).acknowledged)
        except (ValueError, InvalidArgument) as exc:
            raise TransportError(str(exc), rejected=True) from None
        except SpauthError as exc:
            raise TransportError(exc.message) from None

    def close(self) -> None:
        """Nothing to release."""
