"""Refused audit-stream entries go to the dead-letter stream (sidecar.bus.audit_dead_letter):
kept byte for byte with their stable reason code, acknowledged only once the dead letter is
written, never blocking the rest of their batch; counted in the control plane's metrics; and the
command docs/audit.md gives to inspect them runs as pasted. A real Redis and a real SQLite file."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from sidecar.auditship import decision_event
from sidecar.auditship.codec import encode
from sidecar.bus import DEAD_LETTER_STREAM, AuditStreamConsumer, RedisStreamTransport
from sidecar.bus.audit_dead_letter import FIELDS
from sidecar.bus.audit_ingest import GROUP
from sidecar.bus.audit_stream import STREAM
from sidecar.config import load_settings
from sidecar.controlplane import ControlPlane
from sidecar.core.audit import event
from sidecar.core.audit_trail import AuditTrail
from sidecar.core.clock import FakeClock
from sidecar.core.storage import Store
from sidecar.store.sql.sqlite import SqliteStore
from tests.conftest import LoopThread, wait_until
from tests.support.docblocks import named_block
from tests.test_audit_redis import consume, record, stored

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_800_000_000.0


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as c:
        yield c


@pytest.fixture
def trail(tmp_path: Path) -> Iterator[tuple[AuditTrail, SqliteStore]]:
    store = SqliteStore(tmp_path / "spauth.db", busy_timeout_ms=50)
    yield AuditTrail(store, FakeClock(NOW), b"k" * 32), store
    store.close()


@pytest.fixture
def consumers(loop_thread: LoopThread) -> Iterator[list[AuditStreamConsumer]]:
    made: list[AuditStreamConsumer] = []
    yield made
    for consumer in made:
        loop_thread.run(consumer.aclose())


def letters(client: redis.Redis) -> list[dict[str, bytes]]:
    return [
        {k.decode(): v for k, v in fields.items()}
        for _, fields in client.xrange(DEAD_LETTER_STREAM)
    ]


def refused_batch() -> list[bytes]:
    """Two good records around three the trail refuses, each for another reason."""
    forged = encode(event(NOW, "key_a", "key.revoked", "acme", "key_b"))
    future = encode(
        decision_event(
            time=NOW + 3600,
            allowed=True,
            reason="ok",
            credential_id="key_a",
            workspace="acme",
            method="GET",
            path="/v1/workspaces/acme/checks",
            source="203.0.113.7",
            decision_id="dec_future",
            latency_s=0.0001,
        )
    )
    other = bytearray(record(1))
    other[other.index(b"203.0.113.7")] = ord("1")  # dec_000001 again, other content
    return [record(1), forged, future, record(2), bytes(other)]


def decisions_stored(store: Store, ids: list[str]) -> list[str]:
    with store.transaction() as uow:
        return sorted(uow.audit.get_many(ids))


def test_refused_entries_are_dead_lettered_with_their_reason_and_the_rest_stored(
    redis_url: str,
    client: redis.Redis,
    store: Store,
    loop_thread: LoopThread,
    consumers: list[AuditStreamConsumer],
) -> None:
    # On SQLite and on PostgreSQL (the scale-out store), through the store fixture.
    audit = AuditTrail(store, FakeClock(NOW), b"k" * 32)
    batch = refused_batch()
    transport = RedisStreamTransport(redis_url)
    transport.send(batch)
    transport.close()
    junk = client.xadd(STREAM, {"id": "junk", "record": b"\xff\xfe"})
    consumer = AuditStreamConsumer(redis_url, audit, block=0.1)
    consumers.append(consumer)

    assert consume(loop_thread, consumer) == 6
    candidates = ["dec_000001", "dec_000002", "dec_future"]
    assert decisions_stored(store, candidates) == ["dec_000001", "dec_000002"]
    kept = letters(client)
    assert [(d["reason"], d["field"]) for d in kept] == [
        (b"not_a_decision", b"record"),  # the undecodable entry, found before the trail runs
        (b"not_a_decision", b"records.action"),
        (b"future_time", b"records.time"),
        (b"conflict", b"records.id"),
    ]
    # The record's bytes exactly as shipped, with the entry it came from and who refused it.
    assert [d["record"] for d in kept] == [b"\xff\xfe", batch[1], batch[2], batch[4]]
    assert kept[0]["entry"] == junk
    assert [d["id"] for d in kept[2:]] == [b"dec_future", b"dec_000001"]
    assert {d["consumer"] for d in kept} == {consumer.consumer.encode()}
    assert all(list(d) == list(FIELDS) for d in kept)
    assert consumer.dead_lettered == consumer.dead_letters.written == 4
    # Every entry acknowledged and deleted, the dead-lettered ones included.
    assert client.xlen(STREAM) == 0
    assert client.xpending(STREAM, GROUP)["pending"] == 0


def test_an_entry_without_a_record_is_dead_lettered_not_fatal(
    redis_url: str,
    client: redis.Redis,
    trail: tuple[AuditTrail, SqliteStore],
    loop_thread: LoopThread,
    consumers: list[AuditStreamConsumer],
) -> None:
    audit, store = trail
    client.xadd(STREAM, {"id": "x" * 80})  # another writer: no record field at all
    RedisStreamTransport(redis_url).send([record(0)])
    consumer = AuditStreamConsumer(redis_url, audit, block=0.1)
    consumers.append(consumer)
    assert consume(loop_thread, consumer) == 2
    (kept,) = letters(client)
    assert (kept["reason"], kept["record"]) == (b"not_a_decision", b"")
    assert stored(store) == ["dec_000000"]
    assert client.xlen(STREAM) == 0


def test_nothing_is_acknowledged_before_its_dead_letter_is_written(
    redis_url: str,
    client: redis.Redis,
    trail: tuple[AuditTrail, SqliteStore],
    loop_thread: LoopThread,
    consumers: list[AuditStreamConsumer],
) -> None:
    audit, store = trail
    forged = encode(event(NOW, "key_a", "key.revoked", "acme", "key_b"))
    RedisStreamTransport(redis_url).send([record(1), forged, record(2)])
    client.set(DEAD_LETTER_STREAM, b"in the way")  # the dead letter cannot be written
    consumer = AuditStreamConsumer(redis_url, audit, block=0.1)
    consumers.append(consumer)

    with pytest.raises(redis.ResponseError, match="not a stream"):
        consume(loop_thread, consumer)
    # The good records are committed, but nothing is acknowledged: all three stay pending.
    assert stored(store) == ["dec_000001", "dec_000002"]
    assert client.xpending(STREAM, GROUP)["pending"] == 3
    assert client.xlen(STREAM) == 3
    assert consumer.dead_lettered == 0

    client.delete(DEAD_LETTER_STREAM)
    assert consume(loop_thread, consumer) == 3  # its own pending entries, again
    assert [d["record"] for d in letters(client)] == [forged]  # once
    assert stored(store) == ["dec_000001", "dec_000002"]  # re-sends acknowledged, stored once
    assert client.xpending(STREAM, GROUP)["pending"] == 0
    assert client.xlen(STREAM) == 0


def test_claimed_entries_of_a_dead_consumer_are_dead_lettered_too(
    redis_url: str,
    client: redis.Redis,
    trail: tuple[AuditTrail, SqliteStore],
    loop_thread: LoopThread,
    consumers: list[AuditStreamConsumer],
) -> None:
    audit, _ = trail
    forged = encode(event(NOW, "key_a", "key.revoked", "acme", "key_b"))
    RedisStreamTransport(redis_url).send([forged, record(0)])
    client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    client.xreadgroup(GROUP, "dead-replica", {STREAM: ">"}, count=10)  # read, never acked
    consumer = AuditStreamConsumer(redis_url, audit, block=0.1, claim_idle=0.05)
    consumers.append(consumer)
    time.sleep(0.1)
    assert consume(loop_thread, consumer) == 2
    assert [d["record"] for d in letters(client)] == [forged]
    assert client.xpending(STREAM, GROUP)["pending"] == 0


def test_the_control_plane_counts_dead_letters_and_the_docs_command_shows_them(
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
    plane = ControlPlane(settings, clock=FakeClock(NOW))
    plane.bootstrap()
    registry = plane.metrics.registry
    name = "spauth_audit_stream_dead_lettered_records_total"
    # Exported at 0 for every reason from the start.
    assert registry.get_sample_value(name, {"reason": "future_time"}) == 0
    loop_thread.run(plane.start())
    try:
        forged = encode(event(NOW, "key_a", "key.revoked", "acme", "key_b"))
        RedisStreamTransport(redis_url).send([forged, record(0)])
        wait_until(lambda: client.xlen(DEAD_LETTER_STREAM) == 1, timeout=15)
        wait_until(lambda: registry.get_sample_value(name, {"reason": "not_a_decision"}) == 1)
        assert registry.get_sample_value(name, {"reason": "conflict"}) == 0
        # The refusal is in ingest's own counter too (one name per concept: reasons alike).
        refused = "spauth_audit_ingest_refused_records_total"
        assert registry.get_sample_value(refused, {"reason": "not_a_decision"}) == 1
    finally:
        loop_thread.run(plane.aclose(grace=1))

    block = named_block(ROOT / "docs" / "audit.md", "redis-dead-letters")
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.text],
        env={**os.environ, "REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "not_a_decision" in out and "action" in out
    assert client.xlen(DEAD_LETTER_STREAM) == 1  # reading deletes nothing


def test_a_batch_larger_than_an_ingest_call_keeps_each_refusal_with_its_entry(
    redis_url: str,
    client: redis.Redis,
    trail: tuple[AuditTrail, SqliteStore],
    loop_thread: LoopThread,
    consumers: list[AuditStreamConsumer],
) -> None:
    # 2,500 entries: three trail calls (1,000 records each at most) and XACK in three slices.
    _, store = trail
    audit = AuditTrail(store, FakeClock(NOW + 3_000), b"k" * 32)  # record(i) is dated NOW + i
    forged = encode(event(NOW, "key_a", "key.revoked", "acme", "key_b"))
    batch = [record(i) for i in range(2_499)]
    batch.insert(1_500, forged)
    transport = RedisStreamTransport(redis_url)
    for start in range(0, len(batch), 500):
        transport.send(batch[start : start + 500])
    transport.close()
    forged_entry, fields = client.xrange(STREAM)[1_500]
    assert fields[b"record"] == forged
    consumer = AuditStreamConsumer(redis_url, audit, block=0.1, batch=2_500)
    consumers.append(consumer)
    assert consume(loop_thread, consumer) == 2_500
    (kept,) = letters(client)
    assert kept["record"] == forged
    assert kept["entry"] == forged_entry
    assert len(stored(store)) == 2_499
    assert client.xlen(STREAM) == 0
    assert client.xpending(STREAM, GROUP)["pending"] == 0
