"""Where a server's context switches per check come from: ``python -m bench.wakeups``.

Latency at concurrency 1 on this shared 2-core machine moves by tens of microseconds between
runs; context switches do not. For each target this sends one-at-a-time checks (h2load
``-c 1 -m 1``) and reads every thread's ``voluntary_ctxt_switches`` and
``nonvoluntary_ctxt_switches`` from ``/proc/<pid>/task/*/status`` before and after, then prints
the switches per check by thread, next to the same threads' switches per second while idle.

Python threads are named by what they run (``Thread.run`` is wrapped to set the kernel's
15-byte thread name, cut at 15 bytes: grpc's channel spin thread, which runs the inner
``_run`` of ``_run_channel_spin_thread``, reads ``_run``), so a row says which thread woke, not
just how often. The targets:

- ``nothing``: the do-nothing ext_authz server (``bench.ceiling``);
- ``nothing+stream``: the same holding an idle outgoing server-streaming call to a peer process,
  as the sidecar's replication stream does;
- ``nothing+unary``: the same making an outgoing unary call every 0.5 s, as the audit shipper and
  usage reports do;
- ``nothing+stream1``: the same stream with ``SingleThreadedUnaryStream`` (no channel spin
  thread: the consuming thread polls);
- ``sidecar``: the sidecar as shipped, fed by a real control plane (its calls to the control
  plane made by the link process, docs/performance.md "The control-plane link");
- ``sidecar-inprocess``: the same with ``control_plane_link = "inprocess"`` (the calls made by
  threads of the serving process, as before issue #19);
- ``sidecar-audit-off``: the sidecar as shipped with decision records off (no audit shipping);
- ``sidecar-cut``: the sidecar with audit and usage reports off and its control plane stopped
  once it serves: it decides from its replica with no outgoing call at all.

``--env NAME=VALUE`` adds an environment variable to every target (e.g.
``GRPC_POLL_STRATEGY=poll``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from bench import h2load
from bench.cpu import off_server_prefix, process_cpu_seconds
from bench.runner import load_for
from bench.targets import (
    SERVER_ENV,
    RunningTarget,
    TargetEnv,
    TargetError,
    ceiling_cases,
    launch_process,
)

_ROOT = Path(__file__).resolve().parent.parent
_PR_SET_NAME = 15
PEER_SERVICE = "bench.wakeups.Peer"


# --- counting -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThreadCount:
    """One thread's name and its voluntary and involuntary context switches so far."""

    name: str
    voluntary: int
    involuntary: int


def read_threads(pid: int) -> dict[int, ThreadCount]:
    """Every thread of ``pid`` by tid, from ``/proc/<pid>/task/*/status``."""
    counts: dict[int, ThreadCount] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = dict(
                line.split(":\t", 1) for line in (task / "status").read_text().splitlines()
            )
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue  # the thread ended meanwhile
        counts[int(task.name)] = ThreadCount(
            fields["Name"].strip(),
            int(fields["voluntary_ctxt_switches"]),
            int(fields["nonvoluntary_ctxt_switches"]),
        )
    return counts


@dataclass(frozen=True)
class ThreadDelta:
    """What one thread (or every thread of one name) switched during a measurement."""

    name: str
    threads: int
    voluntary: int
    involuntary: int

    @property
    def total(self) -> int:
        return self.voluntary + self.involuntary


def deltas(
    before: Mapping[int, ThreadCount], after: Mapping[int, ThreadCount]
) -> list[ThreadDelta]:
    """Switches between two readings, summed per thread name (threads that started meanwhile
    count from zero; threads that ended are lost, which the harness avoids by warming up)."""
    by_name: dict[str, list[int]] = {}
    for tid, now in after.items():
        then = before.get(tid, ThreadCount(now.name, 0, 0))
        row = by_name.setdefault(now.name, [0, 0, 0])
        row[0] += 1
        row[1] += now.voluntary - then.voluntary
        row[2] += now.involuntary - then.involuntary
    rows = [ThreadDelta(name, n, v, i) for name, (n, v, i) in by_name.items()]
    return sorted(rows, key=lambda r: (-r.total, r.name))


@dataclass(frozen=True)
class Reading:
    """One target's switches per check (during one-at-a-time load) and per second (idle)."""

    target: str
    checks: int
    p50_us: int
    cpu_us: float  # the server process's CPU per check, in microseconds
    busy: list[ThreadDelta]
    idle: list[ThreadDelta]
    idle_seconds: float

    def per_check(self) -> float:
        return sum(r.total for r in self.busy) / max(1, self.checks)

    def idle_per_second(self) -> float:
        return sum(r.total for r in self.idle) / self.idle_seconds


def measure(
    target: RunningTarget, *, duration: float, idle: float, cpus: set[int], workdir: Path
) -> Reading:
    """Idle for ``idle`` seconds, then one-at-a-time checks for ``duration``, counting both."""
    pid = target.pids[0]
    load = load_for(target.cases[0], target.address, workdir)
    h2load.one_at_a_time(load, duration=0.5, cpus=cpus, workdir=workdir)  # warm up
    start = read_threads(pid)
    time.sleep(idle)
    middle = read_threads(pid)
    cpu = process_cpu_seconds(pid)
    result = h2load.one_at_a_time(load, duration=duration, cpus=cpus, workdir=workdir)
    cpu = process_cpu_seconds(pid) - cpu
    end = read_threads(pid)
    latencies = sorted(result.latencies_us)
    return Reading(
        target.name,
        len(latencies),
        h2load.percentile(latencies, 0.5) if latencies else 0,
        cpu * 1e6 / max(1, len(latencies)),
        deltas(middle, end),
        deltas(start, middle),
        idle,
    )


# --- thread names ---------------------------------------------------------------------------


def name_threads() -> None:
    """Wrap ``threading.Thread.run`` so each Python thread sets its kernel name to what it runs
    (the function in ``Thread-3 (_serve)``, else the thread's name), 15 bytes at most."""
    libc = ctypes.CDLL(None, use_errno=True)
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        name = self.name
        if name.endswith(")") and "(" in name:
            name = name[name.rindex("(") + 1 : -1]
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
        original(self)

    threading.Thread.run = run  # type: ignore[method-assign]


# --- the do-nothing server with an idle client, and its peer --------------------------------


def serve_peer() -> None:
    """A gRPC peer: ``Watch`` streams one message a second; ``Ping`` answers at once. Prints its
    port, then serves until killed."""
    import grpc

    def watch(_request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        while context.is_active():
            yield b"hb"
            time.sleep(1)

    handler = grpc.method_handlers_generic_handler(
        PEER_SERVICE,
        {
            "Watch": grpc.unary_stream_rpc_method_handler(watch),
            "Ping": grpc.unary_unary_rpc_method_handler(lambda _r, _c: b""),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def _hold_stream(peer: str, options: Sequence[tuple[str, int]] = ()) -> None:
    import grpc

    channel = grpc.insecure_channel(peer, options=options)
    for _ in channel.unary_stream(f"/{PEER_SERVICE}/Watch", None, None)(b""):
        pass


def _tick_unary(peer: str) -> None:
    import grpc

    ping = grpc.insecure_channel(peer).unary_unary(f"/{PEER_SERVICE}/Ping", None, None)
    while True:
        with contextlib.suppress(grpc.RpcError):
            ping(b"", timeout=1)
        time.sleep(0.5)


def serve_nothing(listen: str, client: str, peer: str) -> None:
    """The do-nothing server, with ``client`` (``none``, ``stream``, ``unary``) calls to
    ``peer`` from a background thread."""
    import grpc
    import grpc.experimental

    from bench import ceiling

    if client == "stream":
        threading.Thread(target=_hold_stream, args=(peer,), daemon=True).start()
    if client == "stream1":  # the consuming thread polls the call itself (no spin thread)
        options = [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
        threading.Thread(target=_hold_stream, args=(peer, options), daemon=True).start()
    if client == "unary":
        threading.Thread(target=_tick_unary, args=(peer,), daemon=True).start()
    ceiling.serve(listen)


@contextlib.contextmanager
def peer(env: TargetEnv) -> Iterator[str]:
    """A peer process off the server CPUs; yields its address."""
    argv = [*off_server_prefix(env.server_cpus), env.python, "-m", "bench.wakeups", "peer"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=_ROOT, start_new_session=True)
    try:
        assert proc.stdout is not None
        yield f"127.0.0.1:{int(proc.stdout.readline())}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def nothing(
    env: TargetEnv, name: str, client: str, peer_address: str, extra: Mapping[str, str]
) -> AbstractContextManager[RunningTarget]:
    argv = [env.python, "-m", "bench.wakeups", "nothing", "{listen}", client, peer_address]
    return launch_process(
        env, name, argv, ceiling_cases(), extra_env={**SERVER_ENV, **extra}, cwd=_ROOT
    )


# --- sidecars -------------------------------------------------------------------------------


@contextlib.contextmanager
def sidecar(
    env: TargetEnv, name: str, extra: Mapping[str, str], *, cut: bool
) -> Iterator[RunningTarget]:
    """``spauth sidecar`` (threads named) fed by a fresh control plane; with ``cut``, audit and
    usage reports off and the control plane stopped once the sidecar serves."""
    from bench import sidecar_target as st

    with st.control_plane(env) as cp:
        valid = st._mint(cp.admin, cp.operator, ["checks:read"])
        argv = [
            env.python, "-m", "bench.wakeups", "sidecar", "--listen", "{listen}",
            "--control-plane", cp.admin, "--state-dir", str(env.workdir / f"{name}-state"),
            "--metrics-addr", "", "--threads", "4",
            "--sync-token-file", str(st.sync_token_file(env)),
        ]  # fmt: skip
        if cut:
            extra = {
                **extra,
                "SPAUTH_SIDECAR_AUDIT": "off",
                "SPAUTH_SIDECAR_USAGE_REPORT_INTERVAL": "0",
            }
        with launch_process(
            env,
            name,
            argv,
            st.sidecar_cases(valid)[:1],
            extra_env={**SERVER_ENV, **extra},
            cwd=_ROOT,
            ready=st._serving,
        ) as target:
            if cut:
                os.kill(cp.pid, signal.SIGKILL)
            yield target


TARGETS = (
    "nothing", "nothing+stream", "nothing+stream1", "nothing+unary",
    "sidecar", "sidecar-inprocess", "sidecar-audit-off", "sidecar-cut",
)  # fmt: skip


def _factory(
    name: str, peer_address: str, extra: Mapping[str, str]
) -> Callable[[TargetEnv], AbstractContextManager[RunningTarget]]:
    clients = {
        "nothing": "none",
        "nothing+stream": "stream",
        "nothing+stream1": "stream1",
        "nothing+unary": "unary",
    }
    if name in clients:
        return lambda env: nothing(env, name, clients[name], peer_address, extra)
    if name == "sidecar-audit-off":
        audit_off = {**extra, "SPAUTH_SIDECAR_AUDIT": "off"}
        return lambda env: sidecar(env, name, audit_off, cut=False)
    if name == "sidecar-inprocess":
        inprocess = {**extra, "SPAUTH_SIDECAR_CONTROL_PLANE_LINK": "inprocess"}
        return lambda env: sidecar(env, name, inprocess, cut=False)
    if name in ("sidecar", "sidecar-cut"):
        return lambda env: sidecar(env, name, extra, cut=name == "sidecar-cut")
    raise TargetError(f"unknown target {name!r}: use one of {', '.join(TARGETS)}")


# --- report ---------------------------------------------------------------------------------


def report(readings: Mapping[str, list[Reading]]) -> str:
    lines = [
        f"{'target':<18} {'checks':>7} {'sw/check':>9} {'spread':>13} {'idle sw/s':>9} "
        f"{'p50 us':>7} {'cpu us':>7}  (median over rounds; spread = min..max)"
    ]
    for name, rows in readings.items():
        per = [r.per_check() for r in rows]
        lines.append(
            f"{name:<18} {sum(r.checks for r in rows):>7} {statistics.median(per):>9.2f} "
            f"{min(per):>6.2f}..{max(per):<6.2f} "
            f"{statistics.median(r.idle_per_second() for r in rows):>9.1f} "
            f"{statistics.median(r.p50_us for r in rows):>7.0f} "
            f"{statistics.median(r.cpu_us for r in rows):>7.0f}"
        )
    for name, rows in readings.items():
        last = rows[-1]
        lines.append(f"\n{name}: per check by thread (last round; threads, voluntary+involuntary)")
        for row in last.busy:
            if row.total:
                lines.append(
                    f"  {row.name:<16} x{row.threads:<2} {row.voluntary / last.checks:6.2f} + "
                    f"{row.involuntary / last.checks:5.2f}"
                )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, list[Reading]]:
    extra = dict(item.split("=", 1) for item in args.env)
    workdir = Path(tempfile.mkdtemp(prefix="wakeups-"))
    env = TargetEnv(frozenset({0}), workdir)
    readings: dict[str, list[Reading]] = {name: [] for name in args.target}
    with contextlib.ExitStack() as stack:
        peer_address = stack.enter_context(peer(env))
        running = {
            name: stack.enter_context(_factory(name.split("@")[0], peer_address, extra)(env))
            for name in args.target
        }
        for rnd in range(args.rounds):
            for name, target in running.items():
                reading = measure(
                    target, duration=args.duration, idle=args.idle, cpus={1}, workdir=workdir
                )
                readings[name].append(reading)
                print(
                    f"round {rnd} {name}: {reading.per_check():.2f} switches/check, "
                    f"p50 {reading.p50_us} us, {reading.checks} checks",
                    file=sys.stderr,
                    flush=True,
                )
    return readings


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["peer"]:
        serve_peer()
        return 0
    if argv[:1] == ["nothing"]:
        name_threads()
        serve_nothing(*argv[1:4])
        return 0
    if argv[:1] == ["sidecar"]:
        name_threads()
        from sidecar.cli.main import main as spauth

        return spauth(list(argv))
    parser = argparse.ArgumentParser(prog="python -m bench.wakeups", description=__doc__)
    parser.add_argument(
        "--target", action="append", help=f"one of {', '.join(TARGETS)} (repeatable)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of checks a round")
    parser.add_argument("--idle", type=float, default=1.0, help="idle seconds counted a round")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for every target")
    parser.add_argument("--json", type=Path, help="also write the readings here")
    args = parser.parse_args(argv)
    args.target = args.target or ["nothing", "sidecar", "sidecar-inprocess"]
    readings = run(args)
    print(report(readings))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    name: [
                        {
                            "per_check": r.per_check(),
                            "p50_us": r.p50_us,
                            "cpu_us": r.cpu_us,
                            "checks": r.checks,
                            "idle_per_second": r.idle_per_second(),
                            "threads": {t.name: t.total / max(1, r.checks) for t in r.busy},
                        }
                        for r in rows
                    ]
                    for name, rows in readings.items()
                },
                indent=2,
            )
        )
    return 0


# Targets for `python -m bench --target bench.wakeups:NAME`: the throughput side of the A/B.
POLL_ENV: Mapping[str, str] = {"GRPC_POLL_STRATEGY": "poll"}


def ceiling_poll(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """The do-nothing server with gRPC's ``poll`` polling engine."""
    argv = [env.python, "-m", "bench.ceiling", "--listen", "{listen}"]
    return launch_process(
        env, "ceiling-poll", argv, ceiling_cases(), extra_env={**SERVER_ENV, **POLL_ENV}, cwd=_ROOT
    )


def sidecar_inprocess(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """The sidecar making its calls to the control plane from the serving process (as before the
    link): the "before" row of the link's A/B next to ``sidecar``."""
    from bench.sidecar_target import _sidecar

    return _sidecar(env, "sidecar-inprocess", {"SPAUTH_SIDECAR_CONTROL_PLANE_LINK": "inprocess"})


def sidecar_poll(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """The sidecar with gRPC's ``poll`` polling engine."""
    from bench.sidecar_target import _sidecar

    return _sidecar(env, "sidecar-poll", POLL_ENV)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
