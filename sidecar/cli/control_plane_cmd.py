"""``spauth control-plane``: the control plane alone (admin gRPC + HTTP), without the embedded
sidecar, so it can run as several replicas behind a Service while sidecars run next to apps."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from pathlib import Path
from typing import Any

from sidecar import logs
from sidecar.config import Settings
from sidecar.core.kek import KekError
from sidecar.ops.configfile import load_control_plane_config
from sidecar.ops.shutdown import arm, stop_budget
from sidecar.ops.tracing import TracingUnavailable

BOOTSTRAP_FILE = "bootstrap-key"


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "control-plane", help="run the control plane without a sidecar (admin gRPC + HTTP)"
    )
    p.add_argument("--config", type=Path, help="TOML config file (top-level settings)")
    p.add_argument("--data-dir", help="state directory for the SQLite store (./.spauth)")
    p.add_argument(
        "--database-url",
        help="postgresql://… shared by every replica (default: SQLite in --data-dir); "
        "prefer SPAUTH_DATABASE_URL when it carries a password",
    )
    p.add_argument("--admin-addr", help="admin gRPC listen address (default 127.0.0.1:50051)")
    p.add_argument("--http-addr", help="HTTP listen address (default 127.0.0.1:8080)")
    p.add_argument(
        "--redis-url", help="change bus between replicas and the audit stream (scale-out)"
    )
    p.add_argument("--log-level")
    p.set_defaults(handler=None, runner=run)


def flags(args: argparse.Namespace) -> dict[str, object]:
    """The settings given as flags (None = not given)."""
    return {
        "data_dir": getattr(args, "data_dir", None),
        "database_url": getattr(args, "database_url", None),
        "admin_addr": getattr(args, "admin_addr", None),
        "http_addr": getattr(args, "http_addr", None),
        "redis_url": getattr(args, "redis_url", None),
        "log_level": getattr(args, "log_level", None),
    }


def write_bootstrap_key(data_dir: Path, secret: str) -> Path:
    """Write the operator key to ``<data-dir>/bootstrap-key``, mode 0600, never overwriting."""
    path = data_dir / BOOTSTRAP_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    return path


# Young-generation collections every 20,000 allocations, as in the sidecar (sidecar_cmd.py).
GC_GEN0_THRESHOLD = 20_000


def stop_on_signal() -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT. Installed before anything binds a port, so
    a signal that arrives during start-up still leads to a clean drain and exit 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_control_plane(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain and return."""
    # Imported here so that admin CLI commands do not pay for loading the servers.
    from sidecar.controlplane import ControlPlane

    stop = stop_on_signal()
    if not settings.database_url:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    plane = ControlPlane(settings)
    minted = plane.bootstrap()
    if minted is not None:
        # Written to a private file, never printed: this process's output goes to shared logs.
        # With PostgreSQL the data dir holds only this file: made when the key is.
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = write_bootstrap_key(settings.data_dir, minted.secret)
        print(f"Operator key (admin:full) created: {path} (mode 0600)", flush=True)
    await plane.start()
    # What start-up built (modules, descriptors, servers) lives as long as the process: keep it
    # out of the collector's way, and collect the young generation less often. Ingest allocates
    # a few short-lived objects per decision record, not cycles: 27.2 -> 26.0 µs per record
    # in-process (docs/performance.md, "Audit ingest"). The sidecar does the same.
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)
    print(
        f"spauth control-plane: admin gRPC on {settings.admin_addr} (port {plane.admin_port}), "
        f"HTTP on {settings.http_addr} (port {plane.http_port})",
        flush=True,
    )
    await stop.wait()
    arm(stop_budget(settings.drain_delay, settings.shutdown_grace), "control-plane")
    await plane.aclose()


def run(args: argparse.Namespace) -> int:
    settings = load_control_plane_config(args.config, flags(args))
    logs.configure(settings.log_level)
    try:
        asyncio.run(run_control_plane(settings))
    except (OSError, TracingUnavailable, KekError) as exc:
        print(f"spauth: error: {exc}", file=sys.stderr)
        return 1
    return 0
