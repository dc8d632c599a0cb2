"""Recognise a presented token (revocation, introspection): a ``sprt_`` refresh token by its
digest, or a JWT access token by its signature against the published keys."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.authz.access_tokens import TokenRejected, VerificationKey, verify_access_token
from sidecar.core import credentials
from sidecar.core.oauth_models import Grant
from sidecar.core.storage import UnitOfWork
from sidecar.oauth.config import OAuthConfig

ACCESS_TOKEN = "access_token"  # noqa: S105 (a token type name)
REFRESH_TOKEN = "refresh_token"  # noqa: S105 (a token type name)
TOKEN_TYPE_HINTS = (ACCESS_TOKEN, REFRESH_TOKEN)


@dataclass(frozen=True, slots=True)
class TokenFacts:
    """What the server knows about a token it issued."""

    kind: str
    grant: Grant
    scopes: frozenset[str]
    issued_at: int
    expires_at: int
    active: bool
    jti: str = ""


def find_token(
    uow: UnitOfWork,
    token: str,
    *,
    keys: Mapping[str, VerificationKey],
    config: OAuthConfig,
    now: float,
) -> TokenFacts | None:
    """The facts about ``token``, or None when it is not one of ours (or is unusable JWT)."""
    if credentials.is_well_formed(token, credentials.REFRESH_TOKEN):
        return _refresh_token(uow, token, now)
    if token.count(".") == 2:
        return _access_token(uow, token, keys, config, now)
    return None


def _refresh_token(uow: UnitOfWork, token: str, now: float) -> TokenFacts | None:
    stored = uow.oauth.refresh_tokens.get(credentials.digest(token))
    grant = uow.oauth.grants.get(stored.grant_id) if stored else None
    if stored is None or grant is None:
        return None
    active = stored.rotated_at is None and now < stored.expires_at and not grant.revoked
    return TokenFacts(
        REFRESH_TOKEN, grant, grant.scopes, stored.created_at, stored.expires_at, active
    )


def _access_token(
    uow: UnitOfWork,
    token: str,
    keys: Mapping[str, VerificationKey],
    config: OAuthConfig,
    now: float,
) -> TokenFacts | None:
    try:
        identity = verify_access_token(
            token,
            keys,
            issuer=config.issuer,
            audience=config.audience,
            now=now,
            leeway=0,
            max_lifetime=config.access_token_ttl,
        )
    except TokenRejected:
        # Unsigned, foreign, expired or malformed: nothing we could revoke or vouch for.
        return None
    grant = uow.oauth.grants.get(identity.grant_id)
    if grant is None or grant.app_id != identity.client_id:
        return None
    revoked = uow.oauth.revoked_tokens.get(identity.jti) is not None
    return TokenFacts(
        ACCESS_TOKEN,
        grant,
        identity.scopes,
        identity.issued_at,
        identity.expires_at,
        active=not revoked and not grant.revoked,
        jti=identity.jti,
    )
