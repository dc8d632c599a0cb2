"""The JSON endpoints: token (RFC 6749 §3.2), revocation (RFC 7009), introspection (RFC 7662),
metadata (RFC 8414) and the JWKS."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from sidecar.core.errors import SpauthError, Unauthenticated
from sidecar.core.models import Principal
from sidecar.core.scopes import ADMIN_FULL, satisfies
from sidecar.http.errors import NO_STORE, error_response, oauth_error, request_id
from sidecar.http.forms import read_pairs, unique
from sidecar.oauth import client_auth
from sidecar.oauth.errors import InsufficientScope, InvalidToken, OAuth2Error
from sidecar.oauth.rfc7662 import Introspector
from sidecar.oauth.server import AuthorizationServer

log = logging.getLogger("sidecar.http")
Endpoint = Callable[[Request], Awaitable[Response]]


class ApiKeyAuthenticator(Protocol):
    def authenticate(self, secret: str) -> Principal: ...


def json_endpoint(handler: Endpoint) -> Endpoint:
    """Map every failure of ``handler`` to an RFC 6749 §5.2 JSON error, once."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except OAuth2Error as exc:
            return error_response(exc)
        except SpauthError as exc:
            log.warning("oauth request failed", extra={"code": exc.code, "path": request.url.path})
            return error_response(oauth_error(exc))
        except ClientDisconnect:
            raise  # nobody to answer; the server logs it at info (sidecar/ops/http_guard.py)
        except Exception:
            log.exception("oauth request failed", extra={"path": request.url.path})
            return error_response(oauth_error(SpauthError("internal")))

    return wrapper


def _no_store(body: dict[str, object]) -> JSONResponse:
    return JSONResponse(body, headers=NO_STORE)


class OAuthApi:
    """Handlers bound to one authorization server."""

    def __init__(self, server: AuthorizationServer, api_keys: ApiKeyAuthenticator) -> None:
        self.server = server
        self.api_keys = api_keys

    async def token(self, request: Request) -> Response:
        form = unique(await read_pairs(request))
        auth = request.headers.get("authorization", "")
        rid = request_id(request)
        response = await asyncio.to_thread(self.server.token.handle, form, auth, rid)
        return _no_store(response.body())

    async def revoke(self, request: Request) -> Response:
        form = unique(await read_pairs(request))
        authorization = request.headers.get("authorization", "")
        app = await asyncio.to_thread(self.server.clients.authenticate_client, authorization, form)
        await asyncio.to_thread(
            self.server.revocation.revoke,
            app,
            form.get("token", ""),
            form.get("token_type_hint", ""),
            request_id(request),
        )
        # RFC 7009 §2.2: 200 whether or not the token was valid; the body is ignored.
        return Response(status_code=200, headers=NO_STORE)

    async def introspect(self, request: Request) -> Response:
        form = unique(await read_pairs(request))
        caller = await self._introspector(request, form)
        body = await asyncio.to_thread(
            self.server.introspection.introspect, caller, form.get("token", "")
        )
        return _no_store(body)

    async def _introspector(self, request: Request, form: dict[str, str]) -> Introspector:
        # RFC 7662 §2.1: "the endpoint MUST also require some form of authorization".
        authorization = request.headers.get("authorization", "")
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer":
            try:
                principal = await asyncio.to_thread(self.api_keys.authenticate, value.strip())
            except Unauthenticated:
                raise InvalidToken("unknown or unusable API key") from None
            if not satisfies(principal.scopes, ADMIN_FULL):
                raise InsufficientScope("introspection with an API key needs admin:full")
            return Introspector(principal=principal)
        app = await asyncio.to_thread(
            self.server.clients.authenticate_client,
            authorization,
            form,
            client_auth.CONFIDENTIAL_METHODS,
        )
        return Introspector(app=app)

    async def metadata(self, request: Request) -> Response:
        return JSONResponse(self.server.metadata(), headers={"Cache-Control": "max-age=300"})

    async def jwks(self, request: Request) -> Response:
        keys = await asyncio.to_thread(self.server.keys.jwks)
        return JSONResponse(keys, headers={"Cache-Control": "max-age=60"})
