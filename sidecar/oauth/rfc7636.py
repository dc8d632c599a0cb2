"""Proof Key for Code Exchange, S256 only. https://www.rfc-editor.org/rfc/rfc7636

RFC 9700 §2.1.1 asks for PKCE from every client and rules out ``plain``, so a request without a
challenge or with another method is refused: there is no downgrade path."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from sidecar.oauth.errors import InvalidGrant, InvalidRequest

S256 = "S256"
SUPPORTED_METHODS = (S256,)
# §4.2: BASE64URL(SHA256(verifier)) without padding is exactly 43 characters.
_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")
# §4.1: code-verifier = 43*128unreserved.
_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")


def s256(verifier: str) -> str:
    """§4.2: code_challenge = BASE64URL-ENCODE(SHA256(ASCII(code_verifier)))."""
    raw = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def validate_challenge(challenge: str, method: str) -> None:
    """Check the authorization request's challenge; raises InvalidRequest."""
    # §4.4.1: "If the server requires Proof Key for Code Exchange (PKCE) by OAuth public clients
    # and the client does not send the code_challenge in the request, the authorization
    # endpoint MUST return the authorization error response with the error value set to
    # invalid_request." We require it of every client (RFC 9700 §2.1.1).
    if not challenge:
        raise InvalidRequest("code_challenge is required (PKCE with S256)")
    # §4.3: a missing method defaults to "plain", which we do not support (RFC 9700 §2.1.1).
    if method != S256:
        raise InvalidRequest("code_challenge_method must be S256")
    if not _CHALLENGE.fullmatch(challenge):
        raise InvalidRequest("code_challenge must be 43 base64url characters (S256)")


def verify(verifier: str, challenge: str, method: str) -> None:
    """Check the token request's verifier against the stored challenge (§4.6)."""
    # RFC 9700 §4.8.2: a verifier sent for a code issued without a challenge is a downgrade
    # attempt and must be rejected. (We never issue such codes; the check stays as a guard.)
    if not challenge:
        if verifier:
            raise InvalidGrant("code_verifier sent for a code issued without code_challenge")
        raise InvalidGrant("authorization code has no PKCE challenge")
    if not verifier:
        raise InvalidRequest("code_verifier is required")
    if not _VERIFIER.fullmatch(verifier):
        raise InvalidRequest("code_verifier must be 43-128 unreserved characters")
    if method != S256:
        raise InvalidGrant("unsupported code_challenge_method")
    # §4.6: "If the values are not equal, an error response indicating "invalid_grant" as
    # described in Section 5.2 of [RFC6749] MUST be returned."
    if not hmac.compare_digest(s256(verifier), challenge):
        raise InvalidGrant("code_verifier does not match code_challenge")
