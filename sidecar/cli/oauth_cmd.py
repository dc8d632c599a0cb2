"""``spauth oauth rotate-signing-key|signing-keys|generate-kek``: the authorization server's
keys. The first two go through the admin API (operator key); ``generate-kek`` is local."""

from __future__ import annotations

import argparse
from typing import Any

from sidecar._gen.statuspulse.auth.v1 import oauth_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import oauth_pb2_grpc as pb_grpc
from sidecar.cli.client import AdminClient
from sidecar.cli.output import emit_json, rfc3339, table
from sidecar.core import kek


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    oauth = sub.add_parser("oauth", help="the authorization server's keys").add_subparsers(
        dest="oauth_command", required=True, metavar="COMMAND"
    )
    p = oauth.add_parser(
        "rotate-signing-key",
        parents=[common],
        help="publish a new signing key (it signs after the lead time)",
    )
    p.add_argument(
        "--now",
        action="store_true",
        help="sign with the new key at once and retire every older key: every sidecar then "
        "denies tokens they signed (after a suspected key compromise)",
    )
    p.set_defaults(handler=rotate)
    p = oauth.add_parser("signing-keys", parents=[common], help="list the published signing keys")
    p.set_defaults(handler=list_keys)
    p = oauth.add_parser(
        "generate-kek", help="print a new key-encryption key (for key_encryption_key[_file])"
    )
    p.set_defaults(handler=None, runner=generate_kek)


def key_json(key: pb.SigningKey) -> dict[str, object]:
    return {
        "kid": key.kid,
        "alg": key.alg,
        "state": key.state,
        "created_at": rfc3339(key.create_time),
        "activates_at": rfc3339(key.activate_time),
        "superseded_at": rfc3339(key.supersede_time, key.HasField("supersede_time")),
    }


def _print(args: argparse.Namespace, keys: list[pb.SigningKey]) -> None:
    if args.output == "json":
        emit_json([key_json(k) for k in keys])
        return
    rows = [[k.kid, k.state, str(rfc3339(k.activate_time))] for k in keys]
    print(table(rows, ["KID", "STATE", "SIGNS FROM"]))


def rotate(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.SigningKeyServiceStub(client.channel)
    resp = client.call(stub.RotateSigningKey, pb.RotateSigningKeyRequest(immediate=args.now))
    if args.output == "json":
        emit_json({"key": key_json(resp.key), "retired": list(resp.retired_kids)})
        return 0
    _print(args, [resp.key])
    for kid in resp.retired_kids:
        print(f"retired {kid}")
    return 0


def list_keys(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.SigningKeyServiceStub(client.channel)
    resp = client.call(stub.ListSigningKeys, pb.ListSigningKeysRequest())
    _print(args, list(resp.keys))
    return 0


def generate_kek(_args: argparse.Namespace) -> int:
    print(kek.generate())
    return 0
