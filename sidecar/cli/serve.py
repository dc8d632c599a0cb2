"""``spauth serve``: the embedded all-in-one product on one SQLite file: the control plane and a
sidecar in one process, sharing one metrics registry (scraped on the HTTP port's /metrics)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any, TextIO

from sidecar import logs
from sidecar.authz.policy import PolicyError
from sidecar.authz.policy_source import load_policy
from sidecar.cli.control_plane_cmd import flags as plane_flags
from sidecar.cli.control_plane_cmd import stop_on_signal
from sidecar.cli.control_plane_cmd import write_bootstrap_key as _write_key
from sidecar.config import Settings, SidecarSettings
from sidecar.core.kek import KekError
from sidecar.core.models import Minted
from sidecar.dataplane.process import Sidecar
from sidecar.ops.configfile import load_control_plane_config, load_sidecar_config
from sidecar.ops.shutdown import arm, stop_budget
from sidecar.ops.tracing import TracingUnavailable

BOOTSTRAP_FILE = "bootstrap-key"


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", help="run the embedded control plane and sidecar")
    p.add_argument("--config", type=Path, help="TOML config file (top level + [sidecar])")
    p.add_argument("--data-dir", help="state directory (env SPAUTH_DATA_DIR, default ./.spauth)")
    p.add_argument("--admin-addr", help="admin gRPC listen address (default 127.0.0.1:50051)")
    p.add_argument("--http-addr", help="HTTP listen address: OAuth, /metrics, /healthz, /readyz")
    p.add_argument("--sidecar-addr", help="sidecar gRPC listen address (default 127.0.0.1:9191)")
    p.add_argument("--policy", dest="policy_file", help="route policy TOML (default: built in)")
    p.add_argument("--log-level")
    p.set_defaults(handler=None, runner=run)


def write_bootstrap_key(data_dir: Path, minted: Minted) -> Path:
    """Write the operator key to ``<data-dir>/bootstrap-key`` with mode 0600 (never overwrite)."""
    return _write_key(data_dir, minted.secret)


def announce_operator_key(secret: str, path: Path, out: TextIO | None = None) -> None:
    """Show the new operator key once, on a terminal only: output that is not a terminal is
    usually a log file (``spauth serve > serve.log &``), and a log must never hold a secret."""
    out = out or sys.stdout
    if out.isatty():
        print(f"Operator key (admin:full, all workspaces), shown once: {secret}", file=out)
    else:
        print(
            "Operator key (admin:full, all workspaces) created; not printed here: this output "
            "is not a terminal",
            file=out,
        )
    print(
        f"It is in {path} (mode 0600). export STATUSPULSE_API_KEY=$(cat {path})",
        file=out,
        flush=True,
    )


def embedded_sidecar_settings(
    settings: Settings,
    base: SidecarSettings,
    admin_port: int,
    oauth_issuer: str,
    sync_token: str = "",
) -> SidecarSettings:
    """The embedded sidecar: the [sidecar] table's settings, wired to this control plane."""
    return dataclasses.replace(
        base,
        listen=settings.sidecar_addr,
        control_plane=f"127.0.0.1:{admin_port}",
        oauth_issuer=oauth_issuer,
        oauth_audience=settings.oauth_audience,
        oauth_access_token_ttl=settings.oauth_access_token_ttl,
        policy_file=settings.policy_file,
        state_dir=settings.data_dir / "sidecar",
        # The control plane's own (configured or generated): the embedded sidecar is no exception.
        sync_token=sync_token or settings.sync_token,
        tracing_endpoint=base.tracing_endpoint or settings.tracing_endpoint,
    )


async def serve(settings: Settings, sidecar_base: SidecarSettings | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain and exit."""
    # Imported here so that admin CLI commands do not pay for loading the servers.
    from sidecar.controlplane import ControlPlane

    stop = stop_on_signal()  # first: a SIGTERM that arrives while starting still drains
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    policy = load_policy(settings.policy_file)
    plane = ControlPlane(settings)
    minted = plane.bootstrap()
    if minted is not None:
        announce_operator_key(minted.secret, write_bootstrap_key(settings.data_dir, minted))
    await plane.start()
    base = sidecar_base or SidecarSettings(metrics_addr="")
    try:
        sidecar = Sidecar(
            embedded_sidecar_settings(
                settings,
                base,
                plane.admin_port,
                plane.oauth.config.issuer if plane.oauth else "",
                plane.sync_token,
            ),
            policy=policy,
            metrics=plane.metrics,
        )
        sidecar.start()
    except BaseException:
        await plane.aclose()
        raise
    plane.health_checks.append(sidecar.health_report)
    print(
        f"spauth serve: admin gRPC on {settings.admin_addr}, HTTP on {settings.http_addr}, "
        f"sidecar (ext_authz) on {settings.sidecar_addr}",
        flush=True,
    )
    if plane.oauth is not None:
        print(f"spauth serve: OAuth issuer {plane.oauth.config.issuer}", flush=True)
    await stop.wait()
    # Two stops, one after the other: the sidecar's, then the control plane's.
    arm(
        stop_budget(base.drain_delay, base.shutdown_grace)
        + stop_budget(settings.drain_delay, settings.shutdown_grace),
        "serve",
    )
    await asyncio.to_thread(sidecar.stop)
    await plane.aclose()


def run(args: argparse.Namespace) -> int:
    flags = {
        **plane_flags(args),
        "sidecar_addr": args.sidecar_addr,
        "policy_file": args.policy_file,
    }
    settings = load_control_plane_config(args.config, flags)
    # The control plane's HTTP port serves the sidecar's metrics too: no separate port unless
    # the [sidecar] table or SPAUTH_SIDECAR_METRICS_ADDR asks for one.
    sidecar_base = load_sidecar_config(args.config, defaults={"metrics_addr": ""})
    logs.configure(settings.log_level)
    try:
        asyncio.run(serve(settings, sidecar_base))
    except (OSError, PolicyError, TracingUnavailable, KekError) as exc:
        print(f"spauth: error: {exc}", file=sys.stderr)
        return 1
    return 0
