"""The sidecar's audit pipeline: queue policy, spool recovery, at-least-once shipping to a real
control plane, a process killed with SIGKILL, and a control plane that is away for a while."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from sidecar._gen.statuspulse.auth.v1 import audit_pb2 as pb
from sidecar.auditship import (
    AuditPipeline,
    AuditQueue,
    Backoff,
    GrpcTransport,
    ShipConfig,
    Shipper,
    Spool,
    decision_event,
)
from sidecar.auditship.codec import decode, encode
from sidecar.auditship.metrics import AuditMetrics
from sidecar.auditship.records import PendingDecision
from sidecar.auditship.spool import frame
from sidecar.authz.decision import Decision, Identity, Reason
from sidecar.config import load_settings
from sidecar.controlplane import ControlPlane
from sidecar.core.audit import AuditEvent, event, scrub
from sidecar.core.clock import FakeClock
from tests.conftest import LoopThread, RunningControlPlane, free_port
from tests.support.sync import TEST_SYNC_TOKEN

ROOT = Path(__file__).resolve().parent.parent


def decision(i: int, allowed: bool = True, path: str = "/v1/checks") -> AuditEvent:
    return decision_event(
        time=1_700_000_000.0 + i,  # in the past of every clock here (ingest refuses the future)
        allowed=allowed,
        reason="ok" if allowed else "unknown_key",
        credential_id="key_a",
        workspace="acme",
        method="GET",
        path=path,
        source="127.0.0.1:5000",
        decision_id=f"dec_{i:06d}",
        latency_s=0.0001,
    )


def stored_decisions(plane: ControlPlane) -> list[str]:
    with plane.store.read() as uow:
        conn = uow.conn  # type: ignore[attr-defined]
        rows = conn.execute("SELECT id FROM audit_events WHERE action LIKE 'authz.%'").fetchall()
    return [r[0] for r in rows]


def wait_until(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


# -- queue ---------------------------------------------------------------------------------


def test_a_full_queue_drops_allows_first_and_keeps_denials() -> None:
    q = AuditQueue(3, deny_headroom=2)
    assert all(q.put(decision(i)) for i in range(3))
    assert q.put(decision(3)) is False  # full: the new allow is dropped
    for i in range(4, 7):
        assert q.put(decision(i, allowed=False))  # each evicts the oldest allow
    assert q.put(decision(7, allowed=False))  # past capacity, within the denial headroom
    stats = q.stats()
    assert (stats.dropped_allows, stats.dropped_denials, stats.depth) == (4, 0, 4)
    assert [e.id for e in q.drain()] == [f"dec_{i:06d}" for i in (4, 5, 6, 7)]


def test_denials_are_dropped_only_past_the_headroom() -> None:
    q = AuditQueue(2, deny_headroom=2)
    results = [q.put(decision(i, allowed=False)) for i in range(6)]
    assert results == [True] * 4 + [False] * 2
    assert q.stats().dropped_denials == 2


def test_drain_keeps_acceptance_order_across_kinds() -> None:
    q = AuditQueue(100)
    kinds = [True, False, False, True, True, False]
    for i, allowed in enumerate(kinds):
        q.put(decision(i, allowed))
    assert [e.id for e in q.drain()] == [f"dec_{i:06d}" for i in range(6)]
    assert q.drain() == []


def test_allows_are_sampled_and_denials_never() -> None:
    draws = iter([0.1, 0.9, 0.3, 0.7] * 10)
    q = AuditQueue(100, allow_sample_rate=0.5, rand=lambda: next(draws))
    kept = [q.put(decision(i)) for i in range(4)]
    assert kept == [True, False, True, False]
    assert all(q.put(decision(10 + i, allowed=False)) for i in range(4))
    assert q.stats().sampled_out == 2 and q.stats().depth == 6


# -- records and spool --------------------------------------------------------------------


def test_decision_records_carry_no_query_string() -> None:
    ev = decision(1, False, "/v1/checks?api_key=spk_secret&x=1#frag")
    assert ev.target == "/v1/checks" and ev.action == "authz.deny" and ev.outcome == "deny"
    assert ev.id == ev.request_id == "dec_000001"
    assert decode(encode(ev)) == ev


def test_spool_survives_reopen_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append([encode(decision(i)) for i in range(5)])
    spool.close()
    segment = next(tmp_path.glob("*.spool"))
    whole = segment.read_bytes()
    with open(segment, "ab") as fh:
        fh.write(frame(encode(decision(5)))[:-7])  # killed inside a write
    spool = Spool(tmp_path)
    assert segment.stat().st_size == len(whole)
    payloads, end = spool.read(spool.acked, 100)
    assert [decode(p).id for p in payloads] == [f"dec_{i:06d}" for i in range(5)]
    spool.append([encode(decision(6))])
    payloads, _ = spool.read(end, 100)
    assert [decode(p).id for p in payloads] == ["dec_000006"]
    spool.close()


def test_spool_rotates_segments_and_deletes_them_once_shipped(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=1000)
    for i in range(30):
        spool.append([encode(decision(i))])
    assert len(list(tmp_path.glob("*.spool"))) > 3
    payloads, end = spool.read(spool.acked, 20)
    assert len(payloads) == 20
    spool.ack(end)
    spool.close()
    reopened = Spool(tmp_path, segment_bytes=1000)
    rest, end = reopened.read(reopened.acked, 100)
    assert [decode(p).id for p in rest] == [f"dec_{i:06d}" for i in range(20, 30)]
    reopened.ack(end)
    assert reopened.pending_bytes == 0 and len(list(tmp_path.glob("*.spool"))) == 1
    reopened.close()


def test_an_ack_newer_than_the_surviving_bytes_is_clamped(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append([encode(decision(i)) for i in range(3)])
    spool.close()
    (tmp_path / "shipped").write_text("1 999999\n")  # power loss: data lost, ack kept
    spool = Spool(tmp_path)
    spool.append([encode(decision(9))])
    payloads, _ = spool.read(spool.acked, 10)
    assert [decode(p).id for p in payloads] == ["dec_000009"]
    spool.close()


# -- shipping -----------------------------------------------------------------------------


def test_shipping_backs_off_with_a_bound_while_the_control_plane_is_away(tmp_path: Path) -> None:
    now = [100.0]
    spool = Spool(tmp_path)
    spool.append([encode(decision(1))])
    transport = GrpcTransport(f"127.0.0.1:{free_port()}", "spk_none", timeout=2)
    shipper = Shipper(spool, transport, backoff=Backoff(1, 4, jitter=0.0), clock=lambda: now[0])
    delays = []
    for _ in range(5):
        delays.append(shipper.poll())
        assert shipper.poll() == delays[-1]  # not due yet: no attempt
        now[0] += delays[-1]
    assert delays == [1, 2, 4, 4, 4]
    assert shipper.stats().failures == 5 and spool.pending_bytes > 0
    transport.close()
    spool.close()


def test_backoff_survives_a_million_failures_and_stays_bounded() -> None:
    # 2.0 ** 1024 overflows a float: an uncapped exponent killed the thread after ~85 minutes.
    for failures in (1025, 10**6, 10**18):
        assert Backoff(0.2, 5.0, jitter=0.0).delay(failures) == 5.0
        assert Backoff(0.2, 5.0, jitter=0.5, random=lambda: 0.999).delay(failures) > 2.5


def test_backoff_jitter_takes_a_random_fraction_off_the_delay() -> None:
    draws = iter([0.0, 1.0, 0.5])
    backoff = Backoff(1, 4, jitter=0.5, random=lambda: next(draws))
    assert [backoff.delay(3), backoff.delay(3), backoff.delay(3)] == [4.0, 2.0, 3.0]


@pytest.mark.parametrize(
    "kwargs",
    [{"initial": 0}, {"initial": 6}, {"multiplier": 1}, {"jitter": 1}, {"jitter": -0.1}],
)
def test_backoff_rejects_settings_that_never_grow_or_never_wait(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(**kwargs)


def test_the_same_records_shipped_twice_are_stored_once(
    tmp_path: Path, control_plane: RunningControlPlane
) -> None:
    transport = GrpcTransport(control_plane.address, TEST_SYNC_TOKEN)
    spool = Spool(tmp_path)
    spool.append([encode(decision(i, i % 3 == 0)) for i in range(50)])
    shipper = Shipper(spool, transport, batch=20)
    assert shipper.drain(time.monotonic() + 30)
    spool.close()
    (tmp_path / "shipped").unlink()  # as if the acknowledgement never reached the disk
    again = Spool(tmp_path)
    assert again.pending_bytes > 0
    assert Shipper(again, transport, batch=20).drain(time.monotonic() + 30)
    ids = stored_decisions(control_plane.plane)
    assert len(ids) == 50 and set(ids) == {f"dec_{i:06d}" for i in range(50)}
    transport.close()
    again.close()


def test_the_shipper_waits_for_a_batch_to_fill_unless_a_backlog_remains(
    tmp_path: Path, control_plane: RunningControlPlane
) -> None:
    # Polling again at once after every send made a loaded sidecar ship every few
    # milliseconds, a handful of records per call: the control plane then paid a call, a
    # transaction and a commit per handful (66 against 29 µs of its CPU per record).
    transport = GrpcTransport(control_plane.address, TEST_SYNC_TOKEN)
    spool = Spool(tmp_path)
    spool.append([encode(decision(i)) for i in range(25)])
    shipper = Shipper(spool, transport, batch=10, idle=0.5)
    assert [shipper.poll(), shipper.poll()] == [0.0, 0.0]  # full batches: a backlog remains
    assert shipper.poll() == 0.5  # 5 records, fewer than a batch: the next ones can wait
    assert shipper.stats().shipped == 25 and spool.pending_bytes == 0
    spool.append([encode(decision(i)) for i in range(25, 28)])
    assert shipper.poll() == 0.5
    assert len(stored_decisions(control_plane.plane)) == 28
    transport.close()
    spool.close()


def test_a_record_the_control_plane_refuses_is_skipped_not_retried_forever(
    tmp_path: Path, control_plane: RunningControlPlane
) -> None:
    transport = GrpcTransport(control_plane.address, TEST_SYNC_TOKEN)
    spool = Spool(tmp_path)
    forged = event(1_800_000_000.0, "key_a", "key.revoked", "acme", "key_b")
    spool.append([encode(decision(1)), encode(forged), encode(decision(2))])
    shipper = Shipper(spool, transport)
    assert shipper.drain(time.monotonic() + 30)
    assert sorted(stored_decisions(control_plane.plane)) == ["dec_000001", "dec_000002"]
    assert shipper.stats().rejected == 1 and spool.pending_bytes == 0
    transport.close()
    spool.close()


@pytest.fixture
def offline_plane(tmp_path: Path, loop_thread: LoopThread) -> Iterator[tuple[ControlPlane, str]]:
    """A control plane with its key minted but not listening yet."""
    settings = load_settings(
        {
            "data_dir": str(tmp_path / "cp"),
            "admin_addr": f"127.0.0.1:{free_port()}",
            "http_addr": "127.0.0.1:0",  # never the fixed 8080
            "sync_token": TEST_SYNC_TOKEN,
        },
        environ={},
    )
    (tmp_path / "cp").mkdir()
    plane = ControlPlane(settings, clock=FakeClock(time.time()))
    minted = plane.bootstrap()
    assert minted is not None
    yield plane, minted.secret
    loop_thread.run(plane.aclose(grace=1))


def test_records_are_spooled_while_the_control_plane_is_down_then_delivered(
    tmp_path: Path, offline_plane: tuple[ControlPlane, str], loop_thread: LoopThread
) -> None:
    plane, _key = offline_plane
    transport = GrpcTransport(plane.settings.admin_addr, TEST_SYNC_TOKEN, timeout=2)
    config = ShipConfig(tmp_path / "spool", backoff=Backoff(0.05, 0.2))
    pipeline = AuditPipeline(config, transport)
    pipeline.start()
    for i in range(600):
        assert pipeline.record(decision(i, allowed=i % 4 != 0))
    wait_until(lambda: pipeline.stats().written == 600)
    assert pipeline.shipper is not None
    wait_until(lambda: pipeline.shipper is not None and pipeline.shipper.stats().failures >= 2)
    assert pipeline.stats().spool_bytes > 0 and stored_decisions(plane) == []

    loop_thread.run(plane.start())
    wait_until(lambda: pipeline.stats().spool_bytes == 0)
    assert pipeline.close(timeout=10)
    ids = stored_decisions(plane)
    assert len(ids) == 600 and len(set(ids)) == 600
    assert pipeline.stats().dropped == 0
    transport.close()


def test_a_killed_process_loses_only_unwritten_records_and_none_twice(
    tmp_path: Path, control_plane: RunningControlPlane
) -> None:
    spool_dir = tmp_path / "spool"
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.audit_child",
            str(spool_dir),
            control_plane.address,
            TEST_SYNC_TOKEN,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    accepted = written = shipped = 0
    for line in child.stdout:
        accepted, written, shipped, dropped = map(int, line.split())
        assert dropped == 0
        if written >= 3000 and shipped >= 500:
            break
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    # Restart: the spool is reopened and everything in it shipped.
    transport = GrpcTransport(control_plane.address, TEST_SYNC_TOKEN)
    pipeline = AuditPipeline(ShipConfig(spool_dir), transport)
    assert pipeline.close(timeout=30)
    transport.close()
    ids = sorted(stored_decisions(control_plane.plane))
    # At most once: ids are unique. No hole: the kept records are a prefix of what was
    # recorded. The bound: every record written before the last report is kept.
    assert len(ids) == len(set(ids))
    assert ids == [f"dec_{i:08d}" for i in range(len(ids))]
    assert len(ids) >= written
    lost = accepted - len(ids)  # a lower bound on the loss: it recorded more after reporting
    print(f"kill -9: recorded >= {accepted}, written >= {written}, kept {len(ids)}, lost {lost}")


def test_metrics_use_the_documented_names(tmp_path: Path) -> None:
    pipeline = AuditPipeline(ShipConfig(tmp_path, queue_capacity=1), None)
    pipeline.record(decision(1))
    pipeline.record(decision(2))
    registry = CollectorRegistry()
    registry.register(AuditMetrics(pipeline))
    text = generate_latest(registry).decode()
    assert "spauth_audit_queue_depth 1.0" in text
    assert 'spauth_audit_dropped_total{outcome="allow"} 1.0' in text
    assert 'spauth_audit_dropped_total{outcome="deny"} 0.0' in text
    pipeline.flush()
    assert "spauth_audit_spool_bytes " in generate_latest(registry).decode()
    pipeline.close()


def test_the_check_observer_records_each_decision(tmp_path: Path) -> None:
    from sidecar.auditship.observer import DecisionRecorder
    from sidecar.authz.decision import Decision, Identity, Reason
    from sidecar.authz.engine import CheckInput

    draws = iter([0.9, 0.1])
    config = ShipConfig(tmp_path, allow_sample_rate=0.5)
    pipeline = AuditPipeline(config, None, rand=lambda: next(draws))
    observe = DecisionRecorder(pipeline, FakeClock(1_800_000_000.0))
    key = Identity("api_key", "key_abc", "acme", frozenset({"checks:read"}), 2e9)
    token = Identity(
        "access_token", "jti_1", "acme", frozenset(), 2e9, subject="usr_1", client_id="app_1"
    )
    view = CheckInput("GET", "/v1/workspaces/acme/checks?api_key=x", "api", {}, {})
    observe(Decision(Reason.OK, "dec_a_1", key), view, "10.0.0.7", 0.000123)  # sampled out
    observe(Decision(Reason.OK, "dec_a_2", token), view, "10.0.0.7", 0.000123)
    observe(Decision(Reason.UNKNOWN_CREDENTIAL, "dec_a_3"), view, "10.0.0.8", 0.00005)
    allow, deny = pipeline.queue.drain()
    assert (allow.id, allow.actor, allow.workspace, allow.action) == (
        "dec_a_2",
        "usr_1",
        "acme",
        "authz.allow",
    )
    assert allow.target == "/v1/workspaces/acme/checks" and allow.time == 1_800_000_000.0
    assert allow.metadata == {
        "method": "GET",
        "source": "10.0.0.7",
        "latency_us": "123",
        "credential": "jti_1",
        "client_id": "app_1",
    }
    assert (deny.actor, deny.workspace, deny.reason, deny.outcome) == (
        "anonymous",
        "",
        "unknown_credential",
        "deny",
    )
    assert pipeline.queue.stats().sampled_out == 1
    pipeline.close()


def test_with_a_sync_token_sidecars_must_present_it_and_it_reads_nothing(
    tmp_path: Path, loop_thread: LoopThread
) -> None:
    import grpc

    from sidecar._gen.statuspulse.auth.v1 import audit_pb2, audit_pb2_grpc
    from sidecar.auditship import TransportError

    token = "sync-" + "x" * 40
    settings = load_settings(
        {
            "data_dir": str(tmp_path),
            "admin_addr": "127.0.0.1:0",
            "http_addr": "127.0.0.1:0",
            "sync_token": token,
        },
        environ={},
    )
    plane = ControlPlane(settings, clock=FakeClock(time.time()))
    loop_thread.run(plane.start())
    address = f"127.0.0.1:{plane.admin_port}"
    try:
        anonymous = GrpcTransport(address)
        with pytest.raises(TransportError, match="UNAUTHENTICATED") as info:
            anonymous.send([encode(decision(1))])
        assert not info.value.rejected  # retried later, not skipped
        anonymous.close()
        # An API key, even the operator's, never ingests: it is not the sync token.
        operator = plane.bootstrap()
        assert operator is not None
        keyed = GrpcTransport(address, operator.secret)
        with pytest.raises(TransportError, match="UNAUTHENTICATED"):
            keyed.send([encode(decision(1))])
        keyed.close()
        sidecar = GrpcTransport(address, token)
        assert sidecar.send([encode(decision(1)), encode(decision(2))]) == 2
        sidecar.close()
        assert sorted(stored_decisions(plane)) == ["dec_000001", "dec_000002"]
        with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as read:
            audit_pb2_grpc.AuditServiceStub(ch).ListAuditRecords(
                audit_pb2.ListAuditRecordsRequest(),
                metadata=(("authorization", f"Bearer {token}"),),
            )
        assert read.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    finally:
        loop_thread.run(plane.aclose(grace=1))


_KEY = Identity("api_key", "key_abc", "acme", frozenset({"checks:read"}), 2e9)
_TOKEN = Identity("access_token", "at_1", "acme", frozenset(), 2e9, subject="usr_1",
                  client_id="app_1", grant_id="g")  # fmt: skip


@pytest.mark.parametrize(
    ("decision", "method", "path", "source"),
    [
        (Decision(Reason.OK, "dec_1", _KEY), "GET", "/v1/workspaces/acme/checks", "10.0.0.7"),
        (Decision(Reason.OK, "dec_2", _TOKEN), "POST", "/v1/x?api_key=spk_" + "a" * 38, ""),
        (Decision(Reason.MISSING_CREDENTIAL, "dec_3"), "GET", "/", "::1"),
        (
            Decision(Reason.INSUFFICIENT_SCOPE, "dec_4", _KEY, "metrics:read"),
            "GET",
            "/m",
            "1.2.3.4",
        ),
        (Decision(Reason.UNKNOWN_CREDENTIAL, "dec_5"), "GET", "/keys/spk_" + "Z" * 38, "h"),
        (Decision(Reason.UNKNOWN_CREDENTIAL, "dec_6"), "Bearer abc.def", "/é" + "x" * 600, "s"),
        (Decision(Reason.OK, "", _KEY), "GET", "/", ""),  # no decision id: a fresh event id
    ],
)
def test_hand_assembled_decision_record_equals_the_protobuf_one(
    decision: Decision, method: str, path: str, source: str
) -> None:
    """The writer builds decision records by hand (PendingDecision.payload); they parse into
    exactly the AuditRecord that encode(scrub(event)) gives, secrets redacted the same way."""
    pending = PendingDecision(decision, method, path, source, 0.000123, 1_800_000_000.123456)
    mine = pb.AuditRecord.FromString(pending.payload())
    reference = pb.AuditRecord.FromString(encode(scrub(pending.event())))
    if not decision.decision_id:  # both got a random id
        assert mine.id and mine.id != reference.id
        mine.id = reference.id
    assert mine == reference
    assert "spk_" not in str(mine) and "Bearer abc" not in str(mine)


def _fixed_part_field_by_field(decision: Decision) -> bytes:
    """The record's fixed part as it was assembled before ``records._fixed_part``: one ``ld``
    per field, the metadata from ``_who``'s dict."""
    from sidecar.auditship.records import _entry, _who
    from sidecar.protowire import ld

    allowed = decision.allowed
    workspace, actor, meta = _who(decision.identity)
    action = "authz.allow" if allowed else "authz.deny"
    return b"".join(
        (
            ld(3, (actor or "anonymous").encode()),
            ld(4, action.encode()),
            ld(5, workspace.encode()) if workspace else b"",
            ld(7, b"allow" if allowed else b"deny"),
            ld(8, decision.reason.value.encode()),
            *(_entry(k, v) for k, v in meta.items()),
        )
    )


_FIELD_TEXT = st.one_of(
    st.just(""), st.text(max_size=8), st.text(min_size=120, max_size=300), st.just("é" * 70)
)


@settings(max_examples=300, deadline=None)
@given(
    reason=st.sampled_from(list(Reason)),
    kind=st.sampled_from(["api_key", "access_token", "other"]),
    fields=st.tuples(*[_FIELD_TEXT] * 5),
    anonymous=st.booleans(),
)
def test_fixed_part_equals_the_field_by_field_assembly(
    reason: Reason, kind: str, fields: tuple[str, ...], anonymous: bool
) -> None:
    """``fixed_part`` (from pieces made once per reason) gives the same bytes as one ``ld``
    per field, for every reason, kind, empty, non-ASCII and ≥ 128-byte values (two-byte length
    prefixes), and no identity; and the bytes parse as those fields of an AuditRecord."""
    from sidecar.auditship import records

    ident_id, workspace, subject, client_id, _ = fields
    identity = None if anonymous else Identity(
        kind, ident_id, workspace, frozenset(), 2e9, subject=subject, client_id=client_id
    )  # fmt: skip
    decision = Decision(reason, "dec_1", identity)
    part = records.fixed_part(decision)
    assert part == _fixed_part_field_by_field(decision)
    assert records.fixed_part(decision) is part  # kept for this very identity
    parsed = pb.AuditRecord.FromString(part)
    assert parsed.reason == reason.value and parsed.workspace == ("" if anonymous else workspace)
