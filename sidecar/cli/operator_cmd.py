"""``spauth operator mint``: break-glass recovery of the operator key with local access to the
store (the SQLite file in ``--data-dir``, or ``--database-url``), for when every operator key is
revoked, expired or lost. No admin API call: the power comes from the store access itself, which
is also what the audit record says (actor ``break-glass``, the local user's name)."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any

from sidecar.cli.client import EXIT_API_ERROR, EXIT_USAGE, CliError, fail
from sidecar.config import Settings
from sidecar.core.apikeys import ApiKeyService
from sidecar.core.clock import SystemClock
from sidecar.core.errors import SpauthError


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    operator = sub.add_parser(
        "operator", help="operator key recovery (local access to the store)"
    ).add_subparsers(dest="operator_command", required=True, metavar="COMMAND")
    p = operator.add_parser(
        "mint",
        help="break-glass: mint a new operator key directly in the store (audited)",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--data-dir", type=Path, help="the data directory holding spauth.db")
    where.add_argument(
        "--database-url",
        help="postgresql://… (prefer SPAUTH_DATABASE_URL when it carries a password)",
    )
    p.add_argument("--name", default="break-glass", help="the new key's name")
    p.set_defaults(handler=None, runner=run)


def store_url(args: argparse.Namespace) -> str:
    """The store to open; a data directory without a store is an error, never a new store."""
    if args.database_url:
        return str(args.database_url)
    db = Path(args.data_dir) / "spauth.db"
    if not db.is_file():
        raise CliError(f"no store at {db}: give the control plane's --data-dir", EXIT_USAGE)
    return Settings(data_dir=Path(args.data_dir)).store_url


def run(args: argparse.Namespace) -> int:
    # Imported here: admin CLI commands do not pay for loading the store drivers.
    from sidecar.store import open_store

    try:
        store = open_store(store_url(args))
    except CliError as exc:
        return fail(str(exc), exc.exit_code)
    try:
        minted = ApiKeyService(store, SystemClock()).break_glass_operator_key(
            getpass.getuser(), args.name
        )
    except SpauthError as exc:
        return fail(f"break-glass failed: {exc.message}", EXIT_API_ERROR)
    finally:
        store.close()
    print(minted.secret)
    print(
        f"operator key {minted.key.id} (admin:full, all workspaces) minted; shown once. "
        "Revoke the lost or leaked operator keys now: spauth keys list --workspace '*'",
        file=sys.stderr,
    )
    return 0
