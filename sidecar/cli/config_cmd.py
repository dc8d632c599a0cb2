"""``spauth config check FILE``: validate a configuration file as the processes would read it
(file, then ``SPAUTH_*`` environment) and print the effective settings, or every error."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sidecar.cli.client import EXIT_USAGE
from sidecar.config import ConfigError, load_settings, load_sidecar_settings
from sidecar.ops.configfile import SIDECAR_TABLE, effective, read_config_file, render


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("config", help="check configuration files")
    commands = p.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check",
        help="validate FILE and print the effective settings (with where each came from)",
        description="Exit 0 and print the effective configuration (secrets redacted), or exit 2 "
        "and print every error, each naming the setting, the value and its source.",
    )
    check.add_argument("file", type=Path, metavar="FILE")
    check.set_defaults(handler=None, runner=run_check)


def run_check(args: argparse.Namespace) -> int:
    try:
        cfg = read_config_file(args.file)
    except ConfigError as exc:
        return _report(exc.errors)
    errors: list[str] = []
    try:
        plane = load_settings(None, None, cfg.control_plane, cfg.label)
    except ConfigError as exc:
        errors.extend(exc.errors)
    try:
        side = load_sidecar_settings(None, None, cfg.sidecar, f"{cfg.label} [{SIDECAR_TABLE}]")
    except ConfigError as exc:
        errors.extend(exc.errors)
    if errors:
        return _report(errors)
    print(f"# {args.file}: OK. Effective settings (file, then SPAUTH_* environment):")
    title = "# control plane (spauth control-plane, spauth serve)"
    print(render(title, effective(plane, cfg.control_plane)))
    print()
    print(render(f"[{SIDECAR_TABLE}]  # spauth sidecar", effective(side, cfg.sidecar)))
    return 0


def _report(errors: list[str]) -> int:
    for error in errors:
        print(f"spauth: error: {error}", file=sys.stderr)
    return EXIT_USAGE
