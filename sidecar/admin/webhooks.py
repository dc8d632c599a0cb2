"""WebhookService servicer."""

from __future__ import annotations

import asyncio

from sidecar._gen.statuspulse.auth.v1 import webhooks_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import webhooks_pb2_grpc as pb_grpc
from sidecar.admin.convert import timestamp
from sidecar.admin.rpc import Authenticator, admin_rpc
from sidecar.core.models import RequestContext
from sidecar.core.webhooks import Delivery, Webhook, WebhookService


class WebhookServicer(pb_grpc.WebhookServiceServicer):  # type: ignore[misc]
    def __init__(self, service: WebhookService, keys: Authenticator) -> None:
        self.authenticator = keys
        self._svc = service

    @admin_rpc
    async def CreateWebhook(
        self, request: pb.CreateWebhookRequest, ctx: RequestContext
    ) -> pb.CreateWebhookResponse:
        hook, secret = await asyncio.to_thread(
            self._svc.add,
            ctx,
            workspace=request.workspace,
            url=request.url,
            events=list(request.events),
        )
        return pb.CreateWebhookResponse(webhook=webhook(hook, []), secret=secret)

    @admin_rpc
    async def ListWebhooks(
        self, request: pb.ListWebhooksRequest, ctx: RequestContext
    ) -> pb.ListWebhooksResponse:
        workspace = request.workspace or ctx.principal.workspace
        hooks = await asyncio.to_thread(self._svc.in_workspace, ctx, workspace)
        out = []
        for hook in hooks:
            recent = await asyncio.to_thread(self._svc.deliveries, ctx, hook.id, 10)
            out.append(webhook(hook, recent))
        return pb.ListWebhooksResponse(webhooks=out)

    @admin_rpc
    async def DeleteWebhook(
        self, request: pb.DeleteWebhookRequest, ctx: RequestContext
    ) -> pb.DeleteWebhookResponse:
        await asyncio.to_thread(self._svc.remove, ctx, request.id)
        return pb.DeleteWebhookResponse()

    @admin_rpc
    async def TestWebhook(
        self, request: pb.TestWebhookRequest, ctx: RequestContext
    ) -> pb.TestWebhookResponse:
        queued = await asyncio.to_thread(self._svc.test, ctx, request.id)
        return pb.TestWebhookResponse(delivery=delivery(queued))


def webhook(hook: Webhook, recent: list[Delivery]) -> pb.Webhook:
    return pb.Webhook(
        id=hook.id,
        workspace=hook.workspace,
        url=hook.url,
        events=sorted(hook.events),
        create_time=timestamp(hook.created_at),
        recent_deliveries=[delivery(d) for d in recent],
    )


def delivery(d: Delivery) -> pb.WebhookDelivery:
    return pb.WebhookDelivery(
        id=d.id,
        event=d.event,
        status=d.status,
        attempts=d.attempts,
        last_error=d.last_error,
        create_time=timestamp(d.created_at),
        next_attempt_time=timestamp(d.next_attempt_at if d.status == "pending" else None),
        deliver_time=timestamp(d.delivered_at),
    )
