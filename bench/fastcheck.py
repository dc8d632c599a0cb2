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


if __name__ == "__main__":
    main()
