"""``spauth keys create|list|show|replace|revoke``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2_grpc as pb_grpc
from sidecar.cli.client import EXIT_USAGE, AdminClient, CliError
from sidecar.cli.output import emit_json, rfc3339, table
from sidecar.core.errors import InvalidArgument
from sidecar.core.validation import format_rate, parse_duration, parse_rate

STATES = {
    "active": pb.API_KEY_STATE_ACTIVE,
    "expired": pb.API_KEY_STATE_EXPIRED,
    "revoked": pb.API_KEY_STATE_REVOKED,
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
    p.set_defaults(handler=create)

    p = keys.add_parser("list", parents=[common], help="list keys, newest first")
    p.add_argument("--workspace", default="")
    p.add_argument("--state", choices=sorted(STATES), default="all")
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
            f"…{k.last_four}",
        ]
        for k in keys
    ]
    print(table(rows, ["ID", "NAME", "WORKSPACE", "SCOPES", "STATE", "EXPIRES", "KEY"]))


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
            workspace=args.workspace, state=STATES[args.state], page_size=200, page_token=token
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
        emit_json(key_json(resp.api_key))
    else:
        _print_keys(args, [resp.api_key])
    return 0


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


def revoke(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.ApiKeyServiceStub(client.channel)
    request = pb.RevokeApiKeyRequest(id=args.id, reason=args.reason, force=args.force)
    resp = client.call(stub.RevokeApiKey, request)
    if args.output == "json":
        emit_json(key_json(resp.api_key))
    else:
        _print_keys(args, [resp.api_key])
    return 0
