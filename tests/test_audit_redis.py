"""The audit stream through a real Redis: the sidecar's transport (idempotent XADD, back-pressure)
and the control planes' consumer group (de-duplication by event id, XACK only after the commit,
pending entries of a dead consumer claimed), then a real sidecar and control plane end to end."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc

from sidecar.auditship import TransportError, decision_event
from sidecar.auditship.codec import encode
from sidecar.bus import DEAD_LETTER_STREAM, AuditStreamConsumer, RedisStreamTransport
from sidecar.bus.audit_ingest import GROUP
from sidecar.bus.audit_stream import STREAM
from sidecar.config import SidecarSettings, load_settings
from sidecar.controlplane import ControlPlane
from sidecar.core import keyformat
from sidecar.core.audit import event
from sidecar.core.audit_trail import AuditTrail
from sidecar.core.clock import FakeClock
from sidecar.dataplane.process import Sidecar
from sidecar.store.sql.sqlite import SqliteStore
from tests.conftest import LoopThread, wait_until
from tests.support.ports import free_port
from tests.support.redis import RedisServer

pytestmark = pytest.mark.redis


def record(i: int) -> bytes:
    return encode(
        decision_event(
            time=1_800_000_000.0 + i,
            allowed=i % 2 == 0,
            reason="ok" if i % 2 == 0 else "unknown_credential",
            credential_id="key_a",
            workspace="acme",
            method="GET",
            path="/v1/workspaces/acme/checks",
            source="203.0.113.7",
            decision_id=f"dec_{i:06d}",
            latency_s=0.0001,
        )
    )


def stored(store: SqliteStore) -> list[str]:
    with sqlite3.connect(store.path) as conn:
        rows = conn.execute("SELECT id FROM audit_events WHERE action LIKE 'authz.%'").fetchall()
    conn.close()
    return sorted(r[0] for r in rows)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as c:
        yield c


@pytest.fixture
def trail(tmp_path: Path) -> Iterator[tuple[AuditTrail, SqliteStore]]:
    store = SqliteStore(tmp_path / "spauth.db", busy_timeout_ms=50)
    yield AuditTrail(store, FakeClock(), b"k" * 32), store
    store.close()


@pytest.fixture
def consumers(loop_thread: LoopThread) -> Iterator[list[AuditStreamConsumer]]:
    made: list[AuditStreamConsumer] = []
    yield made
    for consumer in made:
        loop_thread.run(consumer.aclose())


def consume(loop: LoopThread, consumer: AuditStreamConsumer, rounds: int = 1) -> int:
    """Run ``rounds`` consumer steps by hand (the task does the same in a loop)."""

    async def go() -> int:
        await consumer._ensure_group()
        return sum([await consumer.step() for _ in range(rounds)])

    return int(loop.run(go()))  # type: ignore[call-overload]


# -- the transport ----------------------------------------------------------------------------


def test_a_batch_sent_again_is_added_once(redis_url: str, client: redis.Redis) -> None:
    transport = RedisStreamTransport(redis_url)
    batch = [record(i) for i in range(3)]
    assert transport.send(batch) == 3
    assert transport.send(batch) == 3  # the reply was lost; the shipper sends it again
    assert client.xlen(STREAM) == 3
    # The spool grew meanwhile: the same start, more records; only the new ones are added.
    assert transport.send([*batch, record(3), record(4)]) == 5
    assert client.xlen(STREAM) == 5
    ids = [fields[b"id"] for _, fields in client.xrange(STREAM)]
    assert ids == [f"dec_{i:06d}".encode() for i in range(5)]
    transport.close()


def test_a_full_backlog_refuses_the_batch_for_a_retry(redis_url: str, client: redis.Redis) -> None:
    transport = RedisStreamTransport(redis_url, max_backlog=2)
    assert transport.send([record(0), record(1)]) == 2
    with pytest.raises(TransportError) as err:
        transport.send([record(2)])
    assert not err.value.rejected  # the records stay in the spool
    assert "backlog" in str(err.value)
    assert client.xlen(STREAM) == 2
    transport.close()


def test_bytes_that_are_not_a_record_are_rejected(redis_url: str) -> None:
    transport = RedisStreamTransport(redis_url)
    with pytest.raises(TransportError) as err:
        transport.send([b"\xff\xfe not a record"])
    assert err.value.rejected
    transport.close()


def test_redis_down_is_a_retryable_transport_error() -> None:
    transport = RedisStreamTransport(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    with pytest.raises(TransportError) as err:
        transport.send([record(0)])
    assert not err.value.rejected
    transport.close()


# -- the consumer group -----------------------------------------------------------------------


def test_records_are_stored_once_then_acknowledged_and_deleted(
    redis_url: str,
    client: redis.Redis,
    trail: tuple[AuditTrail, SqliteStore],
    loop_thread: LoopThread,
    consumers: list[AuditStreamConsumer],
) -> None:
    audit, store = trail
    transport = RedisStreamTransport(redis_url)
    transport.send([record(i) for i in range(4)])
    transport.send([record(3), record(4)])  # a different cut: dec_000003 arrives twice
    consumer = AuditStreamConsumer(redis_url, audit, block=0.1)
    consumers.append(consumer)
    assert consume(loop_thread, consumer) == 6
    assert stored(store) == [f"dec_{i:06d}" for i in range(5)]
    assert client.xlen(STREAM) == 0
    assert client.xpending(STREAM, GROUP)["pending"] == 0
    transport.close()


def test_nothing_is_acknowledged_before_the_commit(
    redis_url: str,
    client: redis.Redis,
    trail: tuple[AuditTrail, SqliteStore],
    loop_thread: LoopThread,
    consumers: list[AuditStreamConsumer],
) -> None:
    audit, store = trail
    RedisStreamTransport(redis_url).send([record(i) for i in range(3)])
    consumer = AuditStreamConsumer(redis_url, audit, block=0.1)
    consumers.append(consumer)
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database: the store is busy
    try:
        with pytest.raises(Exception, match="store unavailable"):
            consume(loop_thread, consumer)
        assert client.xpending(STREAM, GROUP)["pending"] == 3
        assert client.xlen(STREAM) == 3
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert consume(loop_thread, consumer) == 3  # its own pending entries, first
    assert stored(store) == ["dec_000000", "dec_000001", "dec_000002"]
    assert client.xpending(STREAM, GROUP)["pending"] == 0


def test_entries_of_a_dead_consumer_are_claimed(
    redis_url: str,
    client: redis.Redis,
    trail: tuple[AuditTrail, SqliteStore],
    loop_thread: LoopThread,
    consumers: list[AuditStreamConsumer],
) -> None:
    audit, store = trail
    RedisStreamTransport(redis_url).send([record(i) for i in range(3)])
    client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    client.xreadgroup(GROUP, "dead-replica", {STREAM: ">"}, count=10)  # read, never acked
    consumer = AuditStreamConsumer(redis_url, audit, block=0.1, claim_idle=0.05)
    consumers.append(consumer)
    time.sleep(0.1)
    assert consume(loop_thread, consumer) == 3
    assert consumer.claimed == 3
    assert stored(store) == ["dec_000000", "dec_000001", "dec_000002"]
    assert client.xpending(STREAM, GROUP)["pending"] == 0


def test_records_the_trail_refuses_are_dead_lettered_and_the_rest_stored(
    redis_url: str,
    client: redis.Redis,
    trail: tuple[AuditTrail, SqliteStore],
    loop_thread: LoopThread,
    consumers: list[AuditStreamConsumer],
) -> None:
    audit, store = trail
    forged = encode(event(1_800_000_000.0, "key_a", "key.revoked", "acme", "key_b"))
    RedisStreamTransport(redis_url).send([record(1), forged, record(2)])
    client.xadd(STREAM, {"id": "junk", "record": b"\xff\xfe"})
    consumer = AuditStreamConsumer(redis_url, audit, block=0.1)
    consumers.append(consumer)
    assert consume(loop_thread, consumer) == 4
    assert stored(store) == ["dec_000001", "dec_000002"]
    assert consumer.dead_lettered == 2
    assert client.xlen(DEAD_LETTER_STREAM) == 2
    assert client.xlen(STREAM) == 0


def test_the_consumer_task_outlives_a_redis_outage(
    trail: tuple[AuditTrail, SqliteStore],
    loop_thread: LoopThread,
    consumers: list[AuditStreamConsumer],
) -> None:
    audit, store = trail
    with RedisServer() as server:
        consumer = AuditStreamConsumer(server.url, audit, block=0.1)
        consumers.append(consumer)
        loop_thread.run(consumer.start())
        transport = RedisStreamTransport(server.url)
        transport.send([record(0)])
        wait_until(lambda: stored(store) == ["dec_000000"])
        server.stop()
        time.sleep(0.3)
        server.start()  # an empty Redis: the group is created again
        transport.send([record(1)])
        wait_until(lambda: stored(store) == ["dec_000000", "dec_000001"], timeout=15)
        transport.close()


def test_a_sidecar_ships_decisions_to_the_control_plane_through_redis(
    tmp_path: Path, redis_url: str, client: redis.Redis, loop_thread: LoopThread
) -> None:
    settings = load_settings(
        {
            "data_dir": str(tmp_path / "cp"),
            "admin_addr": "127.0.0.1:0",
            "http_addr": "127.0.0.1:0",
            "redis_url": redis_url,
        },
        environ={},
    )
    plane = ControlPlane(settings, clock=FakeClock())
    plane.bootstrap()
    loop_thread.run(plane.start())
    sidecar = Sidecar(
        SidecarSettings(
            listen="127.0.0.1:0",
            metrics_addr="",  # no status port: never the fixed 9192
            control_plane=f"127.0.0.1:{plane.admin_port}",
            state_dir=tmp_path / "sc",
            sync_token=plane.sync_token,
            redis_url=redis_url,
            audit_write_interval=0.005,
        ),
        clock=plane.clock,
    )
    sidecar.start()
    try:
        wait_until(lambda: sidecar.replica.loaded)
        req = ext.CheckRequest()
        req.attributes.source.address.socket_address.address = "10.0.0.1"
        http = req.attributes.request.http
        http.method, http.path, http.host = "GET", "/v1/workspaces/acme/checks", "api"
        http.headers["authorization"] = f"Bearer {keyformat.mint_key()}"
        with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
            resp = ext_grpc.AuthorizationStub(channel).Check(req, timeout=5)
        decision_id = resp.dynamic_metadata["decision_id"]
        wait_until(lambda: decision_id in stored(plane.store), timeout=15)  # type: ignore[arg-type]
        # The ingester acknowledges and deletes an entry only after the store committed it: the
        # row is visible a moment before the stream is empty, so wait for that step too.
        wait_until(lambda: client.xlen(STREAM) == 0)
    finally:
        sidecar.stop(grace=1)
        loop_thread.run(plane.aclose(grace=1))
