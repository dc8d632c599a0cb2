"""What sidecar replicas learn about OAuth, as change-log entries: the signing keys to verify
access tokens with, and the grants and tokens revoked before they expire.

Kinds and payloads (the replication contract):

- ``signing_key.upserted`` ``{"kid", "alg", "public_jwk": {...}}``: a key joined the JWKS.
- ``signing_key.retired`` ``{"kid"}``: the key left the JWKS; tokens it signed are all expired.
- ``grant.revoked`` ``{"grant_id", "expires_at"}``: deny tokens whose ``sid`` is this grant;
  ``expires_at`` is the latest ``exp`` of its access tokens, after which the entry can go.
- ``token.revoked`` ``{"jti", "expires_at"}``: deny the access token with this ``jti``.
"""

from __future__ import annotations

from sidecar.core.models import Change
from sidecar.core.oauth_models import Grant, RevokedToken, SigningKey
from sidecar.core.storage import UnitOfWork

SIGNING_KEY_UPSERTED = "signing_key.upserted"
SIGNING_KEY_RETIRED = "signing_key.retired"
GRANT_REVOKED = "grant.revoked"
TOKEN_REVOKED = "token.revoked"  # noqa: S105 (a name, not a secret)


def signing_key_upserted(key: SigningKey) -> Change:
    """A key that verifies tokens (public part only)."""
    payload: dict[str, object] = {"kid": key.kid, "alg": key.alg, "public_jwk": key.public_jwk}
    return Change(SIGNING_KEY_UPSERTED, key.kid, payload)


def signing_key_retired(kid: str) -> Change:
    return Change(SIGNING_KEY_RETIRED, kid, {"kid": kid})


def grant_revoked(grant: Grant) -> Change:
    return Change(
        GRANT_REVOKED, grant.id, {"grant_id": grant.id, "expires_at": grant.access_expires_at}
    )


def token_revoked(token: RevokedToken) -> Change:
    return Change(TOKEN_REVOKED, token.jti, {"jti": token.jti, "expires_at": token.expires_at})


def oauth_snapshot(uow: UnitOfWork, now: float) -> list[Change]:
    """The OAuth part of a replica snapshot: every published signing key, and every revoked
    grant or access token whose tokens may still be unexpired at ``now``."""
    at = int(now)
    out = [signing_key_upserted(k) for k in uow.oauth.signing_keys.published()]
    out.extend(grant_revoked(g) for g in uow.oauth.grants.revoked_unexpired(at))
    out.extend(token_revoked(t) for t in uow.oauth.revoked_tokens.unexpired(at))
    return out
