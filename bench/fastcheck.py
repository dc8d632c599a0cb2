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
