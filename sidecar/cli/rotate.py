"""``spauth keys rotate KEY_ID --target TARGET``: the rotation runbook (sidecar.rotation)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sidecar.cli.client import EXIT_USAGE, AdminClient, CliError
from sidecar.cli.output import emit_json
from sidecar.core.errors import InvalidArgument
from sidecar.core.validation import parse_duration
from sidecar.rotation.runbook import Runbook, Timing
from sidecar.rotation.state import StateError
from sidecar.rotation.targets import TargetError, parse


def register(keys: Any, common: argparse.ArgumentParser) -> None:
    p = keys.add_parser(
        "rotate",
        parents=[common],
        help="replace a key, store the new secret, verify it, revoke the old key when unused",
    )
    p.add_argument("id")
    p.add_argument(
        "--target",
        required=True,
        help="dotenv:PATH[#VAR], aws-secretsmanager:ID, vault-kv:MOUNT/PATH[#FIELD], "
        "k8s-secret:NS/NAME[#KEY] (manifest on stdout) or exec:COMMAND (secret on stdin)",
    )
    p.add_argument("--grace", default="24h", metavar="DURATION", help="revoke anyway after")
    p.add_argument(
        "--settle", default="15m", metavar="DURATION", help="how long the old key must be unused"
    )
    p.add_argument("--poll", default="30s", metavar="DURATION", help="how often to look")
    p.add_argument(
        "--state-file",
        type=Path,
        help="where progress is kept for resuming (default .spauth-rotate-KEY_ID.json)",
    )
    p.set_defaults(handler=rotate)


def _seconds(text: str, flag: str) -> int:
    try:
        return parse_duration(text, flag)
    except InvalidArgument as exc:
        raise CliError(exc.message, EXIT_USAGE) from None


def rotate(client: AdminClient, args: argparse.Namespace) -> int:
    try:
        target = parse(args.target)
    except TargetError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    timing = Timing(
        grace=_seconds(args.grace, "--grace"),
        settle=_seconds(args.settle, "--settle"),
        poll=max(1, _seconds(args.poll, "--poll")),
    )
    state_file = args.state_file or Path(f".spauth-rotate-{args.id}.json")
    # Progress goes to stderr: stdout may carry a manifest (k8s-secret) or JSON.
    runbook = Runbook(
        client, target, state_file, timing, progress=lambda m: print(m, file=sys.stderr)
    )
    try:
        new_id = runbook.run(args.id)
    except StateError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if args.output == "json":
        emit_json({"old": args.id, "new": new_id, "target": args.target})
    return 0
