"""The seam every admin RPC goes through: authenticate the caller, run the (blocking) core call
off the event loop, and map errors once."""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from sidecar.admin.errors import grpc_code
from sidecar.core.audit_trail import SIDECAR
from sidecar.core.errors import SpauthError, Unauthenticated
from sidecar.core.models import Principal, RequestContext

log = logging.getLogger("sidecar.admin")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

Req = TypeVar("Req")
Resp = TypeVar("Resp")


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


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    """The credential from ``authorization: Bearer <key>`` metadata, or ''."""
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
            raise Unauthenticated("authorization metadata must use the Bearer scheme")
    return ""


def request_id(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    """The caller's ``x-request-id`` when well-formed, else a fresh one."""
    for name, value in metadata or ():
        if name == "x-request-id" and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return "req_" + secrets.token_hex(8)


Handler = Callable[[Any, Req, RequestContext], Awaitable[Resp]]


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
    """Decorate a servicer method ``(self, request, ctx)`` whose class has ``authenticator``."""

    @functools.wraps(method)
    async def wrapper(
        self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        metadata = context.invocation_metadata()
        rid = request_id(metadata)  # type: ignore[arg-type]
        context.set_trailing_metadata((("x-request-id", rid),))
        try:
            token = bearer_token(metadata)  # type: ignore[arg-type]
            ctx = await authenticated(self.authenticator, token, rid, context.peer())
            return await method(self, request, ctx)
        except SpauthError as exc:
            log.info(
                "admin call refused",
                extra={"method": method.__name__, "code": exc.code, "request_id": rid},
            )
            await context.abort(grpc_code(exc), exc.message)
        except Exception:
            log.exception("admin call failed", extra={"method": method.__name__, "request_id": rid})
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid})")
        raise AssertionError("unreachable: abort raises")

    return wrapper
