"""Audit records between the domain and protobuf."""

from __future__ import annotations

from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from sidecar._gen.statuspulse.auth.v1 import audit_pb2 as pb
from sidecar.auditship.codec import to_pb
from sidecar.core import audit_native
from sidecar.core.audit import AuditEvent
from sidecar.core.audit_batch import EventBatch, PreparedBatch, Refusal, RefusalReason
from sidecar.core.audit_chain import ChainBreak, ChainedRecord, ChainReport, Problem, time_us
from sidecar.core.audit_trail import encode_cursor
from sidecar.core.errors import InvalidArgument

PROBLEMS = {
    Problem.DIGEST_MISMATCH: pb.AUDIT_CHAIN_PROBLEM_DIGEST_MISMATCH,
    Problem.LINK_MISMATCH: pb.AUDIT_CHAIN_PROBLEM_LINK_MISMATCH,
    Problem.MISSING: pb.AUDIT_CHAIN_PROBLEM_MISSING,
    Problem.CHECKPOINT_INVALID: pb.AUDIT_CHAIN_PROBLEM_CHECKPOINT_INVALID,
    Problem.TRUNCATED: pb.AUDIT_CHAIN_PROBLEM_TRUNCATED,
    Problem.HEAD_MISMATCH: pb.AUDIT_CHAIN_PROBLEM_HEAD_MISMATCH,
    Problem.CHAIN_MISSING: pb.AUDIT_CHAIN_PROBLEM_CHAIN_MISSING,
    Problem.HEADS_INVALID: pb.AUDIT_CHAIN_PROBLEM_HEADS_INVALID,
}

REFUSAL_REASONS = {
    RefusalReason.NOT_A_DECISION: pb.AUDIT_REFUSAL_REASON_NOT_A_DECISION,
    RefusalReason.MALFORMED_ID: pb.AUDIT_REFUSAL_REASON_MALFORMED_ID,
    RefusalReason.MISSING_TIME: pb.AUDIT_REFUSAL_REASON_MISSING_TIME,
    RefusalReason.FUTURE_TIME: pb.AUDIT_REFUSAL_REASON_FUTURE_TIME,
    RefusalReason.TOO_LARGE: pb.AUDIT_REFUSAL_REASON_TOO_LARGE,
    RefusalReason.MALFORMED_WORKSPACE: pb.AUDIT_REFUSAL_REASON_MALFORMED_WORKSPACE,
    RefusalReason.CONFLICT: pb.AUDIT_REFUSAL_REASON_CONFLICT,
    RefusalReason.NUL_CHARACTER: pb.AUDIT_REFUSAL_REASON_NUL_CHARACTER,
}


def timestamp(seconds: float) -> Timestamp:
    """Seconds as a Timestamp, to the microsecond (the precision the chain covers)."""
    ts = Timestamp()
    ts.FromMicroseconds(time_us(seconds))
    return ts


def seconds(ts: Timestamp) -> float:
    return float(ts.ToMicroseconds()) / 1_000_000


def record(rec: ChainedRecord) -> pb.AuditRecord:
    """A stored record as the API shows it, with its chain link and cursor."""
    msg = to_pb(rec.event)
    msg.cursor = encode_cursor(rec.seq)
    msg.chain_seq = rec.link.chain_seq
    msg.prev_digest = rec.link.prev_digest
    msg.digest = rec.link.digest
    return msg


def event(msg: pb.AuditRecord) -> AuditEvent:
    """A shipped record as a domain event (the server sets the chain fields itself). Paid per
    ingested record, so: the time without Timestamp.ToMicroseconds' Python-level call, the
    metadata map copied key by key (half the cost of ``dict(map)``, which goes through the
    Mapping mixins), and the event built positionally (field order of ``AuditEvent``)."""
    ts = msg.time
    meta = msg.metadata
    return AuditEvent(
        msg.id,
        (ts.seconds * 1_000_000 + ts.nanos // 1000) / 1_000_000,
        msg.actor,
        msg.action,
        msg.workspace,
        msg.target,
        msg.outcome,
        msg.reason,
        msg.request_id,
        {k: meta[k] for k in meta},
    )


def ingest_batch(data: bytes, latest: float) -> PreparedBatch:
    """One IngestAuditRecordsRequest's bytes as a checked batch: the compiled step's when it
    reproduces the message, else protobuf's parse and the Python checks (the reference).
    InvalidArgument when the bytes are not an IngestAuditRecordsRequest."""
    batch = audit_native.parse(data, latest)
    if batch is not None:
        return batch
    try:
        message = pb.IngestAuditRecordsRequest.FromString(data)
    except DecodeError:
        raise InvalidArgument("records", "not a well-formed IngestAuditRecordsRequest") from None
    events = [event(r) for r in message.records]
    return EventBatch(events, latest, report_refused=message.report_refused)


def _chain_break(brk: ChainBreak) -> pb.AuditChainBreak:
    return pb.AuditChainBreak(
        problem=PROBLEMS[brk.problem],
        record_id=brk.record_id,
        chain_seq=brk.chain_seq,
        detail=brk.detail,
    )


def chain_status(report: ChainReport) -> pb.AuditChainStatus:
    status = pb.AuditChainStatus(
        workspace=report.workspace,
        ok=report.ok,
        records_checked=report.records_checked,
        head_chain_seq=report.head.chain_seq if report.head else 0,
        head_digest=report.head.digest if report.head else "",
        checkpoint_chain_seq=report.checkpoint_chain_seq,
    )
    if report.first_break is not None:
        status.first_break.CopyFrom(_chain_break(report.first_break))
    return status


def refused(refusal: Refusal, offset: int) -> pb.RefusedAuditRecord:
    """A refusal as the ingest answer lists it; ``offset``: where its message starts in the
    call (a refusal's index counts within its message)."""
    return pb.RefusedAuditRecord(
        index=offset + refusal.index,
        id=refusal.id,
        reason=REFUSAL_REASONS[refusal.reason],
        detail=f"{refusal.field}: {refusal.message}",
    )
