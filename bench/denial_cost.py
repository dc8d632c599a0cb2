"""Where a denial's time goes, in-process (``python -m bench.denial_cost``): the compiled Check
handler with the sidecar's observers as shipped (metrics, denial log through the real JSON log
handler into a file, decision records with the audit pipeline's writer thread running, usage),
called at a fixed pace from one thread, each call timed on its own (wall time, and the thread's
CPU time, which a loaded machine's preemptions do not inflate), reported as a distribution
(p50 / p90 / p99 / p99.9 / max, mean, µs) per case, with the denial log writing its lines in place
(on the calling thread, as before) and on its writer thread (as shipped); "warm" is the µs per
call in a tight loop; gc says how many collections ran during the paced run, their total and
their longest time.

Cases: the allow (decided and observed in C), a missing scope (decided and observed in C;
observed in Python before 2026-12-08), an unknown key (decided and observed in C, the failure
limiter called from C) with the failure limits off, the same counted against a limit it never
reaches (what the ``sidecar_counted`` target's unknown-key row does), the same source once
blocked (what a flood of unknown keys from one address turns into after
``failure_limit_source`` failures: answered 429 in C, before its key is read), and the allow
while another address is blocked; a revoked key (the old key a client keeps sending after a
rotation: decided and observed in C, counted against the source and key id) counted against
limits it never reaches, and the same
check through the pure-Python path (``CheckHandler`` on the parsed request: what every revoked
key took before it was decided in C).

Also a bench target, ``bench.denial_cost:sidecar_counted``: the sidecar as shipped with a source
failure limit no row reaches (failures still counted), so that its unknown-key and wrong-scope
rows measure those denials. The ``sidecar`` target's requests all come from one address, which
its unknown-key row blocks after ``failure_limit_source`` (50) failures: from then on that row,
and the wrong-scope row run while the block lasts, measure a blocked source's 429s (a kept
workdir's sidecar.log: 3,311 ``rate_limited`` lines, 50 ``unknown_credential``, no
``insufficient_scope``)::

    python -m bench --target bench.denial_cost:sidecar_counted --rate-pairs 2 --reps 1 \
        --duration 2 --no-oauth-endpoints --propagation-keys 0

Not a test: timings on a shared machine are noise; nothing asserts on them."""

from __future__ import annotations

import gc
import logging
import os
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from envoy.service.auth.v3 import external_auth_pb2 as ext

from bench.overhead import _engine as overhead_engine
from bench.overhead import key_change
from sidecar.auditship import AuditPipeline, ShipConfig
from sidecar.auditship.observer import DecisionRecorder
from sidecar.authz.engine import Engine
from sidecar.core import keyformat
from sidecar.core.clock import SystemClock
from sidecar.core.models import Change
from sidecar.dataplane.envoy_check import CheckHandler, parse_check_request
from sidecar.dataplane.fastcheck import FastCheckHandler
from sidecar.logs import JsonFormatter
from sidecar.ops.denial_log import DenialLog
from sidecar.ops.metrics import DecisionMetrics, Metrics
from sidecar.ratelimit import AbuseLimits, WindowRateLimiter
from sidecar.usage import UsageTally

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from bench.targets import RunningTarget, TargetEnv

CHECKS = "/v1/workspaces/acme/checks"
METRICS = "/v1/workspaces/acme/metrics"
SOURCE = "10.0.0.7"


def sidecar_counted(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """The sidecar as shipped, failures counted, no source ever blocked (see the docstring)."""
    from bench.sidecar_target import _sidecar

    limit = {"SPAUTH_SIDECAR_FAILURE_LIMIT_SOURCE": str(10**9)}
    return _sidecar(env, "sidecar-counted", limit)


def _engine(secret: str, limits: AbuseLimits) -> Engine:
    engine = overhead_engine(secret, WindowRateLimiter(limits))
    engine.replica.apply(_revoked_change(engine.replica.revision + 1))
    return engine


REVOKED = keyformat.mint_key()


def _revoked_change(revision: int) -> Change:
    """A second key in the replica, ``REVOKED``, revoked (as a rotation leaves the old one)."""
    change = key_change(REVOKED)
    payload = {**change.payload, "id": "key_revoked", "revoked": True}
    return Change(change.kind, "key_revoked", payload, revision)


def _request(path: str, header: str, value: str) -> bytes:
    """Shaped like bench.cases.check_request (the fixed-rate rows' bytes)."""
    req = ext.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "GET", path, "api.statuspulse.test"
    http.headers.update(
        {
            ":method": "GET",
            ":path": path,
            ":authority": "api.statuspulse.test",
            "user-agent": "bench/1.0",
            "accept": "application/json",
            "x-request-id": "5f1c9f7e-2d1b-4a8e-9b1e-8c3f2a1d0e9f",
            header: value,
        }
    )
    req.attributes.source.address.socket_address.address = SOURCE
    req.attributes.source.address.socket_address.port_value = 40312
    data: bytes = req.SerializeToString()
    return data


@contextmanager
def _json_log(path: Path) -> Iterator[None]:
    """The sidecar's logging (sidecar.logs.configure) into a file, as the bench's stderr is."""
    stream = path.open("a", encoding="utf-8")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers[:], root.level = saved
        stream.close()


class _GcWatch:
    """Counts garbage collections and their total time while installed."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self.worst = 0.0
        self._started = 0.0

    def __call__(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            took = time.perf_counter() - self._started
            self.count += 1
            self.seconds += took
            self.worst = max(self.worst, took)


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    n = len(ordered)

    def at(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] * 1e6

    return {
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
        "p99.9": at(0.999),
        "max": ordered[-1] * 1e6,
        "mean": sum(ordered) / n * 1e6,
    }


def paced(
    call: Callable[[], object], rate: float, seconds: float
) -> tuple[list[float], list[float], _GcWatch]:
    """Call ``call`` ``rate`` times a second for ``seconds``, timing each call: wall time (which
    on a loaded machine includes being preempted) and this thread's CPU time."""
    watch = _GcWatch()
    gc.callbacks.append(watch)
    wall: list[float] = []
    cpu: list[float] = []
    interval = 1.0 / rate
    clock, thread_clock = time.perf_counter, time.thread_time
    try:
        start = clock()
        for i in range(int(rate * seconds)):
            due = start + i * interval
            while clock() < due:
                time.sleep(0)
            t0, c0 = clock(), thread_clock()
            call()
            c1, t1 = thread_clock(), clock()
            wall.append(t1 - t0)
            cpu.append(c1 - c0)
    finally:
        gc.callbacks.remove(watch)
    return wall, cpu, watch


def _handler(
    secret: str, workdir: Path, limits: AbuseLimits, denials: DenialLog
) -> tuple[FastCheckHandler, AuditPipeline]:
    clock = SystemClock()
    pipeline = AuditPipeline(ShipConfig(workdir / f"spool-{time.monotonic_ns()}"), None)
    pipeline.start()
    observers: list[Any] = [
        DecisionMetrics(Metrics()),
        denials,
        DecisionRecorder(pipeline, clock),
        UsageTally(clock.now),
    ]
    return FastCheckHandler(CheckHandler(_engine(secret, limits), observers)), pipeline


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.denial_cost", description=__doc__)
    parser.add_argument("--rate", type=float, default=1000.0, help="checks per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="per case and denial log")
    parser.add_argument(
        "--case", action="append", help="run only these cases (repeatable; default: all)"
    )
    parser.add_argument(
        "--log",
        choices=("both", "in place", "writer thread"),
        default="both",
        help="where the denial log writes its lines (default: both, one after the other)",
    )
    args = parser.parse_args()
    rate, seconds = args.rate, args.seconds
    secret = keyformat.mint_key()
    unknown = keyformat.mint_key()
    requests = {
        "allow": _request(CHECKS, "authorization", f"Bearer {secret}"),
        "wrong-scope": _request(METRICS, "x-api-key", secret),
        "unknown-key": _request(CHECKS, "x-api-key", unknown),
        "revoked-key": _request(CHECKS, "x-api-key", REVOKED),
    }
    never = AbuseLimits(source_failures=0, key_failures=0)
    counted = AbuseLimits(source_failures=10**9, key_failures=10**9)
    with tempfile.TemporaryDirectory() as tmp, _json_log(Path(tmp) / "sidecar.log"):
        workdir = Path(tmp)
        print(
            f"µs per Check at {rate:.0f}/s for {seconds:.0f} s, one thread, "
            f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
            file=sys.stderr,
        )
        columns = ("p50", "p90", "p99", "p99.9", "max", "mean")
        print(
            f"{'case':20} {'denial log':13} {'time':4} "
            + " ".join(f"{c:>7}" for c in columns)
            + f" {'warm':>6}  gc(n, total ms, worst ms)"
        )
        cases: list[tuple[str, bytes, AbuseLimits]] = [
            ("allow", requests["allow"], never),
            ("wrong-scope", requests["wrong-scope"], never),
            ("unknown-key", requests["unknown-key"], never),
            ("unknown-key, counted", requests["unknown-key"], counted),
            ("source-blocked", requests["unknown-key"], AbuseLimits(source_failures=1)),
            ("allow, other blocked", requests["allow"], AbuseLimits(source_failures=1)),
            ("revoked-key, counted", requests["revoked-key"], counted),
            ("revoked-key, Python", requests["revoked-key"], counted),
        ]
        unknown_cases = set(args.case or ()) - {name for name, _, _ in cases}
        if unknown_cases:
            parser.error(f"no such case: {', '.join(sorted(unknown_cases))}")
        for name, data, limits in cases:
            if args.case and name not in args.case:
                continue
            for where in ("in place", "writer thread"):
                if name.startswith("allow") and where == "in place":
                    continue  # an allow writes no line
                if args.log not in ("both", where):
                    continue
                denials = DenialLog(100.0, background=where == "writer thread")
                denials.start()
                handler, pipeline = _handler(secret, workdir, limits, denials)
                if name == "allow, other blocked":  # another address is over its limit
                    limiter = handler.handler.engine.limiter
                    assert isinstance(limiter, WindowRateLimiter)
                    limiter.failed("10.9.9.9", "", time.time())
                ctx: Any = None
                call: Callable[[], object] = lambda: handler(data, ctx)  # noqa: B023, E731
                if name.endswith("Python"):  # the reference path, as the fallback runs it
                    python = handler.handler
                    call = lambda: python(parse_check_request(data), ctx)  # noqa: B023, E731
                for _ in range(2000):
                    call()
                warm = _best(call)
                wall, cpu, watch = paced(call, rate, seconds)
                denials.close()
                pipeline.close(0)
                for kind, samples in (("wall", wall), ("cpu", cpu)):
                    p = _percentiles(samples)
                    print(
                        f"{name:20} {where:13} {kind:4} {p['p50']:7.1f} {p['p90']:7.1f} "
                        f"{p['p99']:7.1f} {p['p99.9']:7.1f} {p['max']:7.1f} {p['mean']:7.1f} "
                        f"{warm:6.1f}  ({watch.count}, {watch.seconds * 1e3:.1f}, "
                        f"{watch.worst * 1e3:.2f})"
                    )


def _best(call: Callable[[], object], number: int = 20_000) -> float:
    """µs per call in a tight loop (warm caches), best of five."""
    return min(timeit.repeat(call, number=number, repeat=5)) / number * 1e6


if __name__ == "__main__":
    main()
