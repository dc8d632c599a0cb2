"""The seam every admin RPC goes through, unary or streaming: authenticate the caller, run the
(blocking) core call off the event loop, and map errors once."""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, Protocol, TypeVar

import grpc

from sidecar.admin.errors import grpc_code
from sidecar.core.audit_trail import SIDECAR
from sidecar.core.errors import SpauthError, Unauthenticated
from sidecar.core.models import Principal, RequestContext

log = logging.getLogger("sidecar.admin")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

Req = TypeVar("Req")
Resp = TypeVar("Resp")


Metadata = tuple[tuple[str, str | bytes], ...] | None


class Authenticator(Protocol):
    def authenticate(self, secret: str) -> Principal: ...


class SidecarAuthenticator:
    """Who may feed the control plane what sidecars observe (decision records, usage): a
    sidecar presenting the sync token (the credential it replicates with), or without a
    configured sync token any caller without a credential, as replication trusts the link.
    A key works too (the use case then checks its scopes and workspace)."""

    def __init__(self, keys: Authenticator, sync_token: str) -> None:
        self._keys = keys
        self._sync_token = sync_token.encode()

    def authenticate(self, secret: str) -> Principal:
        if self._sync_token:
            if secret and hmac.compare_digest(secret.encode(), self._sync_token):
                return SIDECAR
        elif not secret:
            return SIDECAR
        return self._keys.authenticate(secret)


class SourceAware:
    """Base of authenticators that also take the caller's address (``admin.throttle``)."""

    def authenticate(self, secret: str, source: str = "") -> Principal:
        raise NotImplementedError


def bearer_token(metadata: Metadata) -> str:
    """The credential from ``authorization: Bearer <key>`` metadata, or ''."""
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
            raise Unauthenticated("authorization metadata must use the Bearer scheme")
    return ""


def request_id(metadata: Metadata) -> str:
    """The caller's ``x-request-id`` when well-formed, else a fresh one."""
    for name, value in metadata or ():
        if name == "x-request-id" and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return "req_" + secrets.token_hex(8)


Handler = Callable[[Any, Req, RequestContext], Awaitable[Resp]]
StreamMethod = Callable[[Any, Req, RequestContext], AsyncIterator[Resp]]

# A stream re-authenticates its key this often (checked before each message it sends), so a
# revoked key stops receiving records.
REAUTH_SECONDS = 10.0


def _begin(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[Metadata, str]:
    metadata: Metadata = context.invocation_metadata()  # type: ignore[assignment]
    rid = request_id(metadata)
    context.set_trailing_metadata((("x-request-id", rid),))
    return metadata, rid


async def abort(
    context: grpc.aio.ServicerContext[Any, Any], exc: Exception, method: str, rid: str
) -> NoReturn:
    """End the call with ``exc`` mapped to its gRPC status; internal detail stays in the log."""
    if isinstance(exc, SpauthError):
        log.info(
            "admin call refused", extra={"method": method, "code": exc.code, "request_id": rid}
        )
        await context.abort(grpc_code(exc), exc.message)
    log.error("admin call failed", exc_info=exc, extra={"method": method, "request_id": rid})
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid})")


async def authenticated(
    authenticator: Authenticator, token: str, rid: str, source: str
) -> RequestContext:
    """The request context of a call presenting ``token``: every admin transport (gRPC, the
    HTTP/JSON API) authenticates here, so the rules are the same on each."""
    if isinstance(authenticator, SourceAware):
        principal = await asyncio.to_thread(authenticator.authenticate, token, source)
    else:
        principal = await asyncio.to_thread(authenticator.authenticate, token)
    return RequestContext(principal=principal, request_id=rid, source=source)


def core_method(method: Callable[..., Awaitable[Any]]) -> Handler[Any, Any]:
    """The undecorated ``(self, request, ctx)`` method behind an ``admin_rpc`` method."""
    return method.__wrapped__  # type: ignore[attr-defined,no-any-return]


def admin_rpc(
    method: Callable[[Any, Req, RequestContext], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    """Decorate a unary servicer method ``(self, request, ctx)`` whose class has
    ``authenticator``."""

    @functools.wraps(method)
    async def wrapper(
        self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        metadata, rid = _begin(context)
        try:
            token = bearer_token(metadata)
            ctx = await authenticated(self.authenticator, token, rid, context.peer())
            return await method(self, request, ctx)
        except Exception as exc:
            await abort(context, exc, method.__name__, rid)

    return wrapper


def admin_stream(
    method: StreamMethod[Req, Resp],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]]:
    """``admin_rpc`` for server-streaming methods; the key is checked again every
    ``REAUTH_SECONDS`` so a long stream does not outlive its key's revocation."""

    @functools.wraps(method)
    async def wrapper(
        self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> AsyncIterator[Resp]:
        metadata, rid = _begin(context)
        try:
            token = bearer_token(metadata)
            ctx = await authenticated(self.authenticator, token, rid, context.peer())
            loop = asyncio.get_running_loop()
            reauth_at = loop.time() + REAUTH_SECONDS
            async for item in method(self, request, ctx):
                if loop.time() >= reauth_at:
                    await authenticated(self.authenticator, token, rid, context.peer())
                    reauth_at = loop.time() + REAUTH_SECONDS
                yield item
        except Exception as exc:
            await abort(context, exc, method.__name__, rid)

    return wrapper
