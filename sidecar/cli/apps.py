"""``spauth apps register|list|show|rotate-secret|delete|sessions|revoke-session``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sidecar._gen.statuspulse.auth.v1 import oauth_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import oauth_pb2_grpc as pb_grpc
from sidecar.cli.client import EXIT_USAGE, AdminClient, CliError
from sidecar.cli.output import emit_json, rfc3339, table
from sidecar.core.errors import InvalidArgument
from sidecar.core.validation import parse_duration

DEFAULT_OVERLAP = "24h"


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    apps = sub.add_parser("apps", help="manage OAuth applications").add_subparsers(
        dest="apps_command", required=True, metavar="COMMAND"
    )
    p = apps.add_parser("register", parents=[common], help="register an app")
    p.add_argument("--workspace", required=True)
    p.add_argument("--name", required=True)
    p.add_argument(
        "--redirect-uri", action="append", required=True, dest="redirect_uris", metavar="URI"
    )
    p.add_argument("--scope", action="append", required=True, dest="scopes", metavar="SCOPE")
    p.add_argument(
        "--confidential", action="store_true", help="give the app a client secret (shown once)"
    )
    p.set_defaults(handler=register_app)

    p = apps.add_parser("list", parents=[common], help="list apps")
    p.add_argument("--workspace", default="")
    p.set_defaults(handler=list_apps)

    p = apps.add_parser("show", parents=[common], help="show one app")
    p.add_argument("client_id")
    p.set_defaults(handler=show)

    p = apps.add_parser("rotate-secret", parents=[common], help="issue a new client secret")
    p.add_argument("client_id")
    p.add_argument(
        "--overlap",
        default=DEFAULT_OVERLAP,
        metavar="DURATION",
        help=f"how long the old secret keeps working (default {DEFAULT_OVERLAP}; 0s: none)",
    )
    p.set_defaults(handler=rotate_secret)

    p = apps.add_parser("delete", parents=[common], help="delete an app, revoking its grants")
    p.add_argument("client_id")
    p.set_defaults(handler=delete)

    p = apps.add_parser("sessions", parents=[common], help="list an app's active sessions")
    p.add_argument("client_id")
    p.set_defaults(handler=sessions)

    p = apps.add_parser("revoke-session", parents=[common], help="revoke one session (grant)")
    p.add_argument("grant_id")
    p.set_defaults(handler=revoke_session)


def app_json(app: pb.OAuthApp, secret: str = "") -> dict[str, object]:
    """The documented JSON shape of an app."""
    out: dict[str, object] = {"client_id": app.client_id}
    if secret:
        out["client_secret"] = secret
    out.update(
        name=app.name,
        workspace=app.workspace,
        redirect_uris=list(app.redirect_uris),
        scopes=list(app.scopes),
        confidential=app.confidential,
        created_at=rfc3339(app.create_time),
        created_by=app.created_by,
        secret_last_four=app.secret_last_four or None,
        previous_secret_expires_at=rfc3339(
            app.previous_secret_expire_time, app.HasField("previous_secret_expire_time")
        ),
    )
    return out


def session_json(s: pb.OAuthAppSession) -> dict[str, object]:
    """The documented JSON shape of a session (grant)."""
    return {
        "grant_id": s.grant_id,
        "client_id": s.client_id,
        "workspace": s.workspace,
        "user_id": s.user_id,
        "email": s.email or None,
        "scopes": list(s.scopes),
        "created_at": rfc3339(s.create_time),
        "last_used_at": rfc3339(s.last_use_time, s.HasField("last_use_time")),
        "revoked_at": rfc3339(s.revoke_time, s.HasField("revoke_time")),
        "revoke_reason": s.revoke_reason or None,
    }


def _print_apps(args: argparse.Namespace, apps: list[pb.OAuthApp]) -> None:
    if args.output == "json":
        emit_json([app_json(a) for a in apps])
        return
    rows = [
        [
            a.client_id,
            a.name,
            a.workspace,
            "confidential" if a.confidential else "public",
            ",".join(a.scopes),
            " ".join(a.redirect_uris),
        ]
        for a in apps
    ]
    print(table(rows, ["CLIENT_ID", "NAME", "WORKSPACE", "TYPE", "SCOPES", "REDIRECT_URIS"]))


def _print_with_secret(args: argparse.Namespace, app: pb.OAuthApp, secret: str) -> None:
    if args.output == "json":
        emit_json(app_json(app, secret))
        return
    print(f"client_id: {app.client_id}")
    if secret:
        print(f"client_secret: {secret}")
        print("Store the client secret now: it is shown only once.", file=sys.stderr)


def _print_sessions(args: argparse.Namespace, items: list[pb.OAuthAppSession]) -> None:
    if args.output == "json":
        emit_json([session_json(s) for s in items])
        return
    rows = [
        [
            s.grant_id,
            s.email or s.user_id,
            ",".join(s.scopes),
            rfc3339(s.create_time) or "",
            rfc3339(s.last_use_time, s.HasField("last_use_time")) or "",
            "revoked" if s.HasField("revoke_time") else "active",
        ]
        for s in items
    ]
    print(table(rows, ["GRANT_ID", "USER", "SCOPES", "CREATED", "LAST_USED", "STATE"]))


def _stub(client: AdminClient) -> pb_grpc.OAuthAppServiceStub:
    return pb_grpc.OAuthAppServiceStub(client.channel)


def register_app(client: AdminClient, args: argparse.Namespace) -> int:
    request = pb.RegisterOAuthAppRequest(
        workspace=args.workspace,
        name=args.name,
        redirect_uris=args.redirect_uris,
        scopes=args.scopes,
        confidential=args.confidential,
    )
    resp = client.call(_stub(client).RegisterOAuthApp, request)
    _print_with_secret(args, resp.app, resp.client_secret)
    return 0


def list_apps(client: AdminClient, args: argparse.Namespace) -> int:
    resp = client.call(
        _stub(client).ListOAuthApps, pb.ListOAuthAppsRequest(workspace=args.workspace)
    )
    _print_apps(args, list(resp.apps))
    return 0


def show(client: AdminClient, args: argparse.Namespace) -> int:
    resp = client.call(_stub(client).GetOAuthApp, pb.GetOAuthAppRequest(client_id=args.client_id))
    if args.output == "json":
        emit_json(app_json(resp.app))
    else:
        _print_apps(args, [resp.app])
    return 0


def rotate_secret(client: AdminClient, args: argparse.Namespace) -> int:
    try:
        overlap = parse_duration(args.overlap, "--overlap")
    except InvalidArgument as exc:
        raise CliError(exc.message, EXIT_USAGE) from None
    request = pb.RotateOAuthAppSecretRequest(client_id=args.client_id, overlap_seconds=overlap)
    resp = client.call(_stub(client).RotateOAuthAppSecret, request)
    _print_with_secret(args, resp.app, resp.client_secret)
    return 0


def delete(client: AdminClient, args: argparse.Namespace) -> int:
    resp = client.call(
        _stub(client).DeleteOAuthApp, pb.DeleteOAuthAppRequest(client_id=args.client_id)
    )
    if args.output == "json":
        emit_json(app_json(resp.app))
    else:
        print(f"deleted {resp.app.client_id}; its sessions are revoked")
    return 0


def sessions(client: AdminClient, args: argparse.Namespace) -> int:
    request = pb.ListOAuthAppSessionsRequest(client_id=args.client_id)
    resp = client.call(_stub(client).ListOAuthAppSessions, request)
    _print_sessions(args, list(resp.sessions))
    return 0


def revoke_session(client: AdminClient, args: argparse.Namespace) -> int:
    request = pb.RevokeOAuthAppSessionRequest(grant_id=args.grant_id)
    resp = client.call(_stub(client).RevokeOAuthAppSession, request)
    if args.output == "json":
        emit_json(session_json(resp.session))
    else:
        _print_sessions(args, [resp.session])
    return 0
