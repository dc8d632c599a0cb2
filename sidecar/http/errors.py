"""The one place where errors become HTTP responses on the OAuth endpoints: OAuth errors carry
their own wire code and status; domain errors are translated to one (``HTTP_ERRORS``, with a
test that fails when a domain error has no entry). Internal detail never reaches a client."""

from __future__ import annotations

import logging
import re
import secrets

from starlette.requests import Request
from starlette.responses import JSONResponse

from sidecar.core import errors
from sidecar.oauth.errors import (
    InsufficientScope,
    InvalidRequest,
    InvalidToken,
    OAuth2Error,
    ServerError,
    TemporarilyUnavailable,
)

log = logging.getLogger("sidecar.http")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

# RFC 6749 §5.1: token responses (and anything carrying tokens) must not be cached.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

HTTP_ERRORS: dict[type[errors.SpauthError], type[OAuth2Error]] = {
    errors.SpauthError: ServerError,
    errors.InvalidArgument: InvalidRequest,
    errors.Unauthenticated: InvalidToken,
    errors.PermissionDenied: InsufficientScope,
    errors.NotFound: InvalidRequest,
    errors.AlreadyExists: InvalidRequest,
    errors.FailedPrecondition: InvalidRequest,
    # A store failure: the request did not take effect (never a false success).
    errors.Unavailable: TemporarilyUnavailable,
    errors.RateLimited: TemporarilyUnavailable,
}


def oauth_error(error: errors.SpauthError) -> OAuth2Error:
    """The OAuth error for a domain error (most specific mapped class wins)."""
    for cls in type(error).__mro__:
        mapped = HTTP_ERRORS.get(cls)
        if mapped is not None:
            if mapped in (ServerError, TemporarilyUnavailable):
                return mapped()
            return mapped(error.message)
    return ServerError()


def error_response(error: OAuth2Error) -> JSONResponse:
    """RFC 6749 §5.2: a JSON object with ``error`` (and ``error_description``)."""
    return JSONResponse(
        error.body(), status_code=error.status_code, headers={**NO_STORE, **error.headers()}
    )


def request_id(request: Request) -> str:
    """The caller's ``x-request-id`` when well-formed, else a fresh one."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.fullmatch(given) else "req_" + secrets.token_hex(8)


def source(request: Request) -> str:
    """The peer address (proxy headers are not trusted)."""
    return request.client.host if request.client else "unknown"
