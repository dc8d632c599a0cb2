"""Benchmark targets for our sidecar: a real control plane (SQLite) feeding ``spauth sidecar``
over its replication stream, with keys minted through the admin API, measured with the same
server model and experiments as the ceiling (``bench.targets.SERVER_ENV``, 4 threads).

Cases: a valid key on a route it may use (allow), an unknown well-formed key (deny, 401), a
valid key on a route that needs a scope it lacks (deny, 403)."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import cp_cost
from bench.cases import Case, grpc_case, typical_headers
from bench.cpu import off_server_prefix
from bench.targets import (
    SERVER_ENV,
    IngestMeter,
    RunningTarget,
    TargetEnv,
    TargetError,
    launch_process,
    log_path,
)

_ROOT = Path(__file__).resolve().parent.parent
CHECKS = "/v1/workspaces/acme/checks"
# sidecar.dataplane.fastcheck.check_path logs "check path: compiled" or "check path: python …".
CHECK_PATH_LOG = "check path: "
METRICS = "/v1/workspaces/acme/metrics"


def _serving(listen: str) -> bool:
    with grpc.insecure_channel(listen) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1
            )
        except grpc.RpcError:
            return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def sync_token_file(env: TargetEnv) -> Path:
    """The sync token ``_control_plane`` generated into its data dir: sidecars get the path,
    never the value (results record every process's argv and environment)."""
    return env.workdir / "control-plane" / "sync-token"


@dataclass(frozen=True)
class ControlPlane:
    """A control plane started for a target: its admin address, the operator key, its pid, its
    data directory (the SQLite file its decision records land in) and its HTTP address (its
    ``/metrics``)."""

    admin: str
    operator: str
    pid: int
    data: Path
    http: str

    def ingest_meter(self) -> IngestMeter:
        """Its CPU and ingest counters, for ``cp_cpu_us_per_record``."""
        return cp_cost.meter(self.pid, self.http, self.data / "spauth.db")


@contextlib.contextmanager
def control_plane(env: TargetEnv) -> Iterator[ControlPlane]:
    """A control plane on a fresh SQLite file, kept off the server CPUs: with decision records on
    it ingests thousands of records a second, work the sidecar's row must not be charged for
    (nor lose its CPU to); its CPU per stored record is reported separately."""
    data = env.workdir / "control-plane"
    log_path = env.workdir / "control-plane.log"
    log = log_path.open("wb")
    # Port 0, read back from its start-up line: a port picked here and bound there could be
    # taken meanwhile (an Envoy started alongside, bound to port 0).
    proc = subprocess.Popen(
        [*off_server_prefix(env.server_cpus),
         env.python, "-m", "sidecar", "control-plane", "--data-dir", str(data),
         "--admin-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"],
        stdout=log, stderr=subprocess.STDOUT, cwd=_ROOT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        key_file = data / "bootstrap-key"
        ports = None
        while ports is None or not key_file.exists() or not _serving(ports[0]):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise TargetError("control plane did not start; see control-plane.log")
            time.sleep(0.1)
            ports = ports or _bound_ports(log_path.read_text(errors="replace"))
        admin, http = ports
        if not _metrics_up(http):
            raise TargetError("control plane's /metrics did not answer; see control-plane.log")
        yield ControlPlane(admin, key_file.read_text().strip(), proc.pid, data, http)
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


@contextlib.contextmanager
def _control_plane(env: TargetEnv) -> Iterator[tuple[str, str]]:
    """:func:`control_plane` as ``(admin address, operator key)``."""
    with control_plane(env) as cp:
        yield cp.admin, cp.operator


_STARTED = re.compile(r"admin gRPC on \S+ \(port (\d+)\), HTTP on \S+ \(port (\d+)\)")


def _bound_ports(log: str) -> tuple[str, str] | None:
    """``(admin, http)`` addresses from ``spauth control-plane``'s start-up line, once printed."""
    found = _STARTED.search(log)
    if found is None:
        return None
    return f"127.0.0.1:{found[1]}", f"127.0.0.1:{found[2]}"


def _metrics_up(http: str) -> bool:
    try:
        cp_cost.scrape(http)
    except (OSError, ValueError):  # not up, or not its /metrics (the port's squatter)
        return False
    return True


def _admin_up(admin: str) -> bool:
    with grpc.insecure_channel(admin) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=0.5)
        except grpc.FutureTimeoutError:
            return False
    return True


def _mint(admin: str, operator: str, scopes: list[str]) -> str:
    from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as pb
    from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2_grpc as pb_grpc

    with grpc.insecure_channel(admin) as channel:
        resp = pb_grpc.ApiKeyServiceStub(channel).CreateApiKey(
            pb.CreateApiKeyRequest(workspace="acme", name="bench", scopes=scopes),
            metadata=(("authorization", f"Bearer {operator}"),),
            timeout=10,
        )
    return str(resp.key)


def reported_check_path(log: Path) -> str | None:
    """The Check path a sidecar said at start-up it runs ("compiled" or "python"; a compiled
    path asked for but not built falls back to "python"), from its JSON log; None when absent."""
    for line in log.read_text(errors="replace").splitlines():
        try:
            msg = json.loads(line).get("msg")
        except (ValueError, AttributeError):
            continue
        if isinstance(msg, str) and msg.startswith(CHECK_PATH_LOG):
            return msg.removeprefix(CHECK_PATH_LOG).split()[0]
    return None


def with_check_path(target: RunningTarget, log: Path) -> RunningTarget:
    """``target`` with ``check_path`` (as the sidecar logging to ``log`` reported it) in its
    row's info."""
    return replace(target, info={**target.info, "check_path": reported_check_path(log)})


def sidecar_cases(valid: str) -> list[Case]:
    unknown = "spk_" + "7" * 32 + "AbC123"
    from sidecar.core.keyformat import checksum

    unknown = unknown[:-6] + checksum(unknown[:-6])  # well formed, never minted
    # Each case from its own address: the failure limiter blocks the unknown key's address
    # after failure_limit_source (50) failures, as shipped, so from then on that row measures a
    # blocked source's 429 (bench.denial_cost:sidecar_counted measures the unknown key itself).
    # Sent from the same address, the wrong-scope row measured those 429s too.
    return [
        grpc_case("allow", typical_headers(authorization=f"Bearer {valid}"), "allow", path=CHECKS),
        grpc_case(
            "unknown-key",
            typical_headers(x_api_key=unknown),
            "deny",
            path=CHECKS,
            source="10.0.0.8",
        ),
        grpc_case(
            "wrong-scope",
            typical_headers(x_api_key=valid),
            "deny",
            path=METRICS,
            source="10.0.0.9",
            check=_forbidden,
        ),
    ]


def _forbidden(response: external_auth_pb2.CheckResponse) -> str | None:
    """A wrong scope's answer is a 403 (a 429 would mean its source was blocked)."""
    status = int(response.denied_response.status.code)
    return None if status == 403 else f"expected HTTP 403 (insufficient scope), got {status}"


@contextlib.contextmanager
def _sidecar(
    env: TargetEnv,
    name: str,
    extra_env: Mapping[str, str],
    *,
    module: str = "sidecar",
    allow_only: bool = False,
) -> Iterator[RunningTarget]:
    """``python -m <module> sidecar`` fed by a fresh control plane; ``module`` may wrap the
    sidecar's entry point (bench.hotpath does), ``allow_only`` keeps just the allow case."""
    with control_plane(env) as cp:
        valid = _mint(cp.admin, cp.operator, ["checks:read"])
        argv = [
            env.python, "-m", module, "sidecar", "--listen", "{listen}",
            "--control-plane", cp.admin, "--state-dir", str(env.workdir / f"{name}-state"),
            "--metrics-addr", "", "--threads", "4",
            "--sync-token-file", str(sync_token_file(env)),
        ]  # fmt: skip
        cases = sidecar_cases(valid)
        with launch_process(
            env,
            name,
            argv,
            cases[:1] if allow_only else cases,
            extra_env={**SERVER_ENV, **extra_env},
            cwd=_ROOT,
            ready=_serving,
        ) as target:
            target = with_check_path(target, log_path(env, name))
            records = extra_env.get("SPAUTH_SIDECAR_AUDIT", "on") != "off"
            yield replace(target, ingest=cp.ingest_meter()) if records else target


def sidecar(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """The sidecar as shipped: metrics, denial log and decision audit records on."""
    return _sidecar(env, "sidecar", {})


def sidecar_audit_off(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """The same with decision records off, to price the audit pipeline in the same run."""
    return _sidecar(env, "sidecar-audit-off", {"SPAUTH_SIDECAR_AUDIT": "off"})


def sidecar_usage_off(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """The same with usage counting (last used) off, to price the per-check tally."""
    return _sidecar(env, "sidecar-usage-off", {"SPAUTH_SIDECAR_USAGE_REPORT_INTERVAL": "0"})


__all__ = ["sidecar", "sidecar_audit_off", "sidecar_cases", "sidecar_usage_off"]
