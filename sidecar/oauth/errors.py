"""OAuth error responses, each class with its wire code and HTTP status.

RFC 6749 §5.2 (token endpoint), §4.1.2.1 (authorization endpoint), RFC 7009 §2.2.1
(``unsupported_token_type``): https://www.rfc-editor.org/rfc/rfc6749#section-5.2
The transport renders ``body()`` as JSON (or as redirect parameters) and never adds detail."""

from __future__ import annotations

import re

# RFC 6749 §5.2: error_description is limited to %x20-21 / %x23-5B / %x5D-7E.
_UNSAFE = re.compile(r"[^\x20-\x21\x23-\x5b\x5d-\x7e]")


class OAuth2Error(Exception):
    """Base class; ``error`` is the registered code, ``status_code`` the HTTP status."""

    error = "server_error"
    status_code = 500

    def __init__(self, description: str = "") -> None:
        super().__init__(description or self.error)
        self.description = _UNSAFE.sub("?", description)[:300]

    def body(self) -> dict[str, str]:
        """The JSON object of RFC 6749 §5.2 (``error`` and, if any, ``error_description``)."""
        out = {"error": self.error}
        if self.description:
            out["error_description"] = self.description
        return out

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(OAuth2Error):
    error = "invalid_request"
    status_code = 400


class InvalidClient(OAuth2Error):
    """Client authentication failed. RFC 6749 §5.2: 401 with ``WWW-Authenticate``."""

    error = "invalid_client"
    status_code = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Basic realm="statuspulse", charset="UTF-8"'}


class InvalidGrant(OAuth2Error):
    error = "invalid_grant"
    status_code = 400


class UnauthorizedClient(OAuth2Error):
    error = "unauthorized_client"
    status_code = 400


class UnsupportedGrantType(OAuth2Error):
    error = "unsupported_grant_type"
    status_code = 400


class InvalidScope(OAuth2Error):
    error = "invalid_scope"
    status_code = 400


class AccessDenied(OAuth2Error):
    """The member denied consent (sent to the client as a redirect, RFC 6749 §4.1.2.1)."""

    error = "access_denied"
    status_code = 403


class UnsupportedResponseType(OAuth2Error):
    error = "unsupported_response_type"
    status_code = 400


class UnsupportedTokenType(OAuth2Error):
    """RFC 7009 §2.2.1: the server cannot revoke tokens of the hinted type."""

    error = "unsupported_token_type"
    status_code = 400


class InvalidToken(OAuth2Error):
    """RFC 6750 §3.1: the caller's bearer credential is unknown (introspection callers)."""

    error = "invalid_token"
    status_code = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="statuspulse", error="invalid_token"'}


class InsufficientScope(OAuth2Error):
    """RFC 6750 §3.1: the caller's credential lacks the scope this endpoint needs."""

    error = "insufficient_scope"
    status_code = 403


class ServerError(OAuth2Error):
    error = "server_error"
    status_code = 500


class TemporarilyUnavailable(OAuth2Error):
    """The store failed: the request did not take effect and may be retried (RFC 7009 §2.2.1
    says a client must then assume the token still exists)."""

    error = "temporarily_unavailable"
    status_code = 503

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


ALL_OAUTH_ERRORS: tuple[type[OAuth2Error], ...] = (
    OAuth2Error,
    InvalidRequest,
    InvalidClient,
    InvalidGrant,
    UnauthorizedClient,
    UnsupportedGrantType,
    InvalidScope,
    AccessDenied,
    UnsupportedResponseType,
    UnsupportedTokenType,
    InvalidToken,
    InsufficientScope,
    ServerError,
    TemporarilyUnavailable,
)
