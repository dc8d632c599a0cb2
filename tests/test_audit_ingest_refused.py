"""Refused decision records named in the ingest answer (``report_refused``), over real gRPC and the
real control plane, in every mix of versions a rolling upgrade passes through: a new sidecar and a
new control plane settle a batch with bad records in one call and dead-letter exactly those; a
sender that does not ask (an old sidecar) still gets INVALID_ARGUMENT; a new sidecar facing a
control plane that does not know the field (it ignores it, as protobuf does) still isolates the
bad records one by one."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest

from sidecar._gen.statuspulse.auth.v1 import audit_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import audit_pb2_grpc as pb_grpc
from sidecar.admin.audit import AuditServicer
from sidecar.admin.audit_convert import REFUSAL_REASONS
from sidecar.auditship import GrpcTransport, RecordsRefused, Shipper, Spool
from sidecar.auditship.codec import decode, encode
from sidecar.auditship.shipper import DEAD_LETTER_FILE
from sidecar.auditship.spool import parse_frames
from sidecar.auditship.transport import RefusedRecord, TrailTransport
from sidecar.core.audit import AuditEvent, event
from sidecar.core.audit_trail import SIDECAR, RefusalReason
from sidecar.core.clock import FakeClock
from sidecar.core.models import Principal, RequestContext
from tests.conftest import LoopThread, RunningControlPlane
from tests.support.sync import TEST_SYNC_TOKEN
from tests.test_audit_ingest_batch import mixed, record

SECRET_ID = "a/b spk_" + "A1b2" * 8  # malformed, and holding a credential
OPERATOR = RequestContext(Principal("key_op", "*", frozenset({"admin:full"})), "req_op")


class CountingTransport:
    """The real transport, with the size of each send written down (how many calls it took)."""

    def __init__(self, inner: GrpcTransport | TrailTransport) -> None:
        self.inner = inner
        self.sends: list[int] = []

    def send(self, records: Sequence[bytes]) -> int:
        self.sends.append(len(records))
        return self.inner.send(records)

    def close(self) -> None:
        self.inner.close()


def bad_batch(control_plane: RunningControlPlane) -> tuple[list[AuditEvent], dict[int, str]]:
    """1,200 good records (three stream messages) with bad ones among them, and the position
    and reason of each bad one. One shares a good record's id with other content, so only its
    position tells it apart; one has an id that is a credential."""
    clock = control_plane.clock
    batch = mixed(clock, 0, 1200)
    twin = record(7, "globex", batch[7].time)  # batch[7]'s id, other content
    assert twin.id == batch[7].id and twin != batch[7]
    bad = {
        3: record(5000, "acme", clock.now() + 86400),
        499: event(clock.now(), "key_a", "key.revoked", "acme", "key_b"),
        500: record(5001, "Not A Workspace", clock.now()),
        777: twin,
        1100: AuditEvent(SECRET_ID, clock.now(), "key_a", "authz.allow", "acme", "/"),
    }
    for index in sorted(bad):
        batch.insert(index, bad[index])
    reasons = {
        3: "future_time",
        499: "not_a_decision",
        500: "malformed_workspace",
        777: "conflict",
        1100: "malformed_id",
    }
    return batch, reasons


def _dead_lettered(dead: Path) -> list[bytes]:
    frames, _ = parse_frames(dead.read_bytes())
    return frames


def test_a_new_sidecar_and_control_plane_settle_bad_records_in_one_call(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    plane = control_plane.plane
    batch, reasons = bad_batch(control_plane)
    payloads = [encode(e) for e in batch]
    grpc_transport = GrpcTransport(control_plane.address, TEST_SYNC_TOKEN, timeout=10)
    with pytest.raises(RecordsRefused) as info:
        grpc_transport.send(payloads)
    refused = info.value.refused
    assert {r.index: r.reason for r in refused} == reasons
    assert info.value.acknowledged == len(batch) - len(reasons)
    # No secret in the answer: the credential in the malformed id comes back redacted.
    assert [r.id for r in refused if r.index == 1100] == ["a/b [redacted]"]
    assert all("spk_" not in r.id + r.detail for r in refused)
    stored = {e.id for i, e in enumerate(batch) if i not in reasons}
    with plane.store.read() as uow:
        assert set(uow.audit.get_many([e.id for e in batch])) == stored
    # The control plane's metrics count what was stored and each refusal by its reason.
    sample = plane.metrics.registry.get_sample_value
    assert sample("spauth_audit_ingested_records_total") == len(stored)
    for reason in reasons.values():
        labels = {"reason": reason}
        assert sample("spauth_audit_ingest_refused_records_total", labels) == 1, reason

    # The shipper: one call, the refused records (by position) in the dead-letter file, the
    # rest acknowledged in the spool.
    spool = Spool(tmp_path / "spool")
    spool.append(payloads)
    dead = tmp_path / "spool" / DEAD_LETTER_FILE
    transport = CountingTransport(grpc_transport)
    shipper = Shipper(spool, transport, batch=len(payloads), dead_letter=dead)
    assert shipper.drain(time.monotonic() + 30)
    assert transport.sends == [len(payloads)]
    assert _dead_lettered(dead) == [payloads[i] for i in sorted(reasons)]
    assert shipper.stats().rejected == len(reasons) and spool.pending_bytes == 0
    assert all(r.ok for r in plane.audit.verify(OPERATOR))
    transport.close()
    spool.close()


def test_a_sender_that_does_not_ask_gets_invalid_argument_as_before(
    control_plane: RunningControlPlane,
) -> None:
    """An old sidecar's request (no report_refused): INVALID_ARGUMENT naming the refused ids,
    the rest stored, no refused list anywhere."""
    plane, clock = control_plane.plane, control_plane.clock
    good = mixed(clock, 0, 10)
    future = record(999, "acme", clock.now() + 86400)
    records = [pb.AuditRecord.FromString(encode(e)) for e in [*good[:4], future, *good[4:]]]
    with control_plane.channel() as channel:
        stub = pb_grpc.AuditServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.IngestAuditRecords(
                iter([pb.IngestAuditRecordsRequest(records=records)]),
                metadata=(("authorization", f"Bearer {TEST_SYNC_TOKEN}"),),
                timeout=10,
            )
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"1 refused, the rest stored: '{future.id}': records.time" in info.value.details()
    with plane.store.read() as uow:
        assert set(uow.audit.get_many([e.id for e in [*good, future]])) == {e.id for e in good}


def test_refusals_are_listed_when_any_message_of_the_call_asks(
    control_plane: RunningControlPlane,
) -> None:
    """The flag in the second message only: the call still answers OK with the list, positions
    counted across messages."""
    clock = control_plane.clock
    first = [pb.AuditRecord.FromString(encode(e)) for e in mixed(clock, 0, 3)]
    future = pb.AuditRecord.FromString(encode(record(999, "acme", clock.now() + 86400)))
    second = [pb.AuditRecord.FromString(encode(e)) for e in mixed(clock, 3, 2)]
    messages = [
        pb.IngestAuditRecordsRequest(records=first),
        pb.IngestAuditRecordsRequest(records=[second[0], future, second[1]], report_refused=True),
    ]
    with control_plane.channel() as channel:
        resp = pb_grpc.AuditServiceStub(channel).IngestAuditRecords(
            iter(messages), metadata=(("authorization", f"Bearer {TEST_SYNC_TOKEN}"),), timeout=10
        )
    assert resp.stored == 5 and len(resp.acknowledged_ids) == 5
    assert [(r.index, r.id, r.reason) for r in resp.refused] == [
        (4, future.id, pb.AUDIT_REFUSAL_REASON_FUTURE_TIME)
    ]


async def _start_old_control_plane(servicer: AuditServicer) -> tuple[grpc.aio.Server, int]:
    """IngestAuditRecords served by the real servicer, parsed as a control plane built before
    report_refused parses it: protobuf keeps an unknown field aside and the code never reads
    it, which is the field cleared here (the servicer takes each message's bytes)."""

    def parse(data: bytes) -> bytes:
        message = pb.IngestAuditRecordsRequest.FromString(data)
        message.ClearField("report_refused")
        return bytes(message.SerializeToString())

    handler = grpc.stream_unary_rpc_method_handler(
        servicer.IngestAuditRecords,
        request_deserializer=parse,
        response_serializer=pb.IngestAuditRecordsResponse.SerializeToString,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "statuspulse.auth.v1.AuditService", {"IngestAuditRecords": handler}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture
def old_control_plane(control_plane: RunningControlPlane, loop_thread: LoopThread) -> Iterator[str]:
    server, port = loop_thread.run(_start_old_control_plane(control_plane.plane.audit_servicer))  # type: ignore[misc]
    yield f"127.0.0.1:{port}"
    loop_thread.run(server.stop(None))


def test_a_new_sidecar_facing_an_old_control_plane_isolates_bad_records_as_today(
    control_plane: RunningControlPlane, old_control_plane: str, tmp_path: Path
) -> None:
    plane = control_plane.plane
    batch, _ = bad_batch(control_plane)
    payloads = [encode(e) for e in batch[:40]]  # one bad record among them, at 3
    spool = Spool(tmp_path / "spool")
    spool.append(payloads)
    dead = tmp_path / "spool" / DEAD_LETTER_FILE
    transport = CountingTransport(GrpcTransport(old_control_plane, TEST_SYNC_TOKEN, timeout=10))
    shipper = Shipper(spool, transport, dead_letter=dead)
    assert shipper.drain(time.monotonic() + 60)
    # The batch, refused without names; then each record alone (stored ones: duplicates).
    assert transport.sends == [40] + [1] * 40
    assert _dead_lettered(dead) == [payloads[3]]
    assert shipper.stats().rejected == 1 and spool.pending_bytes == 0
    with plane.store.read() as uow:
        assert set(uow.audit.get_many([e.id for e in batch[:40]])) == {
            e.id for i, e in enumerate(batch[:40]) if i != 3
        }
    assert all(r.ok for r in plane.audit.verify(OPERATOR))
    transport.close()
    spool.close()


def test_the_in_process_transport_names_refused_records_too(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    batch, reasons = bad_batch(control_plane)
    payloads = [encode(e) for e in batch]
    spool = Spool(tmp_path / "spool")
    spool.append(payloads)
    dead = tmp_path / "spool" / DEAD_LETTER_FILE
    transport = CountingTransport(
        TrailTransport(control_plane.plane.audit, RequestContext(SIDECAR, "req_in_process"))
    )
    shipper = Shipper(spool, transport, batch=len(payloads), dead_letter=dead)
    assert shipper.drain(time.monotonic() + 30)
    assert transport.sends == [len(payloads)]
    assert [decode(p).id for p in _dead_lettered(dead)] == [
        decode(payloads[i]).id for i in sorted(reasons)
    ]


class AnsweringTransport:
    """A control plane's answer as the transport reports it (what a buggy or hostile control
    plane could send): the shipper must not trust an answer that does not add up."""

    def __init__(self, acknowledged: int, refused: list[RefusedRecord]) -> None:
        self.answer = RecordsRefused(acknowledged, refused)

    def send(self, records: Sequence[bytes]) -> int:
        raise self.answer

    def close(self) -> None:
        """Nothing to release."""


@pytest.mark.parametrize(
    ("acknowledged", "indexes"),
    [(2, [3]), (2, [1, 1]), (3, [1]), (1, [1])],
    ids=["out-of-range", "repeated", "too-many", "too-few"],
)
def test_an_answer_that_does_not_account_for_every_record_moves_nothing(
    tmp_path: Path, acknowledged: int, indexes: list[int], clock: FakeClock
) -> None:
    payloads = [encode(e) for e in mixed(clock, 0, 3)]
    spool = Spool(tmp_path / "spool")
    spool.append(payloads)
    dead = tmp_path / "spool" / DEAD_LETTER_FILE
    refused = [RefusedRecord(i, "x", "conflict", "") for i in indexes]
    shipper = Shipper(spool, AnsweringTransport(acknowledged, refused), dead_letter=dead)
    assert not shipper.drain(time.monotonic() + 5)
    assert not dead.exists() and spool.pending_bytes > 0 and shipper.stats().rejected == 0
    spool.close()


def test_every_refusal_reason_has_a_wire_code() -> None:
    assert set(REFUSAL_REASONS) == set(RefusalReason)
    assert len(set(REFUSAL_REASONS.values())) == len(RefusalReason)
    wire = {v.number for v in pb.AuditRefusalReason.DESCRIPTOR.values if v.number}
    assert set(REFUSAL_REASONS.values()) == wire
