"""OAuth application lifecycle for admins: register, list, show, rotate the client secret,
delete (revoking its grants), list and revoke its sessions (grants). Every change writes its
audit event and change-log entries in one transaction."""

from __future__ import annotations

import builtins
import re
from dataclasses import replace
from urllib.parse import SplitResult, urlsplit

from sidecar.core import credentials, permissions, validation
from sidecar.core.audit import acted
from sidecar.core.clock import Clock
from sidecar.core.errors import FailedPrecondition, InvalidArgument, NotFound
from sidecar.core.grants import revoke_grant
from sidecar.core.models import OPERATOR_WORKSPACE, Principal, RequestContext
from sidecar.core.oauth_models import AppSession, Grant, OAuthApp, RegisteredApp
from sidecar.core.scopes import parse_scopes, sort_scopes
from sidecar.core.storage import Store, UnitOfWork

MAX_REDIRECT_URIS = 10
MAX_URI_LENGTH = 2000
MAX_SECRET_OVERLAP = 30 * 86400
MAX_LISTED = 1000
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
# A DNS name or IPv4 address (letters, digits, dots, dashes), or an IPv6 literal (hex and
# colons): no percent-encoding, no characters a browser would map to something else.
_HOST = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?|[0-9a-f:]{2,39}")


def redirect_uri(value: str, field: str = "redirect_uri") -> str:
    """An absolute redirect URI without fragment (RFC 6749 §3.1.2): https, http on loopback only
    (RFC 8252 §7.3), or a private-use scheme of a native app (RFC 8252 §7.1, e.g.
    ``com.example.app:/cb``). Compared later by exact string match (RFC 9700 §4.1.3).

    Checked the way a browser will parse it (WHATWG URL Standard), not only as RFC 3986 does:
    a browser reads ``\\`` as ``/`` in http(s) URLs and strips tabs and newlines, so
    ``http://evil.example\\@127.0.0.1/cb`` is a loopback URI to ``urlsplit`` but sends the code
    to ``evil.example``. Backslashes, userinfo (``@`` before the host), percent-encoded or
    non-ASCII hosts and control characters are refused outright."""
    problem = uri_problem(value)
    if problem:
        raise InvalidArgument(field, f"{value[:80]!r}: {problem}")
    return value


def uri_problem(value: str) -> str:
    """Why ``value`` is not an acceptable redirect URI ('' when it is)."""
    if not value or len(value) > MAX_URI_LENGTH or not value.isascii():
        return "malformed URI (empty, too long or not ASCII)"
    if not value.isprintable() or any(c in value for c in " \t\r\n"):
        return "malformed URI (blanks or control characters)"
    if "\\" in value:
        return "must not contain a backslash (browsers read it as '/')"
    if "#" in value:
        return "must not contain a fragment"
    parts = urlsplit(value)
    if parts.scheme in ("http", "https"):
        return _web_uri_problem(value, parts)
    if "." in parts.scheme and parts.path and not parts.netloc:
        return ""
    return "use https://, http:// on a loopback address, or a reverse-domain private-use scheme"


def _web_uri_problem(value: str, parts: SplitResult) -> str:
    if not value.startswith(f"{parts.scheme}://"):
        return "an http(s) URI must start with scheme://"
    if "@" in parts.netloc:
        return "must not contain userinfo ('@' before the host)"
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        return "malformed host or port"
    if not host or not _HOST.fullmatch(host):
        return "malformed host"
    if parts.netloc.rsplit(":", 1)[-1] == "" or (port is not None and port == 0):
        return "malformed port"
    if parts.scheme == "https" or host in _LOOPBACK:
        return ""
    return "http:// is allowed on a loopback address only (127.0.0.1, [::1], localhost)"


class AppService:
    """OAuth application use cases for the admin API."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    def register(
        self,
        ctx: RequestContext,
        *,
        workspace: str,
        name: str,
        redirect_uris: list[str],
        scopes: list[str],
        confidential: bool,
    ) -> RegisteredApp:
        """Register an app; a confidential one gets a client secret, returned only here."""
        workspace = validation.workspace(workspace)
        name = validation.name(name)
        uris = tuple(dict.fromkeys(redirect_uri(u, "redirect_uris") for u in redirect_uris))
        if not 1 <= len(uris) <= MAX_REDIRECT_URIS:
            raise InvalidArgument("redirect_uris", f"give 1 to {MAX_REDIRECT_URIS} redirect URIs")
        granted = parse_scopes(scopes)
        permissions.require(ctx.principal, workspace)
        secret = credentials.mint(credentials.CLIENT_SECRET) if confidential else ""
        app = OAuthApp(
            id=credentials.mint_id("app_"),
            workspace=workspace,
            name=name,
            redirect_uris=uris,
            scopes=granted,
            confidential=confidential,
            created_at=int(self._clock.now()),
            created_by=ctx.principal.key_id,
            secret_digest=credentials.digest(secret) if secret else None,
            secret_last_four=secret[-4:],
        )
        with self._store.transaction() as uow:
            uow.oauth.apps.insert(app)
            meta = {
                "name": app.name,
                "scopes": " ".join(sort_scopes(granted)),
                "confidential": str(confidential).lower(),
            }
            self._record(uow, ctx, "app.registered", app, meta)
        return RegisteredApp(app=app, client_secret=secret)

    def list(self, ctx: RequestContext, *, workspace: str = "") -> list[OAuthApp]:
        """Apps the caller may see, newest first."""
        if workspace and workspace != OPERATOR_WORKSPACE:
            validation.workspace(workspace)
        scope = workspace or ctx.principal.workspace
        permissions.require(ctx.principal, scope)
        with self._store.read() as uow:
            return uow.oauth.apps.list(
                workspace=None if scope == OPERATOR_WORKSPACE else scope, limit=MAX_LISTED
            )

    def get(self, ctx: RequestContext, app_id: str) -> OAuthApp:
        with self._store.read() as uow:
            app = _load_app(uow, app_id, ctx.principal)
        permissions.require(ctx.principal, app.workspace)
        return app

    def rotate_secret(self, ctx: RequestContext, app_id: str, *, overlap: int) -> RegisteredApp:
        """A new client secret; the old one keeps working for ``overlap`` seconds."""
        validation.in_range(overlap, 0, MAX_SECRET_OVERLAP, "overlap")
        secret = credentials.mint(credentials.CLIENT_SECRET)
        now = int(self._clock.now())
        with self._store.transaction() as uow:
            app = _load_app(uow, app_id, ctx.principal)
            permissions.require(ctx.principal, app.workspace)
            if not app.confidential:
                raise FailedPrecondition(f"app {app.id} is public: it has no client secret")
            app = replace(
                app,
                secret_digest=credentials.digest(secret),
                secret_last_four=secret[-4:],
                previous_secret_digest=app.secret_digest if overlap else None,
                previous_secret_expires_at=now + overlap if overlap else None,
            )
            uow.oauth.apps.update(app)
            self._record(uow, ctx, "app.secret_rotated", app, {"overlap": str(overlap)})
        return RegisteredApp(app=app, client_secret=secret)

    def delete(self, ctx: RequestContext, app_id: str) -> OAuthApp:
        """Delete an app and revoke every grant it holds."""
        now = self._clock.now()
        with self._store.transaction() as uow:
            app = _load_app(uow, app_id, ctx.principal)
            permissions.require(ctx.principal, app.workspace)
            app = replace(app, deleted_at=int(now), secret_digest=None, previous_secret_digest=None)
            uow.oauth.apps.update(app)
            grants = uow.oauth.grants.active_for_app(app.id)
            for grant in grants:
                revoke_grant(
                    uow,
                    grant,
                    now=now,
                    actor=ctx.principal.key_id,
                    reason="app deleted",
                    request_id=ctx.request_id,
                )
            self._record(uow, ctx, "app.deleted", app, {"grants_revoked": str(len(grants))})
        return app

    def sessions(self, ctx: RequestContext, app_id: str) -> builtins.list[AppSession]:
        """The app's active grants with the member's e-mail address. A grant's last use is the
        later of its last token refresh and the last access-token use the sidecars reported."""
        with self._store.read() as uow:
            app = _load_app(uow, app_id, ctx.principal)
            permissions.require(ctx.principal, app.workspace)
            grants = uow.oauth.grants.active_for_app(app.id)
            used = uow.usage.last_used([g.id for g in grants])
            out = []
            for grant in grants:
                member = uow.oauth.members.get(grant.user_id)
                last = max(grant.last_used_at, used.get(grant.id, 0))
                out.append(
                    AppSession(
                        grant=replace(grant, last_used_at=last),
                        email=member.email if member else "",
                    )
                )
        return out

    def revoke_session(self, ctx: RequestContext, grant_id: str) -> Grant:
        """Revoke one grant (idempotent)."""
        if not grant_id:
            raise InvalidArgument("grant_id", "must not be empty")
        with self._store.transaction() as uow:
            grant = uow.oauth.grants.get(grant_id)
            if grant is None:
                raise NotFound(f"no session (grant) with id {grant_id[:64]!r}")
            permissions.require(ctx.principal, grant.workspace)
            return revoke_grant(
                uow,
                grant,
                now=self._clock.now(),
                actor=ctx.principal.key_id,
                reason="revoked by an admin",
                request_id=ctx.request_id,
            )

    def _record(
        self,
        uow: UnitOfWork,
        ctx: RequestContext,
        action: str,
        app: OAuthApp,
        metadata: dict[str, str],
    ) -> None:
        uow.audit.append(
            acted(ctx, self._clock.now(), action, app.workspace, app.id, metadata=metadata)
        )


def _load_app(uow: UnitOfWork, app_id: str, principal: Principal) -> OAuthApp:
    """The app ``principal`` may see: another workspace's is "not found"."""
    if not app_id:
        raise InvalidArgument("client_id", "must not be empty")
    app = uow.oauth.apps.get(app_id)
    if app is None or app.deleted or not permissions.visible(principal, app.workspace):
        raise NotFound(f"no app with client_id {app_id[:64]!r}")
    return app
