"""``spauth whoami`` (the calling key) and ``spauth keys verify`` (a key read from stdin): what a
key is and, with ``--method`` and ``--path``, what the sidecar's policy decides for that request
with it. The "verify connectivity" step after a rotation."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2_grpc as pb_grpc
from sidecar.cli.client import EXIT_USAGE, AdminClient, CliError, admin_client, tls_files
from sidecar.cli.keys import key_json
from sidecar.cli.output import emit_json

# Exit status when the policy would deny the asked-for request (the key itself is fine).
EXIT_DENIED = 3


def add_route_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="", help="with --path: the request to decide")
    parser.add_argument("--path", default="", help="e.g. /v1/workspaces/acme/checks")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("whoami", parents=[common], help="describe the key in STATUSPULSE_API_KEY")
    add_route_options(p)
    p.set_defaults(handler=whoami)


def register_verify(keys: Any, common: argparse.ArgumentParser) -> None:
    """``spauth keys verify`` (under ``keys``)."""
    p = keys.add_parser(
        "verify", parents=[common], help="describe the key given on stdin (e.g. after rotating)"
    )
    add_route_options(p)
    p.set_defaults(handler=None, runner=verify)


def whoami(client: AdminClient, args: argparse.Namespace) -> int:
    """Ask the admin API about the client's own key."""
    if bool(args.method) != bool(args.path):
        raise CliError("--method and --path go together", EXIT_USAGE)
    stub = pb_grpc.ApiKeyServiceStub(client.channel)
    resp = client.call(stub.WhoAmI, pb.WhoAmIRequest(method=args.method, path=args.path))
    _print(args, resp)
    if resp.HasField("decision") and not resp.decision.allowed:
        return EXIT_DENIED
    return 0


def verify(args: argparse.Namespace) -> int:
    """``keys verify``: the key comes on stdin (never argv, where ps and history see it)."""
    key = sys.stdin.readline().strip()
    if not key:
        raise CliError("keys verify: give the key on stdin", EXIT_USAGE)
    with admin_client(args.endpoint, key, tls_files(args)) as client:
        return whoami(client, args)


def _print(args: argparse.Namespace, resp: pb.WhoAmIResponse) -> None:
    decision = resp.decision if resp.HasField("decision") else None
    if args.output == "json":
        out: dict[str, object] = {**key_json(resp.api_key)}
        if decision is not None:
            out["decision"] = {
                "allowed": decision.allowed,
                "reason": decision.reason,
                "http_status": decision.http_status,
                "route": decision.route or None,
                "required_scopes": list(decision.required_scopes),
            }
        emit_json(out)
        return
    info = key_json(resp.api_key)
    for name in ("id", "name", "workspace", "scopes", "state", "expires_at"):
        value = info[name]
        print(f"{name + ':':<11} {' '.join(value) if isinstance(value, list) else value}")
    if decision is not None:
        verdict = "allow" if decision.allowed else "deny"
        route = f" (route {decision.route!r})" if decision.route else ""
        print(f"{'decision:':<11} {verdict} {decision.http_status} {decision.reason}{route}")
