"""``spauth sidecar``: the data plane on its own, fed by a remote control plane."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from sidecar import logs
from sidecar.authz.policy import PolicyError
from sidecar.config import SidecarSettings
from sidecar.dataplane.process import Sidecar
from sidecar.ops.configfile import load_sidecar_config
from sidecar.ops.shutdown import arm, stop_budget
from sidecar.ops.tracing import TracingUnavailable


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sidecar", help="run the ext_authz sidecar against a control plane")
    p.add_argument("--config", type=Path, help="TOML config file; its [sidecar] table applies")
    p.add_argument("--listen", help="gRPC listen address (default 127.0.0.1:9191)")
    p.add_argument(
        "--control-plane",
        help="control plane admin address, or several replicas as A:PORT,B:PORT "
        "(default 127.0.0.1:50051)",
    )
    p.add_argument("--policy", dest="policy_file", help="route policy TOML (default: built in)")
    p.add_argument("--state-dir", help="where the replica snapshot is kept (.spauth-sidecar)")
    p.add_argument(
        "--sync-token-file",
        help="file holding the control plane's sync token (e.g. <data-dir>/sync-token); "
        "or env SPAUTH_SIDECAR_SYNC_TOKEN",
    )
    p.add_argument("--max-staleness", help="seconds without sync before failing closed (900)")
    p.add_argument("--threads", help="gRPC worker threads per process (4)")
    p.add_argument("--workers", help="processes sharing the port with SO_REUSEPORT (1)")
    p.add_argument(
        "--metrics-addr", help="/metrics, /healthz, /readyz address (127.0.0.1:9192; '' = off)"
    )
    p.add_argument("--oauth-issuer", help="issuer of OAuth access tokens (http://127.0.0.1:8080)")
    p.add_argument("--oauth-audience", help="audience of OAuth access tokens (statuspulse-api)")
    p.add_argument(
        "--oauth-access-token-ttl",
        help="the control plane's access-token lifetime; longer-lived tokens are refused (1h)",
    )
    p.add_argument("--redis-url", help="share rate limits and ship audit through Redis (scale-out)")
    p.add_argument("--failure-limit-source", help="failed credentials per source per window (50)")
    p.add_argument("--failure-limit-key", help="failed credentials per key id per window (20)")
    p.add_argument("--failure-window", help="seconds the failure limits count over (60)")
    p.add_argument("--log-level")
    p.set_defaults(handler=None, runner=run)


def _settings(args: argparse.Namespace) -> SidecarSettings:
    return load_sidecar_config(
        args.config,
        {
            "listen": args.listen,
            "control_plane": args.control_plane,
            "policy_file": args.policy_file,
            "state_dir": args.state_dir,
            "sync_token_file": args.sync_token_file,
            "max_staleness": args.max_staleness,
            "threads": args.threads,
            "workers": args.workers,
            "metrics_addr": args.metrics_addr,
            "oauth_issuer": args.oauth_issuer,
            "oauth_audience": args.oauth_audience,
            "oauth_access_token_ttl": args.oauth_access_token_ttl,
            "redis_url": args.redis_url,
            "failure_limit_source": args.failure_limit_source,
            "failure_limit_key": args.failure_limit_key,
            "failure_window": args.failure_window,
            "log_level": args.log_level,
        },
    )


GC_GEN0_THRESHOLD = 20_000
WORKER_ENV = "SPAUTH_SIDECAR_WORKER_INDEX"  # internal: marks a process run_workers started


def settle_for_serving() -> None:
    """The process settings of a started sidecar (``python -m bench.tail_inprocess`` applies
    the same ones to the sidecar it measures)."""
    # This process only serves checks from here on. What it holds now (modules, descriptors,
    # the policy) lives as long as it does: keep it out of the collector's way, and collect the
    # young generation less often — a check allocates short-lived objects, not cycles.
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)


def serve_one(settings: SidecarSettings) -> int:
    """Run one sidecar process until SIGTERM/SIGINT, then drain and exit 0."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        # Set by run_workers for its children only: they share one port on purpose.
        sidecar = Sidecar(settings, reuse_port=WORKER_ENV in os.environ)
        sidecar.start()
    except (PolicyError, OSError, TracingUnavailable) as exc:
        print(f"spauth: error: {exc}", file=sys.stderr)
        return 1
    settle_for_serving()
    port = sidecar.status_server.port if sidecar.status_server else 0
    print(
        f"spauth sidecar: listening on {settings.listen} (port {sidecar.port})"
        + (f", metrics on port {port}" if port else ""),
        flush=True,
    )
    stop.wait()
    arm(stop_budget(settings.drain_delay, settings.shutdown_grace), "sidecar")
    sidecar.stop()
    # Everything a stop keeps is on disk or sent by now (spool fsynced, replica saved, spans
    # and log lines flushed). Skip the interpreter's teardown: it joins the gRPC server's
    # thread pool, where a handler grpc could not cancel holds the exit, and runs library
    # atexit hooks with nothing left to do.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_workers(settings: SidecarSettings, argv: list[str]) -> int:
    """Start ``workers`` copies of this command on the same port, each with its own replica and
    state directory; forward SIGTERM/SIGINT; exit when they all have. Worker ``i`` serves its
    metrics on the metrics port + ``i`` (each process counts its own checks).

    A worker that exits on its own (crash, OOM kill) would leave the port served by fewer
    processes without anyone noticing, so the others are stopped and this process exits non-zero:
    the supervisor (systemd, Kubernetes) restarts the whole set."""
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.returncode is None:
                child.send_signal(signum)

    # Before starting anything: a signal during start-up must reach the workers too.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    for index in range(settings.workers):
        state = Path(settings.state_dir) / f"worker-{index}"
        child_argv = [*argv, "--workers", "1", "--state-dir", str(state)]
        if settings.metrics_addr:
            child_argv += ["--metrics-addr", _offset_port(settings.metrics_addr, index)]
        env = {**os.environ, WORKER_ENV: str(index)}
        children.append(subprocess.Popen([sys.executable, "-m", "sidecar", *child_argv], env=env))
        if stopping:  # signalled while starting: stop the ones started so far
            forward(signal.SIGTERM, None)
    failed = 0
    while any(child.returncode is None for child in children):
        pid, status = os.wait()  # any worker; retried after a signal handler runs (PEP 475)
        child = next((c for c in children if c.pid == pid), None)
        if child is None:
            continue
        child.returncode = os.waitstatus_to_exitcode(status)
        if not stopping:
            index = children.index(child)
            print(
                f"spauth: error: worker {index} (pid {pid}) exited with {child.returncode}; "
                "stopping the other workers",
                file=sys.stderr,
                flush=True,
            )
            code = child.returncode
            failed = code if code > 0 else 128 - code if code < 0 else 1  # killed: 128 + signal
            forward(signal.SIGTERM, None)
    return failed or max((c.returncode or 0 for c in children), default=0)


def _offset_port(addr: str, index: int) -> str:
    host, _, port = addr.rpartition(":")
    return f"{host}:{int(port) + index}" if int(port) else addr


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    logs.configure(settings.log_level)
    if settings.workers > 1:
        argv = _without(list(args.argv), ("--workers", "--state-dir"))
        return run_workers(settings, argv)
    return serve_one(settings)


def _without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in flags:
            skip = True
            continue
        if any(arg.startswith(f + "=") for f in flags):
            continue
        out.append(arg)
    return out
