"""Envoy rows: the same HTTP request through Envoy (deploy/envoy/front-proxy.yaml) with no
ext_authz, with the do-nothing ceiling, and with our sidecar. Routes answer with Envoy's own
``direct_response`` so that no Python upstream caps the numbers; Envoy (``--concurrency 1``) and
the ext_authz server share the server CPU, h2load has the other.

Envoy + sidecar runs with Envoy + do-nothing alongside as its ``reference``, and Envoy +
do-nothing with Envoy alone: the runner alternates latency runs between each pair and reports the
difference (bench/README.md, "one at a time"). A row with ext_authz records in its info the
filter's timeout (``ext_authz_timeout``) and, for the sidecar, the Check path it runs
(``check_path``: compiled or python, as the sidecar logged it at start-up)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from bench.cases import HttpCase
from bench.envoy import envoy_target
from bench.sidecar_target import (
    CHECKS,
    _mint,
    _serving,
    control_plane,
    reported_check_path,
    sync_token_file,
)
from bench.targets import (
    _PROJECT_ROOT,
    SERVER_ENV,
    RunningTarget,
    TargetEnv,
    launch_process,
    log_path,
)
from sidecar.devtools.envoy import EnvoyProcess

T = TypeVar("T")
# Saturation keeps 64 requests queued in front of one CPU, and a shared machine can stall it:
# the shipped 0.25 s would then fail rows for a queue the load generator built. Latency runs
# (one at a time, 1,000/s) stay far below either bound on a quiet machine.
AUTHZ_TIMEOUT = "5s"
_DIRECT = {"status": 200, "body": {"inline_string": "ok"}}


def direct_responses(config: dict[str, Any], *, authz: bool) -> None:
    """The rows' Envoy configuration: every route answered by Envoy itself, the ext_authz
    filter (kept with ``authz``, else removed) given :data:`AUTHZ_TIMEOUT`."""
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for vhost in hcm["route_config"]["virtual_hosts"]:
        for route in vhost["routes"]:
            route.pop("route", None)
            route["direct_response"] = _DIRECT
    if not authz:
        hcm["http_filters"] = [
            f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_authz"
        ]
    for f in hcm["http_filters"]:
        if f["name"] == "envoy.filters.http.ext_authz":
            f["typed_config"]["grpc_service"]["timeout"] = AUTHZ_TIMEOUT


@contextlib.contextmanager
def _envoy(
    env: TargetEnv,
    name: str,
    authz_port: int,
    cases: list[HttpCase],
    pids: list[int],
    authz: bool,
    authz_info: Mapping[str, object] | None = None,
) -> Iterator[RunningTarget]:
    """Envoy in front of the ext_authz server on ``authz_port`` (``authz``) or alone;
    ``authz_info`` (what that server reported) joins the row's info."""
    with EnvoyProcess(
        authz=("127.0.0.1", authz_port or 1),
        upstream=("127.0.0.1", 1),
        customize=lambda c: direct_responses(c, authz=authz),
    ) as envoy:
        info = {"ext_authz_timeout": AUTHZ_TIMEOUT, **(authz_info or {})} if authz else {}
        yield envoy_target(name, envoy.url, cases, [envoy.pid, *pids], info=info)


def _case(headers: dict[str, str]) -> list[HttpCase]:
    return [HttpCase("allow", headers, 200, path=CHECKS)]


@contextlib.contextmanager
def _envoy_noauth(env: TargetEnv, name: str = "envoy") -> Iterator[RunningTarget]:
    with _envoy(env, name, 0, _case({}), [], authz=False) as target:
        yield target


@contextlib.contextmanager
def _envoy_ceiling(
    env: TargetEnv, name: str = "envoy+ceiling", response_file: Path | None = None
) -> Iterator[RunningTarget]:
    argv = [env.python, "-m", "bench.ceiling", "--listen", "{listen}"]
    if response_file is not None:
        argv += ["--response-file", str(response_file)]
    with launch_process(
        env, f"ceiling-behind-{name}", argv, [], extra_env=SERVER_ENV, cwd=_PROJECT_ROOT
    ) as authz:
        port = int(authz.address.rsplit(":", 1)[1])
        with _envoy(env, name, port, _case({}), list(authz.pids), True) as target:
            yield target


@contextlib.contextmanager
def _meanwhile(manager: AbstractContextManager[T]) -> Iterator[Callable[[], T]]:
    """Enter ``manager`` in a thread while the caller starts other things (start-up is most of
    a quick run's time); the yielded call waits for it and returns what it yielded."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        entered = pool.submit(manager.__enter__)
        try:
            yield entered.result
        finally:
            if entered.exception() is None:  # waits; nothing to exit if entering failed
                manager.__exit__(None, None, None)


@contextlib.contextmanager
def _envoy_ceiling_vs_envoy(env: TargetEnv) -> Iterator[RunningTarget]:
    # Envoy alone runs next to it: the latency Envoy + do-nothing adds over Envoy by itself.
    with _meanwhile(_envoy_noauth(env, "envoy (reference)")) as alone, _envoy_ceiling(env) as t:
        yield replace(t, reference=alone())


@contextlib.contextmanager
def _sidecar_behind_envoy(
    env: TargetEnv, extra_env: Mapping[str, str] | None = None
) -> Iterator[RunningTarget]:
    """Envoy asking our sidecar (as shipped unless ``extra_env`` says otherwise, its control
    plane off the server CPUs) with a valid key; no reference alongside."""
    with control_plane(env) as cp:
        key = _mint(cp.admin, cp.operator, ["checks:read"])
        argv = [
            env.python, "-m", "sidecar", "sidecar", "--listen", "{listen}",
            "--control-plane", cp.admin, "--state-dir", str(env.workdir / "envoy-sidecar-state"),
            "--metrics-addr", "", "--threads", "4",
            "--sync-token-file", str(sync_token_file(env)),
        ]  # fmt: skip
        with launch_process(
            env, "sidecar-behind-envoy", argv, [], extra_env={**SERVER_ENV, **(extra_env or {})},
            cwd=_PROJECT_ROOT, ready=_serving,
        ) as authz:  # fmt: skip
            port = int(authz.address.rsplit(":", 1)[1])
            cases = _case({"authorization": f"Bearer {key}"})
            # The Check path the sidecar runs, as it said at start-up (compiled or python).
            path = reported_check_path(log_path(env, "sidecar-behind-envoy"))
            info = {"check_path": path}
            with _envoy(env, "envoy+sidecar", port, cases, list(authz.pids), True, info) as target:
                yield replace(target, ingest=cp.ingest_meter())


@contextlib.contextmanager
def _envoy_sidecar(env: TargetEnv) -> Iterator[RunningTarget]:
    # Envoy + do-nothing runs next to it, so latency runs alternate between the two and the row
    # reports what the sidecar adds (the machine drifts too much for rows minutes apart).
    with (
        _meanwhile(_envoy_ceiling(env, "envoy+ceiling (reference)")) as reference,
        _sidecar_behind_envoy(env) as target,
    ):
        yield replace(target, reference=reference())


def sidecar_behind_envoy(
    env: TargetEnv, extra_env: Mapping[str, str] | None = None
) -> AbstractContextManager[RunningTarget]:
    """Envoy + sidecar without its reference alongside (bench.side_by_side_envoy loads the two
    at once instead), ``extra_env`` added to the sidecar's environment; ``pids`` are Envoy's
    first, then the sidecar's."""
    return _sidecar_behind_envoy(env, extra_env)


def ceiling_behind_envoy(
    env: TargetEnv, response_file: Path | None = None
) -> AbstractContextManager[RunningTarget]:
    """Envoy + do-nothing without a reference alongside (answering ``response_file``'s bytes
    when given, e.g. :func:`sidecar_allow_response`); ``pids`` are Envoy's first."""
    name = "envoy+ceiling" if response_file is None else "envoy+ceiling-full"
    return _envoy_ceiling(env, name, response_file)


def envoy_noauth(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """Envoy answering by itself: the proxy's own ceiling."""
    return _envoy_noauth(env)


def envoy_ceiling(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """Envoy asking the do-nothing ext_authz server (Envoy alone alongside, as reference)."""
    return _envoy_ceiling_vs_envoy(env)


def sidecar_allow_response() -> bytes:
    """The sidecar's own allow for an API key of the bench's shape (its ResponseEncoder, the
    default policy's credential headers stripped): five identity headers, the decision-id
    header, the headers to remove and the decision's dynamic metadata."""
    from sidecar.authz.decision import Decision, Identity, Reason
    from sidecar.authz.policy_source import load_policy
    from sidecar.dataplane.check_responses import ResponseEncoder

    policy = load_policy(None)
    identity = Identity(
        "api_key", "key_" + "0" * 24, "acme", frozenset({"checks:read"}), 4_102_444_800.0
    )
    decision = Decision(Reason.OK, "dec_" + "0" * 36, identity)
    strip = policy.credential_headers if policy.strip_credentials else ()
    return ResponseEncoder().build(decision, strip)


@contextlib.contextmanager
def _envoy_ceiling_full(env: TargetEnv) -> Iterator[RunningTarget]:
    response = env.workdir / "sidecar-allow.bin"
    response.write_bytes(sidecar_allow_response())
    with (
        _meanwhile(_envoy_ceiling(env, "envoy+ceiling (reference)")) as reference,
        _envoy_ceiling(env, "envoy+ceiling-full", response) as target,
    ):
        yield replace(target, reference=reference())


def envoy_ceiling_full(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """Envoy asking the do-nothing server, which answers with the sidecar's own allow
    (identity headers, headers to remove, metadata) instead of one header: what handling a
    real answer costs Envoy, at no authz cost (Envoy + do-nothing alongside, as reference)."""
    return _envoy_ceiling_full(env)


def envoy_sidecar(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """Envoy asking our sidecar (as shipped) with a valid key (Envoy + do-nothing alongside,
    as reference)."""
    return _envoy_sidecar(env)
