"""Workspace members (OAuth resource owners) for admins: create and list. Passwords are hashed
with scrypt before they reach the store and never leave the service."""

from __future__ import annotations

import re

from sidecar.core import credentials, passwords, validation
from sidecar.core.apps import require_admin
from sidecar.core.audit import event
from sidecar.core.clock import Clock
from sidecar.core.errors import AlreadyExists, InvalidArgument
from sidecar.core.models import OPERATOR_WORKSPACE, RequestContext
from sidecar.core.oauth_models import Member
from sidecar.core.scopes import ADMIN_FULL, KEYS_MANAGE, SCOPES, parse_scopes, sort_scopes
from sidecar.core.storage import Store

# What a member may delegate to apps unless the admin says otherwise: everything but managing
# credentials.
DEFAULT_MEMBER_SCOPES = frozenset(SCOPES) - {ADMIN_FULL, KEYS_MANAGE}
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s]+")
MAX_LISTED = 1000


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
        require_admin(ctx.principal, workspace)
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
            if uow.oauth.members.get_by_email(workspace, email) is not None:
                raise AlreadyExists(f"{email} is already a member of workspace {workspace!r}")
            uow.oauth.members.insert(member)
            uow.audit.append(
                event(
                    self._clock.now(),
                    ctx.principal.key_id,
                    "user.created",
                    workspace,
                    member.id,
                    request_id=ctx.request_id,
                    metadata={"scopes": " ".join(sort_scopes(held))},
                )
            )
        return member

    def list(self, ctx: RequestContext, *, workspace: str = "") -> list[Member]:
        """Members the caller may see, newest first."""
        if workspace and workspace != OPERATOR_WORKSPACE:
            validation.workspace(workspace)
        scope = workspace or ctx.principal.workspace
        require_admin(ctx.principal, scope)
        with self._store.read() as uow:
            return uow.oauth.members.list(
                workspace=None if scope == OPERATOR_WORKSPACE else scope, limit=MAX_LISTED
            )
