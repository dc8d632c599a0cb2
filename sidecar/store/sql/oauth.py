"""SQLite repositories for the OAuth tables (migration 0002), bound to the connection and
transaction of a ``SqliteUnitOfWork`` through ``uow.oauth``. The SQL is standard (``TRUE``,
``ON CONFLICT … DO NOTHING``), so PostgreSQL runs the same classes over a ``QmarkConnection``
(sidecar/store/sql/postgres_oauth.py); the one dialect difference, the insertion-order column of
signing keys, is a class attribute."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from sidecar.core.oauth_models import (
    AuthorizationCode,
    BrowserSession,
    Grant,
    Member,
    OAuthApp,
    RefreshToken,
    RevokedToken,
    SigningKey,
)
from sidecar.store.sql.qmark import Executes

T = TypeVar("T")


def _scopes(text: str) -> frozenset[str]:
    return frozenset(text.split())


def _join(scopes: frozenset[str]) -> str:
    return " ".join(sorted(scopes))


def _blob(value: object) -> bytes | None:
    return None if value is None else bytes(value)  # type: ignore[call-overload]


class _Table(Generic[T]):
    """Row mapping for one table: its columns, how a record becomes values and back."""

    def __init__(
        self,
        conn: Executes,
        table: str,
        columns: Sequence[str],
        to_row: Callable[[T], tuple[object, ...]],
        from_row: Callable[[Any], T],
    ) -> None:
        self._conn = conn
        self._table = table
        self._columns = tuple(columns)
        self._to_row = to_row
        self._from_row = from_row
        self._select = f"SELECT {', '.join(columns)} FROM {table}"

    def insert(self, record: T) -> None:
        marks = ", ".join("?" * len(self._columns))
        self._conn.execute(
            f"INSERT INTO {self._table} ({', '.join(self._columns)}) VALUES ({marks})",
            self._to_row(record),
        )

    def update(self, record: T) -> None:
        """Update every column but the first (the primary key)."""
        values = self._to_row(record)
        assignments = ", ".join(f"{c} = ?" for c in self._columns[1:])
        self._conn.execute(
            f"UPDATE {self._table} SET {assignments} WHERE {self._columns[0]} = ?",
            (*values[1:], values[0]),
        )

    def one(self, where: str, args: tuple[object, ...]) -> T | None:
        row = self._conn.execute(f"{self._select} WHERE {where}", args).fetchone()
        return self._from_row(row) if row else None

    def many(self, where: str, args: tuple[object, ...]) -> list[T]:
        rows = self._conn.execute(f"{self._select} WHERE {where}", args).fetchall()
        return [self._from_row(r) for r in rows]

    def delete(self, where: str, args: tuple[object, ...]) -> int:
        return int(self._conn.execute(f"DELETE FROM {self._table} WHERE {where}", args).rowcount)


# -- apps ---------------------------------------------------------------------------------------

_APP_COLUMNS = (
    "id",
    "workspace",
    "name",
    "redirect_uris",
    "scopes",
    "confidential",
    "secret_digest",
    "secret_last_four",
    "previous_secret_digest",
    "previous_secret_expires_at",
    "created_at",
    "created_by",
    "deleted_at",
)


def _app_row(a: OAuthApp) -> tuple[object, ...]:
    return (
        a.id,
        a.workspace,
        a.name,
        json.dumps(list(a.redirect_uris)),
        _join(a.scopes),
        int(a.confidential),
        a.secret_digest,
        a.secret_last_four,
        a.previous_secret_digest,
        a.previous_secret_expires_at,
        a.created_at,
        a.created_by,
        a.deleted_at,
    )


def _app(r: Any) -> OAuthApp:
    return OAuthApp(
        id=r[0],
        workspace=r[1],
        name=r[2],
        redirect_uris=tuple(json.loads(r[3])),
        scopes=_scopes(r[4]),
        confidential=bool(r[5]),
        secret_digest=_blob(r[6]),
        secret_last_four=r[7],
        previous_secret_digest=_blob(r[8]),
        previous_secret_expires_at=r[9],
        created_at=r[10],
        created_by=r[11],
        deleted_at=r[12],
    )


class SqlOAuthApps:
    """OAuthAppRepository."""

    def __init__(self, conn: Executes) -> None:
        self._t = _Table(conn, "oauth_apps", _APP_COLUMNS, _app_row, _app)

    def insert(self, app: OAuthApp) -> None:
        self._t.insert(app)

    def update(self, app: OAuthApp) -> None:
        self._t.update(app)

    def get(self, app_id: str) -> OAuthApp | None:
        return self._t.one("id = ?", (app_id,))

    def list(self, *, workspace: str | None, limit: int) -> list[OAuthApp]:
        order = "ORDER BY created_at DESC, id DESC LIMIT ?"
        if workspace is None:
            return self._t.many(f"deleted_at IS NULL {order}", (limit,))
        return self._t.many(f"deleted_at IS NULL AND workspace = ? {order}", (workspace, limit))


# -- members ------------------------------------------------------------------------------------

_MEMBER_COLUMNS = (
    "id",
    "workspace",
    "email",
    "password_hash",
    "scopes",
    "created_at",
    "created_by",
    "disabled_at",
    "last_signin_at",
    "deleted_at",
)


def _member_row(m: Member) -> tuple[object, ...]:
    return (
        m.id,
        m.workspace,
        m.email,
        m.password_hash,
        _join(m.scopes),
        m.created_at,
        m.created_by,
        m.disabled_at,
        m.last_signin_at,
        m.deleted_at,
    )


def _member(r: Any) -> Member:
    return Member(r[0], r[1], r[2], r[3], _scopes(r[4]), r[5], r[6], r[7], r[8], r[9])


class SqlMembers:
    """MemberRepository."""

    def __init__(self, conn: Executes) -> None:
        self._t = _Table(conn, "oauth_users", _MEMBER_COLUMNS, _member_row, _member)

    def insert(self, member: Member) -> None:
        self._t.insert(member)

    def update(self, member: Member) -> None:
        self._t.update(member)

    def get(self, user_id: str) -> Member | None:
        return self._t.one("id = ?", (user_id,))

    def get_by_email(self, workspace: str, email: str) -> Member | None:
        return self._t.one("workspace = ? AND email = ?", (workspace, email))

    def list(self, *, workspace: str | None, limit: int) -> list[Member]:
        order = "ORDER BY created_at DESC, id DESC LIMIT ?"
        if workspace is None:
            return self._t.many(f"deleted_at IS NULL {order}", (limit,))
        return self._t.many(f"deleted_at IS NULL AND workspace = ? {order}", (workspace, limit))


# -- grants -------------------------------------------------------------------------------------

_GRANT_COLUMNS = (
    "id",
    "app_id",
    "user_id",
    "workspace",
    "scopes",
    "created_at",
    "last_used_at",
    "access_expires_at",
    "revoked_at",
    "revoke_reason",
)


def _grant_row(g: Grant) -> tuple[object, ...]:
    return (
        g.id,
        g.app_id,
        g.user_id,
        g.workspace,
        _join(g.scopes),
        g.created_at,
        g.last_used_at,
        g.access_expires_at,
        g.revoked_at,
        g.revoke_reason,
    )


def _grant(r: Any) -> Grant:
    return Grant(r[0], r[1], r[2], r[3], _scopes(r[4]), r[5], r[6], r[7], r[8], r[9])


class SqlGrants:
    """GrantRepository."""

    def __init__(self, conn: Executes) -> None:
        self._t = _Table(conn, "oauth_grants", _GRANT_COLUMNS, _grant_row, _grant)

    def insert(self, grant: Grant) -> None:
        self._t.insert(grant)

    def update(self, grant: Grant) -> None:
        self._t.update(grant)

    def get(self, grant_id: str) -> Grant | None:
        return self._t.one("id = ?", (grant_id,))

    def active_for_app(self, app_id: str) -> list[Grant]:
        return self._t.many(
            "app_id = ? AND revoked_at IS NULL ORDER BY created_at DESC, id DESC", (app_id,)
        )

    def active_for_user(self, user_id: str) -> list[Grant]:
        return self._t.many(
            "user_id = ? AND revoked_at IS NULL ORDER BY created_at DESC, id DESC", (user_id,)
        )

    def revoked_unexpired(self, now: int) -> list[Grant]:
        return self._t.many("revoked_at IS NOT NULL AND access_expires_at > ?", (now,))


# -- codes, refresh tokens, revoked access tokens -----------------------------------------------

_CODE_COLUMNS = (
    "digest",
    "app_id",
    "user_id",
    "workspace",
    "scopes",
    "redirect_uri",
    "redirect_uri_given",
    "code_challenge",
    "code_challenge_method",
    "created_at",
    "expires_at",
    "used_at",
    "grant_id",
)


def _code_row(c: AuthorizationCode) -> tuple[object, ...]:
    return (
        c.digest,
        c.app_id,
        c.user_id,
        c.workspace,
        _join(c.scopes),
        c.redirect_uri,
        int(c.redirect_uri_given),
        c.code_challenge,
        c.code_challenge_method,
        c.created_at,
        c.expires_at,
        c.used_at,
        c.grant_id,
    )


def _code(r: Any) -> AuthorizationCode:
    return AuthorizationCode(
        bytes(r[0]),
        r[1],
        r[2],
        r[3],
        _scopes(r[4]),
        r[5],
        bool(r[6]),
        r[7],
        r[8],
        r[9],
        r[10],
        r[11],
        r[12],
    )


class SqlCodes:
    """AuthorizationCodeRepository."""

    def __init__(self, conn: Executes) -> None:
        self._t = _Table(conn, "oauth_codes", _CODE_COLUMNS, _code_row, _code)

    def insert(self, code: AuthorizationCode) -> None:
        self._t.insert(code)

    def update(self, code: AuthorizationCode) -> None:
        self._t.update(code)

    def get(self, digest: bytes) -> AuthorizationCode | None:
        return self._t.one("digest = ?", (digest,))

    def purge(self, before: int) -> int:
        return self._t.delete("expires_at < ?", (before,))


_REFRESH_COLUMNS = ("digest", "grant_id", "created_at", "expires_at", "rotated_at")


def _refresh_row(t: RefreshToken) -> tuple[object, ...]:
    return (t.digest, t.grant_id, t.created_at, t.expires_at, t.rotated_at)


def _refresh(r: Any) -> RefreshToken:
    return RefreshToken(bytes(r[0]), r[1], r[2], r[3], r[4])


class SqlRefreshTokens:
    """RefreshTokenRepository."""

    def __init__(self, conn: Executes) -> None:
        self._t = _Table(conn, "oauth_refresh_tokens", _REFRESH_COLUMNS, _refresh_row, _refresh)

    def insert(self, token: RefreshToken) -> None:
        self._t.insert(token)

    def update(self, token: RefreshToken) -> None:
        self._t.update(token)

    def get(self, digest: bytes) -> RefreshToken | None:
        return self._t.one("digest = ?", (digest,))


_REVOKED_COLUMNS = ("jti", "grant_id", "expires_at", "revoked_at")


def _revoked_row(t: RevokedToken) -> tuple[object, ...]:
    return (t.jti, t.grant_id, t.expires_at, t.revoked_at)


def _revoked(r: Any) -> RevokedToken:
    return RevokedToken(r[0], r[1], r[2], r[3])


class SqlRevokedTokens:
    """RevokedTokenRepository."""

    def __init__(self, conn: Executes) -> None:
        self._conn = conn
        self._t = _Table(conn, "oauth_revoked_tokens", _REVOKED_COLUMNS, _revoked_row, _revoked)

    def insert(self, token: RevokedToken) -> bool:
        """False when the jti was revoked already (by this or a racing writer)."""
        cursor = self._conn.execute(
            "INSERT INTO oauth_revoked_tokens (jti, grant_id, expires_at, revoked_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (jti) DO NOTHING",
            _revoked_row(token),
        )
        return bool(cursor.rowcount == 1)

    def get(self, jti: str) -> RevokedToken | None:
        return self._t.one("jti = ?", (jti,))

    def unexpired(self, now: int) -> list[RevokedToken]:
        return self._t.many("expires_at > ?", (now,))


# -- signing keys, browser sessions, server secrets ---------------------------------------------

_KEY_COLUMNS = (
    "kid",
    "alg",
    "private_pem",
    "public_jwk",
    "created_at",
    "superseded_at",
    "retired_at",
    "activates_at",
)


def _key_row(k: SigningKey) -> tuple[object, ...]:
    return (
        k.kid,
        k.alg,
        k.private_pem,
        json.dumps(k.public_jwk, sort_keys=True),
        k.created_at,
        k.superseded_at,
        k.retired_at,
        k.activates_at,
    )


def _key(r: Any) -> SigningKey:
    return SigningKey(r[0], r[1], bytes(r[2]), json.loads(r[3]), r[4], r[5], r[6], r[7])


class SqlSigningKeys:
    """SigningKeyRepository."""

    # Breaks ties between keys created in the same second (insertion order): SQLite's rowid;
    # PostgreSQL has an identity column for it.
    ORDER_COLUMN = "rowid"

    def __init__(self, conn: Executes) -> None:
        self._t = _Table(conn, "oauth_signing_keys", _KEY_COLUMNS, _key_row, _key)

    def insert(self, key: SigningKey) -> None:
        self._t.insert(key)

    def update(self, key: SigningKey) -> None:
        self._t.update(key)

    def current(self, now: int) -> SigningKey | None:
        order = f"ORDER BY activates_at DESC, created_at DESC, {self.ORDER_COLUMN} DESC"
        return self._t.one(f"superseded_at IS NULL AND activates_at <= ? {order} LIMIT 1", (now,))

    def pending(self, now: int) -> list[SigningKey]:
        order = f"ORDER BY activates_at DESC, {self.ORDER_COLUMN} DESC"
        return self._t.many(f"retired_at IS NULL AND activates_at > ? {order}", (now,))

    def all(self) -> list[SigningKey]:
        return self._t.many(f"TRUE ORDER BY created_at DESC, {self.ORDER_COLUMN} DESC", ())

    def published(self) -> list[SigningKey]:
        order = f"ORDER BY created_at DESC, {self.ORDER_COLUMN} DESC"
        return self._t.many(f"retired_at IS NULL {order}", ())


_SESSION_COLUMNS = ("digest", "user_id", "workspace", "created_at", "expires_at")


def _session_row(s: BrowserSession) -> tuple[object, ...]:
    return (s.digest, s.user_id, s.workspace, s.created_at, s.expires_at)


def _session(r: Any) -> BrowserSession:
    return BrowserSession(bytes(r[0]), r[1], r[2], r[3], r[4])


class SqlBrowserSessions:
    """BrowserSessionRepository."""

    def __init__(self, conn: Executes) -> None:
        self._t = _Table(conn, "oauth_sessions", _SESSION_COLUMNS, _session_row, _session)

    def insert(self, session: BrowserSession) -> None:
        self._t.insert(session)

    def get(self, digest: bytes) -> BrowserSession | None:
        return self._t.one("digest = ?", (digest,))

    def delete(self, digest: bytes) -> None:
        self._t.delete("digest = ?", (digest,))

    def delete_for_user(self, user_id: str) -> int:
        return self._t.delete("user_id = ?", (user_id,))

    def purge(self, before: int) -> int:
        return self._t.delete("expires_at < ?", (before,))


class SqlServerSecrets:
    """ServerSecretRepository."""

    def __init__(self, conn: Executes) -> None:
        self._conn = conn

    def get(self, name: str) -> bytes | None:
        row = self._conn.execute(
            "SELECT value FROM oauth_server_secrets WHERE name = ?", (name,)
        ).fetchone()
        return bytes(row[0]) if row else None

    def insert(self, name: str, value: bytes, now: int) -> None:
        self._conn.execute(
            "INSERT INTO oauth_server_secrets (name, value, created_at) VALUES (?, ?, ?)",
            (name, value, now),
        )


class SqlOAuthRepositories:
    """``uow.oauth``: every OAuth repository over the unit of work's connection."""

    signing_keys_class: type[SqlSigningKeys] = SqlSigningKeys

    def __init__(self, conn: Executes) -> None:
        self.apps = SqlOAuthApps(conn)
        self.members = SqlMembers(conn)
        self.grants = SqlGrants(conn)
        self.codes = SqlCodes(conn)
        self.refresh_tokens = SqlRefreshTokens(conn)
        self.revoked_tokens = SqlRevokedTokens(conn)
        self.signing_keys = self.signing_keys_class(conn)
        self.sessions = SqlBrowserSessions(conn)
        self.server_secrets = SqlServerSecrets(conn)
