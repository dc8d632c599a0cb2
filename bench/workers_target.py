"""Throughput versus ``spauth sidecar --workers N``: N processes on one port (SO_REUSEPORT), each
with its own replica, fed by a real control plane; and the do-nothing ceiling run the same way.

CPU placement (this machine has 2 CPUs, see bench/README.md "Workers"):

* ``sidecar-workers-1`` — one process pinned to the server CPU, h2load on the other: the same
  placement as the ceiling, so its ``ratio_to_ceiling`` is the usual efficiency figure.
* ``sidecar-workers-2`` and ``ceiling-workers-2`` — two processes free to use **both** CPUs while
  h2load stays pinned to the client CPU, i.e. one worker shares a CPU with the load generator.
  Their ``ratio_to_ceiling`` is a *scaling* figure (box throughput ÷ one process on a dedicated
  core); sidecar-workers-2 ÷ ceiling-workers-2 is the sidecar's efficiency at that placement.
  They use 8 h2load connections (``RunningTarget.clients``): the kernel spreads connections, not
  requests, over the processes, and with 4 connections all of them land on one process in 1 run
  of 8; with 8, in 1 of 128. Per-process CPU of every rep is in the JSON
  (``server_cpu_util_by_process``), so an unbalanced run shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path

from bench.sidecar_target import _ROOT, _control_plane, _mint, sidecar_cases, sync_token_file
from bench.targets import SERVER_ENV, RunningTarget, TargetEnv, ceiling_cases, launch_process

# h2load connections for the multi-process rows (see the module docstring).
MULTI_PROCESS_CLIENTS = 8


def _all_cpus() -> frozenset[int]:
    # os.sched_getaffinity(0) is narrowed to the client CPUs by `python -m bench` itself.
    return frozenset(range(os.cpu_count() or 1))


def _free_port_run(env: TargetEnv, count: int) -> int:
    """The first of ``count`` consecutive free ports (worker i serves metrics on base + i)."""
    for _ in range(50):
        base = env.free_port()
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports")


def _all_ready(base: int, count: int) -> bool:
    """Every worker's /readyz says ready: its own replica is loaded (one port per worker)."""
    for port in range(base, base + count):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                if resp.status != 200 or json.load(resp).get("status") == "not_serving":
                    return False
        except (OSError, urllib.error.URLError, ValueError):
            return False
    return True


@contextlib.contextmanager
def _sidecar_workers(env: TargetEnv, workers: int, spread: bool) -> Iterator[RunningTarget]:
    name = f"sidecar-workers-{workers}"
    with _control_plane(env) as (admin, operator):
        valid = _mint(admin, operator, ["checks:read"])
        metrics = _free_port_run(env, workers)
        argv = [
            env.python, "-m", "sidecar", "sidecar", "--listen", "{listen}",
            "--control-plane", admin, "--state-dir", str(env.workdir / f"{name}-state"),
            "--metrics-addr", f"127.0.0.1:{metrics}", "--threads", "4",
            "--workers", str(workers), "--sync-token-file", str(sync_token_file(env)),
        ]  # fmt: skip
        launch_env = replace(env, server_cpus=_all_cpus()) if spread else env
        with launch_process(
            launch_env,
            name,
            argv,
            sidecar_cases(valid)[:1],  # throughput versus N: the allow case says it
            extra_env=SERVER_ENV,
            cwd=_ROOT,
            ready=lambda _listen: _all_ready(metrics, workers),
        ) as target:
            info = {**target.info, "workers": workers, "placement": _placement(spread)}
            yield replace(
                target,
                info=info,
                pin=not spread,
                clients=MULTI_PROCESS_CLIENTS if workers > 1 else None,
            )


def _placement(spread: bool) -> str:
    if spread:
        return "server processes on all CPUs, h2load pinned to the client CPUs (shared)"
    return "server pinned to the server CPUs, h2load to the client CPUs"


def sidecar_workers_1(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """``--workers 1`` (one process, no supervisor), pinned like the ceiling."""
    return _sidecar_workers(env, 1, spread=False)


def sidecar_workers_2(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """``--workers 2`` on both CPUs, sharing one with h2load."""
    return _sidecar_workers(env, 2, spread=True)


@contextlib.contextmanager
def ceiling_workers_2(env: TargetEnv) -> Iterator[RunningTarget]:
    """Two do-nothing servers on one port (SO_REUSEPORT), placed like sidecar-workers-2."""
    argv = [env.python, "-m", "bench.ceiling", "--listen", "{listen}", "--processes", "2"]
    launch_env = replace(env, server_cpus=_all_cpus())
    with launch_process(
        launch_env,
        "ceiling-workers-2",
        argv,
        ceiling_cases(),
        extra_env=SERVER_ENV,
        cwd=_ROOT,
        ready=lambda listen: _listeners(int(listen.rsplit(":", 1)[1])) >= 2,
    ) as target:
        info = {**target.info, "workers": 2, "placement": _placement(True)}
        yield replace(target, info=info, pin=False, clients=MULTI_PROCESS_CLIENTS)


def _listeners(port: int) -> int:
    """How many sockets listen on ``port`` (each SO_REUSEPORT process has its own). gRPC binds
    127.0.0.1 as a v4-mapped IPv6 socket, so both tables are read."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                count += 1
    return count


__all__ = ["ceiling_workers_2", "sidecar_workers_1", "sidecar_workers_2"]
