"""The one place where errors become responses of the HTTP/JSON admin API: RFC 9457 problem
documents (``application/problem+json``, https://www.rfc-editor.org/rfc/rfc9457).

The status is not chosen here a second time: a domain error's gRPC code comes from the gRPC mapper
(``sidecar.admin.errors.grpc_code``) and becomes an HTTP status by the table of
``google/rpc/code.proto`` — the table Envoy's gRPC-JSON transcoder uses too, so the API answers
the same status through either front end. The stable ``code`` is the domain error's own."""

from __future__ import annotations

from typing import Any

import grpc
from starlette.responses import JSONResponse

from sidecar.admin.errors import grpc_code
from sidecar.core.errors import InvalidArgument, RateLimited, SpauthError

MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "https://statuspulse.example/problems/"

# google/rpc/code.proto: "HTTP Mapping" of each code.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def status_of(error: SpauthError) -> int:
    """The HTTP status of a domain error (through its gRPC code)."""
    return HTTP_STATUS[grpc_code(error)]


def problem(
    status: int,
    code: str,
    detail: str,
    request_id: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """A problem document: ``type`` names the stable ``code``, ``request_id`` finds the log."""
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + code,
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "code": code,
        "request_id": request_id,
        **extra,
    }
    all_headers = {"x-request-id": request_id, "cache-control": "no-store", **(headers or {})}
    if status == 401:
        # RFC 6750 §3: the scheme the API expects.
        all_headers.setdefault("www-authenticate", 'Bearer realm="statuspulse"')
    return JSONResponse(body, status_code=status, headers=all_headers, media_type=MEDIA_TYPE)


def error_problem(error: SpauthError, request_id: str) -> JSONResponse:
    """The problem document of a domain error; internal errors say nothing but the request id."""
    status = status_of(error)
    if status >= 500 and grpc_code(error) is not grpc.StatusCode.UNAVAILABLE:
        return problem(status, "internal", f"internal error (request id {request_id})", request_id)
    extra: dict[str, Any] = {"grpc_status": grpc_code(error).name}
    if isinstance(error, InvalidArgument):
        extra["field"] = error.field
    headers = None
    if isinstance(error, RateLimited):
        # RFC 9110 §10.2.3 (RFC 6585 §4: a 429 MAY say how long to wait).
        headers = {"retry-after": str(error.retry_after)}
    return problem(status, error.code, error.message, request_id, headers=headers, **extra)
