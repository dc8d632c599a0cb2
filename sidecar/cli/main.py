"""Entry point of the ``spauth`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib import metadata

from sidecar.authz.policy import PolicyError
from sidecar.cli import (
    apps,
    audit,
    config_cmd,
    control_plane_cmd,
    keys,
    oauth_cmd,
    operator_cmd,
    serve,
    sidecar_cmd,
    users,
    webhooks,
    whoami,
)
from sidecar.cli.client import EXIT_USAGE, CliError, admin_client, fail, tls_files
from sidecar.config import ConfigError


def build_parser(environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if environ is None else environ
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--endpoint",
        default=env.get("SPAUTH_ENDPOINT", "127.0.0.1:50051"),
        help="admin API address (env SPAUTH_ENDPOINT, default 127.0.0.1:50051)",
    )
    common.add_argument("--output", "-o", choices=("table", "json"), default="table")
    tls = common.add_argument_group("TLS to the admin API (any of these turns TLS on)")
    tls.add_argument(
        "--tls", action="store_true", default=bool(env.get("SPAUTH_TLS")),
        help="use TLS with the system's trusted roots (env SPAUTH_TLS=1)",
    )  # fmt: skip
    for name, what in (
        ("ca", "CA certificate (PEM) that signed the admin port's certificate"),
        ("cert", "client certificate (PEM) for an mTLS admin port"),
        ("key", "the client certificate's private key (PEM)"),
    ):
        tls.add_argument(
            f"--tls-{name}",
            default=env.get(f"SPAUTH_TLS_{name.upper()}", ""),
            metavar="FILE",
            help=f"{what} (env SPAUTH_TLS_{name.upper()})",
        )
    parser = argparse.ArgumentParser(
        prog="spauth", description="StatusPulse Auth: control plane, sidecar and admin CLI"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.register(sub, common)
    key_commands = keys.register(sub, common)
    sidecar_cmd.register(sub, common)
    control_plane_cmd.register(sub, common)
    config_cmd.register(sub, common)
    apps.register(sub, common)
    users.register(sub, common)
    oauth_cmd.register(sub, common)
    operator_cmd.register(sub, common)
    audit.register(sub, common)
    webhooks.register(sub, common)
    whoami.register(sub, common)
    whoami.register_verify(key_commands, common)
    return parser


def _version() -> str:
    try:
        return metadata.version("statuspulse-auth")
    except metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        runner = getattr(args, "runner", None)
        if runner is not None:
            return int(runner(args))
        key = os.environ.get("STATUSPULSE_API_KEY", "")
        with admin_client(args.endpoint, key, tls_files(args)) as client:
            return int(args.handler(client, args))
    except CliError as exc:
        return fail(str(exc), exc.exit_code)
    except ConfigError as exc:
        for error in exc.errors[:-1]:
            fail(f"configuration: {error}", EXIT_USAGE)
        return fail(f"configuration: {exc.errors[-1]}", EXIT_USAGE)
    except PolicyError as exc:
        return fail(f"policy: {exc}", EXIT_USAGE)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`spauth audit export | head`): stop quietly, like cat does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
