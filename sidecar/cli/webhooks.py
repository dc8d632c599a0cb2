"""``spauth webhooks add|list|remove|test``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sidecar._gen.statuspulse.auth.v1 import webhooks_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import webhooks_pb2_grpc as pb_grpc
from sidecar.cli.client import AdminClient
from sidecar.cli.output import emit_json, rfc3339, table
from sidecar.core.webhooks import EVENTS


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    hooks = sub.add_parser("webhooks", help="manage a workspace's webhooks").add_subparsers(
        dest="webhooks_command", required=True, metavar="COMMAND"
    )
    p = hooks.add_parser("add", parents=[common], help="register a webhook (secret shown once)")
    p.add_argument("--workspace", required=True)
    p.add_argument("--url", required=True)
    p.add_argument(
        "--event", action="append", dest="events", choices=EVENTS, help="repeatable; default all"
    )
    p.set_defaults(handler=add)
    p = hooks.add_parser("list", parents=[common], help="webhooks and their recent deliveries")
    p.add_argument("--workspace", default="")
    p.set_defaults(handler=list_hooks)
    p = hooks.add_parser("remove", parents=[common], help="delete a webhook")
    p.add_argument("id")
    p.set_defaults(handler=remove)
    p = hooks.add_parser("test", parents=[common], help="send a webhook.test event")
    p.add_argument("id")
    p.set_defaults(handler=test)


def hook_json(hook: pb.Webhook) -> dict[str, object]:
    return {
        "id": hook.id,
        "workspace": hook.workspace,
        "url": hook.url,
        "events": list(hook.events),
        "created_at": rfc3339(hook.create_time),
        "recent_deliveries": [delivery_json(d) for d in hook.recent_deliveries],
    }


def delivery_json(d: pb.WebhookDelivery) -> dict[str, object]:
    return {
        "id": d.id,
        "event": d.event,
        "status": d.status,
        "attempts": d.attempts,
        "last_error": d.last_error or None,
        "created_at": rfc3339(d.create_time),
        "next_attempt_at": rfc3339(d.next_attempt_time, d.HasField("next_attempt_time")),
        "delivered_at": rfc3339(d.deliver_time, d.HasField("deliver_time")),
    }


def _print(args: argparse.Namespace, hooks: list[pb.Webhook]) -> None:
    if args.output == "json":
        emit_json([hook_json(h) for h in hooks])
        return
    rows = []
    for h in hooks:
        last = h.recent_deliveries[0] if h.recent_deliveries else None
        status = f"{last.event} {last.status}" if last else "none yet"
        rows.append([h.id, h.workspace, h.url, ",".join(h.events), status])
    print(table(rows, ["ID", "WORKSPACE", "URL", "EVENTS", "LAST DELIVERY"]))


def add(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.WebhookServiceStub(client.channel)
    request = pb.CreateWebhookRequest(
        workspace=args.workspace, url=args.url, events=args.events or list(EVENTS)
    )
    resp = client.call(stub.CreateWebhook, request)
    if args.output == "json":
        emit_json({**hook_json(resp.webhook), "secret": resp.secret})
        return 0
    print(resp.secret)
    _print(args, [resp.webhook])
    print("Store this signing secret now: it is shown only once.", file=sys.stderr)
    return 0


def list_hooks(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.WebhookServiceStub(client.channel)
    resp = client.call(stub.ListWebhooks, pb.ListWebhooksRequest(workspace=args.workspace))
    _print(args, list(resp.webhooks))
    return 0


def remove(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.WebhookServiceStub(client.channel)
    client.call(stub.DeleteWebhook, pb.DeleteWebhookRequest(id=args.id))
    return 0


def test(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.WebhookServiceStub(client.channel)
    resp = client.call(stub.TestWebhook, pb.TestWebhookRequest(id=args.id))
    if args.output == "json":
        emit_json(delivery_json(resp.delivery))
    else:
        print(f"queued {resp.delivery.id}: see `spauth webhooks list` for its status")
    return 0
