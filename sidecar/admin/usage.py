"""UsageService servicer: sidecars report credential uses (see sidecar.usage)."""

from __future__ import annotations

import asyncio

from sidecar._gen.statuspulse.auth.v1 import usage_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import usage_pb2_grpc as pb_grpc
from sidecar.admin.rpc import Authenticator, SidecarAuthenticator, admin_rpc
from sidecar.core.errors import InvalidArgument
from sidecar.core.models import RequestContext
from sidecar.core.usage import MAX_REPORT_ENTRIES, CredentialUse, UsageReport, UsageService, UseKind

PB_TO_KIND = {
    pb.CREDENTIAL_KIND_API_KEY: UseKind.API_KEY,
    pb.CREDENTIAL_KIND_OAUTH_GRANT: UseKind.OAUTH_GRANT,
}


class UsageServicer(pb_grpc.UsageServiceServicer):  # type: ignore[misc]
    """ReportUsage, authenticated as decision-record ingestion is (the sync token)."""

    def __init__(self, service: UsageService, keys: Authenticator, *, sync_token: str) -> None:
        self.authenticator = SidecarAuthenticator(keys, sync_token)
        self._svc = service

    @admin_rpc
    async def ReportUsage(
        self, request: pb.ReportUsageRequest, ctx: RequestContext
    ) -> pb.ReportUsageResponse:
        stored = await asyncio.to_thread(self._svc.report, ctx, report_from_pb(request))
        return pb.ReportUsageResponse(stored=stored)


def report_from_pb(request: pb.ReportUsageRequest) -> UsageReport:
    if len(request.uses) > MAX_REPORT_ENTRIES:
        raise InvalidArgument("uses", f"at most {MAX_REPORT_ENTRIES} entries per report")
    uses = []
    for entry in request.uses:
        kind = PB_TO_KIND.get(entry.kind)
        if kind is None:
            raise InvalidArgument("uses.kind", "must be an API key or an OAuth grant")
        uses.append(
            CredentialUse(entry.credential_id, kind, entry.uses, entry.last_use_time.seconds)
        )
    return UsageReport(request.report_id, tuple(uses))
