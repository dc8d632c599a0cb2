"""The sidecar's own tail, in process: ``python -m bench.tail_inprocess``.

A real ``Sidecar`` (as ``spauth sidecar`` builds it: replication, the control-plane link, the
audit writer and shipper, usage reports, the denial log's writer, housekeeping), fed by a real
control plane, started in this process and settled as ``serve_one`` settles it (gc frozen, its
thresholds). One thread then does what an RPC thread does at ``--rate`` checks a second: sleeps
until the next check is due, wakes, and calls the compiled Check handler with the bytes of
``--case``: an allow (the default), a missing scope (``wrong-scope``: the key on a metrics path)
or a well-formed key the replica does not hold (``unknown-key``; the source failure limit is
raised out of reach, so it stays that denial and does not become a blocked source's 429).
Each check is timed from its due time (µs):

- ``late``: due → the thread runs Python again (the OS wake-up, then the GIL if a background
  thread holds it), split by the thread's own ``schedstat`` into ``runq`` (runnable, waiting for
  the CPU: the machine) and ``gil`` (the rest: not runnable, i.e. waiting for the GIL; timer
  slack is set to 1 ns for the thread);
- ``call``: the handler call itself (wall);
- ``total``: due → answered.

Phases alternate (``--phases`` pairs of ``--seconds`` each) between sys.setswitchinterval values
(``--switch-ms``, the first is the default 5 ms) in the same process, so the A/B shares the
machine's state; a ``bare`` phase (``--bare``) runs the same loop in a process with no sidecar
(a child interpreter: the machine's and the interpreter's own wake-up, the do-nothing side).
The process is pinned to CPU 0, as the bench pins the server; the control plane runs off it.

Not a test: timings on a shared machine are noise; nothing asserts on them."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SERVER_CPU = 0
_PR_SET_TIMERSLACK = 29


@dataclass
class Samples:
    """Per-check components, µs."""

    late: list[float] = field(default_factory=list)
    runq: list[float] = field(default_factory=list)
    gil: list[float] = field(default_factory=list)
    call: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    due: list[float] = field(default_factory=list)  # perf_counter seconds

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name: percentiles(values)
            for name, values in vars(self).items()
            if values and name != "due"
        }

    def during(self, intervals: Sequence[tuple[float, float]]) -> dict[str, float]:
        """``late`` of the checks due while one of ``intervals`` (sorted) was under way, against
        the others'."""
        inside: list[float] = []
        outside: list[float] = []
        j = 0
        for due, late in zip(self.due, self.late, strict=True):
            while j < len(intervals) and intervals[j][1] < due:
                j += 1
            hit = j < len(intervals) and intervals[j][0] <= due
            (inside if hit else outside).append(late)
        row = {"checks": float(len(inside))}
        if inside:
            row |= {"late mean": round(sum(inside) / len(inside), 1), "late max": max(inside)}
        if outside:
            row["others' late mean"] = round(sum(outside) / len(outside), 1)
        return row


def percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    n = len(ordered)

    def at(q: float) -> float:
        return round(ordered[min(n - 1, int(q * n))], 1)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "p99.9": at(0.999),
            "max": round(ordered[-1], 1), "mean": round(sum(ordered) / n, 1)}  # fmt: skip


def _runq_ns(fd: int) -> int:
    """This thread's run-queue wait so far (``/proc/thread-self/schedstat``, 2nd field)."""
    return int(os.pread(fd, 128, 0).split()[1])


def paced(call: Callable[[], object], rate: float, seconds: float) -> Samples:
    """``call`` ``rate`` times a second, each from its due time, sleeping in between."""
    ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
    fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
    out = Samples()
    interval = 1.0 / rate
    clock = time.perf_counter
    try:
        start = clock() + interval
        for i in range(int(rate * seconds)):
            due = start + i * interval
            q0 = _runq_ns(fd)
            wait = due - clock()
            if wait > 0:
                time.sleep(wait)
            woke = clock()
            q1 = _runq_ns(fd)
            call()
            done = clock()
            late = max(0.0, woke - due) * 1e6
            runq = min(late, (q1 - q0) / 1e3)
            out.late.append(late)
            out.runq.append(runq)
            out.gil.append(late - runq)
            out.call.append((done - woke) * 1e6)
            out.total.append(max(0.0, done - due) * 1e6)
            out.due.append(due)
    finally:
        os.close(fd)
    return out


class Units:
    """Times background units of work of a live sidecar: each wrapped method records, per call,
    its thread's CPU µs (a Python thread runs holding the GIL, so this is about how long it kept
    a check waiting), its wall µs (which adds waits that release the GIL: I/O, the link), its
    wall interval (to find the checks that arrived during it) and its longest stretch of CPU
    between two hand-overs of the GIL (``sidecar.auditship.gil.let_go``)."""

    def __init__(self) -> None:
        self.cpu: dict[str, list[float]] = {}
        self.wall: dict[str, list[float]] = {}
        self.span: dict[str, list[float]] = {}
        self.intervals: dict[str, list[tuple[float, float]]] = {}
        self._since = time.monotonic()
        self._local = threading.local()
        from sidecar.auditship import gil

        shipped = gil.let_go

        def let_go() -> None:  # the stretch since the unit began or the last hand-over
            self._mark()
            shipped()

        gil.let_go = let_go

    def _mark(self) -> None:
        label = getattr(self._local, "label", None)
        if label is not None:
            now = time.thread_time()
            self.span[label].append((now - self._local.mark) * 1e6)
            self._local.mark = now

    def wrap(self, owner: object, attr: str, label: str) -> None:
        inner = getattr(owner, attr)
        cpu, wall = self.cpu.setdefault(label, []), self.wall.setdefault(label, [])
        intervals = self.intervals.setdefault(label, [])
        self.span.setdefault(label, [])
        local = self._local

        def timed(*args: object, **kwargs: object) -> object:
            outer = getattr(local, "label", None)
            local.label, local.mark = label, time.thread_time()
            c0, t0 = local.mark, time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._mark()
                local.label = outer
                t1 = time.perf_counter()
                wall.append((t1 - t0) * 1e6)
                cpu.append((time.thread_time() - c0) * 1e6)
                intervals.append((t0, t1))

        setattr(owner, attr, timed)

    def reset(self) -> None:
        for values in (*self.cpu.values(), *self.wall.values(), *self.span.values()):
            values.clear()
        for spans in self.intervals.values():
            spans.clear()
        self._since = time.monotonic()

    def during(self, prefix: str) -> list[tuple[float, float]]:
        """The wall intervals of every unit whose label starts with ``prefix``."""
        return sorted(i for label, spans in self.intervals.items()
                      if label.startswith(prefix) for i in spans)  # fmt: skip

    def summary(self) -> dict[str, dict[str, float]]:
        seconds = time.monotonic() - self._since
        out = {}
        for label, cpu in self.cpu.items():
            if cpu:
                row = {f"cpu {k}": v for k, v in percentiles(cpu).items() if k in ("p50", "max")}
                row["longest stretch"] = round(max(self.span[label], default=0.0), 1)
                row["per_s"] = round(len(cpu) / seconds, 1)
                row["cpu_ms_per_s"] = round(sum(cpu) / 1e3 / seconds, 2)
                row["wall max"] = round(max(self.wall[label]), 1)
                out[label] = row
        return out


def watch_units(sidecar: object) -> Units:
    """The sidecar's background units of work (docs/performance.md, "The sidecar's own tail")."""
    units = Units()
    s: Any = sidecar
    if s.audit is not None:
        units.wrap(s.audit, "flush", "audit-writer: queue → spool")
        units.wrap(s.audit.spool, "sync", "audit-writer: fsync")
        if s.audit.shipper is not None:
            units.wrap(s.audit.shipper._spool, "read", "audit-shipper: spool read")
            units.wrap(s.audit.shipper, "_deliver", "audit-shipper: send (+ wait)")
            units.wrap(s.audit.spool, "ack", "audit-shipper: ack")
    if s.usage is not None:
        units.wrap(s.usage, "poll", "usage-reporter")
    if s.denial_log.writer is not None:
        units.wrap(s.denial_log.writer, "drain", "log-writer")
    units.wrap(s, "_update_health", "housekeeping: health")
    units.wrap(s.denial_log, "flush", "housekeeping: denial log flush")
    if s.link is not None:
        units.wrap(s.link, "_deliver", "link reader: message")
    return units


def bare(rate: float, seconds: float) -> dict[str, dict[str, float]]:
    """The same loop calling nothing, in a fresh interpreter with no other thread."""
    code = (
        "import json, sys; from bench.tail_inprocess import paced; "
        f"print(json.dumps(paced(lambda: None, {rate}, {seconds}).summary()))"
    )
    done = subprocess.run(
        ["taskset", "-c", str(SERVER_CPU), sys.executable, "-c", code],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    summary: dict[str, dict[str, float]] = json.loads(done.stdout)
    return summary


CASES = ("allow", "wrong-scope", "unknown-key")


def _sidecar_check(
    workdir: Path, admin: str, token_file: Path, key: str, case: str = "allow"
) -> tuple[object, Callable[[], object]]:
    from envoy.service.auth.v3 import external_auth_pb2 as ext

    from bench.denial_cost import CHECKS, METRICS, _request
    from sidecar.cli.sidecar_cmd import settle_for_serving
    from sidecar.core import keyformat
    from sidecar.dataplane.process import Sidecar
    from sidecar.ops.configfile import load_sidecar_config

    settings = load_sidecar_config(
        None,
        {
            "listen": "127.0.0.1:0",
            "control_plane": admin,
            "state_dir": str(workdir / "sidecar-state"),
            "sync_token_file": str(token_file),
            "metrics_addr": "",
            "threads": "4",
            "failure_limit_source": str(10**9),  # an unknown key's row stays that denial
        },
    )
    sidecar = Sidecar(settings)
    sidecar.start()
    assert sidecar.fast_check is not None, "the compiled Check path is not built"
    data = _request(CHECKS, "authorization", f"Bearer {key}")
    fast = sidecar.fast_check
    deadline = time.monotonic() + 30
    while ext.CheckResponse.FromString(fast(data, None)).status.code != 0:  # type: ignore[arg-type]
        if time.monotonic() > deadline:
            raise RuntimeError("the sidecar never allowed the minted key")
        time.sleep(0.05)
    if case == "wrong-scope":  # the key holds checks:read only
        data = _request(METRICS, "x-api-key", key)
    elif case == "unknown-key":
        data = _request(CHECKS, "x-api-key", keyformat.mint_key())
    settle_for_serving()
    return sidecar, lambda: fast(data, None)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tail_inprocess", description=__doc__)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=3.0, help="per phase")
    parser.add_argument("--phases", type=int, default=3, help="rounds of every interval")
    parser.add_argument("--switch-ms", type=float, action="append", help="intervals to compare")
    parser.add_argument(
        "--slice",
        type=int,
        action="append",
        help="the shipper's records per GIL slice to compare (0: whole batches; default 64)",
    )
    parser.add_argument("--bare", action="store_true", help="add the no-sidecar loop per round")
    parser.add_argument("--case", choices=CASES, default="allow", help="what every check is")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    intervals = args.switch_ms or [5.0]
    slice_sizes = args.slice or [64]
    os.sched_setaffinity(0, {SERVER_CPU})
    from bench import sidecar_target as st
    from bench.targets import TargetEnv

    workdir = Path(tempfile.mkdtemp(prefix="tail-inprocess-"))
    env = TargetEnv(frozenset({SERVER_CPU}), workdir)
    results: dict[str, list[dict[str, Any]]] = {}
    with st.control_plane(env) as cp:
        key = st._mint(cp.admin, cp.operator, ["checks:read"])
        token_file = st.sync_token_file(env)
        sidecar, check = _sidecar_check(workdir, cp.admin, token_file, key, args.case)
        print(f"case: {args.case}", file=sys.stderr)
        units = watch_units(sidecar)
        try:
            paced(check, args.rate, 1.0)  # warm
            for rnd in range(args.phases):
                phases: list[tuple[str, Callable[[], dict[str, dict[str, float]]]]] = [
                    (
                        f"sidecar, switch {ms} ms, slice {n}",
                        _phase(check, ms, n, args.rate, args.seconds, units),
                    )
                    for ms in intervals
                    for n in slice_sizes
                ]
                if args.bare:
                    phases.append(("bare loop, no sidecar", _bare(args.rate, args.seconds)))
                for name, run in phases:
                    summary = run()
                    results.setdefault(name, []).append(summary)
                    load = os.getloadavg()[0]
                    print(f"round {rnd} {name}: {_line(summary)} load {load:.2f}", file=sys.stderr)
        finally:
            sys.setswitchinterval(0.005)
            sidecar.stop()  # type: ignore[attr-defined]
    print(report(results))
    for name, rounds in results.items():
        if not name.startswith("sidecar"):
            continue
        print(f"\n{name}: background units, last round (µs of the thread's CPU)")
        for label, row in rounds[-1]["units"].items():
            print(f"  {label:<34} " + ", ".join(f"{k} {v}" for k, v in row.items()))
        for what in ("during shipper", "during writer", "during log-writer"):
            print(f"  checks due {what[7:]} work, per round: "
                  + "; ".join(", ".join(f"{k} {v:.0f}" for k, v in r[what].items())
                              for r in rounds))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _phase(
    check: Callable[[], object],
    ms: float,
    slice_records: int,
    rate: float,
    seconds: float,
    units: Units,
) -> Callable[[], dict[str, Any]]:
    """A phase with the GIL switch interval ``ms`` and the audit shipper's slices of
    ``slice_records`` (sidecar.auditship.gil; 0: whole batches, as before)."""
    from sidecar.auditship import gil

    def run() -> dict[str, Any]:
        shipped = gil.SLICE_RECORDS
        sys.setswitchinterval(ms / 1e3)
        gil.SLICE_RECORDS = slice_records
        units.reset()
        try:
            samples = paced(check, rate, seconds)
        finally:
            sys.setswitchinterval(0.005)
            gil.SLICE_RECORDS = shipped
        return {
            **samples.summary(),
            "units": units.summary(),
            "during shipper": samples.during(units.during("audit-shipper: s")),
            "during writer": samples.during(units.during("audit-writer: queue")),
            "during log-writer": samples.during(units.during("log-writer")),
        }

    return run


def _bare(rate: float, seconds: float) -> Callable[[], dict[str, Any]]:
    return lambda: bare(rate, seconds)


def _line(summary: dict[str, dict[str, float]]) -> str:
    return ", ".join(
        f"{k} p99 {summary[k]['p99']:.0f} p99.9 {summary[k]['p99.9']:.0f}"
        for k in ("total", "gil", "runq", "call")
    )


def report(results: dict[str, list[dict[str, dict[str, float]]]]) -> str:
    import statistics

    lines = [f"{'phase':<36} {'part':<6} {'p50':>7} {'p90':>7} {'p99':>7} {'p99.9':>8} {'max':>8}"
             "  (µs; median over rounds)"]  # fmt: skip
    for name, rounds in results.items():
        for part in ("total", "late", "gil", "runq", "call"):
            row = [statistics.median(r[part][q] for r in rounds)
                   for q in ("p50", "p90", "p99", "p99.9", "max")]  # fmt: skip
            lines.append(f"{name:<36} {part:<6} " + " ".join(f"{v:>7.1f}" for v in row[:3])
                         + f" {row[3]:>8.1f} {row[4]:>8.1f}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
