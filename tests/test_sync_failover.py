"""Sidecars with several control-plane replicas: when the replica a sidecar streams from stops or
falls silent, it moves to another and resumes from its revision (no snapshot, nothing missed).
Real control planes (in-process, real gRPC on 127.0.0.1:0) share one database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc

from sidecar._gen.statuspulse.auth.v1 import replication_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import replication_pb2_grpc as pb_grpc
from sidecar.config import ConfigError, SidecarSettings, load_settings, load_sidecar_settings
from sidecar.controlplane import ControlPlane
from sidecar.core import kek
from sidecar.core.clock import FakeClock
from sidecar.core.models import RequestContext
from sidecar.dataplane.process import Sidecar
from sidecar.replication.client import parse_targets
from tests.conftest import LoopThread, RunningControlPlane, wait_until

SYNC_TOKEN = "failover-test-sync-token"


@dataclass
class Replica:
    plane: ControlPlane
    loop: LoopThread
    address: str
    running: bool = True

    def stop(self) -> None:
        if self.running:
            self.loop.run(self.plane.aclose(grace=0))
            self.running = False


@dataclass
class Cluster:
    replicas: list[Replica]
    operator: RequestContext

    def by_address(self, address: str) -> Replica:
        return next(r for r in self.replicas if r.address == address)

    def targets(self) -> str:
        return ",".join(r.address for r in self.replicas)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def cluster(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[Cluster]:
    """Two control-plane replicas on one database."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'shared.db'}"
    replicas = []
    shared_kek = kek.generate()  # every replica of one store shares the KEK
    for n in range(2):
        settings = load_settings(
            {
                "data_dir": str(tmp_path / f"cp{n}"),
                "database_url": url,
                "key_encryption_key": shared_kek,
                "admin_addr": "127.0.0.1:0",
                "http_addr": "127.0.0.1:0",
                "sync_heartbeat": "0.1",
                "sweep_interval": "3600",
                # Replicas share one sync token (a Secret in deploy/k8s).
                "sync_token": SYNC_TOKEN,
            },
            environ={},
        )
        loop = LoopThread()
        plane = ControlPlane(settings, clock=clock)
        loop.run(plane.start())
        replicas.append(Replica(plane, loop, f"127.0.0.1:{plane.admin_port}"))
    minted = replicas[0].plane.bootstrap()
    assert minted is not None
    keys = replicas[0].plane.keys
    yield Cluster(replicas, RequestContext(keys.authenticate(minted.secret), "req-test"))
    for r in replicas:
        r.stop()
        r.loop.close()


@pytest.fixture
def sidecars(tmp_path: Path, clock: FakeClock) -> Iterator[list[Sidecar]]:
    started: list[Sidecar] = []
    yield started
    for sc in started:
        sc.stop(grace=0.2)


def start_sidecar(
    started: list[Sidecar], tmp_path: Path, clock: FakeClock, targets: str
) -> Sidecar:
    settings = SidecarSettings(
        listen="127.0.0.1:0",
        control_plane=targets,
        state_dir=tmp_path / f"sidecar-{len(started)}",
        metrics_addr="",
        sync_token=SYNC_TOKEN,
    )
    sc = Sidecar(settings, clock=clock)
    sc.start()
    started.append(sc)
    wait_until(lambda: sc.replica.loaded and sc.sync.connected)
    return sc


def check(sc: Sidecar, key: str) -> ext.CheckResponse:
    """The sidecar's answer to a GET of acme's checks with ``key``, over gRPC."""
    req = ext.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "GET", "/v1/workspaces/acme/checks", "api.test"
    http.headers["authorization"] = f"Bearer {key}"
    with grpc.insecure_channel(f"127.0.0.1:{sc.port}") as ch:
        return ext_grpc.AuthorizationStub(ch).Check(req, timeout=5)


def allowed(sc: Sidecar, key: str) -> bool:
    return bool(check(sc, key).status.code == 0)


def test_a_sidecar_moves_to_the_other_replica_and_misses_no_revision(
    cluster: Cluster, sidecars: list[Sidecar], tmp_path: Path, clock: FakeClock
) -> None:
    a, b = cluster.replicas
    keys = a.plane.keys
    first = keys.create(cluster.operator, workspace="acme", name="one", scopes=["checks:read"])
    sc = start_sidecar(sidecars, tmp_path, clock, cluster.targets())
    assert allowed(sc, first.secret)
    mine = cluster.by_address(sc.sync.target)
    other = b if mine is a else a
    before = sc.sync.reconnects

    mine.stop()
    # Written on the surviving replica while the sidecar is between streams.
    svc = other.plane.keys
    revoked = svc.revoke(cluster.operator, first.key.id, reason="leaked")
    second = svc.create(cluster.operator, workspace="acme", name="two", scopes=["checks:read"])
    with other.plane.store.read() as uow:
        head = uow.changes.head()

    wait_until(lambda: sc.sync.connected and sc.sync.target == other.address)
    wait_until(lambda: sc.replica.revision == head)
    assert sc.sync.reconnects > before
    assert other.plane.replication.snapshots_sent == 0  # resumed, not re-sent everything
    assert revoked.revoked_at is not None and not allowed(sc, first.secret)
    assert allowed(sc, second.secret)


def test_changes_made_on_one_replica_reach_sidecars_of_the_other(
    cluster: Cluster, sidecars: list[Sidecar], tmp_path: Path, clock: FakeClock
) -> None:
    a, b = cluster.replicas
    on_a = start_sidecar(sidecars, tmp_path, clock, a.address)
    on_b = start_sidecar(sidecars, tmp_path, clock, b.address)
    minted = a.plane.keys.create(
        cluster.operator, workspace="acme", name="k", scopes=["checks:read"]
    )
    # B has no notification from A's commit; its stream re-reads the log every heartbeat.
    wait_until(lambda: allowed(on_a, minted.secret) and allowed(on_b, minted.secret))
    b.plane.keys.revoke(cluster.operator, minted.key.id)
    wait_until(lambda: not allowed(on_a, minted.secret) and not allowed(on_b, minted.secret))


class _Silent(pb_grpc.ReplicationServiceServicer):  # type: ignore[misc]
    """A control plane that accepts the stream and then says nothing (frozen, partitioned)."""

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.SubscribeResponse]:
        await asyncio.sleep(3600)
        yield pb.SubscribeResponse()


def test_a_silent_replica_is_abandoned_for_the_next(
    control_plane: RunningControlPlane,
    sidecars: list[Sidecar],
    tmp_path: Path,
    clock: FakeClock,
    loop_thread: LoopThread,
) -> None:
    async def serve() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        pb_grpc.add_ReplicationServiceServicer_to_server(_Silent(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop_thread.run(serve())  # type: ignore[misc]
    try:
        settings = SidecarSettings(
            listen="127.0.0.1:0",
            control_plane=f"127.0.0.1:{port},{control_plane.address}",
            state_dir=tmp_path / "sidecar",
            metrics_addr="",
            sync_token=control_plane.plane.sync_token,
        )
        sc = Sidecar(settings, clock=clock)
        sc.sync.silence_timeout = 0.3
        sc.start()
        sidecars.append(sc)
        wait_until(lambda: sc.replica.loaded and sc.sync.target == control_plane.address)
    finally:
        loop_thread.run(server.stop(0))


def test_targets_parse_and_validate() -> None:
    assert parse_targets("a:1, b:2,a:1,") == ["a:1", "b:2"]
    assert parse_targets(["a:1"]) == ["a:1"]
    with pytest.raises(ValueError, match="control_plane"):
        parse_targets(" , ")
    s = load_sidecar_settings({"control_plane": "10.0.0.1:50051,10.0.0.2:50051"}, environ={})
    assert s.control_plane == "10.0.0.1:50051,10.0.0.2:50051"
    with pytest.raises(ConfigError, match="control_plane"):
        load_sidecar_settings({"control_plane": "10.0.0.1:50051,nope"}, environ={})
