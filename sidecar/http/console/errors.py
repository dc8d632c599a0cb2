"""The one place where domain errors become console pages: each stable error code gets an HTTP
status (``CONSOLE_STATUS``, with a test that fails when a domain error has no entry). The
domain's messages are safe to show (they never hold a secret); internal faults and store
outages show a fixed text and the request id instead."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.core import errors

CONSOLE_STATUS: dict[type[errors.SpauthError], int] = {
    errors.SpauthError: 500,
    errors.InvalidArgument: 400,
    errors.Unauthenticated: 401,
    errors.PermissionDenied: 403,
    errors.NotFound: 404,
    errors.AlreadyExists: 409,
    errors.FailedPrecondition: 409,
    # The change did not take effect (never a false success).
    errors.Unavailable: 503,
    errors.RateLimited: 429,
}

_HIDDEN = {
    500: "Something went wrong on our side.",
    503: "The service is unavailable; nothing was changed.",
}


@dataclass(frozen=True, slots=True)
class ConsoleError:
    """What the error page shows: status, stable code and a message safe for the member."""

    status: int
    code: str
    message: str


def console_error(error: errors.SpauthError, request_id: str) -> ConsoleError:
    """The page for a domain error (the most specific mapped class wins)."""
    status = 500
    for cls in type(error).__mro__:
        mapped = CONSOLE_STATUS.get(cls)
        if mapped is not None:
            status = mapped
            break
    if status in _HIDDEN:
        text = f"{_HIDDEN[status]} (request id {request_id})"
        return ConsoleError(status, error.code, text)
    return ConsoleError(status, error.code, error.message)
