"""How shipped records reach the control plane: an injected ``Transport``. ``GrpcTransport``
uses the IngestAuditRecords client stream; ``TrailTransport`` calls the trail in-process."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from sidecar._gen.statuspulse.auth.v1 import audit_pb2 as pb
from sidecar.auditship.codec import REPORT_REFUSED, decode, ingest_request_sliced
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


@dataclass(frozen=True, slots=True)
class RefusedRecord:
    """A record of a send the control plane refused: its position in the send, its id (cut
    and redacted by the control plane), and why (a stable code, and words)."""

    index: int
    id: str
    reason: str
    detail: str


class RecordsRefused(TransportError):
    """The control plane stored and acknowledged every record of the send except ``refused``
    (exactly those: re-sending them cannot succeed)."""

    def __init__(self, acknowledged: int, refused: Sequence[RefusedRecord]) -> None:
        shown = "; ".join(f"{r.id!r}: {r.reason}" for r in refused[:5])
        super().__init__(f"{len(refused)} refused, the rest stored: {shown}", rejected=True)
        self.acknowledged = acknowledged
        self.refused = tuple(refused)


class Transport(Protocol):
    def send(self, records: Sequence[bytes]) -> int:
        """Deliver serialized AuditRecords; returns how many the control plane acknowledged
        (stored now or before). Raises TransportError: ``RecordsRefused`` when it names the
        records it refused (the rest acknowledged), ``rejected`` when it refused some without
        saying which."""
        ...

    def close(self) -> None: ...


class GrpcTransport:
    """IngestAuditRecords to one of several control planes (``targets``: "a:50051,b:50051").
    A send goes to the control plane that last answered and, when that one is unreachable, to
    the others in turn, so decisions reach whichever replica is up. ``credentials`` (TLS) and
    ``options`` are the sync stream's; ``token`` is the sidecar's sync token."""

    def __init__(
        self,
        targets: str,
        token: str = "",
        *,
        timeout: float = 10.0,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, str]] = (),
        channel_factory: Callable[[str], grpc.Channel] | None = None,
    ) -> None:
        self._targets = [t.strip() for t in targets.split(",") if t.strip()]
        # ``channel_factory``: channels made elsewhere (the sidecar's link process,
        # sidecar/dataplane/link.py) instead of in this process.
        self._channels = [
            channel_factory(t)
            if channel_factory is not None
            else grpc.secure_channel(t, credentials, options=options)
            if credentials is not None
            else grpc.insecure_channel(t, options=options)
            for t in self._targets
        ]
        # Requests are built from spool bytes (no serializer); responses are parsed as usual.
        self._ingests = [
            channel.stream_unary(
                INGEST_METHOD,
                request_serializer=None,
                response_deserializer=pb.IngestAuditRecordsResponse.FromString,
            )
            for channel in self._channels
        ]
        self._current = 0
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout

    def send(self, records: Sequence[bytes]) -> int:
        def messages() -> Iterator[bytes]:
            # Every message asks for the refused list (report_refused): a control plane that
            # knows the field answers OK naming them; an older one ignores it and answers
            # INVALID_ARGUMENT, which stays a rejection (the shipper then isolates them).
            for start in range(0, len(records), MESSAGE_RECORDS):
                chunk = records[start : start + MESSAGE_RECORDS]
                yield ingest_request_sliced(chunk) + REPORT_REFUSED

        errors: list[str] = []
        for step in range(len(self._ingests)):
            index = (self._current + step) % len(self._ingests)
            try:
                resp = self._ingests[index](
                    messages(), metadata=self._metadata, timeout=self._timeout
                )
            except grpc.RpcError as exc:
                code = exc.code()
                if code in _TRY_NEXT:
                    errors.append(f"{self._targets[index]}: {code.name}: {exc.details()}")
                    continue
                raise TransportError(
                    f"ingest failed: {code.name}: {exc.details()}",
                    rejected=code is grpc.StatusCode.INVALID_ARGUMENT,
                ) from None
            self._current = index
            if resp.refused:
                raise RecordsRefused(
                    len(resp.acknowledged_ids),
                    [
                        RefusedRecord(
                            r.index, r.id, _REASONS.get(r.reason, "unspecified"), r.detail
                        )
                        for r in resp.refused
                    ],
                )
            return len(resp.acknowledged_ids)
        raise TransportError("ingest failed: " + "; ".join(errors))

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


# The wire's reason codes as the shipper logs them ("future_time", ...).
_REASONS = {
    value.number: value.name.removeprefix("AUDIT_REFUSAL_REASON_").lower()
    for value in pb.AuditRefusalReason.DESCRIPTOR.values
    if value.number
}
# Another control plane may answer where this one could not.
_TRY_NEXT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class TrailTransport:
    """Straight into the trail, for a sidecar running in the control plane's process."""

    def __init__(self, trail: AuditTrail, ctx: RequestContext) -> None:
        self._trail = trail
        self._ctx = ctx

    def send(self, records: Sequence[bytes]) -> int:
        try:
            events = [decode(r) for r in records]
            # In messages' sizes, as over gRPC (the trail takes at most 1000 per call).
            results = [
                self._trail.ingest(self._ctx, events[start : start + MESSAGE_RECORDS])
                for start in range(0, len(events), MESSAGE_RECORDS)
            ]
        except (ValueError, InvalidArgument) as exc:
            raise TransportError(str(exc), rejected=True) from None
        except SpauthError as exc:
            raise TransportError(exc.message) from None
        acknowledged = sum(len(result.acknowledged) for result in results)
        refused = [
            RefusedRecord(n * MESSAGE_RECORDS + r.index, r.id, r.reason.value, str(r))
            for n, result in enumerate(results)
            for r in result.refused
        ]
        if refused:
            # As over gRPC with report_refused: the rest is stored, these are named.
            raise RecordsRefused(acknowledged, refused)
        return acknowledged

    def close(self) -> None:
        """Nothing to release."""
