"""The change bus: two control-plane replicas on one SQLite file (WAL works across connections
and processes on one host), a sidecar connected to replica B, a key revoked on replica A.

Replica B's heartbeat re-read is set long (30 s) where the test is about the bus, so a delivery
well inside it can only have come through Redis; where the bus is absent or down, the heartbeat
is short and is what delivers. Timing is printed (-s), never asserted."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2_grpc as pb_grpc
from sidecar.authz.decision import Reason
from sidecar.authz.engine import CheckInput
from sidecar.config import SidecarSettings, load_settings
from sidecar.controlplane import ControlPlane
from sidecar.core.clock import FakeClock
from sidecar.dataplane.process import Sidecar
from sidecar.replication.bus import RedisChangeBus
from sidecar.store.sql.sqlite import SqliteStore
from tests.conftest import LoopThread, bearer, wait_until
from tests.support.redis import RedisServer

pytestmark = pytest.mark.redis

LONG = 30.0  # a heartbeat the tests never wait for


@dataclass
class Cluster:
    a: ControlPlane
    b: ControlPlane
    operator_key: str
    sidecar: Sidecar

    def stub(self, plane: ControlPlane) -> pb_grpc.ApiKeyServiceStub:
        channel = grpc.insecure_channel(f"127.0.0.1:{plane.admin_port}")
        return pb_grpc.ApiKeyServiceStub(channel)

    def create_key(self) -> tuple[str, str]:
        request = pb.CreateApiKeyRequest(workspace="acme", name="ci", scopes=["checks:read"])
        resp = self.stub(self.a).CreateApiKey(request, metadata=bearer(self.operator_key))
        return resp.api_key.id, resp.key

    def revoke(self, key_id: str) -> float:
        """Revoke on replica A; returns the monotonic time the call returned."""
        self.stub(self.a).RevokeApiKey(
            pb.RevokeApiKeyRequest(id=key_id), metadata=bearer(self.operator_key)
        )
        return time.monotonic()

    def decide(self, secret: str) -> Reason:
        headers = {"authorization": f"Bearer {secret}"}
        view = CheckInput("GET", "/v1/workspaces/acme/checks", "api", headers, {})
        return self.sidecar.engine.check(view).reason


def _plane(data_dir: Path, clock: FakeClock, heartbeat: float, redis_url: str) -> ControlPlane:
    settings = load_settings(
        {
            "data_dir": str(data_dir),
            "admin_addr": "127.0.0.1:0",
            "http_addr": "127.0.0.1:0",
            "sync_heartbeat": str(heartbeat),
            "redis_url": redis_url,
        },
        environ={},
    )
    return ControlPlane(settings, clock=clock)


@contextmanager
def cluster(
    tmp_path: Path, redis_url: str, *, heartbeat_b: float, loop: LoopThread
) -> Iterator[Cluster]:
    clock = FakeClock()
    data_dir = tmp_path / "shared"
    a = _plane(data_dir, clock, 1.0, redis_url)
    minted = a.bootstrap()
    assert minted is not None
    b = _plane(data_dir, clock, heartbeat_b, redis_url)
    loop.run(a.start())
    loop.run(b.start())
    sidecar = Sidecar(
        SidecarSettings(
            listen="127.0.0.1:0",
            metrics_addr="",  # no status port: never the fixed 9192
            control_plane=f"127.0.0.1:{b.admin_port}",
            state_dir=tmp_path / "sidecar",
            sync_token=b.sync_token,
        ),
        clock=clock,
    )
    sidecar.start()
    try:
        wait_until(lambda: sidecar.replica.loaded)
        yield Cluster(a, b, minted.secret, sidecar)
    finally:
        sidecar.stop(grace=0.5)
        loop.run(b.aclose(grace=1))
        loop.run(a.aclose(grace=1))


def propagate(c: Cluster, timeout: float) -> float:
    """Create a key on A, wait until the sidecar on B allows it, revoke it on A; seconds until
    the sidecar on B denies it."""
    key_id, secret = c.create_key()
    wait_until(lambda: c.decide(secret) is Reason.OK, timeout=timeout)
    revoked_at = c.revoke(key_id)
    wait_until(lambda: c.decide(secret) is Reason.REVOKED_CREDENTIAL, timeout, interval=0.001)
    return time.monotonic() - revoked_at


def test_a_revocation_on_replica_a_reaches_a_sidecar_on_b_through_redis(
    tmp_path: Path, redis_url: str, loop_thread: LoopThread
) -> None:
    with cluster(tmp_path, redis_url, heartbeat_b=LONG, loop=loop_thread) as c:
        assert c.a.bus is not None and c.b.bus is not None
        wait_until(lambda: c.a.bus.connected and c.b.bus.connected)  # type: ignore[union-attr]
        took = [propagate(c, timeout=LONG / 3) for _ in range(3)]
        print(f"\nA -> sidecar on B with Redis: {[round(t * 1000, 1) for t in took]} ms")
        assert c.b.bus.received >= 3


def test_without_redis_the_heartbeat_re_read_delivers(
    tmp_path: Path, loop_thread: LoopThread
) -> None:
    with cluster(tmp_path, "", heartbeat_b=1.0, loop=loop_thread) as c:
        assert c.b.bus is None
        took = propagate(c, timeout=10)
        print(f"\nA -> sidecar on B without Redis: {took * 1000:.0f} ms (heartbeat 1 s)")


def test_redis_killed_mid_test_then_back(tmp_path: Path, loop_thread: LoopThread) -> None:
    with (
        RedisServer() as server,
        cluster(tmp_path, server.url, heartbeat_b=3.0, loop=loop_thread) as c,
    ):
        bus_a, bus_b = c.a.bus, c.b.bus
        assert bus_a is not None and bus_b is not None
        wait_until(lambda: bus_a.connected and bus_b.connected)
        before = propagate(c, timeout=10)
        server.stop()
        wait_until(lambda: not bus_b.connected)
        # Redis down: the control planes keep serving, the heartbeat re-read delivers.
        during = propagate(c, timeout=10)
        server.start()
        wait_until(lambda: bus_a.connected and bus_b.connected, timeout=15)
        received = bus_b.received
        after = propagate(c, timeout=10)
        assert bus_b.received > received  # the bus carries revocations again
        print(
            f"\nA -> sidecar on B: Redis up {before * 1000:.0f} ms, killed {during * 1000:.0f} ms "
            f"(heartbeat 3 s), back {after * 1000:.0f} ms"
        )


def test_a_hung_redis_is_noticed_and_left(tmp_path: Path, loop_thread: LoopThread) -> None:
    """Redis stops answering without closing connections (SIGSTOP): the bus notices from its own
    keep-alives, reconnects when Redis answers again, and wakes the streams once."""
    store = SqliteStore(tmp_path / "bus.db")
    woken: list[int] = []
    with RedisServer() as server:
        bus = RedisChangeBus(server.url, store, woken.append, liveness=0.2)
        loop_thread.run(bus.start())
        try:
            wait_until(lambda: bus.connected)
            server.pause()
            wait_until(lambda: not bus.connected, timeout=10)
            server.resume()
            wait_until(lambda: bus.connected, timeout=15)
            assert woken.count(0) >= 2  # once per (re)subscription
        finally:
            server.resume()
            loop_thread.run(bus.aclose())
            store.close()
