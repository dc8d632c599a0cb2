"""Workspace members (OAuth resource owners) for admins: create, list, and the offboarding
lifecycle (disable, enable, delete, reset the password). Passwords are hashed with scrypt before
they reach the store and never leave the service.

Disabling, deleting or resetting the password of a member revokes every grant they hold in the
same transaction (each revocation is a change-log entry, so every sidecar denies their access
tokens within the propagation time) and ends their browser sessions. Deletion marks the record
and frees the e-mail address; the audit history keeps naming the member's id."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from sidecar.core import credentials, passwords, permissions, validation, webhooks
from sidecar.core.audit import acted
from sidecar.core.clock import Clock
from sidecar.core.errors import AlreadyExists, InvalidArgument, NotFound
from sidecar.core.grants import revoke_grant
from sidecar.core.models import OPERATOR_WORKSPACE, RequestContext
from sidecar.core.oauth_models import Member
from sidecar.core.scopes import ADMIN_FULL, KEYS_MANAGE, SCOPES, parse_scopes, sort_scopes
from sidecar.core.storage import Store, UnitOfWork

# What a member may delegate to apps unless the admin says otherwise: everything but managing
# credentials.
DEFAULT_MEMBER_SCOPES = frozenset(SCOPES) - {ADMIN_FULL, KEYS_MANAGE}
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s]+")
MAX_LISTED = 1000
DELETED_DOMAIN = "deleted.invalid"  # RFC 2606 §2: .invalid never resolves


@dataclass(frozen=True, slots=True)
class Offboarded:
    """A member after a lifecycle change, and how many grants it revoked."""

    member: Member
    grants_revoked: int = 0


def normalize_email(value: str, field: str = "email") -> str:
    """Trimmed, lower-cased, one ``@`` and a dotted domain, at most 254 characters."""
    value = value.strip().lower()
    if len(value) > 254 or not _EMAIL.fullmatch(value) or not value.isprintable():
        raise InvalidArgument(field, f"malformed e-mail address {value[:80]!r}")
    return value


class UserService:
    """Member use cases for the admin API."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    def create(
        self,
        ctx: RequestContext,
        *,
        workspace: str,
        email: str,
        password: str,
        scopes: list[str] | None = None,
    ) -> Member:
        """Create a member who can sign in and consent to apps for ``scopes``."""
        workspace = validation.workspace(workspace)
        email = normalize_email(email)
        problem = passwords.password_problem(password)
        if problem:
            raise InvalidArgument("password", problem)
        held = parse_scopes(scopes) if scopes else DEFAULT_MEMBER_SCOPES
        permissions.require(ctx.principal, workspace)
        member = Member(
            id=credentials.mint_id("usr_"),
            workspace=workspace,
            email=email,
            password_hash=passwords.hash_password(password),
            scopes=held,
            created_at=int(self._clock.now()),
            created_by=ctx.principal.key_id,
        )
        with self._store.transaction() as uow:
            # Needs the read inside the transaction: two creates must not both pass.
            if uow.oauth.members.get_by_email(workspace, email) is not None:
                raise AlreadyExists(f"{email} is already a member of workspace {workspace!r}")
            uow.oauth.members.insert(member)
            granted = {"scopes": " ".join(sort_scopes(held))}
            uow.audit.append(
                acted(
                    ctx, self._clock.now(), "user.created", workspace, member.id, metadata=granted
                )
            )
        return member

    def list(self, ctx: RequestContext, *, workspace: str = "") -> list[Member]:
        """Members the caller may see, newest first."""
        if workspace and workspace != OPERATOR_WORKSPACE:
            validation.workspace(workspace)
        scope = workspace or ctx.principal.workspace
        permissions.require(ctx.principal, scope)
        with self._store.read() as uow:
            return uow.oauth.members.list(
                workspace=None if scope == OPERATOR_WORKSPACE else scope, limit=MAX_LISTED
            )

    def disable(self, ctx: RequestContext, user_id: str) -> Offboarded:
        """Refuse sign-in and refresh, revoke every grant, end browser sessions."""
        now = int(self._clock.now())
        with self._store.transaction() as uow:
            member = self._load(uow, ctx, user_id)
            if member.disabled_at is None:
                member = replace(member, disabled_at=now)
                uow.oauth.members.update(member)
                webhooks.member_disabled(uow, now, member)  # once, when it is disabled
            revoked = self._sign_out(uow, ctx, member, "member disabled")
            self._record(uow, ctx, "user.disabled", member, {"grants_revoked": str(revoked)})
        return Offboarded(member, revoked)

    def enable(self, ctx: RequestContext, user_id: str) -> Offboarded:
        """Let a disabled member sign in again (revoked grants stay revoked)."""
        with self._store.transaction() as uow:
            member = self._load(uow, ctx, user_id)
            if member.disabled_at is not None:
                member = replace(member, disabled_at=None)
                uow.oauth.members.update(member)
                self._record(uow, ctx, "user.enabled", member, {})
        return Offboarded(member)

    def delete(self, ctx: RequestContext, user_id: str) -> Offboarded:
        """Disable for good: the password hash is destroyed and the e-mail address freed."""
        now = int(self._clock.now())
        with self._store.transaction() as uow:
            member = self._load(uow, ctx, user_id)
            revoked = self._sign_out(uow, ctx, member, "member deleted")
            member = replace(
                member,
                email=f"{member.id}@{DELETED_DOMAIN}",
                password_hash="",
                disabled_at=member.disabled_at or now,
                deleted_at=now,
            )
            uow.oauth.members.update(member)
            self._record(uow, ctx, "user.deleted", member, {"grants_revoked": str(revoked)})
        return Offboarded(member, revoked)

    def reset_password(self, ctx: RequestContext, user_id: str, password: str) -> Offboarded:
        """A new password; every grant and browser session of the member ends."""
        problem = passwords.password_problem(password)
        if problem:
            raise InvalidArgument("password", problem)
        hashed = passwords.hash_password(password)
        with self._store.transaction() as uow:
            member = replace(self._load(uow, ctx, user_id), password_hash=hashed)
            uow.oauth.members.update(member)
            revoked = self._sign_out(uow, ctx, member, "password reset")
            self._record(uow, ctx, "user.password_reset", member, {"grants_revoked": str(revoked)})
        return Offboarded(member, revoked)

    # -- helpers -------------------------------------------------------------------------------

    def _load(self, uow: UnitOfWork, ctx: RequestContext, user_id: str) -> Member:
        if not user_id:
            raise InvalidArgument("id", "must not be empty")
        member = uow.oauth.members.get(user_id[:100])
        # Another workspace's member is "not found" (``permissions.visible``).
        if (
            member is None
            or member.deleted_at is not None
            or not permissions.visible(ctx.principal, member.workspace)
        ):
            raise NotFound(f"no member with id {user_id[:64]!r}")
        permissions.require(ctx.principal, member.workspace)
        return member

    def _sign_out(self, uow: UnitOfWork, ctx: RequestContext, member: Member, reason: str) -> int:
        grants = uow.oauth.grants.active_for_user(member.id)
        for grant in grants:
            revoke_grant(
                uow,
                grant,
                now=self._clock.now(),
                actor=ctx.principal.key_id,
                reason=reason,
                request_id=ctx.request_id,
            )
        uow.oauth.sessions.delete_for_user(member.id)
        return len(grants)

    def _record(
        self,
        uow: UnitOfWork,
        ctx: RequestContext,
        action: str,
        member: Member,
        metadata: dict[str, str],
    ) -> None:
        uow.audit.append(
            acted(ctx, self._clock.now(), action, member.workspace, member.id, metadata=metadata)
        )
