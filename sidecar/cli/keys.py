"""``spauth keys create|list|show|replace|revoke|update|suspend|resume``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2_grpc as pb_grpc
from sidecar.cli import rotate
from sidecar.cli.client import EXIT_USAGE, AdminClient, CliError
from sidecar.cli.output import emit_json, rfc3339, table
from sidecar.core.errors import InvalidArgument
from sidecar.core.validation import format_duration, format_rate, parse_duration, parse_rate

STATES = {
    "active": pb.API_KEY_STATE_ACTIVE,
    "expired": pb.API_KEY_STATE_EXPIRED,
    "revoked": pb.API_KEY_STATE_REVOKED,
    "suspended": pb.API_KEY_STATE_SUSPENDED,
    "all": pb.API_KEY_STATE_UNSPECIFIED,
}
STATE_NAMES = {v: k for k, v in STATES.items() if k != "all"}


def register(sub: Any, common: argparse.ArgumentParser) -> Any:
    """Add ``keys`` and its commands; returns its sub-parsers (``keys verify`` joins them)."""
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True, metavar="COMMAND"
    )
    p = keys.add_parser("create", parents=[common], help="mint a key (the secret shows once)")
    p.add_argument("--workspace", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--scope", action="append", required=True, dest="scopes", metavar="SCOPE")
    p.add_argument("--expires-in", default="", metavar="DURATION", help="e.g. 90d, 24h")
    p.add_argument(
        "--rate-limit", default="", metavar="RATE", help="requests per period, e.g. 100/s, 6000/m"
    )
    p.add_argument("--description", default="")
    p.add_argument(
        "--client-cidr",
        action="append",
        default=[],
        dest="client_cidrs",
        metavar="CIDR",
        help="only usable from this network (repeatable), e.g. 10.0.0.0/8",
    )
    p.add_argument("--rotate-every", default="", metavar="DURATION", help="e.g. 60d")
    p.set_defaults(handler=create)

    p = keys.add_parser("list", parents=[common], help="list keys, newest first")
    p.add_argument("--workspace", default="")
    p.add_argument(
        "--state",
        choices=sorted(STATES),
        default="all",
        help="only keys in this state (default: all)",
    )
    p.add_argument(
        "--unused-for",
        default="",
        metavar="DURATION",
        help="only keys not used (never used: not created) within DURATION, e.g. 30d",
    )
    p.add_argument(
        "--expiring-within", default="", metavar="DURATION", help="only keys expiring within"
    )
    p.add_argument(
        "--rotation-due", action="store_true", help="only keys past their rotation schedule"
    )
    p.set_defaults(handler=list_keys)

    p = keys.add_parser("show", parents=[common], help="show one key")
    p.add_argument("id")
    p.set_defaults(handler=show)

    p = keys.add_parser("replace", parents=[common], help="Create Replacement for a key")
    p.add_argument("id")
    p.add_argument("--grace", default="", metavar="DURATION", help="revoke the old key after")
    p.add_argument("--expires-in", default="", metavar="DURATION")
    p.set_defaults(handler=replace)

    p = keys.add_parser("revoke", parents=[common], help="revoke a key now")
    p.add_argument("id")
    p.add_argument("--reason", default="")
    p.add_argument(
        "--force",
        action="store_true",
        help="allow revoking the last usable operator key (recovery: spauth operator mint)",
    )
    p.set_defaults(handler=revoke)

    p = keys.add_parser("update", parents=[common], help="edit a key without re-issuing it")
    p.add_argument("id")
    p.add_argument("--name")
    p.add_argument("--description")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--rate-limit", metavar="RATE", help="e.g. 100/s")
    rate.add_argument("--no-rate-limit", action="store_true", help="remove the rate limit")
    nets = p.add_mutually_exclusive_group()
    nets.add_argument(
        "--client-cidr", action="append", dest="client_cidrs", metavar="CIDR", help="repeatable"
    )
    nets.add_argument("--any-network", action="store_true", help="remove the network limit")
    p.add_argument("--rotate-every", metavar="DURATION", help="e.g. 60d; 0s removes it")
    p.set_defaults(handler=update)

    p = keys.add_parser("suspend", parents=[common], help="deny a key until resumed")
    p.add_argument("id")
    p.add_argument("--reason", default="")
    p.set_defaults(handler=suspend)

    p = keys.add_parser("resume", parents=[common], help="lift a suspension")
    p.add_argument("id")
    p.set_defaults(handler=resume)

    rotate.register(keys, common)
    return keys


def _duration(text: str, flag: str) -> int:
    if not text:
        return 0
    try:
        return parse_duration(text, flag)
    except InvalidArgument as exc:
        raise CliError(exc.message, EXIT_USAGE) from None


def _rate(text: str) -> pb.RateLimit | None:
    if not text:
        return None
    try:
        requests, period = parse_rate(text, "--rate-limit")
    except InvalidArgument as exc:
        raise CliError(exc.message, EXIT_USAGE) from None
    return pb.RateLimit(requests=requests, period_seconds=period)


def key_json(key: pb.ApiKey, secret: str = "") -> dict[str, object]:
    """The documented JSON shape of a key."""
    out: dict[str, object] = {"id": key.id}
    if secret:
        out["key"] = secret
    out.update(
        name=key.name,
        workspace=key.workspace,
        scopes=list(key.scopes),
        state=STATE_NAMES.get(key.state, "unknown"),
        created_at=rfc3339(key.create_time),
        expires_at=rfc3339(key.expire_time),
        revoked_at=rfc3339(key.revoke_time, key.HasField("revoke_time")),
        replaces=key.replaces or None,
        replaced_by=key.replaced_by or None,
        revoke_reason=key.revoke_reason or None,
        grace_deadline=rfc3339(key.grace_deadline, key.HasField("grace_deadline")),
        last_four=key.last_four,
        rate_limit=(
            format_rate(key.rate_limit.requests, key.rate_limit.period_seconds)
            if key.HasField("rate_limit")
            else None
        ),
        last_used_at=rfc3339(key.last_use_time, key.HasField("last_use_time")),
        description=key.description or None,
        client_cidrs=list(key.client_cidrs),
        suspended_at=rfc3339(key.suspend_time, key.HasField("suspend_time")),
        rotate_every=format_duration(key.rotation_period_seconds)
        if key.rotation_period_seconds
        else None,
        rotation_due_at=rfc3339(key.rotation_due_time, key.HasField("rotation_due_time")),
    )
    return out


def _print_keys(args: argparse.Namespace, keys: list[pb.ApiKey]) -> None:
    if args.output == "json":
        emit_json([key_json(k) for k in keys])
        return
    rows = [
        [
            k.id,
            k.name,
            k.workspace,
            ",".join(k.scopes),
            STATE_NAMES.get(k.state, "?"),
            rfc3339(k.expire_time) or "",
            rfc3339(k.last_use_time, k.HasField("last_use_time")) or "never",
            f"…{k.last_four}",
        ]
        for k in keys
    ]
    headers = ["ID", "NAME", "WORKSPACE", "SCOPES", "STATE", "EXPIRES", "LAST USED", "KEY"]
    print(table(rows, headers))


def _print_minted(args: argparse.Namespace, key: pb.ApiKey, secret: str) -> None:
    if args.output == "json":
        emit_json(key_json(key, secret))
        return
    print(secret)
    _print_keys(args, [key])
    print("Store this key now: it is shown only once.", file=sys.stderr)


def create(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.ApiKeyServiceStub(client.channel)
    request = pb.CreateApiKeyRequest(
        workspace=args.workspace,
        name=args.name,
        scopes=args.scopes,
        expires_in_seconds=_duration(args.expires_in, "--expires-in"),
        rate_limit=_rate(args.rate_limit),
        description=args.description,
        client_cidrs=args.client_cidrs,
        rotation_period_seconds=_duration(args.rotate_every, "--rotate-every"),
    )
    resp = client.call(stub.CreateApiKey, request)
    _print_minted(args, resp.api_key, resp.key)
    return 0


def list_keys(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.ApiKeyServiceStub(client.channel)
    keys: list[pb.ApiKey] = []
    token = ""
    while True:
        request = pb.ListApiKeysRequest(
            workspace=args.workspace,
            state=STATES[args.state],
            page_size=200,
            page_token=token,
            unused_for_seconds=_duration(args.unused_for, "--unused-for"),
            expiring_within_seconds=_duration(args.expiring_within, "--expiring-within"),
            rotation_due=args.rotation_due,
        )
        resp = client.call(stub.ListApiKeys, request)
        keys.extend(resp.api_keys)
        token = resp.next_page_token
        if not token:
            break
    _print_keys(args, keys)
    return 0


def show(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.ApiKeyServiceStub(client.channel)
    resp = client.call(stub.GetApiKey, pb.GetApiKeyRequest(id=args.id))
    if args.output == "json":
        out = key_json(resp.api_key)
        out["daily_uses"] = [{"date": d.date, "uses": d.uses} for d in resp.daily_uses]
        emit_json(out)
        return 0
    fields = key_json(resp.api_key)
    fields["daily_uses"] = [f"{d.date}:{d.uses}" for d in resp.daily_uses]
    fields["last_used_at"] = fields.get("last_used_at") or "never"
    print(_key_fields(fields))
    return 0


def _key_fields(fields: dict[str, object]) -> str:
    """One key as a FIELD/VALUE table: every field of the JSON shape, ``-`` where unset."""
    rows = [[name, _cell(value)] for name, value in fields.items()]
    return table(rows, ["FIELD", "VALUE"])


def _cell(value: object) -> str:
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def replace(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.ApiKeyServiceStub(client.channel)
    request = pb.CreateReplacementApiKeyRequest(
        id=args.id,
        grace_seconds=_duration(args.grace, "--grace"),
        expires_in_seconds=_duration(args.expires_in, "--expires-in"),
    )
    resp = client.call(stub.CreateReplacementApiKey, request)
    _print_minted(args, resp.api_key, resp.key)
    return 0


def _print_one(args: argparse.Namespace, key: pb.ApiKey) -> int:
    if args.output == "json":
        emit_json(key_json(key))
    else:
        _print_keys(args, [key])
    return 0


def revoke(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.ApiKeyServiceStub(client.channel)
    request = pb.RevokeApiKeyRequest(id=args.id, reason=args.reason, force=args.force)
    resp = client.call(stub.RevokeApiKey, request)
    return _print_one(args, resp.api_key)


def update(client: AdminClient, args: argparse.Namespace) -> int:
    request = pb.UpdateApiKeyRequest(id=args.id)
    if args.name is not None:
        request.name = args.name
    if args.description is not None:
        request.description = args.description
    rate = _rate(args.rate_limit or "")
    if rate is not None:
        request.rate_limit.CopyFrom(rate)
    request.clear_rate_limit = args.no_rate_limit
    if args.client_cidrs is not None:
        request.client_cidrs.cidrs.extend(args.client_cidrs)
    elif args.any_network:
        request.client_cidrs.SetInParent()
    if args.rotate_every is not None:
        request.rotation_period_seconds = _duration(args.rotate_every, "--rotate-every")
    stub = pb_grpc.ApiKeyServiceStub(client.channel)
    return _print_one(args, client.call(stub.UpdateApiKey, request).api_key)


def suspend(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.ApiKeyServiceStub(client.channel)
    request = pb.SuspendApiKeyRequest(id=args.id, reason=args.reason)
    return _print_one(args, client.call(stub.SuspendApiKey, request).api_key)


def resume(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.ApiKeyServiceStub(client.channel)
    resp = client.call(stub.ResumeApiKey, pb.ResumeApiKeyRequest(id=args.id))
    return _print_one(args, resp.api_key)
