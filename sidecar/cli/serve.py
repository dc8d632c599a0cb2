"""``spauth serve``: the embedded all-in-one product on one SQLite file."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from sidecar import logs
from sidecar.config import Settings, SidecarSettings, load_settings
from sidecar.core.models import Minted
from sidecar.core.policy import PolicyError
from sidecar.dataplane.policy_source import load_policy
from sidecar.dataplane.server import Sidecar

BOOTSTRAP_FILE = "bootstrap-key"


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", help="run the embedded control plane and sidecar")
    p.add_argument("--data-dir", help="state directory (env SPAUTH_DATA_DIR, default ./.spauth)")
    p.add_argument("--admin-addr", help="admin gRPC listen address (default 127.0.0.1:50051)")
    p.add_argument("--http-addr", help="OAuth HTTP listen address (default 127.0.0.1:8080)")
    p.add_argument("--sidecar-addr", help="sidecar gRPC listen address (default 127.0.0.1:9191)")
    p.add_argument("--policy", dest="policy_file", help="route policy TOML (default: built in)")
    p.set_defaults(handler=None, runner=run)


def write_bootstrap_key(data_dir: Path, minted: Minted) -> Path:
    """Write the operator key to ``<data-dir>/bootstrap-key`` with mode 0600 (never overwrite)."""
    path = data_dir / BOOTSTRAP_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(minted.secret + "\n")
    return path


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain and exit."""
    # Imported here so that admin CLI commands do not pay for loading the servers.
    from sidecar.controlplane import ControlPlane

    # Handlers first: a SIGTERM that arrives while the servers start still drains them.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    policy = load_policy(settings.policy_file)
    plane = ControlPlane(settings)
    minted = plane.bootstrap()
    if minted is not None:
        path = write_bootstrap_key(settings.data_dir, minted)
        print(f"Operator key (admin:full, all workspaces), shown once: {minted.secret}")
        print(f"It is also in {path} (mode 0600). export STATUSPULSE_API_KEY=$(cat {path})")
    await plane.start()
    sidecar = Sidecar(
        SidecarSettings(
            listen=settings.sidecar_addr,
            control_plane=f"127.0.0.1:{plane.admin_port}",
            policy_file=settings.policy_file,
            state_dir=settings.data_dir / "sidecar",
            sync_token=settings.sync_token,
            oauth_issuer=plane.oauth.config.issuer if plane.oauth else "",
            oauth_audience=settings.oauth_audience,
        ),
        policy=policy,
    )
    try:
        sidecar.start()
    except BaseException:
        await plane.aclose()
        raise
    print(
        f"spauth serve: admin gRPC on {settings.admin_addr}, "
        f"sidecar (ext_authz) on {settings.sidecar_addr}",
        flush=True,
    )
    if plane.oauth is not None:
        print(f"spauth serve: OAuth issuer {plane.oauth.config.issuer}", flush=True)
    await stop.wait()
    await asyncio.to_thread(sidecar.stop)
    await plane.aclose()


def run(args: argparse.Namespace) -> int:
    settings = load_settings(
        {
            "data_dir": args.data_dir,
            "admin_addr": args.admin_addr,
            "http_addr": args.http_addr,
            "sidecar_addr": args.sidecar_addr,
            "policy_file": args.policy_file,
        }
    )
    logs.configure(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except (OSError, PolicyError) as exc:
        print(f"spauth: error: {exc}", file=sys.stderr)
        return 1
    return 0
