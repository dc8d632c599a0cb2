"""``spauth users create|list|disable|enable|delete|reset-password``: workspace members who
sign in at /oauth/authorize, and their offboarding."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from sidecar._gen.statuspulse.auth.v1 import oauth_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import oauth_pb2_grpc as pb_grpc
from sidecar.cli.client import EXIT_USAGE, AdminClient, CliError
from sidecar.cli.output import emit_json, rfc3339, table


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    users = sub.add_parser("users", help="manage workspace members (OAuth sign-in)").add_subparsers(
        dest="users_command", required=True, metavar="COMMAND"
    )
    p = users.add_parser(
        "create", parents=[common], help="create a member (password read from stdin)"
    )
    p.add_argument("--workspace", required=True)
    p.add_argument("--email", required=True)
    p.add_argument(
        "--scope",
        action="append",
        default=[],
        dest="scopes",
        metavar="SCOPE",
        help="scopes the member may delegate (default: all but keys:manage and admin:full)",
    )
    p.set_defaults(handler=create)

    p = users.add_parser("list", parents=[common], help="list members")
    p.add_argument("--workspace", default="")
    p.set_defaults(handler=list_users)

    for name, handler, text in (
        ("disable", disable, "refuse sign-in and revoke every grant (tokens denied everywhere)"),
        ("enable", enable, "let a disabled member sign in again"),
        ("delete", delete, "delete a member, revoking every grant (audit history stays)"),
    ):
        p = users.add_parser(name, parents=[common], help=text)
        p.add_argument("id")
        p.set_defaults(handler=handler)
    p = users.add_parser(
        "reset-password",
        parents=[common],
        help="set a new password (read from stdin) and sign the member out everywhere",
    )
    p.add_argument("id")
    p.set_defaults(handler=reset_password)


def read_password() -> str:
    """From the terminal without echo, or the first line of piped stdin (never from argv,
    which other local users can read)."""
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != first:
            raise CliError("the passwords differ", EXIT_USAGE)
        return first
    line = sys.stdin.readline()
    password = line[:-1] if line.endswith("\n") else line
    if not password:
        raise CliError(
            'no password on stdin: pipe it in, e.g. `printf %s "$PW" | spauth ...`', EXIT_USAGE
        )
    return password


def user_json(user: pb.User) -> dict[str, object]:
    """The documented JSON shape of a member."""
    return {
        "id": user.id,
        "workspace": user.workspace,
        "email": user.email,
        "scopes": list(user.scopes),
        "created_at": rfc3339(user.create_time),
        "created_by": user.created_by,
        "state": user.state,
        "last_sign_in_at": rfc3339(user.last_sign_in_time, user.HasField("last_sign_in_time")),
        "disabled_at": rfc3339(user.disable_time, user.HasField("disable_time")),
    }


def _print(args: argparse.Namespace, users: list[pb.User]) -> None:
    if args.output == "json":
        emit_json([user_json(u) for u in users])
        return
    rows = [
        [
            u.id,
            u.email,
            u.workspace,
            u.state,
            str(rfc3339(u.create_time)),
            rfc3339(u.last_sign_in_time, u.HasField("last_sign_in_time")) or "never",
            ",".join(u.scopes),
        ]
        for u in users
    ]
    print(table(rows, ["ID", "EMAIL", "WORKSPACE", "STATE", "CREATED", "LAST SIGN-IN", "SCOPES"]))


def create(client: AdminClient, args: argparse.Namespace) -> int:
    request = pb.CreateUserRequest(
        workspace=args.workspace, email=args.email, password=read_password(), scopes=args.scopes
    )
    resp = client.call(pb_grpc.UserServiceStub(client.channel).CreateUser, request)
    if args.output == "json":
        emit_json(user_json(resp.user))
    else:
        _print(args, [resp.user])
    return 0


def list_users(client: AdminClient, args: argparse.Namespace) -> int:
    request = pb.ListUsersRequest(workspace=args.workspace)
    resp = client.call(pb_grpc.UserServiceStub(client.channel).ListUsers, request)
    _print(args, list(resp.users))
    return 0


def _changed(args: argparse.Namespace, user: pb.User, grants_revoked: int | None) -> int:
    if args.output == "json":
        out = user_json(user)
        if grants_revoked is not None:
            out["grants_revoked"] = grants_revoked
        emit_json(out)
        return 0
    _print(args, [user])
    if grants_revoked is not None:
        print(f"grants revoked: {grants_revoked}")
    return 0


def disable(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.UserServiceStub(client.channel)
    resp = client.call(stub.DisableUser, pb.DisableUserRequest(id=args.id))
    return _changed(args, resp.user, resp.grants_revoked)


def enable(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.UserServiceStub(client.channel)
    resp = client.call(stub.EnableUser, pb.EnableUserRequest(id=args.id))
    return _changed(args, resp.user, None)


def delete(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.UserServiceStub(client.channel)
    resp = client.call(stub.DeleteUser, pb.DeleteUserRequest(id=args.id))
    return _changed(args, resp.user, resp.grants_revoked)


def reset_password(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.UserServiceStub(client.channel)
    request = pb.ResetUserPasswordRequest(id=args.id, password=read_password())
    resp = client.call(stub.ResetUserPassword, request)
    return _changed(args, resp.user, resp.grants_revoked)
