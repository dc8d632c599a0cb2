"""JWT profile for OAuth 2.0 access tokens: issuance. https://www.rfc-editor.org/rfc/rfc9068

Verification lives in ``sidecar.authz.access_tokens`` (the sidecar uses it)."""

from __future__ import annotations

from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.core import keyformat
from sidecar.oauth.signing import ALG

TOKEN_TYPE = "at+jwt"  # noqa: S105 (a name, not a secret)


@dataclass(frozen=True, slots=True)
class AccessToken:
    """An issued access token and the facts the server keeps about it."""

    token: str
    jti: str
    expires_at: int
    issued_at: int


def issue(
    signer: tuple[str, rsa.RSAPrivateKey],
    *,
    issuer: str,
    audience: str,
    subject: str,
    client_id: str,
    scopes: frozenset[str] | list[str],
    workspace: str,
    grant_id: str,
    now: float,
    ttl: int,
) -> AccessToken:
    """Sign an access token. Claims per RFC 9068 §2.2 (iss, exp, aud, sub, client_id, iat, jti,
    scope) plus ``workspace`` and ``sid`` (the grant, so revoking it denies the token)."""
    kid, key = signer
    iat = int(now)
    jti = "at_" + keyformat.random_token(22)
    claims = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "client_id": client_id,
        "scope": " ".join(sorted(scopes)),
        "workspace": workspace,
        "sid": grant_id,
        "jti": jti,
        "iat": iat,
        "exp": iat + ttl,
    }
    # RFC 9068 §2.1: typ "at+jwt" so an ID token or other JWT cannot pass as an access token.
    token = jwt.encode(claims, key, algorithm=ALG, headers={"typ": TOKEN_TYPE, "kid": kid})
    return AccessToken(token=token, jti=jti, expires_at=iat + ttl, issued_at=iat)
