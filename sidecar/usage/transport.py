"""How usage reports reach the control plane: ``UsageService.ReportUsage`` over gRPC."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grpc

from sidecar._gen.statuspulse.auth.v1 import usage_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import usage_pb2_grpc as pb_grpc
from sidecar.core.usage import UsageReport, UseKind
from sidecar.replication.client import parse_targets

KIND_TO_PB = {
    UseKind.API_KEY: pb.CREDENTIAL_KIND_API_KEY,
    UseKind.OAUTH_GRANT: pb.CREDENTIAL_KIND_OAUTH_GRANT,
}


class UsageTransportError(Exception):
    """Reporting failed. ``rejected``: the control plane refused the report itself (resending
    it cannot succeed); otherwise retry."""

    def __init__(self, message: str, *, rejected: bool = False) -> None:
        super().__init__(message)
        self.rejected = rejected


class UsageTransport(Protocol):
    def send(self, report: UsageReport) -> None:
        """Deliver ``report`` (stored now or before), or raise UsageTransportError."""
        ...

    def close(self) -> None: ...


def to_pb(report: UsageReport) -> pb.ReportUsageRequest:
    request = pb.ReportUsageRequest(report_id=report.id)
    for use in report.uses:
        entry = request.uses.add(
            credential_id=use.credential_id, kind=KIND_TO_PB[use.kind], uses=use.uses
        )
        entry.last_use_time.FromSeconds(use.last_used_at)
    return request


class GrpcUsageTransport:
    """ReportUsage to one of the control-plane replicas in ``targets`` (moving to the next
    after a failure, as the replication stream does); ``token`` is the sidecar's sync token."""

    def __init__(
        self,
        targets: str | Sequence[str],
        token: str = "",
        *,
        timeout: float = 5.0,  # a report is small: a healthy control plane answers in ms
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        channel_factory: Callable[[str], grpc.Channel] | None = None,
    ) -> None:
        self._targets = parse_targets(targets)
        # Channels made elsewhere (the sidecar's link process) instead of in this process.
        self._channel_factory = channel_factory
        self._current = 0
        self._credentials = credentials
        self._options = list(options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        self._channel = self._open()

    def _open(self) -> grpc.Channel:
        target = self._targets[self._current]
        if self._channel_factory is not None:
            return self._channel_factory(target)
        if self._credentials is None:
            return grpc.insecure_channel(target, options=self._options)
        return grpc.secure_channel(target, self._credentials, options=self._options)

    def send(self, report: UsageReport) -> None:
        stub = pb_grpc.UsageServiceStub(self._channel)
        try:
            stub.ReportUsage(to_pb(report), metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            rejected = code is grpc.StatusCode.INVALID_ARGUMENT
            if not rejected and len(self._targets) > 1:
                self._channel.close()
                self._current = (self._current + 1) % len(self._targets)
                self._channel = self._open()
            raise UsageTransportError(
                f"report failed: {code.name}: {exc.details()}", rejected=rejected
            ) from None

    def close(self) -> None:
        self._channel.close()
