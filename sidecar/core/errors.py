"""One exception tree for the domain. Each class carries its wire identity as a plain string;
each transport maps it once (see ``sidecar.admin.errors``). Messages are safe to show clients:
they never contain a secret."""

from __future__ import annotations


class SpauthError(Exception):
    """Base of every error the domain raises on purpose."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(SpauthError):
    """A request field is malformed or out of range; ``field`` names it."""

    code = "invalid_argument"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Unauthenticated(SpauthError):
    """The caller's credential is missing, malformed, unknown, expired or revoked."""

    code = "unauthenticated"


class PermissionDenied(SpauthError):
    """The caller is authenticated but lacks a scope or acts outside its workspace."""

    code = "permission_denied"


class NotFound(SpauthError):
    """The named object does not exist."""

    code = "not_found"


class AlreadyExists(SpauthError):
    """The object to create exists already."""

    code = "already_exists"


class FailedPrecondition(SpauthError):
    """The object is in a state that does not allow the operation (e.g. replacing a revoked key)."""

    code = "failed_precondition"


class Unavailable(SpauthError):
    """A dependency (the store) is unavailable; the operation did not take effect."""

    code = "unavailable"


class RateLimited(SpauthError):
    """Too many requests (e.g. too many refused keys from one address); ``retry_after`` is an
    upper bound, in seconds, on when to try again."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


ALL_ERRORS: tuple[type[SpauthError], ...] = (
    SpauthError,
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    Unavailable,
    RateLimited,
)
