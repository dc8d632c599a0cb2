"""Revoking grants and access tokens: the record, its audit event and its change-log entry, in
the caller's transaction (so a revocation either fully happens or not at all)."""

from __future__ import annotations

from dataclasses import replace

from sidecar.core.audit import event
from sidecar.core.changes import grant_revoked, token_revoked
from sidecar.core.oauth_models import Grant, RevokedToken
from sidecar.core.storage import UnitOfWork


def revoke_grant(
    uow: UnitOfWork,
    grant: Grant,
    *,
    now: float,
    actor: str,
    reason: str,
    request_id: str = "",
) -> Grant:
    """Revoke ``grant``: its refresh tokens stop working and replicas deny its access tokens.
    Revoking a revoked grant returns it unchanged (idempotent)."""
    if grant.revoked:
        return grant
    grant = replace(grant, revoked_at=int(now), revoke_reason=reason)
    uow.oauth.grants.update(grant)
    uow.audit.append(
        event(
            now,
            actor,
            "grant.revoked",
            grant.workspace,
            grant.id,
            request_id=request_id,
            reason=reason,
            metadata={"client_id": grant.app_id, "user_id": grant.user_id},
        )
    )
    uow.changes.append(grant_revoked(grant))
    return grant


def revoke_access_token(
    uow: UnitOfWork,
    *,
    jti: str,
    grant: Grant,
    expires_at: int,
    now: float,
    actor: str,
    request_id: str = "",
) -> bool:
    """Revoke one access token until it expires; False when it was revoked already."""
    token = RevokedToken(jti=jti, grant_id=grant.id, expires_at=expires_at, revoked_at=int(now))
    if not uow.oauth.revoked_tokens.insert(token):
        return False
    uow.audit.append(
        event(
            now,
            actor,
            "token.revoked",
            grant.workspace,
            jti,
            request_id=request_id,
            metadata={"client_id": grant.app_id, "grant_id": grant.id, "type": "access_token"},
        )
    )
    uow.changes.append(token_revoked(token))
    return True
