"""``spauth audit list|tail|export|verify``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from sidecar._gen.statuspulse.auth.v1 import audit_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import audit_pb2_grpc as pb_grpc
from sidecar.cli.client import EXIT_USAGE, AdminClient, CliError
from sidecar.cli.output import emit_json, table
from sidecar.core.errors import InvalidArgument
from sidecar.core.validation import parse_duration

EXIT_CHAIN_BROKEN = 3
PAGE = 500
# Tail reconnects after these errors (the control plane restarting), resuming by cursor.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
_PROBLEMS = {
    pb.AUDIT_CHAIN_PROBLEM_DIGEST_MISMATCH: "record edited",
    pb.AUDIT_CHAIN_PROBLEM_LINK_MISMATCH: "link broken",
    pb.AUDIT_CHAIN_PROBLEM_MISSING: "records missing",
    pb.AUDIT_CHAIN_PROBLEM_CHECKPOINT_INVALID: "checkpoint invalid",
    pb.AUDIT_CHAIN_PROBLEM_TRUNCATED: "newest records deleted",
    pb.AUDIT_CHAIN_PROBLEM_HEAD_MISMATCH: "tail rewritten",
    pb.AUDIT_CHAIN_PROBLEM_CHAIN_MISSING: "chain deleted",
    pb.AUDIT_CHAIN_PROBLEM_HEADS_INVALID: "signed heads forged",
}


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    audit = sub.add_parser("audit", help="read and verify the audit trail").add_subparsers(
        dest="audit_command", required=True, metavar="COMMAND"
    )
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--workspace", default="")
    filters.add_argument("--action", default="", help="e.g. key.revoked, authz.deny")
    filters.add_argument("--actor", default="", help="a key id, 'system' or 'anonymous'")
    window = argparse.ArgumentParser(add_help=False)
    window.add_argument("--since", default="", help="RFC 3339 time, date, or age (24h, 7d)")
    window.add_argument("--until", default="", help="RFC 3339 time, date, or age")

    p = audit.add_parser("list", parents=[common, filters, window], help="records, newest first")
    p.add_argument("--limit", type=int, default=50, help="at most this many records (0: all)")
    p.set_defaults(handler=list_records)

    p = audit.add_parser("tail", parents=[common, filters], help="follow new records")
    p.add_argument("--cursor", default="", help="resume after this cursor")
    p.set_defaults(handler=tail)

    p = audit.add_parser("export", parents=[common, filters, window], help="JSON lines for SIEMs")
    p.add_argument("--cursor", default="", help="start after this cursor (incremental export)")
    p.set_defaults(handler=export)

    p = audit.add_parser("verify", parents=[common], help="check the hash chains")
    p.add_argument("--workspace", default="")
    p.set_defaults(handler=verify)


def parse_time(text: str, flag: str, now: float | None = None) -> Timestamp | None:
    """``2026-11-26T15:00:00Z``, ``2026-11-26`` or an age such as ``24h`` (before now)."""
    if not text:
        return None
    ts = Timestamp()
    if text[-1] in "smhdw" and text[0].isdigit():
        try:
            age = parse_duration(text, flag)
        except InvalidArgument as exc:
            raise CliError(exc.message, EXIT_USAGE) from None
        ts.FromMicroseconds(round(((now or time.time()) - age) * 1_000_000))
        return ts
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(
            f"{flag}: expected an RFC 3339 time (2026-11-26T15:00:00Z), a date or an age "
            f"(24h), got {text[:40]!r}",
            EXIT_USAGE,
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    ts.FromDatetime(moment)
    return ts


def _filter(args: argparse.Namespace, window: bool) -> pb.AuditFilter:
    f = pb.AuditFilter(workspace=args.workspace, action=args.action, actor=args.actor)
    if window:
        for name in ("since", "until"):
            ts = parse_time(getattr(args, name), f"--{name}")
            if ts is not None:
                getattr(f, name).CopyFrom(ts)
    return f


def rfc3339_us(ts: Timestamp) -> str:
    """A record time to the microsecond: ``2026-11-26T15:46:55.123456Z``."""
    # Integer arithmetic: the chain digests cover integer microseconds, and an auditor
    # recomputes them from this text (docs/audit.md).
    us = ts.ToMicroseconds()
    moment = datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_json(r: pb.AuditRecord) -> dict[str, object]:
    """The documented JSON shape of a record (docs/audit.md)."""
    return {
        "id": r.id,
        "time": rfc3339_us(r.time),
        "actor": r.actor,
        "action": r.action,
        "workspace": r.workspace,
        "target": r.target,
        "outcome": r.outcome,
        "reason": r.reason,
        "request_id": r.request_id,
        "metadata": dict(sorted(r.metadata.items())),
        "cursor": r.cursor,
        "chain_seq": r.chain_seq,
        "prev_digest": r.prev_digest,
        "digest": r.digest,
    }


def _row(r: pb.AuditRecord) -> list[str]:
    return [rfc3339_us(r.time), r.workspace, r.action, r.actor, r.target, r.outcome, r.reason]


HEADERS = ["TIME", "WORKSPACE", "ACTION", "ACTOR", "TARGET", "OUTCOME", "REASON"]


def list_records(client: AdminClient, args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise CliError("--limit: must not be negative", EXIT_USAGE)
    stub = pb_grpc.AuditServiceStub(client.channel)
    f = _filter(args, window=True)
    records: list[pb.AuditRecord] = []
    token = ""
    while args.limit == 0 or len(records) < args.limit:
        size = PAGE if args.limit == 0 else min(PAGE, args.limit - len(records))
        request = pb.ListAuditRecordsRequest(filter=f, page_size=size, page_token=token)
        resp = client.call(stub.ListAuditRecords, request)
        records.extend(resp.records)
        token = resp.next_page_token
        if not token:
            break
    if args.output == "json":
        emit_json([record_json(r) for r in records])
    else:
        print(table([_row(r) for r in records], HEADERS))
    return 0


def _print_streamed(args: argparse.Namespace, record: pb.AuditRecord) -> None:
    if args.output == "json":
        print(json.dumps(record_json(record)), flush=True)
    else:
        print("  ".join(_row(record)).rstrip(), flush=True)


def tail(
    client: AdminClient,
    args: argparse.Namespace,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Follow until interrupted; when the control plane goes away, retry with backoff and
    resume after the last cursor seen, so no record is skipped or shown twice."""
    stub = pb_grpc.AuditServiceStub(client.channel)
    f = _filter(args, window=False)
    cursor = args.cursor
    delay = 0.1
    while True:
        stream = stub.TailAuditRecords(
            pb.TailAuditRecordsRequest(filter=f, cursor=cursor), metadata=client.metadata
        )
        try:
            for resp in stream:
                delay = 0.1
                cursor = resp.cursor or cursor
                if resp.HasField("record"):
                    _print_streamed(args, resp.record)
        except grpc.RpcError as exc:
            # Never connected (a wrong endpoint, a refused key): say so and stop.
            if not cursor or exc.code() not in _RETRYABLE:
                raise client._translate(exc) from None
        # The stream ended (server shutdown) or broke: come back where we left off.
        print(f"spauth: audit tail: reconnecting (cursor {cursor or 'none'})", file=sys.stderr)
        sleep(delay)
        delay = min(delay * 2, 5.0)


def export(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.AuditServiceStub(client.channel)
    request = pb.ExportAuditRecordsRequest(filter=_filter(args, window=True), cursor=args.cursor)
    count, cursor = 0, args.cursor
    try:
        for resp in stub.ExportAuditRecords(request, metadata=client.metadata):
            sys.stdout.write(json.dumps(record_json(resp.record)) + "\n")
            count, cursor = count + 1, resp.record.cursor
    except grpc.RpcError as exc:
        raise client._translate(exc) from None
    sys.stdout.flush()
    resume = f"; next time: --cursor {cursor}" if cursor else ""
    print(f"exported {count} records{resume}", file=sys.stderr)
    return 0


def verify(client: AdminClient, args: argparse.Namespace) -> int:
    stub = pb_grpc.AuditServiceStub(client.channel)
    resp = client.call(stub.VerifyAuditChain, pb.VerifyAuditChainRequest(workspace=args.workspace))
    if args.output == "json":
        emit_json([_status_json(c) for c in resp.chains])
    else:
        rows = [
            [
                c.workspace,
                "ok" if c.ok else "BROKEN",
                str(c.records_checked),
                f"{c.head_chain_seq}:{c.head_digest[:16]}" if c.head_digest else "-",
            ]
            for c in resp.chains
        ]
        print(table(rows, ["WORKSPACE", "CHAIN", "RECORDS", "HEAD"]))
        for c in resp.chains:
            if not c.ok:
                brk = c.first_break
                what = _PROBLEMS.get(brk.problem, "broken")
                print(f"{c.workspace}: first broken link: {what}: {brk.detail}")
    return 0 if all(c.ok for c in resp.chains) else EXIT_CHAIN_BROKEN


def _status_json(c: pb.AuditChainStatus) -> dict[str, object]:
    out: dict[str, object] = {
        "workspace": c.workspace,
        "ok": c.ok,
        "records_checked": c.records_checked,
        "head_chain_seq": c.head_chain_seq,
        "head_digest": c.head_digest,
        "checkpoint_chain_seq": c.checkpoint_chain_seq,
        "first_break": None,
    }
    if not c.ok:
        brk = c.first_break
        out["first_break"] = {
            "problem": pb.AuditChainProblem.Name(brk.problem)
            .removeprefix("AUDIT_CHAIN_PROBLEM_")
            .lower(),
            "record_id": brk.record_id,
            "chain_seq": brk.chain_seq,
            "detail": brk.detail,
        }
    return out
