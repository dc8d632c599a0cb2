"""AuditService servicer: list, tail, export, verify, and ingest from sidecars."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from sidecar._gen.statuspulse.auth.v1 import audit_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import audit_pb2_grpc as pb_grpc
from sidecar.admin import audit_convert as convert
from sidecar.admin.errors import grpc_code
from sidecar.admin.rpc import (
    Authenticator,
    SidecarAuthenticator,
    admin_rpc,
    authenticated,
    bearer_token,
    request_id,
)
from sidecar.core.audit_trail import AuditTrail, decode_cursor, encode_cursor
from sidecar.core.errors import SpauthError
from sidecar.core.models import Principal, RequestContext

log = logging.getLogger("sidecar.admin")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
StreamMethod = Callable[[Any, Req, RequestContext], AsyncIterator[Resp]]

# A tail wakes at once for changes committed in this process (key events, ingests) and polls
# this often for anything else (another control plane on the same database).
POLL_SECONDS = 0.25
# A stream re-authenticates its key this often (checked before each record it sends), so a
# revoked key stops receiving records.
REAUTH_SECONDS = 10.0


def load_checkpoint_key(path: Path) -> bytes:
    """The HMAC key that signs retention checkpoints; created (mode 0600) on first use."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
        return bytes.fromhex(path.read_text().strip())


def admin_stream(
    method: StreamMethod[Req, Resp],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]]:
    """``admin_rpc`` for server-streaming methods: authenticate, stream, map errors once."""

    @functools.wraps(method)
    async def wrapper(
        self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> AsyncIterator[Resp]:
        metadata = context.invocation_metadata()
        rid = request_id(metadata)  # type: ignore[arg-type]
        context.set_trailing_metadata((("x-request-id", rid),))
        try:
            token = bearer_token(metadata)  # type: ignore[arg-type]
            ctx = await authenticated(self.authenticator, token, rid, context.peer())
            loop = asyncio.get_running_loop()
            reauth_at = loop.time() + REAUTH_SECONDS
            async for item in method(self, request, ctx):
                if loop.time() >= reauth_at:
                    # A long tail must not outlive its key's revocation.
                    await asyncio.to_thread(self.authenticator.authenticate, token)
                    reauth_at = loop.time() + REAUTH_SECONDS
                yield item
        except SpauthError as exc:
            log.info(
                "admin stream refused",
                extra={"method": method.__name__, "code": exc.code, "request_id": rid},
            )
            await context.abort(grpc_code(exc), exc.message)
        except Exception:
            log.exception("admin stream failed", extra={"method": method.__name__})
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid})")

    return wrapper


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
        self._sidecars = SidecarAuthenticator(authenticator, sync_token)
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
        """A sidecar (the sync token), or an ``admin:full`` key for its own workspace."""
        return self._sidecars.authenticate(token)

    async def IngestAuditRecords(
        self,
        request: AsyncIterator[pb.IngestAuditRecordsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.IngestAuditRecordsResponse:
        metadata = context.invocation_metadata()
        rid = request_id(metadata)  # type: ignore[arg-type]
        acknowledged: list[str] = []
        stored = cursor = 0
        try:
            token = bearer_token(metadata)  # type: ignore[arg-type]
            principal = await asyncio.to_thread(self._ingest_principal, token)
            ctx = RequestContext(principal=principal, request_id=rid, source=context.peer())
            async for message in request:
                events = [convert.event(r) for r in message.records]
                result = await asyncio.to_thread(self._trail.ingest, ctx, events)
                acknowledged.extend(result.acknowledged)
                stored += result.stored
                cursor = result.cursor
                if result.stored:
                    self._wake()
        except SpauthError as exc:
            log.info("audit ingest refused", extra={"code": exc.code, "request_id": rid})
            await context.abort(grpc_code(exc), exc.message)
        except Exception:
            log.exception("audit ingest failed", extra={"request_id": rid})
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid})")
        return pb.IngestAuditRecordsResponse(
            acknowledged_ids=acknowledged, stored=stored, cursor=encode_cursor(cursor)
        )
