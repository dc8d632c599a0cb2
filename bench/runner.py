"""Measure each case of a running target: verify, warm up, saturate, then a fixed rate."""

from __future__ import annotations

import hashlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import h2load
from bench.cases import CHECK_METHOD, GRPC_HEADERS, Case, GrpcCase
from bench.cpu import pin_tree, system_cpu_seconds, tree_cpu_by_process, tree_cpu_seconds
from bench.targets import RunningTarget

# CPU (in cores) used by processes other than server and h2load above which a run is suspect.
# A quiet machine shows 0.00-0.05 (kernel threads, this process polling).
NOISE_LIMIT = 0.1
# With --wait-quiet, a disturbed run is repeated up to this many times.
NOISY_RETRIES = 2


@dataclass(frozen=True)
class Settings:
    """How long and how hard to push; ``quick()`` is for smoke tests, not for numbers."""

    server_cpus: frozenset[int]
    client_cpus: frozenset[int]
    workdir: Path
    reps: int = 3
    # Short reps: each is paired with a ceiling rep (see _saturation), and drift between the two
    # matters more than length; 3 s is 300 ticks of /proc CPU time.
    duration: float = 3.0  # seconds per saturation rep
    warmup: float = 1.0  # seconds of saturation before the reps, not measured
    clients: int = 4
    streams: int = 16
    rate: float = 1000.0  # req/s of the fixed-rate run
    rate_duration: float = 5.0
    quiet_wait: float = 0.0  # max seconds to wait for other processes to go idle, per case

    def quick(self) -> Settings:
        """Tiny durations, one rep: proves the pipeline works, measures nothing useful."""
        return Settings(
            self.server_cpus,
            self.client_cpus,
            self.workdir,
            reps=1,
            duration=0.5,
            warmup=0.2,
            clients=self.clients,
            streams=self.streams,
            rate=self.rate,
            rate_duration=0.5,
        )

    def describe(self) -> dict[str, Any]:
        """Settings as JSON-ready values."""
        out = asdict(self)
        out["server_cpus"] = sorted(self.server_cpus)
        out["client_cpus"] = sorted(self.client_cpus)
        out["workdir"] = str(self.workdir)
        return out


@dataclass
class CaseResult:
    """One row of the report."""

    target: str
    case: str
    kind: str
    expect: str
    status: str = "ok"  # "ok" or "failed"
    error: str | None = None
    request_bytes: int | None = None
    saturation: dict[str, Any] = field(default_factory=dict)
    fixed_rate: dict[str, Any] = field(default_factory=dict)
    ratio_to_ceiling: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


def load_for(case: Case, address: str, workdir: Path) -> h2load.Load:
    """The h2load request for ``case`` against ``address``."""
    if isinstance(case, GrpcCase):
        body = _body_file(case.body(), workdir)
        return h2load.Load(f"http://{address}{CHECK_METHOD}", GRPC_HEADERS, body)
    status_class = case.expect_status // 100 * 100
    return h2load.Load(
        address.rstrip("/") + case.path,
        tuple(case.headers.items()),
        None if case.body is None else _body_file(case.body, workdir),
        range(status_class, status_class + 100),
        http1=case.http1,
    )


def _body_file(body: bytes, workdir: Path) -> Path:
    path = workdir / f"body-{hashlib.sha256(body).hexdigest()[:16]}.bin"
    path.write_bytes(body)
    return path


def _per_call_us(cpu_s: float, calls: int) -> float | None:
    return round(cpu_s / calls * 1e6, 1) if calls else None


class _CpuWindow:
    """CPU used during one run: the server tree's, h2load's, and everybody else's."""

    def __init__(self, pids: Sequence[int]) -> None:
        self._pids = pids
        self._start = time.monotonic()
        self._server = tree_cpu_seconds(pids)
        self._by_process = tree_cpu_by_process(pids)
        self._busy, self._steal = system_cpu_seconds()

    def close(self, client_cpu_s: float, calls: int) -> dict[str, Any]:
        """Per-call and utilisation figures; call right after the load generator exits."""
        elapsed = time.monotonic() - self._start
        server = tree_cpu_seconds(self._pids) - self._server
        busy, steal = system_cpu_seconds()
        other = max(0.0, busy - self._busy - server - client_cpu_s)
        extra: dict[str, Any] = {}
        by_process = tree_cpu_by_process(self._pids)
        if len(by_process) > 1:  # e.g. --workers N: show how the processes shared the load
            extra["server_cpu_util_by_process"] = [
                {"pid": pid, "cpu_util": round((cpu - self._by_process.get(pid, 0.0)) / elapsed, 3)}
                for pid, cpu in by_process.items()
            ]
        return {
            "server_cpu_us_per_call": _per_call_us(server, calls),
            "client_cpu_us_per_call": _per_call_us(client_cpu_s, calls),
            "server_cpu_util": round(server / elapsed, 3),
            # > ~0.1 means something else ran during the measurement: distrust the row.
            "other_cpu_util": round(other / elapsed, 3),
            "steal_util": round((steal - self._steal) / elapsed, 3),
            **extra,
        }


def _quietly(s: Settings, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one measurement; with ``quiet_wait`` set, wait for quiet first and retry a run that
    others disturbed (up to NOISY_RETRIES times), keeping the least disturbed attempt."""
    attempts = 1 + (NOISY_RETRIES if s.quiet_wait > 0 else 0)
    best: dict[str, Any] | None = None
    for attempt in range(1, attempts + 1):
        busy_before = wait_quiet(NOISE_LIMIT, s.quiet_wait)
        out = {**run(), "busy_before": busy_before, "attempt": attempt}
        if best is None or out["other_cpu_util"] < best["other_cpu_util"]:
            best = out
        if out["other_cpu_util"] <= NOISE_LIMIT:
            break
    assert best is not None
    return {**best, "tries": attempt}


def _saturation_run(load: h2load.Load, pids: Sequence[int], s: Settings) -> dict[str, Any]:
    window = _CpuWindow(pids)
    run = h2load.saturate(
        load,
        duration=s.duration,
        clients=s.clients,
        streams=s.streams,
        cpus=set(s.client_cpus),
        workdir=s.workdir,
    )
    cpu = window.close(run.client_cpu_s, run.done)
    return {"rps": run.rps, "requests": run.done, "unexpected": run.unexpected, **cpu}


# One saturation rep of the ceiling, run right before each rep of another target: the machine's
# speed drifts by ±10-15 % over minutes, so each rep is compared with a ceiling measured
# seconds earlier, and the ratio is the median of those paired ratios.
Baseline = Callable[[], dict[str, Any]]


def _saturation(
    load: h2load.Load, pids: Sequence[int], s: Settings, baseline: Baseline | None = None
) -> dict[str, Any]:
    h2load.saturate(  # warm-up, not measured
        load,
        duration=s.warmup,
        clients=s.clients,
        streams=s.streams,
        cpus=set(s.client_cpus),
        workdir=s.workdir,
    )
    reps = []
    for _ in range(s.reps):
        ceiling = baseline() if baseline is not None else None
        rep = _quietly(s, lambda: _saturation_run(load, pids, s))
        if ceiling is not None:
            rep["ceiling_rps"] = ceiling["rps"]
            rep["ceiling_server_cpu_us_per_call"] = ceiling["server_cpu_us_per_call"]
        reps.append(rep)
    summary: dict[str, Any] = {"rps": statistics.median(r["rps"] for r in reps)}
    if baseline is not None:
        summary["paired_ratio"] = round(
            statistics.median(r["rps"] / r["ceiling_rps"] for r in reps if r["ceiling_rps"]), 3
        )
    skip: tuple[str, ...] = ("rps", "requests", "unexpected", "busy_before", "attempt", "tries")
    skip += ("server_cpu_util_by_process", "ceiling_rps", "ceiling_server_cpu_us_per_call")
    for key in [k for k in reps[0] if k not in skip]:
        values = [r[key] for r in reps if r[key] is not None]
        summary[key] = round(statistics.median(values), 3) if values else None
    summary["unexpected"] = sum(r["unexpected"] for r in reps)
    summary["reps"] = reps
    return summary


def _fixed_rate_run(load: h2load.Load, pids: Sequence[int], s: Settings) -> dict[str, Any]:
    window = _CpuWindow(pids)
    run = h2load.fixed_rate(
        load, rate=s.rate, duration=s.rate_duration, cpus=set(s.client_cpus), workdir=s.workdir
    )
    cpu = window.close(run.stats.client_cpu_s, run.stats.done)
    lat = sorted(run.latencies_us)
    out: dict[str, Any] = {
        "target_rps": s.rate,
        "achieved_rps": round(run.stats.rps, 1),
        "requests": run.stats.done,
        "unexpected": run.stats.unexpected,
        **cpu,
    }
    for label, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)):
        out[f"{label}_ms"] = round(h2load.percentile(lat, fraction) / 1000, 3) if lat else None
    out["max_ms"] = round(lat[-1] / 1000, 3) if lat else None
    return out


def _fixed_rate(load: h2load.Load, pids: Sequence[int], s: Settings) -> dict[str, Any]:
    return _quietly(s, lambda: _fixed_rate_run(load, pids, s))


def wait_quiet(limit: float, max_wait: float) -> float | None:
    """Wait (up to ``max_wait`` s) for a 1-second window in which the machine's busy CPU is
    below ``limit`` cores; return the last window's busy cores, or None when not asked to wait.

    Called before each measured run, when our server is idle, so busy time is other people's:
    on a shared box this trades run time for numbers that mean something.
    """
    if max_wait <= 0:
        return None
    deadline = time.monotonic() + max_wait
    while True:
        before = system_cpu_seconds()[0]
        time.sleep(1.0)
        busy = system_cpu_seconds()[0] - before
        if busy < limit or time.monotonic() > deadline:
            return round(busy, 3)


def measure_case(
    target: RunningTarget, case: Case, s: Settings, baseline: Baseline | None = None
) -> CaseResult:
    """Verify ``case`` with one real call, then load it; a failed check skips the load.
    ``baseline`` (one ceiling rep) runs before each saturation rep when given."""
    result = CaseResult(target.name, case.name, case.kind, case.expect, info=dict(target.info))
    if target.clients is not None:
        result.info["clients"] = target.clients
    if isinstance(case, GrpcCase):
        result.request_bytes = len(case.request)
    error = case.verify(target.address)
    if error is not None:
        result.status, result.error = "failed", f"verification: {error}"
        return result
    load = load_for(case, target.address, s.workdir)
    try:
        result.saturation = _saturation(load, target.pids, s, baseline)
        result.fixed_rate = _fixed_rate(load, target.pids, s)
    except (RuntimeError, ValueError) as exc:
        result.status, result.error = "failed", str(exc)
        return result
    unexpected = result.saturation["unexpected"] + result.fixed_rate["unexpected"]
    if unexpected:
        result.status = "failed"
        result.error = f"{unexpected} requests under load failed or got an unexpected status"
    return result


def run_target(
    target: RunningTarget, s: Settings, ceiling: RunningTarget | None = None
) -> list[CaseResult]:
    """Measure every case of a started target, in order; with a running ``ceiling``, each
    saturation rep is paired with a ceiling rep just before it (``paired_ratio``)."""
    if target.pin:
        pin_tree(target.pids, set(s.server_cpus))
    if target.clients is not None:
        s = replace(s, clients=target.clients)
    baseline: Baseline | None = None
    if ceiling is not None:
        ceiling_load = load_for(ceiling.cases[0], ceiling.address, s.workdir)
        # The ceiling's own h2load settings (connections), not the target's.
        plain = replace(s, clients=ceiling.clients or s.clients)

        def baseline() -> dict[str, Any]:
            return _quietly(plain, lambda: _saturation_run(ceiling_load, ceiling.pids, plain))

    results = []
    for case in target.cases:
        print(f"  {target.name} / {case.name} …", file=sys.stderr, flush=True)
        results.append(measure_case(target, case, s, baseline))
    return results
