"""Where a Check's server CPU goes: the real sidecar with its Check handler cut short at each
stage, measured as ordinary bench targets against the same-run ceiling.

    python -m bench --target bench.hotpath:noop --target bench.hotpath:view \
        --target bench.hotpath:engine --target bench.hotpath:encode \
        --target bench.hotpath:observers --target bench.hotpath:burn400 \
        --no-oauth-endpoints --propagation-keys 0

Stages (each a real ``spauth sidecar`` against a real control plane, decision records off, so
the process, its threads and its replica are the shipped ones; only the handler differs):

* ``noop``: answers the ceiling's pre-built allow — the sidecar process's own cost;
* ``view``: + reads the request's fields (``request_view``);
* ``engine``: + decides (route match, SHA-256, replica lookup, scopes);
* ``encode``: + assembles the response bytes;
* ``observers``: the shipped handler (+ metrics and the denial log);
* ``burnN``: ``noop`` plus a pure-Python loop of N iterations (``burn200`` ≈ 3.7 µs,
  ``burn400`` ≈ 7.4 µs in-process here): what a microsecond of tight Python costs under load.

Server CPU µs per call minus ``noop``'s is the stage's cost under load; compare it with the
same stage in-process (``python -m bench.overhead``). docs/performance.md has a run.
Run with ``python -m bench.hotpath <stage> sidecar ...`` by the targets below, not by hand."""

from __future__ import annotations

import os
import sys
from contextlib import AbstractContextManager
from typing import Any

from bench.sidecar_target import _sidecar
from bench.targets import RunningTarget, TargetEnv

STAGE_ENV = "SPAUTH_BENCH_STAGE"


def _stage(env: TargetEnv, stage: str) -> AbstractContextManager[RunningTarget]:
    # The Python Check path: the stages cut CheckHandler.__call__, which the compiled path
    # (bench.fastcheck) bypasses for the checks it decides.
    extra = {"SPAUTH_SIDECAR_AUDIT": "off", "SPAUTH_SIDECAR_CHECK_PATH": "python", STAGE_ENV: stage}
    return _sidecar(env, f"stage-{stage}", extra, module="bench.hotpath", allow_only=True)


def _factory(stage: str) -> Any:
    def factory(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
        return _stage(env, stage)

    factory.__doc__ = f"The sidecar with its Check handler cut at stage {stage!r}."
    return factory


noop = _factory("noop")
view = _factory("view")
engine = _factory("engine")
encode = _factory("encode")
observers = _factory("observers")
burn200 = _factory("burn200")
burn400 = _factory("burn400")


def _patch(stage: str) -> None:
    """Replace CheckHandler.__call__ by the stage's cut-down version (before the server starts)."""
    from bench.ceiling import allow_response
    from sidecar.dataplane import envoy_check

    allow: bytes = allow_response().SerializeToString()

    def call(self: envoy_check.CheckHandler, request: Any, context: Any) -> bytes:
        if stage.startswith("burn"):
            x = 0
            for i in range(int(stage[4:])):
                x += i
            return allow
        if stage == "noop":
            return allow
        view = envoy_check.request_view(request)
        if stage == "view":
            return allow
        decision = self.engine.check(view)
        if stage == "engine":
            return allow
        return self.encoder.encode(decision, ())

    if stage != "observers":
        envoy_check.CheckHandler.__call__ = call  # type: ignore[method-assign]


if __name__ == "__main__":
    _patch(os.environ.get(STAGE_ENV, "observers"))
    from sidecar.cli.main import main

    sys.exit(main(sys.argv[1:]))
