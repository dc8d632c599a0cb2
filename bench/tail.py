"""Where the p99 at a fixed rate comes from: ``python -m bench.tail``.

The bench's fixed-rate row reports the sidecar's p99 minus the do-nothing server's. This tool
runs the same kind of load (h2load, open loop, ``--rate`` checks/s, the server pinned to CPU 0
and h2load to CPU 1) against targets started side by side, in rounds that alternate between
them, and says what ran while the slowest requests waited:

- the latency distribution of every run (p50 / p90 / p99 / p99.9 / max, µs) and, per round,
  each target's p99 minus the first target's (the do-nothing server by default);
- every thread of the target's process tree (threads named by what they run, as
  ``bench.wakeups`` does), from ``/proc/<pid>/task/*/schedstat``: CPU per second, times it ran
  per second and µs per run — a background thread that holds the GIL shows here, since a
  Python thread runs holding it;
- with ``--perf``, ``perf record -e sched:sched_switch`` on both CPUs during the run: every
  request's lifetime (from h2load's log, epoch converted to the monotonic clock perf uses) is
  overlaid with what each CPU ran meanwhile, and the µs per request of each kind of task —
  the target's RPC threads, its other threads by name, its child processes (the sidecar's link),
  h2load, other people's processes, idle — is reported for all requests and for the slowest 1 %.
  What is over-represented in the slowest 1 % is the tail's cause.

Targets: ``nothing`` (``bench.wakeups``'s do-nothing server), ``sidecar`` (as shipped, fed by a
real control plane), and either with ``+NAME=VALUE`` appended (an extra environment variable,
e.g. ``sidecar+BENCH_TAIL_SWITCH_INTERVAL_MS=0.5`` or ``sidecar+BENCH_TAIL_SLICE_RECORDS=0``, which
this module's sidecar entry point applies before it starts); several ``+`` may follow. Not a test:
timings on a shared machine are noise; nothing asserts on them."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from bench import h2load, wakeups
from bench.cpu import descendants, system_cpu_seconds
from bench.runner import load_for, wait_quiet
from bench.targets import RunningTarget, TargetEnv, TargetError

SERVER_CPU = 0
CLIENT_CPU = 1


# --- per-thread CPU from schedstat ----------------------------------------------------------


@dataclass(frozen=True)
class Sched:
    """One thread's name, CPU ns, run-queue wait ns and number of times it ran (schedstat)."""

    name: str
    pid: int
    cpu_ns: int
    wait_ns: int
    runs: int


def read_sched(root: int) -> dict[int, Sched]:
    """Every thread of ``root``'s process tree by tid."""
    out: dict[int, Sched] = {}
    for pid in descendants(root):
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                cpu, wait, runs = (int(v) for v in (task / "schedstat").read_text().split())
                name = (task / "comm").read_text().strip()
            except (OSError, ValueError):
                continue
            label = name if pid == root else f"child:{name}"
            out[int(task.name)] = Sched(label, pid, cpu, wait, runs)
    return out


@dataclass(frozen=True)
class ThreadUse:
    """What the threads of one name did during a run: CPU ms per second, runs per second, µs
    per run and µs of run-queue wait per run."""

    name: str
    threads: int
    cpu_ms_s: float
    runs_s: float
    us_per_run: float
    wait_us_per_run: float


def thread_use(
    before: Mapping[int, Sched], after: Mapping[int, Sched], seconds: float
) -> list[ThreadUse]:
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for tid, now in after.items():
        then = before.get(tid, Sched(now.name, now.pid, 0, 0, 0))
        row = rows[now.name]
        row[0] += 1
        row[1] += now.cpu_ns - then.cpu_ns
        row[2] += now.wait_ns - then.wait_ns
        row[3] += now.runs - then.runs
    out = [
        ThreadUse(
            name,
            n,
            cpu / 1e6 / seconds,
            runs / seconds,
            cpu / 1e3 / runs if runs else 0.0,
            wait / 1e3 / runs if runs else 0.0,
        )
        for name, (n, cpu, wait, runs) in rows.items()
    ]
    return sorted(out, key=lambda r: -r.cpu_ms_s)


# --- what ran while each request waited (perf sched) ----------------------------------------


@dataclass(frozen=True)
class Slice:
    """One run of one task on one CPU, monotonic seconds."""

    cpu: int
    start: float
    end: float
    tid: int
    pid: int
    name: str


def parse_timehist(text: str) -> list[Slice]:
    """``perf sched timehist`` lines: end time, [cpu], name[tid/pid], wait, delay, run (ms)."""
    slices: list[Slice] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 6 or not parts[1].startswith("["):
            continue
        try:
            end = float(parts[0])
            cpu = int(parts[1].strip("[]"))
            run_ms = float(parts[-1])
        except ValueError:
            continue
        task = " ".join(parts[2:-3])
        if task == "<idle>":  # the CPU's idle task has no ids on these lines
            slices.append(Slice(cpu, end - run_ms / 1e3, end, 0, 0, task))
            continue
        name, _, ids = task.rpartition("[")
        tid_s, _, pid_s = ids.rstrip("]").partition("/")
        try:
            tid = int(tid_s)
            pid = int(pid_s) if pid_s else tid
        except ValueError:
            continue
        slices.append(Slice(cpu, end - run_ms / 1e3, end, tid, pid, name))
    return slices


def classify(s: Slice, root: int, tree: set[int], client: set[int], rpc: set[str]) -> str:
    """A slice's kind, as the attribution reports it."""
    if s.tid == 0 or s.name.startswith("<idle>") or s.name.startswith("swapper"):
        return "idle"
    if s.pid == root:
        return "rpc" if s.name.startswith(tuple(rpc)) else f"own:{s.name}"
    if s.pid in tree:
        return f"child:{s.name}"
    if s.pid in client:
        return "h2load"
    return "others"


def attribute(
    requests: Sequence[tuple[float, float]],
    slices: Sequence[Slice],
    kind: Mapping[int, str],
    cpu: int,
) -> list[dict[str, float]]:
    """For each request (start, end: monotonic seconds), µs each kind of task ran on ``cpu``
    during it. ``kind`` maps a slice's index to its kind."""
    mine = sorted(
        ((s.start, s.end, kind[i]) for i, s in enumerate(slices) if s.cpu == cpu),
        key=lambda t: t[0],
    )
    starts = [t[0] for t in mine]
    longest = max((e - b for b, e, _ in mine), default=0.0)
    out: list[dict[str, float]] = []
    import bisect

    for begin, end in requests:
        used: dict[str, float] = defaultdict(float)
        i = bisect.bisect_left(starts, begin - longest)
        while i < len(mine) and mine[i][0] < end:
            b, e, k = mine[i]
            overlap = min(e, end) - max(b, begin)
            if overlap > 0:
                used[k] += overlap * 1e6
            i += 1
        out.append(dict(used))
    return out


@contextlib.contextmanager
def perf_sched(path: Path, cpus: str) -> Iterator[None]:
    """``perf record`` of every context switch on ``cpus``, perf itself on the client CPU."""
    argv = [
        "taskset", "-c", str(CLIENT_CPU), "perf", "record", "-q", "-k", "CLOCK_MONOTONIC",
        "-e", "sched:sched_switch", "-C", cpus, "-o", str(path),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)  # perf attaches
    try:
        yield
    finally:
        proc.send_signal(2)
        proc.wait(30)


def timehist(path: Path) -> list[Slice]:
    done = subprocess.run(
        ["perf", "sched", "timehist", "-i", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return parse_timehist(done.stdout)


# --- one run --------------------------------------------------------------------------------


@dataclass
class Run:
    """One fixed-rate run of one target."""

    target: str
    latencies_us: list[int]
    threads: list[ThreadUse]
    other_cores: float  # CPU used by everything but the target's tree and h2load, in cores
    load: float
    gc: list[tuple[int, int]] = field(default_factory=list)  # (generation, µs) per collection
    attribution: dict[str, dict[str, float]] = field(default_factory=dict)

    def pct(self, q: float) -> int:
        return h2load.percentile(sorted(self.latencies_us), q)


def _requests(workdir: Path, offset: float) -> list[tuple[float, float]]:
    """(start, end) of every request in the last fixed-rate run, monotonic seconds."""
    out: list[tuple[float, float]] = []
    for log in sorted(workdir.glob("h2load-rate-*.log")):
        for line in log.read_text().splitlines():
            start_us, _status, took = line.split("\t")[:3]
            start = int(start_us) / 1e6 - offset
            out.append((start, start + int(took) / 1e6))
    return out


# The threads that serve checks: grpc's poller and its RPC pool (the sidecar names its pool).
RPC_THREADS = frozenset({"_serve", "ThreadPoolExecu", "spauth-rpc"})


def measure(
    target: RunningTarget,
    *,
    rate: float,
    duration: float,
    workdir: Path,
    use_perf: bool,
    gc_log_path: Path | None = None,
) -> Run:
    pid = target.pids[0]
    load = load_for(target.cases[0], target.address, workdir)
    tree = set(descendants(pid))
    before = read_sched(pid)
    busy0 = system_cpu_seconds()[0]
    tree0 = sum(s.cpu_ns for s in before.values())
    offset = time.time() - time.monotonic()
    perf_file = workdir / "perf.data"
    stack = contextlib.ExitStack()
    if use_perf:
        stack.enter_context(perf_sched(perf_file, f"{SERVER_CPU},{CLIENT_CPU}"))
    t0 = time.monotonic()
    with stack:
        result = h2load.fixed_rate(
            load, rate=rate, duration=duration, cpus={CLIENT_CPU}, workdir=workdir
        )
    seconds = time.monotonic() - t0
    after = read_sched(pid)
    busy = system_cpu_seconds()[0] - busy0
    tree_cpu = (sum(s.cpu_ns for s in after.values()) - tree0) / 1e9
    client_cpu = result.stats.client_cpu_s
    run = Run(
        target.name,
        result.latencies_us,
        thread_use(before, after, seconds),
        max(0.0, busy - tree_cpu - client_cpu) / seconds,
        os.getloadavg()[0],
    )
    run.gc = collections(gc_log_path, t0, t0 + seconds) if gc_log_path else []
    if use_perf:
        run.attribution = _attribution(perf_file, pid, tree, workdir, offset)
    return run


def _attribution(
    perf_file: Path, pid: int, tree: set[int], workdir: Path, offset: float
) -> dict[str, dict[str, float]]:
    slices = timehist(perf_file)
    requests = _requests(workdir, offset)
    if not slices or not requests:
        return {}
    client = {s.pid for s in slices if s.name.startswith("h2load")}
    kinds = {i: classify(s, pid, tree, client, set(RPC_THREADS)) for i, s in enumerate(slices)}
    out: dict[str, dict[str, float]] = {}
    took = [e - b for b, e in requests]
    cut = sorted(took)[int(0.99 * len(took))]
    for cpu in (SERVER_CPU, CLIENT_CPU):
        per = attribute(requests, slices, kinds, cpu)
        for label, chosen in (
            ("all", per),
            ("slowest 1%", [u for u, t in zip(per, took, strict=True) if t >= cut]),
        ):
            totals: dict[str, float] = defaultdict(float)
            for used in chosen:
                for k, v in used.items():
                    totals[k] += v
            n = max(1, len(chosen))
            out[f"cpu{cpu} {label}"] = {k: round(v / n, 1) for k, v in totals.items()}
    runs: dict[str, list[float]] = defaultdict(list)
    for i, s in enumerate(slices):
        if s.cpu == SERVER_CPU and (s.pid in tree):
            runs[kinds[i]].append((s.end - s.start) * 1e6)
    for k, lengths in runs.items():
        lengths.sort()
        out[f"run µs {k}"] = {
            "n": len(lengths),
            "p50": lengths[len(lengths) // 2],
            "p99": lengths[int(0.99 * len(lengths))],
            "max": lengths[-1],
        }
    out["mean µs"] = {
        "all": statistics.mean(took) * 1e6,
        "slowest 1%": statistics.mean([t for t in took if t >= cut]) * 1e6,
    }
    return out


# --- targets --------------------------------------------------------------------------------


def factory(spec: str, env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """``nothing`` or ``sidecar``, each optionally followed by ``+NAME=VALUE`` items."""
    base, *items = spec.split("+")
    extra = dict(item.split("=", 1) for item in items)
    if base == "nothing":
        return wakeups.nothing(env, spec, "none", "-", extra)
    if base == "sidecar":
        return _sidecar(env, spec, extra)
    raise TargetError(f"unknown target {spec!r}: nothing or sidecar, with +NAME=VALUE items")


SWITCH_ENV = "BENCH_TAIL_SWITCH_INTERVAL_MS"  # read by this module's own sidecar entry point
GC_LOG_ENV = "BENCH_TAIL_GC_LOG"  # the same: a file each collection appends a line to
SLICE_ENV = "BENCH_TAIL_SLICE_RECORDS"  # the same: sidecar.auditship.gil.SLICE_RECORDS (0: off)


def log_collections(path: Path) -> Callable[[], None]:
    """Append ``monotonic-seconds generation µs thread`` to ``path`` after every collection of
    this process (line-buffered; the write happens outside the timed span); returns what stops
    it."""
    import gc
    import threading

    sink = path.open("a", buffering=1)
    started = [0.0]

    def watch(phase: str, info: dict[str, int]) -> None:
        now = time.monotonic()
        if phase == "start":
            started[0] = now
            return
        took = (now - started[0]) * 1e6
        sink.write(f"{now:.6f} {info['generation']} {took:.0f} {threading.current_thread().name}\n")

    gc.callbacks.append(watch)

    def stop() -> None:
        gc.callbacks.remove(watch)
        sink.close()

    return stop


@contextlib.contextmanager
def _sidecar(env: TargetEnv, name: str, extra: Mapping[str, str]) -> Iterator[RunningTarget]:
    """``spauth sidecar`` as ``bench.wakeups`` starts it (threads named, a fresh control plane),
    through this module's entry point, which applies ``BENCH_TAIL_SWITCH_INTERVAL_MS`` first
    (an A/B of the interval without a setting)."""
    from bench import sidecar_target as st
    from bench.targets import SERVER_ENV, launch_process

    with st.control_plane(env) as cp:
        valid = st._mint(cp.admin, cp.operator, ["checks:read"])
        argv = [
            env.python, "-m", "bench.tail", "sidecar", "--listen", "{listen}",
            "--control-plane", cp.admin, "--state-dir", str(env.workdir / f"{name}-state"),
            "--metrics-addr", "", "--threads", "4",
            "--sync-token-file", str(st.sync_token_file(env)),
        ]  # fmt: skip
        with launch_process(
            env,
            name,
            argv,
            st.sidecar_cases(valid)[:1],
            extra_env={**SERVER_ENV, GC_LOG_ENV: str(gc_log(env, name)), **extra},
            cwd=wakeups._ROOT,
            ready=st._serving,
        ) as target:
            yield target


def gc_log(env: TargetEnv, name: str) -> Path:
    return env.workdir / f"{name}-gc.log".replace("/", "_")


def collections(path: Path, start: float, end: float) -> list[tuple[int, int]]:
    """(generation, µs) of every collection logged in ``path`` between two monotonic times."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        at, gen, took = line.split()[:3]
        if start <= float(at) <= end:
            out.append((int(gen), int(took)))
    return out


# --- report ---------------------------------------------------------------------------------


def report(runs: Mapping[str, list[Run]]) -> str:
    names = list(runs)
    lines = [
        f"{'target':<40} {'p50':>6} {'p90':>6} {'p99':>6} {'p99.9':>7} {'max':>7} "
        f"{'others':>7}  (µs, median over rounds; others = cores of other people's CPU)"
    ]
    for name, rows in runs.items():

        def med(q: float, rows: list[Run] = rows) -> float:
            return statistics.median(r.pct(q) for r in rows)

        lines.append(
            f"{name:<40} {med(0.5):>6.0f} {med(0.9):>6.0f} {med(0.99):>6.0f} {med(0.999):>7.0f} "
            f"{statistics.median(max(r.latencies_us) for r in rows):>7.0f} "
            f"{statistics.median(r.other_cores for r in rows):>7.2f}"
        )
    first = names[0]
    for name in names[1:]:
        diffs = [b.pct(0.99) - a.pct(0.99) for a, b in zip(runs[first], runs[name], strict=True)]
        lines.append(
            f"p99 {name} minus {first}, per round: {diffs} µs; median "
            f"{statistics.median(diffs):.0f}"
        )
    for name, rows in runs.items():
        lines.append(f"\n{name}: threads (last round; CPU ms/s, runs/s, µs/run, wait µs/run)")
        for t in rows[-1].threads:
            if t.cpu_ms_s >= 0.05:
                lines.append(
                    f"  {t.name:<24} x{t.threads:<2} {t.cpu_ms_s:7.2f} {t.runs_s:8.1f} "
                    f"{t.us_per_run:7.1f} {t.wait_us_per_run:7.1f}"
                )
        for label, used in rows[-1].attribution.items():
            order = sorted(used.items(), key=lambda kv: -kv[1])
            if label.startswith("run µs"):
                order = list(used.items())
            shown = ", ".join(f"{k} {v:.0f}" for k, v in order)
            lines.append(f"  {label}: {shown}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, list[Run]]:
    workdir = Path(tempfile.mkdtemp(prefix="tail-"))
    env = TargetEnv(frozenset({SERVER_CPU}), workdir)
    runs: dict[str, list[Run]] = {name: [] for name in args.target}
    with contextlib.ExitStack() as stack:
        running = {name: stack.enter_context(factory(name, env)) for name in args.target}
        for target in running.values():  # warm up: connections, caches, the link
            load = load_for(target.cases[0], target.address, workdir)
            h2load.fixed_rate(
                load, rate=args.rate, duration=1.0, cpus={CLIENT_CPU}, workdir=workdir
            )
        for rnd in range(args.rounds):
            for name, target in running.items():
                wait_quiet(0.3, args.wait_quiet)
                one = measure(
                    target, rate=args.rate, duration=args.duration, workdir=workdir,
                    use_perf=args.perf, gc_log_path=gc_log(env, name),
                )  # fmt: skip
                runs[name].append(one)
                print(
                    f"round {rnd} {name}: p50 {one.pct(0.5)} p99 {one.pct(0.99)} "
                    f"p99.9 {one.pct(0.999)} µs, others {one.other_cores:.2f} cores, "
                    f"gc {one.gc}, "
                    f"load {one.load:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
    return runs


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["sidecar"]:
        wakeups.name_threads()
        if interval := os.environ.get(SWITCH_ENV):
            sys.setswitchinterval(float(interval) / 1e3)
        if gc_log := os.environ.get(GC_LOG_ENV):
            log_collections(Path(gc_log))
        if (records := os.environ.get(SLICE_ENV)) is not None:
            from sidecar.auditship import gil

            gil.SLICE_RECORDS = int(records)
        from sidecar.cli.main import main as spauth

        return spauth(list(argv))
    parser = argparse.ArgumentParser(prog="python -m bench.tail", description=__doc__)
    parser.add_argument("--target", action="append", help="nothing, sidecar[+NAME=VALUE…]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per run")
    parser.add_argument("--rate", type=float, default=1000.0, help="checks per second")
    parser.add_argument("--perf", action="store_true", help="attribute with perf sched")
    parser.add_argument("--wait-quiet", type=float, default=0.0, help="max s to wait for quiet")
    parser.add_argument("--json", type=Path, help="also write the runs here")
    args = parser.parse_args(argv)
    args.target = args.target or ["nothing", "sidecar"]
    runs = run(args)
    print(report(runs))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    name: [
                        {
                            "p50": r.pct(0.5),
                            "p90": r.pct(0.9),
                            "p99": r.pct(0.99),
                            "p999": r.pct(0.999),
                            "max": max(r.latencies_us),
                            "other_cores": r.other_cores,
                            "load": r.load,
                            "gc": r.gc,
                            "threads": [t.__dict__ for t in r.threads],
                            "attribution": r.attribution,
                        }
                        for r in rows
                    ]
                    for name, rows in runs.items()
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
