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

from bench import cp_cost, h2load
from bench.cases import CHECK_METHOD, GRPC_HEADERS, Case, GrpcCase
from bench.cpu import pin_tree, system_cpu_seconds, tree_cpu_by_process, tree_cpu_seconds
from bench.targets import IngestMeter, RunningTarget

# CPU (in cores) used by processes other than server and h2load above which a run is suspect.
# A quiet machine shows 0.00-0.05 (kernel threads, this process polling).
NOISE_LIMIT = 0.1
# A gRPC row whose request is at least this many bytes longer or shorter than the ceiling's own
# (the access-token rows: 1,325 bytes against 532) also gets a ceiling rep sent the row's own
# bytes before each of its saturation reps (``same_request_paired_ratio``): the do-nothing
# server pays for a longer request too (+2.7 µs per call for those 800 bytes, bench/README.md,
# "The ceiling's request"), which the usual ratio charges to the row. Rows a few bytes off the
# ceiling's (the API-key rows, ≈ 35) are not worth the extra reps.
SAME_REQUEST_MIN_BYTES = 128
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
    # Fixed-rate runs of a row with a baseline, each right after a baseline run: at 1,000/s on an
    # idle machine p99 is mostly wake-ups, so one pair's difference is not quotable (README).
    rate_pairs: int = 3
    quiet_wait: float = 0.0  # max seconds to wait for other processes to go idle, per case
    serial_duration: float = 2.0  # seconds per one-at-a-time rep (targets with a reference)

    def quick(self) -> Settings:
        """Tiny durations, one rep: proves the pipeline works, measures nothing useful."""
        return Settings(
            self.server_cpus,
            self.client_cpus,
            self.workdir,
            reps=1,
            # Not shorter: the OAuth section's refresh rows need the tokens that many seconds
            # of code exchange return (bench.oauth_endpoints).
            duration=0.5,
            warmup=0.1,
            clients=self.clients,
            streams=self.streams,
            rate=self.rate,
            rate_duration=0.3,
            rate_pairs=1,
            serial_duration=0.2,
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
    serial: dict[str, Any] = field(default_factory=dict)  # one at a time, vs the reference
    ratio_to_ceiling: float | None = None
    # Over the ceiling sent this row's own request bytes (rows whose request size differs).
    ratio_to_ceiling_same_request: float | None = None
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


def _saturation_run(
    load: h2load.Load, pids: Sequence[int], s: Settings, meter: IngestMeter | None = None
) -> dict[str, Any]:
    window = _CpuWindow(pids)
    ingest = cp_cost.IngestWindow(meter) if meter is not None else None
    run = h2load.saturate(
        load,
        duration=s.duration,
        clients=s.clients,
        streams=s.streams,
        cpus=set(s.client_cpus),
        workdir=s.workdir,
    )
    cpu = window.close(run.client_cpu_s, run.done)
    cp = ingest.close(run.done) if ingest is not None else {}
    return {"rps": run.rps, "requests": run.done, "unexpected": run.unexpected, **cpu, **cp}


# One saturation rep of the ceiling, run right before each rep of another target: the machine's
# speed drifts by ±10-15 % over minutes, so each rep is compared with a ceiling measured
# seconds earlier, and the ratio is the median of those paired ratios.
Baseline = Callable[[], dict[str, Any]]


def _saturation(
    load: h2load.Load,
    pids: Sequence[int],
    s: Settings,
    baseline: Baseline | None = None,
    meter: IngestMeter | None = None,
    reference: Baseline | None = None,
    same_request: Baseline | None = None,
) -> dict[str, Any]:
    """The saturation reps; each after one rep of ``baseline`` (the ceiling), then of
    ``reference`` (the target's own do-nothing counterpart, e.g. Envoy + do-nothing for Envoy +
    sidecar), then of ``same_request`` (the ceiling sent this row's request bytes) when given,
    so every ratio is of reps seconds apart."""
    before = cp_cost.count_now(meter)
    warm = h2load.saturate(  # warm-up, not measured
        load,
        duration=s.warmup,
        clients=s.clients,
        streams=s.streams,
        cpus=set(s.client_cpus),
        workdir=s.workdir,
    )
    cp_cost.after_load(meter, before, warm.done)
    # Each pairing: its rep's keys are "<prefix>_rps" and "<prefix>_server_cpu_us_per_call",
    # its summary the median of the reps' rps over that rps.
    sides = [
        (prefix, summary_key, run)
        for prefix, summary_key, run in (
            ("ceiling", "paired_ratio", baseline),
            ("reference", "reference_paired_ratio", reference),
            ("ceiling_same_request", "same_request_paired_ratio", same_request),
        )
        if run is not None
    ]
    reps = []
    for _ in range(s.reps):
        paired = [(prefix, run()) for prefix, _, run in sides]
        rep = _quietly(s, lambda: _saturation_run(load, pids, s, meter))
        for prefix, side in paired:
            rep[f"{prefix}_rps"] = side["rps"]
            rep[f"{prefix}_server_cpu_us_per_call"] = side["server_cpu_us_per_call"]
        reps.append(rep)
    summary: dict[str, Any] = {"rps": statistics.median(r["rps"] for r in reps)}
    skip: tuple[str, ...] = ("rps", "requests", "unexpected", "busy_before", "attempt", "tries")
    skip += ("server_cpu_util_by_process",)
    for prefix, summary_key, _ in sides:
        rps = f"{prefix}_rps"
        summary[summary_key] = _median([r["rps"] / r[rps] for r in reps if r[rps]])
        skip += (rps, f"{prefix}_server_cpu_us_per_call")
    for key in [k for k in reps[0] if k not in skip and not k.startswith("cp_")]:
        summary[key] = _median([r[key] for r in reps if r[key] is not None])
    if meter is not None:
        summary |= cp_cost.summary(reps)
    summary["unexpected"] = sum(r["unexpected"] for r in reps)
    summary["reps"] = reps
    return summary


def _latency_run(
    run: Callable[[], h2load.RateStats], pids: Sequence[int], target_rps: float | None
) -> dict[str, Any]:
    """One latency run (fixed rate or one at a time): percentiles plus CPU per call."""
    window = _CpuWindow(pids)
    rate = run()
    cpu = window.close(rate.stats.client_cpu_s, rate.stats.done)
    lat = sorted(rate.latencies_us)
    out: dict[str, Any] = {
        **({} if target_rps is None else {"target_rps": target_rps}),
        "achieved_rps": round(rate.stats.rps, 1),
        "requests": rate.stats.done,
        "unexpected": rate.stats.unexpected,
        **cpu,
    }
    for label, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)):
        out[f"{label}_ms"] = round(h2load.percentile(lat, fraction) / 1000, 3) if lat else None
    out["max_ms"] = round(lat[-1] / 1000, 3) if lat else None
    return out


def _fixed_rate_run(load: h2load.Load, pids: Sequence[int], s: Settings) -> dict[str, Any]:
    def run() -> h2load.RateStats:
        return h2load.fixed_rate(
            load, rate=s.rate, duration=s.rate_duration, cpus=set(s.client_cpus), workdir=s.workdir
        )

    return _latency_run(run, pids, s.rate)


def _serial_run(load: h2load.Load, pids: Sequence[int], s: Settings) -> dict[str, Any]:
    def run() -> h2load.RateStats:
        return h2load.one_at_a_time(
            load, duration=s.serial_duration, cpus=set(s.client_cpus), workdir=s.workdir
        )

    return _latency_run(run, pids, None)


@dataclass(frozen=True)
class _Side:
    """What latency runs are paired with: the do-nothing server on the same path."""

    name: str
    load: h2load.Load
    pids: Sequence[int]


def _added(target: dict[str, Any], base: dict[str, Any], label: str) -> float | None:
    t, b = target.get(f"{label}_ms"), base.get(f"{label}_ms")
    return None if t is None or b is None else round(t - b, 3)


# Of a baseline run, what a fixed-rate row keeps (per pair, and their medians).
_BASELINE_KEYS = ("achieved_rps", "p50_ms", "p99_ms", "p999_ms", "other_cpu_util", "unexpected")


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's shape from several: counts summed, the noise the worst, other numbers the
    median, anything else the first run's."""
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        values = [r[key] for r in runs if r.get(key) is not None]
        if key in ("requests", "unexpected"):
            out[key] = sum(values)
        elif key == "other_cpu_util":
            out[key] = max(values)
        elif isinstance(first, int | float) and not isinstance(first, bool) and values:
            out[key] = _median(values)
        else:
            out[key] = first
    return out


def _median(values: list[float]) -> float | None:
    """The median to 3 decimals; None when nothing was measured."""
    return round(statistics.median(values), 3) if values else None


def _spread(values: list[float]) -> list[float] | None:
    return [min(values), max(values)] if values else None


def _fixed_rate(
    load: h2load.Load,
    pids: Sequence[int],
    s: Settings,
    base: _Side | None = None,
    meter: IngestMeter | None = None,
) -> dict[str, Any]:
    """The fixed-rate run; with ``base``, ``rate_pairs`` pairs of a run of the do-nothing server
    at the same rate then one of the target: the row's figures are medians over the pairs, and
    ``added_p50_ms``/``added_p99_ms`` the median of the pairs' differences, with their spread
    (min, max) and every pair in ``pairs``."""

    def measured() -> dict[str, Any]:
        before = cp_cost.count_now(meter)
        run = _quietly(s, lambda: _fixed_rate_run(load, pids, s))
        cp_cost.after_load(meter, before, run["requests"])
        return run

    if base is None:
        return measured()
    pairs: list[dict[str, Any]] = []
    for _ in range(max(1, s.rate_pairs)):
        baseline = _quietly(s, lambda: _fixed_rate_run(base.load, base.pids, s))
        run = measured()
        pairs.append(
            {
                "target": run,
                "baseline": {k: baseline[k] for k in _BASELINE_KEYS},
                "added_p50_ms": _added(run, baseline, "p50"),
                "added_p99_ms": _added(run, baseline, "p99"),
            }
        )
    out = _medians([p["target"] for p in pairs])
    out["baseline"] = {"target": base.name, **_medians([p["baseline"] for p in pairs])}
    for label in ("p50", "p99"):
        diffs = [d for p in pairs if (d := p[f"added_{label}_ms"]) is not None]
        out[f"added_{label}_ms"] = _median(diffs)
        out[f"added_{label}_ms_spread"] = _spread(diffs)
    out["unexpected"] += out["baseline"]["unexpected"]
    out["pairs"] = pairs
    return out


def _serial(
    load: h2load.Load, pids: Sequence[int], s: Settings, ref: _Side, meter: IngestMeter | None
) -> dict[str, Any]:
    """One request at a time (``h2load -c 1 -m 1``), ``reps`` times, each rep right after a rep
    of the reference: ``added_*`` are medians of the paired differences (the machine drifts)."""
    runs = []
    for _ in range(s.reps):
        base = _quietly(s, lambda: _serial_run(ref.load, ref.pids, s))
        before = cp_cost.count_now(meter)
        run = _quietly(s, lambda: _serial_run(load, pids, s))
        cp_cost.after_load(meter, before, run["requests"])
        runs.append({"target": run, "reference": base})

    def med(side: str, key: str) -> float | None:
        return _median([r[side][key] for r in runs if r[side][key] is not None])

    def added(label: str) -> float | None:
        return _median(
            [d for r in runs if (d := _added(r["target"], r["reference"], label)) is not None]
        )

    return {
        "clients": 1,
        "streams": 1,
        "reference": ref.name,
        **{key: med("target", key) for key in ("achieved_rps", "p50_ms", "p99_ms")},
        "server_cpu_us_per_call": med("target", "server_cpu_us_per_call"),
        "reference_p50_ms": med("reference", "p50_ms"),
        "reference_p99_ms": med("reference", "p99_ms"),
        "added_p50_ms": added("p50"),
        "added_p99_ms": added("p99"),
        "other_cpu_util": max(
            max(r["target"]["other_cpu_util"], r["reference"]["other_cpu_util"]) for r in runs
        ),
        "unexpected": sum(r[side]["unexpected"] for r in runs for side in ("target", "reference")),
        "reps": runs,
    }


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
    target: RunningTarget,
    case: Case,
    s: Settings,
    baseline: Baseline | None = None,
    base: _Side | None = None,
    reference: Baseline | None = None,
    same_request: Baseline | None = None,
) -> CaseResult:
    """Verify ``case`` with one real call, then load it; a failed check skips the load.
    ``baseline`` (one ceiling rep), ``reference`` (one rep of the target's reference) and
    ``same_request`` (one ceiling rep with the case's bytes) run before each saturation rep
    when given; ``base`` (the reference, else the ceiling) before
    the fixed-rate run, and, when it is the target's reference, before each one-at-a-time rep."""
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
    meter = target.ingest
    try:
        result.saturation = _saturation(
            load, target.pids, s, baseline, meter, reference, same_request
        )
        result.fixed_rate = _fixed_rate(load, target.pids, s, base, meter)
        if target.reference is not None and base is not None:
            result.serial = _serial(load, target.pids, s, base, meter)
    except (RuntimeError, ValueError) as exc:
        result.status, result.error = "failed", str(exc)
        return result
    unexpected = sum(
        part.get("unexpected", 0) for part in (result.saturation, result.fixed_rate, result.serial)
    )
    if unexpected:
        result.status = "failed"
        result.error = f"{unexpected} requests under load failed or got an unexpected status"
    return result


def _reference_side(reference: RunningTarget, s: Settings) -> _Side:
    """Ready the target's reference: pinned like it, verified, warmed up."""
    if reference.pin:
        pin_tree(reference.pids, set(s.server_cpus))
    case = reference.cases[0]
    error = case.verify(reference.address)
    if error is not None:
        raise RuntimeError(f"reference {reference.name}: verification: {error}")
    load = load_for(case, reference.address, s.workdir)
    h2load.saturate(
        load,
        duration=s.warmup,
        clients=s.clients,
        streams=s.streams,
        cpus=set(s.client_cpus),
        workdir=s.workdir,
    )
    return _Side(reference.name, load, reference.pids)


def run_target(
    target: RunningTarget, s: Settings, ceiling: RunningTarget | None = None
) -> list[CaseResult]:
    """Measure every case of a started target, in order; with a running ``ceiling``, each
    saturation rep is paired with a ceiling rep just before it (``paired_ratio``), and the
    fixed-rate run with a ceiling run at the same rate (unless the target has a reference).
    A target with a reference also has a reference rep before each saturation rep
    (``reference_paired_ratio``: Envoy + sidecar over Envoy + do-nothing, seconds apart), and
    a case whose request differs in size from the ceiling's a ceiling rep sent its own bytes
    (``same_request_paired_ratio``, see SAME_REQUEST_MIN_BYTES)."""
    if target.pin:
        pin_tree(target.pids, set(s.server_cpus))
    if target.clients is not None:
        s = replace(s, clients=target.clients)
    baseline: Baseline | None = None
    base: _Side | None = None
    plain = s
    if ceiling is not None:
        ceiling_load = load_for(ceiling.cases[0], ceiling.address, s.workdir)
        # The ceiling's own h2load settings (connections), not the target's.
        plain = replace(s, clients=ceiling.clients or s.clients)
        base = _Side(ceiling.name, ceiling_load, ceiling.pids)

        def baseline() -> dict[str, Any]:
            return _quietly(plain, lambda: _saturation_run(ceiling_load, ceiling.pids, plain))

    reference: Baseline | None = None
    if target.reference is not None:
        ref = base = _reference_side(target.reference, s)
        own = replace(s, clients=target.reference.clients or s.clients)

        def reference() -> dict[str, Any]:
            return _quietly(own, lambda: _saturation_run(ref.load, ref.pids, own))

    results = []
    for case in target.cases:
        print(f"  {target.name} / {case.name} …", file=sys.stderr, flush=True)
        same: Baseline | None = None
        if ceiling is not None and (same_load := same_request_load(case, ceiling, s)):
            same = _ceiling_rep(same_load, ceiling.pids, plain)
        results.append(measure_case(target, case, s, baseline, base, reference, same))
    return results


def same_request_load(case: Case, ceiling: RunningTarget, s: Settings) -> h2load.Load | None:
    """The ceiling sent ``case``'s own request bytes (the do-nothing server answers any request
    alike), when their size differs from the ceiling's own case's by at least
    SAME_REQUEST_MIN_BYTES; None otherwise, and for HTTP cases."""
    own = ceiling.cases[0]
    if not isinstance(case, GrpcCase) or not isinstance(own, GrpcCase):
        return None
    if abs(len(case.request) - len(own.request)) < SAME_REQUEST_MIN_BYTES:
        return None
    return load_for(case, ceiling.address, s.workdir)


def _ceiling_rep(load: h2load.Load, pids: Sequence[int], s: Settings) -> Baseline:
    def run() -> dict[str, Any]:
        return _quietly(s, lambda: _saturation_run(load, pids, s))

    return run
