"""Targets: the things benchmarked, and how to start them.

A *target factory* is a callable ``factory(env: TargetEnv)`` returning a context manager that
yields a :class:`RunningTarget` — its address, its cases and the pids whose CPU counts as the
server's — and cleans up on exit. :func:`launch_process` covers the usual case of one command
line that serves ``Authorization/Check`` on a port; a factory can do any set-up around it
(start a control plane, mint keys, write a policy) and build its cases from what it created.

Factories are named in :data:`BUILTIN` as lazy ``"module:attribute"`` strings, or given on the
command line as ``--target package.module:attribute``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from bench.cases import Case, grpc_case, typical_headers
from bench.cpu import pin_tree, taskset_prefix

# The gRPC experiment the ceiling (and the sidecar, to stay comparable) runs with: turning the
# event-engine listener off was 10-28 % faster on this machine with grpcio 1.85 (REFERENCE.md,
# re-measured by this bench). Experiment names change between grpcio versions; a stale name is
# caught at launch ("Unknown experiment" in the server's log fails the target).
SERVER_ENV: Mapping[str, str] = {"GRPC_EXPERIMENTS": "-event_engine_listener"}


@dataclass(frozen=True)
class TargetEnv:
    """What the runner gives a factory: CPUs to pin the server to and a scratch directory."""

    server_cpus: frozenset[int]
    workdir: Path
    python: str = sys.executable

    def free_port(self) -> int:
        """A currently free TCP port on 127.0.0.1 (the usual small race applies)."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
            return port


@dataclass(frozen=True)
class RunningTarget:
    """A started target. ``address`` is ``host:port`` for gRPC cases, a base URL for HTTP ones."""

    name: str
    address: str
    cases: Sequence[Case]
    pids: Sequence[int]
    info: Mapping[str, object] = field(default_factory=dict)  # copied into the JSON result
    pin: bool = True  # pin ``pids`` (and children) to the server CPUs before measuring
    # h2load connections for saturation (None = Settings.clients). SO_REUSEPORT balances
    # connections, so a target with N processes on one port needs enough of them.
    clients: int | None = None
    # The do-nothing counterpart on the same path (Envoy + ceiling for Envoy + sidecar), running
    # alongside: latency runs alternate between the two and report the difference.
    reference: RunningTarget | None = None
    # The control plane ingesting this target's decision records (runs outside ``pids``).
    ingest: IngestMeter | None = None


@dataclass(frozen=True)
class IngestCount:
    """What a control plane has ingested so far: records stored, and records refused by reason."""

    stored: int
    refused: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class IngestMeter:
    """A process outside the target that works for every check — the control plane storing the
    sidecar's decision records: its CPU (``pids`` and their descendants) and ``read()``, its own
    counters of what it has ingested so far, read around each saturation rep; ``cross_check``,
    when given, counts the stored records another way (its database), at the rep's ends only."""

    pids: Sequence[int]
    read: Callable[[], IngestCount]
    cross_check: Callable[[], int] | None = None


TargetFactory = Callable[[TargetEnv], AbstractContextManager[RunningTarget]]


class TargetError(RuntimeError):
    """A target could not be started or resolved."""


def _wait_listening(proc: subprocess.Popen[bytes], port: int, deadline: float, log: Path) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TargetError(f"exited with {proc.returncode} before listening:\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TargetError(f"not listening on port {port} in time:\n{_tail(log)}")


def _wait_ready(
    proc: subprocess.Popen[bytes],
    listen: str,
    ready: Callable[[str], bool] | None,
    deadline: float,
    log: Path,
) -> None:
    while ready is not None and not ready(listen):
        if proc.poll() is not None:
            raise TargetError(f"exited with {proc.returncode} before ready:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise TargetError(f"listening on {listen} but not ready in time:\n{_tail(log)}")
        time.sleep(0.1)


def _tail(log: Path, chars: int = 2000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    # The child leads its own session, so its process group holds only what it started.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def log_path(env: TargetEnv, name: str) -> Path:
    """Where :func:`launch_process` writes the stdout/stderr of the process it calls ``name``."""
    return env.workdir / f"{name}.log"


@contextlib.contextmanager
def launch_process(
    env: TargetEnv,
    name: str,
    argv: Sequence[str],
    cases: Sequence[Case],
    *,
    extra_env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    ready: Callable[[str], bool] | None = None,
    ready_timeout: float = 30.0,
) -> Iterator[RunningTarget]:
    """Start ``argv`` pinned to the server CPUs; yield it as a target; stop it afterwards.

    ``{listen}``, ``{host}`` and ``{port}`` in ``argv`` are replaced by the chosen address.
    The target counts as started once the port accepts connections and ``ready(listen)``
    (if given: e.g. a health probe for a server that listens before it has its data) returns
    True. The server's stdout/stderr go to ``<workdir>/<name>.log``.
    """
    port = env.free_port()
    listen = f"127.0.0.1:{port}"
    final = [a.format(listen=listen, host="127.0.0.1", port=port) for a in argv]
    log = log_path(env, name)
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [*taskset_prefix(set(env.server_cpus)), *final],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(extra_env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + ready_timeout
        _wait_listening(proc, port, deadline, log)
        _wait_ready(proc, listen, ready, deadline, log)
        if "Unknown experiment" in _tail(log, 100_000):
            raise TargetError(f"GRPC_EXPERIMENTS names an unknown experiment:\n{_tail(log)}")
        pin_tree([proc.pid], set(env.server_cpus))
        info = {"argv": final, "env": dict(extra_env or {})}
        yield RunningTarget(name, listen, cases, [proc.pid], info)
    finally:
        _stop(proc)


def ceiling_cases() -> list[Case]:
    """The ceiling answers everything with allow; one realistic request is enough."""
    key = "spk_" + "7" * 32 + "AbC123"
    return [grpc_case("allow", typical_headers(x_api_key=key), "allow")]


_PROJECT_ROOT = Path(__file__).resolve().parent.parent  # so `-m bench.ceiling` imports


def ceiling(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """The do-nothing server with the chosen experiments (:data:`SERVER_ENV`)."""
    argv = [env.python, "-m", "bench.ceiling", "--listen", "{listen}"]
    return launch_process(
        env, "ceiling", argv, ceiling_cases(), extra_env=SERVER_ENV, cwd=_PROJECT_ROOT
    )


def ceiling_default_experiments(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """The same server with grpcio's default experiments, to re-check the choice."""
    argv = [env.python, "-m", "bench.ceiling", "--listen", "{listen}"]
    return launch_process(
        env,
        "ceiling-default-experiments",
        argv,
        ceiling_cases(),
        extra_env={"GRPC_EXPERIMENTS": ""},
        cwd=_PROJECT_ROOT,
    )


CEILING = "ceiling"
# name -> "module:attribute" of a TargetFactory; imported only when selected.
BUILTIN: dict[str, str] = {
    CEILING: "bench.targets:ceiling",
    "ceiling-default-experiments": "bench.targets:ceiling_default_experiments",
    "sidecar": "bench.sidecar_target:sidecar",
    "sidecar-audit-off": "bench.sidecar_target:sidecar_audit_off",
    "sidecar-usage-off": "bench.sidecar_target:sidecar_usage_off",
    "envoy": "bench.envoy_targets:envoy_noauth",
    "envoy+ceiling": "bench.envoy_targets:envoy_ceiling",
    "envoy+sidecar": "bench.envoy_targets:envoy_sidecar",
    "sidecar-jwt": "bench.oauth_targets:sidecar_jwt",
    "sidecar-jwt-nocache": "bench.oauth_targets:sidecar_jwt_nocache",
    "sidecar-workers-1": "bench.workers_target:sidecar_workers_1",
    "sidecar-workers-2": "bench.workers_target:sidecar_workers_2",
    "ceiling-workers-2": "bench.workers_target:ceiling_workers_2",
}
# Run by `python -m bench` without --target (the ceiling always runs: ratios need it).
DEFAULT_TARGETS: list[str] = [
    CEILING, "sidecar", "sidecar-audit-off", "envoy", "envoy+ceiling", "envoy+sidecar",
]  # fmt: skip
DEFAULT_TARGETS += ["sidecar-jwt", "sidecar-jwt-nocache"]
DEFAULT_TARGETS += ["sidecar-workers-1", "sidecar-workers-2", "ceiling-workers-2"]


def resolve(spec: str) -> TargetFactory:
    """Turn a builtin name or ``module:attribute`` into a factory."""
    path = BUILTIN.get(spec, spec)
    module_name, sep, attr = path.partition(":")
    if not sep:
        known = ", ".join(sorted(BUILTIN))
        raise TargetError(f"unknown target {spec!r}: use one of {known} or module:attribute")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise TargetError(f"cannot load target {spec!r}: {exc}") from exc
    if not callable(factory):
        raise TargetError(f"target {spec!r} is not callable")
    return cast(TargetFactory, factory)
