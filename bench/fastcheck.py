"""The compiled Check path against the pure-Python one, in one run, each paired with the ceiling
(docs/performance.md, "A compiled Check path"):

    python -m bench --target bench.fastcheck:sidecar_python --target bench.fastcheck:sidecar_c \
        --no-oauth-endpoints --propagation-keys 0 --wait-quiet 60

Both are the real ``spauth sidecar`` as shipped (metrics, denial log, decision records and usage
counting on) fed by a real control plane; only ``check_path`` differs. The allow case only (the
API-key Check of the issue's table), to keep the run short; ``*_all`` adds the two denials
(an unknown key, which the C path hands to Python because the rate limiter counts it, and a
missing scope, which it decides)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from bench.sidecar_target import _sidecar
from bench.targets import RunningTarget, TargetEnv

PATH_ENV = "SPAUTH_SIDECAR_CHECK_PATH"


def sidecar_python(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """The sidecar with the pure-Python Check path (the reference), allow case."""
    return _sidecar(env, "sidecar-python", {PATH_ENV: "python"}, allow_only=True)


def sidecar_c(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """The sidecar with the compiled Check path, allow case."""
    return _sidecar(env, "sidecar-c", {PATH_ENV: "compiled"}, allow_only=True)


def sidecar_python_all(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """The pure-Python path: allow, unknown key, missing scope."""
    return _sidecar(env, "sidecar-python-all", {PATH_ENV: "python"})


def sidecar_c_all(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """The compiled path: allow, unknown key (handed to Python), missing scope."""
    return _sidecar(env, "sidecar-c-all", {PATH_ENV: "compiled"})


def main() -> None:
    """In-process µs per Check, both paths, on the same allow request (parse included, metrics
    and denial log observing): ``python -m bench.fastcheck``."""
    import logging

    from bench.overhead import PATH, _engine, _request, per_call_us
    from sidecar.core import keyformat
    from sidecar.dataplane.envoy_check import CheckHandler, parse_check_request
    from sidecar.dataplane.fastcheck import FastCheckHandler
    from sidecar.ops.denial_log import DenialLog
    from sidecar.ops.metrics import DecisionMetrics, Metrics

    logging.getLogger().handlers[:] = [logging.NullHandler()]
    secret = keyformat.mint_key()
    data = _request(secret).SerializeToString()

    def handler() -> CheckHandler:
        return CheckHandler(_engine(secret), [DecisionMetrics(Metrics()), DenialLog(100.0)])

    python, compiled = handler(), FastCheckHandler(handler())
    ctx: Any = None
    rows = {
        "python: parse + handler": lambda: python(parse_check_request(data), ctx),
        "compiled: handler": lambda: compiled(data, ctx),
        "python: parse only": lambda: parse_check_request(data),
    }
    print(f"allow on {PATH}, µs per call (best of 5):")
    for name, call in rows.items():
        print(f"  {name:28} {per_call_us(call, 100_000):6.2f}")
    assert compiled.counts()[0] > 0  # the compiled path decided them


def shipped() -> None:
    """In-process µs per Check of the compiled handler with the sidecar's observers as shipped
    (metrics, denial log, decision records, usage), in batches of 60 checks followed by one
    spool write (the writer's 10 ms at 6,000 checks/s), and the writer's µs per record:
    ``python -m bench.fastcheck shipped``."""
    import logging
    import tempfile
    import time
    from pathlib import Path

    from bench.overhead import _engine, _request
    from sidecar.auditship import AuditPipeline, ShipConfig
    from sidecar.auditship.observer import DecisionRecorder
    from sidecar.core import keyformat
    from sidecar.core.clock import SystemClock
    from sidecar.dataplane.envoy_check import CheckHandler
    from sidecar.dataplane.fastcheck import FastCheckHandler
    from sidecar.ops.denial_log import DenialLog
    from sidecar.ops.metrics import DecisionMetrics, Metrics
    from sidecar.usage import UsageTally

    logging.getLogger().handlers[:] = [logging.NullHandler()]
    secret = keyformat.mint_key()
    data = _request(secret).SerializeToString()
    clock = SystemClock()
    for audit in (True, False):
        with tempfile.TemporaryDirectory() as spool:
            pipeline = AuditPipeline(ShipConfig(Path(spool)), None)
            observers: list[Any] = [DecisionMetrics(Metrics()), DenialLog(100.0)]
            observers += [DecisionRecorder(pipeline, clock)] if audit else []
            observers.append(UsageTally(clock.now))
            handler = FastCheckHandler(CheckHandler(_engine(secret), observers))
            check_us = write_us = float("inf")
            for _ in range(5):
                checks = writes = 0.0
                for _ in range(1000):
                    started = time.perf_counter()
                    for _ in range(60):
                        handler(data, None)  # type: ignore[arg-type]
                    wrote = time.perf_counter()
                    pipeline.flush(sync=False)
                    checks += wrote - started
                    writes += time.perf_counter() - wrote
                check_us = min(check_us, checks / 60_000 * 1e6)
                write_us = min(write_us, writes / 60_000 * 1e6)
            pipeline.close(0)
            print(
                f"audit {'on ' if audit else 'off'}: {check_us:5.2f} µs per check, writer "
                f"{write_us:5.2f} µs per record (observed in C: {handler.observed_in_c})"
            )


if __name__ == "__main__":
    import sys

    shipped() if sys.argv[1:] == ["shipped"] else main()
