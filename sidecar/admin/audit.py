"""AuditService servicer: list, tail, export, verify, and ingest from sidecars."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from sidecar._gen.statuspulse.auth.v1 import audit_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import audit_pb2_grpc as pb_grpc
from sidecar.admin import audit_convert as convert
from sidecar.admin.rpc import (
    Authenticator,
    abort,
    admin_rpc,
    admin_stream,
    bearer_token,
    request_id,
)
from sidecar.core.audit_trail import (
    SIDECAR,
    AuditTrail,
    IngestResult,
    decode_cursor,
    encode_cursor,
)
from sidecar.core.errors import InvalidArgument, Unauthenticated
from sidecar.core.models import Principal, RequestContext

log = logging.getLogger("sidecar.admin")

# The messages of a call stored in one transaction (the shipper sends 4 of 500 records per
# call): one commit instead of four, each writing every page its records dirtied.
MESSAGES_PER_COMMIT = 4
# A tail wakes at once for changes committed in this process (key events, ingests) and polls
# this often for anything else (another control plane on the same database).
POLL_SECONDS = 0.25


def _filter_kwargs(f: pb.AuditFilter, *, times: bool = True) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"workspace": f.workspace, "action": f.action, "actor": f.actor}
    if times:
        kwargs["since"] = convert.seconds(f.since) if f.HasField("since") else None
        kwargs["until"] = convert.seconds(f.until) if f.HasField("until") else None
    return kwargs


class AuditServicer(pb_grpc.AuditServiceServicer):  # type: ignore[misc]
    """Admin API for the audit trail."""

    def __init__(
        self, trail: AuditTrail, authenticator: Authenticator, *, sync_token: str = ""
    ) -> None:
        self.authenticator = authenticator
        self._trail = trail
        # Decision records are stricter than the shared seam: the sync token only, never a key.
        self._sync_token = sync_token.encode()
        self._waiters: set[asyncio.Event] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = asyncio.Event()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remember the server's loop so ``notify`` can be called from any thread."""
        self._loop = loop

    def notify(self, _revision: int = 0) -> None:
        """Wake every tail (thread-safe; a store subscription calls this after commits)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        for waiter in self._waiters:
            waiter.set()

    def close(self) -> None:
        """End every tail now (they resume with their cursor against the next server)."""
        self._closing.set()
        self._wake()

    @admin_rpc
    async def ListAuditRecords(
        self, request: pb.ListAuditRecordsRequest, ctx: RequestContext
    ) -> pb.ListAuditRecordsResponse:
        query = self._trail.query(ctx, **_filter_kwargs(request.filter))
        page = await asyncio.to_thread(
            self._trail.page, query, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListAuditRecordsResponse(
            records=[convert.record(r) for r in page.items], next_page_token=page.next_token
        )

    @admin_stream
    async def TailAuditRecords(
        self, request: pb.TailAuditRecordsRequest, ctx: RequestContext
    ) -> AsyncIterator[pb.TailAuditRecordsResponse]:
        query = self._trail.query(ctx, **_filter_kwargs(request.filter, times=False))
        cursor = decode_cursor(request.cursor)
        if cursor < 0:
            cursor = await asyncio.to_thread(self._trail.end)
        waiter = asyncio.Event()
        self._waiters.add(waiter)
        # The first response tells a client with no cursor where it started, so it can resume
        # from there even if nothing matched before the connection broke.
        yield pb.TailAuditRecordsResponse(cursor=encode_cursor(cursor))
        try:
            while not self._closing.is_set():
                waiter.clear()
                found, scanned = await asyncio.to_thread(self._trail.after, query, cursor)
                for rec in found:
                    yield pb.TailAuditRecordsResponse(
                        record=convert.record(rec), cursor=encode_cursor(rec.seq)
                    )
                if scanned > cursor and (not found or found[-1].seq < scanned):
                    yield pb.TailAuditRecordsResponse(cursor=encode_cursor(scanned))
                cursor = scanned
                if found and len(found) >= self._trail.policy.batch:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.wait(), POLL_SECONDS)
        finally:
            self._waiters.discard(waiter)

    @admin_stream
    async def ExportAuditRecords(
        self, request: pb.ExportAuditRecordsRequest, ctx: RequestContext
    ) -> AsyncIterator[pb.ExportAuditRecordsResponse]:
        query = self._trail.query(ctx, **_filter_kwargs(request.filter))
        cursor = max(decode_cursor(request.cursor), 0)
        # Export what is stored when the call starts, so it ends even under constant ingest.
        end = await asyncio.to_thread(self._trail.end)
        while cursor < end:
            found, scanned = await asyncio.to_thread(self._trail.after, query, cursor)
            for rec in found:
                if rec.seq > end:
                    return
                yield pb.ExportAuditRecordsResponse(record=convert.record(rec))
            if scanned <= cursor:
                return
            cursor = scanned

    @admin_rpc
    async def VerifyAuditChain(
        self, request: pb.VerifyAuditChainRequest, ctx: RequestContext
    ) -> pb.VerifyAuditChainResponse:
        reports = await asyncio.to_thread(self._trail.verify, ctx, request.workspace)
        return pb.VerifyAuditChainResponse(chains=[convert.chain_status(r) for r in reports])

    def _ingest_principal(self, token: str) -> Principal:
        """Only a sidecar, presenting the sync token, ingests decision records: never an API
        key (a tenant would write records under decision ids it read), never anyone without
        a credential. A control plane without a sync token accepts no ingest at all."""
        if self._sync_token and token and hmac.compare_digest(token.encode(), self._sync_token):
            return SIDECAR
        raise Unauthenticated("audit ingest needs the sync token")

    def _ingest(
        self, ctx: RequestContext, messages: list[bytes]
    ) -> list[tuple[IngestResult, int, bool]]:
        """Messages' bytes (the method takes raw bytes, see ``add_to_server``): each decoded
        once, straight into a checked batch, and all stored in one transaction. Returns, per
        message, the result, how many records it held, and whether it asked for refusals to be
        listed."""
        latest = self._trail.latest_record_time()
        batches = [convert.ingest_batch(data, latest) for data in messages]
        results = self._trail.ingest_batches(ctx, batches)
        return [(r, b.size, b.report_refused) for r, b in zip(results, batches, strict=True)]

    async def _store(self, ctx: RequestContext, messages: list[bytes], tally: _Tally) -> None:
        """Store ``messages`` together (off the loop) and add their results to ``tally``."""
        results = await asyncio.to_thread(self._ingest, ctx, messages)
        for result, size, report in results:
            tally.add(result, size, report)
        if any(result.stored for result, _, _ in results):
            self._wake()

    async def IngestAuditRecords(
        self,
        request: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.IngestAuditRecordsResponse:
        metadata = context.invocation_metadata()
        rid = request_id(metadata)  # type: ignore[arg-type]
        tally = _Tally()
        try:
            token = bearer_token(metadata)  # type: ignore[arg-type]
            # A constant-time compare of two short strings: on the loop, not a thread hop.
            principal = self._ingest_principal(token)
            ctx = RequestContext(principal=principal, request_id=rid, source=context.peer())
            pending: list[bytes] = []
            async for data in request:
                pending.append(data)
                if len(pending) == MESSAGES_PER_COMMIT:
                    await self._store(ctx, pending, tally)
                    pending = []
            if pending:
                await self._store(ctx, pending, tally)
            if tally.refused and not tally.report_refused:
                raise _refusal(tally.refused)
        except Exception as exc:
            await abort(context, exc, "IngestAuditRecords", rid)
        return pb.IngestAuditRecordsResponse(
            acknowledged_ids=tally.acknowledged,
            stored=tally.stored,
            cursor=encode_cursor(tally.cursor),
            refused=tally.refused,
        )


@dataclass(slots=True)
class _Tally:
    """What an IngestAuditRecords call has stored so far, message by message."""

    acknowledged: list[str] = field(default_factory=list)
    refused: list[pb.RefusedAuditRecord] = field(default_factory=list)
    stored: int = 0
    cursor: int = 0
    offset: int = 0  # records in the messages before (a refusal's index counts in the call)
    report_refused: bool = False

    def add(self, result: IngestResult, size: int, report_refused: bool) -> None:
        self.report_refused = self.report_refused or report_refused
        self.acknowledged.extend(result.acknowledged)
        self.refused.extend(convert.refused(r, self.offset) for r in result.refused)
        self.offset += size
        self.stored += result.stored
        self.cursor = result.cursor


SERVICE = "statuspulse.auth.v1.AuditService"


class _Handlers:
    """Catches the method handlers the generated registration makes (its only two calls)."""

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]

    def add_generic_rpc_handlers(self, _handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, _service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.handlers = handlers


def add_to_server(servicer: AuditServicer, server: grpc.aio.Server) -> None:
    """The generated registration, except that IngestAuditRecords takes each message as raw
    bytes (no deserializer): the ingest step parses them once, without a protobuf object per
    record, and a message that is not well-formed gets INVALID_ARGUMENT from the one error
    mapping (``abort``) instead of failing in the framework."""
    caught = _Handlers()
    pb_grpc.add_AuditServiceServicer_to_server(servicer, caught)
    handlers = dict(caught.handlers)
    handlers["IngestAuditRecords"] = grpc.stream_unary_rpc_method_handler(
        servicer.IngestAuditRecords,
        response_serializer=pb.IngestAuditRecordsResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)  # type: ignore[attr-defined]


def _refusal(refused: list[pb.RefusedAuditRecord]) -> InvalidArgument:
    """The answer to a sender that did not ask for ``refused`` (one older than the field) when
    records were refused: INVALID_ARGUMENT naming them (the first few), so it re-sends the
    call's records one at a time and dead-letters exactly the refused ones. Everything else in
    the call is stored already, and acknowledged on that re-send as a duplicate: an
    acknowledgement only ever follows a commit."""
    shown = "; ".join(f"{r.id!r}: {r.detail}" for r in refused[:_SHOWN_REFUSALS])
    more = f" (and {len(refused) - _SHOWN_REFUSALS} more)" if len(refused) > _SHOWN_REFUSALS else ""
    return InvalidArgument("records", f"{len(refused)} refused, the rest stored: {shown}{more}")


_SHOWN_REFUSALS = 5
