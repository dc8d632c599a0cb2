"""PostgreSQL repositories for the OAuth tables (migration 0002), bound to the connection and
transaction of a ``PgUnitOfWork`` through ``uow.oauth``. Row mapping is SQLite's (one place per
column); only the SQL differs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import psycopg

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
from sidecar.store.sqlite_oauth import (
    _APP_COLUMNS,
    _CODE_COLUMNS,
    _GRANT_COLUMNS,
    _KEY_COLUMNS,
    _MEMBER_COLUMNS,
    _REFRESH_COLUMNS,
    _REVOKED_COLUMNS,
    _SESSION_COLUMNS,
    _app,
    _app_row,
    _code,
    _code_row,
    _grant,
    _grant_row,
    _key,
    _key_row,
    _member,
    _member_row,
    _refresh,
    _refresh_row,
    _revoked,
    _revoked_row,
    _session,
    _session_row,
)

T = TypeVar("T")
Conn = psycopg.Connection[Any]


class _Table(Generic[T]):
    """Row mapping for one table: its columns, how a record becomes values and back."""

    def __init__(
        self,
        conn: Conn,
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
        marks = ", ".join(["%s"] * len(self._columns))
        self._conn.execute(
            f"INSERT INTO {self._table} ({', '.join(self._columns)}) VALUES ({marks})",
            self._to_row(record),
        )

    def update(self, record: T) -> None:
        """Update every column but the first (the primary key)."""
        values = self._to_row(record)
        assignments = ", ".join(f"{c} = %s" for c in self._columns[1:])
        self._conn.execute(
            f"UPDATE {self._table} SET {assignments} WHERE {self._columns[0]} = %s",
            (*values[1:], values[0]),
        )

    def one(self, where: str, args: tuple[object, ...]) -> T | None:
        row = self._conn.execute(f"{self._select} WHERE {where}", args).fetchone()
        return self._from_row(row) if row else None

    def many(self, where: str, args: tuple[object, ...]) -> list[T]:
        rows = self._conn.execute(f"{self._select} WHERE {where}", args).fetchall()
        return [self._from_row(r) for r in rows]

    def delete(self, where: str, args: tuple[object, ...]) -> int:
        return self._conn.execute(f"DELETE FROM {self._table} WHERE {where}", args).rowcount


class PgOAuthApps:
    """OAuthAppRepository."""

    def __init__(self, conn: Conn) -> None:
        self._t = _Table(conn, "oauth_apps", _APP_COLUMNS, _app_row, _app)

    def insert(self, app: OAuthApp) -> None:
        self._t.insert(app)

    def update(self, app: OAuthApp) -> None:
        self._t.update(app)

    def get(self, app_id: str) -> OAuthApp | None:
        return self._t.one("id = %s", (app_id,))

    def list(self, *, workspace: str | None, limit: int) -> list[OAuthApp]:
        order = "ORDER BY created_at DESC, id DESC LIMIT %s"
        if workspace is None:
            return self._t.many(f"deleted_at IS NULL {order}", (limit,))
        return self._t.many(f"deleted_at IS NULL AND workspace = %s {order}", (workspace, limit))


class PgMembers:
    """MemberRepository."""

    def __init__(self, conn: Conn) -> None:
        self._t = _Table(conn, "oauth_users", _MEMBER_COLUMNS, _member_row, _member)

    def insert(self, member: Member) -> None:
        self._t.insert(member)

    def get(self, user_id: str) -> Member | None:
        return self._t.one("id = %s", (user_id,))

    def get_by_email(self, workspace: str, email: str) -> Member | None:
        return self._t.one("workspace = %s AND email = %s", (workspace, email))

    def list(self, *, workspace: str | None, limit: int) -> list[Member]:
        if workspace is None:
            return self._t.many("TRUE ORDER BY created_at DESC, id DESC LIMIT %s", (limit,))
        return self._t.many(
            "workspace = %s ORDER BY created_at DESC, id DESC LIMIT %s", (workspace, limit)
        )


class PgGrants:
    """GrantRepository."""

    def __init__(self, conn: Conn) -> None:
        self._t = _Table(conn, "oauth_grants", _GRANT_COLUMNS, _grant_row, _grant)

    def insert(self, grant: Grant) -> None:
        self._t.insert(grant)

    def update(self, grant: Grant) -> None:
        self._t.update(grant)

    def get(self, grant_id: str) -> Grant | None:
        return self._t.one("id = %s", (grant_id,))

    def active_for_app(self, app_id: str) -> list[Grant]:
        return self._t.many(
            "app_id = %s AND revoked_at IS NULL ORDER BY created_at DESC, id DESC", (app_id,)
        )

    def revoked_unexpired(self, now: int) -> list[Grant]:
        return self._t.many("revoked_at IS NOT NULL AND access_expires_at > %s", (now,))


class PgCodes:
    """AuthorizationCodeRepository."""

    def __init__(self, conn: Conn) -> None:
        self._t = _Table(conn, "oauth_codes", _CODE_COLUMNS, _code_row, _code)

    def insert(self, code: AuthorizationCode) -> None:
        self._t.insert(code)

    def update(self, code: AuthorizationCode) -> None:
        self._t.update(code)

    def get(self, digest: bytes) -> AuthorizationCode | None:
        return self._t.one("digest = %s", (digest,))

    def purge(self, before: int) -> int:
        return self._t.delete("expires_at < %s", (before,))


class PgRefreshTokens:
    """RefreshTokenRepository."""

    def __init__(self, conn: Conn) -> None:
        self._t = _Table(conn, "oauth_refresh_tokens", _REFRESH_COLUMNS, _refresh_row, _refresh)

    def insert(self, token: RefreshToken) -> None:
        self._t.insert(token)

    def update(self, token: RefreshToken) -> None:
        self._t.update(token)

    def get(self, digest: bytes) -> RefreshToken | None:
        return self._t.one("digest = %s", (digest,))


class PgRevokedTokens:
    """RevokedTokenRepository."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn
        self._t = _Table(conn, "oauth_revoked_tokens", _REVOKED_COLUMNS, _revoked_row, _revoked)

    def insert(self, token: RevokedToken) -> bool:
        cursor = self._conn.execute(
            "INSERT INTO oauth_revoked_tokens (jti, grant_id, expires_at, revoked_at) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (jti) DO NOTHING",
            _revoked_row(token),
        )
        return cursor.rowcount == 1

    def get(self, jti: str) -> RevokedToken | None:
        return self._t.one("jti = %s", (jti,))

    def unexpired(self, now: int) -> list[RevokedToken]:
        return self._t.many("expires_at > %s", (now,))


class PgSigningKeys:
    """SigningKeyRepository."""

    def __init__(self, conn: Conn) -> None:
        self._t = _Table(conn, "oauth_signing_keys", _KEY_COLUMNS, _key_row, _key)

    def insert(self, key: SigningKey) -> None:
        self._t.insert(key)

    def update(self, key: SigningKey) -> None:
        self._t.update(key)

    def current(self) -> SigningKey | None:
        # seq breaks ties between keys created in the same second (insertion order).
        return self._t.one("superseded_at IS NULL ORDER BY created_at DESC, seq DESC LIMIT 1", ())

    def published(self) -> list[SigningKey]:
        return self._t.many("retired_at IS NULL ORDER BY created_at DESC, seq DESC", ())


class PgBrowserSessions:
    """BrowserSessionRepository."""

    def __init__(self, conn: Conn) -> None:
        self._t = _Table(conn, "oauth_sessions", _SESSION_COLUMNS, _session_row, _session)

    def insert(self, session: BrowserSession) -> None:
        self._t.insert(session)

    def get(self, digest: bytes) -> BrowserSession | None:
        return self._t.one("digest = %s", (digest,))

    def delete(self, digest: bytes) -> None:
        self._t.delete("digest = %s", (digest,))

    def purge(self, before: int) -> int:
        return self._t.delete("expires_at < %s", (before,))


class PgServerSecrets:
    """ServerSecretRepository."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn

    def get(self, name: str) -> bytes | None:
        row = self._conn.execute(
            "SELECT value FROM oauth_server_secrets WHERE name = %s", (name,)
        ).fetchone()
        return bytes(row[0]) if row else None

    def insert(self, name: str, value: bytes, now: int) -> None:
        self._conn.execute(
            "INSERT INTO oauth_server_secrets (name, value, created_at) VALUES (%s, %s, %s)",
            (name, value, now),
        )


class PgOAuthRepositories:
    """``uow.oauth``: every OAuth repository over the unit of work's connection."""

    def __init__(self, conn: Conn) -> None:
        self.apps = PgOAuthApps(conn)
        self.members = PgMembers(conn)
        self.grants = PgGrants(conn)
        self.codes = PgCodes(conn)
        self.refresh_tokens = PgRefreshTokens(conn)
        self.revoked_tokens = PgRevokedTokens(conn)
        self.signing_keys = PgSigningKeys(conn)
        self.sessions = PgBrowserSessions(conn)
        self.server_secrets = PgServerSecrets(conn)
