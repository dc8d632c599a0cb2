"""Health transitions, seen the way Kubernetes and Envoy see them: HTTP /readyz and /healthz, and
grpc.health.v1 on the sidecar's port. Time moves only when the test says so (FakeClock)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.core.clock import FakeClock
from sidecar.core.models import Change
from sidecar.dataplane.process import SYNC_HEALTH, Sidecar
from sidecar.ops.health import Health, Status
from tests.conftest import LoopThread, RunningControlPlane
from tests.support.ops import (
    bearer,
    call_check,
    check_request,
    create_key,
    http_get,
    plane_on,
    ready,
    running_sidecar,
    sample,
    scrape,
    sidecar_settings,
    status_url,
    wait_until,
)
from tests.support.ports import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CHECKS = "/v1/workspaces/acme/checks/1"


def grpc_health(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


def test_sidecar_health_transitions(tmp_path: Path, loop_thread: LoopThread) -> None:
    clock = FakeClock()
    addr = f"127.0.0.1:{free_port()}"
    settings = sidecar_settings(addr, tmp_path / "sc", max_staleness=60)
    with running_sidecar(settings, clock) as sidecar:
        url = status_url(sidecar)
        # Loading: nothing to sync from yet. Alive, not ready; checks fail closed.
        assert ready(url) == (503, {"status": "not_serving", "reasons": ["replica_not_ready"]})
        assert http_get(url + "/healthz")[0] == 200
        assert grpc_health(sidecar.port) == NOT_SERVING

        with plane_on(addr, tmp_path / "cp", clock, loop_thread) as (_plane, operator):
            wait_until(lambda: ready(url) == (200, {"status": "serving", "reasons": []}))
            wait_until(lambda: grpc_health(sidecar.port) == SERVING)
            assert grpc_health(sidecar.port, SYNC_HEALTH) == SERVING
            secret, _ = create_key(addr, operator, ["checks:read"])
            wait_until(lambda: call_check(sidecar.port, check_request(CHECKS, bearer(secret)))
                       .status.code == 0)  # fmt: skip

        # Control plane gone: degraded, still ready, still answering from the replica.
        degraded = (200, {"status": "degraded", "reasons": ["control_plane_unreachable"]})
        wait_until(lambda: ready(url) == degraded)
        wait_until(lambda: grpc_health(sidecar.port, SYNC_HEALTH) == NOT_SERVING)
        assert grpc_health(sidecar.port) == SERVING
        assert call_check(sidecar.port, check_request(CHECKS, bearer(secret))).status.code == 0
        staleness = sample(scrape(url), "spauth_replica_staleness_seconds")

        # Past max_staleness: not serving, and checks fail closed with 503.
        clock.advance(61)
        assert ready(url) == (503, {"status": "not_serving", "reasons": ["replica_stale"]})
        wait_until(lambda: grpc_health(sidecar.port) == NOT_SERVING)
        denied = call_check(sidecar.port, check_request(CHECKS, bearer(secret)))
        assert denied.denied_response.status.code == 503
        samples = scrape(url)
        assert sample(samples, "spauth_replica_staleness_seconds") == staleness + 61
        # Counted by the housekeeping thread, within a tick (0.25 s) of the lost stream.
        wait_until(lambda: sample(scrape(url), "spauth_sync_reconnects_total") >= 1)
        assert sample(samples, "spauth_decisions_total", outcome="error",
                      reason="replica_stale") == 1  # fmt: skip


def test_sidecar_drains_on_stop(control_plane: RunningControlPlane, tmp_path: Path) -> None:
    secret, _ = create_key(control_plane.address, control_plane.operator_key, ["checks:read"])
    settings = sidecar_settings(control_plane.address, tmp_path / "sc", drain_delay=3.0)
    sidecar = Sidecar(settings, control_plane.clock)
    sidecar.start()
    url = status_url(sidecar)
    wait_until(lambda: ready(url)[0] == 200)
    stopper = threading.Thread(target=sidecar.stop, kwargs={"grace": 1})
    stopper.start()
    try:
        wait_until(lambda: ready(url) == (503, {"status": "not_serving", "reasons": ["draining"]}))
        assert grpc_health(sidecar.port) == NOT_SERVING
        # NOT_SERVING first, but still answering, so traffic can move away without errors.
        assert call_check(sidecar.port, check_request(CHECKS, bearer(secret))).status.code == 0
        assert http_get(url + "/healthz")[0] == 200
    finally:
        stopper.join(15)
    assert not stopper.is_alive()
    # The replica was persisted on the way out.
    assert (tmp_path / "sc" / "replica.bin").is_file()


def test_control_plane_readiness_and_drain(tmp_path: Path, loop_thread: LoopThread) -> None:
    clock = FakeClock()
    with plane_on(
        "127.0.0.1:0", tmp_path / "cp", clock, loop_thread, drain_delay=3.0, shutdown_grace=0
    ) as (plane, _):
        url = f"http://127.0.0.1:{plane.http_port}"
        assert ready(url) == (200, {"status": "serving", "reasons": []})
        assert http_get(url + "/healthz") == (200, b'{"status":"ok"}')
        # An embedded component's health is folded in (spauth serve adds the sidecar's).
        plane.health_checks.append(lambda: Health(Status.DEGRADED, ("control_plane_unreachable",)))
        assert ready(url) == (200, {"status": "degraded", "reasons": ["control_plane_unreachable"]})
        plane.health_checks.clear()

        closing = asyncio.run_coroutine_threadsafe(plane.aclose(), loop_thread.loop)
        wait_until(lambda: ready(url) == (503, {"status": "not_serving", "reasons": ["draining"]}))
        closing.result(15)


def test_a_change_of_unknown_kind_is_reported_not_skipped(
    tmp_path: Path, loop_thread: LoopThread
) -> None:
    """A newer control plane's change the sidecar cannot apply: health degraded, a metric by
    kind, and the changes after it still apply (the key below keeps working)."""
    clock = FakeClock()
    addr = f"127.0.0.1:{free_port()}"
    settings = sidecar_settings(addr, tmp_path / "sc", max_staleness=60)
    with running_sidecar(settings, clock) as sidecar:
        url = status_url(sidecar)
        with plane_on(addr, tmp_path / "cp", clock, loop_thread) as (plane, operator):
            wait_until(lambda: ready(url) == (200, {"status": "serving", "reasons": []}))
            with plane.store.transaction() as uow:
                uow.changes.append(Change("credential.from_the_future", "key_x", {"id": "x"}))
            secret, _ = create_key(addr, operator, ["checks:read"])
            wait_until(lambda: call_check(sidecar.port, check_request(CHECKS, bearer(secret)))
                       .status.code == 0)  # fmt: skip
            degraded = (200, {"status": "degraded", "reasons": ["unknown_change_kind"]})
            wait_until(lambda: ready(url) == degraded)
            wait_until(
                lambda: (
                    sample(
                        scrape(url),
                        "spauth_replica_unknown_changes_total",
                        kind="credential.from_the_future",
                    )
                    == 1
                )
            )
