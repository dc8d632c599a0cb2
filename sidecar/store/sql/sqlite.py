"""SQLite backend: one file in WAL mode, one connection per thread, versioned migrations."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sidecar.core.errors import Unavailable
from sidecar.core.models import ApiKey, Change, KeyState
from sidecar.core.storage import Cursor, KeyRow, PackRow
from sidecar.store.sql import migrations
from sidecar.store.sql.audit import SqlAudit, link_unchained
from sidecar.store.sql.listeners import CommitListeners
from sidecar.store.sql.oauth import SqlOAuthRepositories
from sidecar.store.sql.qmark import Executes
from sidecar.store.sql.usage import SqlUsage
from sidecar.store.sql.webhooks import SqlWebhooks

_KEY_COLUMNS = (
    "id, digest, last_four, name, workspace, scopes, created_at, expires_at, created_by, "
    "revoked_at, revoke_reason, replaces, replaced_by, grace_deadline, expiry_recorded, "
    "rate_limit, rate_period, description, suspended_at, client_cidrs, rotation_period, "
    "expiry_warned, rotation_due_recorded"
)


def _key_from_row(row: sqlite3.Row) -> ApiKey:
    return ApiKey(
        id=row[0],
        digest=bytes(row[1]),
        last_four=row[2],
        name=row[3],
        workspace=row[4],
        scopes=frozenset(row[5].split()),
        created_at=row[6],
        expires_at=row[7],
        created_by=row[8],
        revoked_at=row[9],
        revoke_reason=row[10],
        replaces=row[11],
        replaced_by=row[12],
        grace_deadline=row[13],
        expiry_recorded=bool(row[14]),
        rate_limit=row[15],
        rate_period=row[16],
        description=row[17],
        suspended_at=row[18],
        client_cidrs=tuple(row[19].split()),
        rotation_period=row[20],
        expiry_warned=bool(row[21]),
        rotation_due_recorded=bool(row[22]),
    )


def _key_values(key: ApiKey) -> tuple[object, ...]:
    return (
        key.id,
        key.digest,
        key.last_four,
        key.name,
        key.workspace,
        " ".join(sorted(key.scopes)),
        key.created_at,
        key.expires_at,
        key.created_by,
        key.revoked_at,
        key.revoke_reason,
        key.replaces,
        key.replaced_by,
        key.grace_deadline,
        int(key.expiry_recorded),
        key.rate_limit,
        key.rate_period,
        key.description,
        key.suspended_at,
        " ".join(key.client_cidrs),
        key.rotation_period,
        int(key.expiry_warned),
        int(key.rotation_due_recorded),
    )


# KeyRepository.packing_rows: the expiry folded with a grace deadline as the packed table does
# (a deadline of NULL or 0 is none), the shared part as one JSON text ({profile} per database);
# "ORDER BY" the digest (the table's order) appended unless the caller sorts them itself.
PACKING_ROWS = (
    "SELECT digest, id, CASE WHEN grace_deadline IS NULL OR grace_deadline = 0 "
    "OR grace_deadline >= expires_at THEN expires_at ELSE grace_deadline END, {profile} "
    "FROM api_keys WHERE revoked_at IS NULL AND expires_at > ?"
)


class SqlKeys:
    """KeyRepository over one connection (also PostgreSQL's, through ``Executes``)."""

    packing_profile = (
        "json_array(workspace, scopes, rate_limit, rate_period, client_cidrs, "
        "suspended_at IS NOT NULL)"
    )
    # "+digest": sorted, not read through the digest index (a table lookup per row: 3x the cost
    # at a million keys).
    packing_order = "+digest"
    # "+workspace": the few rows in the window grouped after a scan of the table, not the whole
    # table walked through the workspace index with a table lookup per row (1M keys: 1.7 s of
    # CPU -> 0.1 s, at every sweep and right when a fresh control plane serves its first sidecar).
    expiring_group = "+workspace"

    def __init__(self, conn: Executes) -> None:
        self._conn = conn

    def insert(self, key: ApiKey) -> None:
        values = _key_values(key)
        marks = ", ".join("?" * len(values))
        self._conn.execute(f"INSERT INTO api_keys ({_KEY_COLUMNS}) VALUES ({marks})", values)

    def update(self, key: ApiKey) -> None:
        values = _key_values(key)
        columns = [c.strip() for c in _KEY_COLUMNS.split(",")][1:]
        assignments = ", ".join(f"{c} = ?" for c in columns)
        self._conn.execute(f"UPDATE api_keys SET {assignments} WHERE id = ?", (*values[1:], key.id))

    def get(self, key_id: str) -> ApiKey | None:
        row = self._conn.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,)
        ).fetchone()
        return _key_from_row(row) if row else None

    def get_by_digest(self, digest: bytes) -> ApiKey | None:
        row = self._conn.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE digest = ?", (digest,)
        ).fetchone()
        return _key_from_row(row) if row else None

    def page(
        self,
        *,
        workspace: str | None,
        state: KeyState | None,
        now: int,
        limit: int,
        after: Cursor | None,
        unused_since: int | None = None,
        expiring_before: int | None = None,
        rotation_due: bool = False,
    ) -> list[ApiKey]:
        where: list[str] = []
        args: list[object] = []
        if unused_since is not None:
            where.append(
                "COALESCE((SELECT last_used_at FROM credential_last_use "
                "WHERE credential_id = api_keys.id), created_at) < ?"
            )
            args.append(unused_since)
        if workspace is not None:
            where.append("workspace = ?")
            args.append(workspace)
        if state is KeyState.REVOKED:
            where.append("revoked_at IS NOT NULL")
        elif state is KeyState.EXPIRED:
            where.append("revoked_at IS NULL AND expires_at <= ?")
            args.append(now)
        elif state is KeyState.ACTIVE:
            where.append("revoked_at IS NULL AND expires_at > ? AND suspended_at IS NULL")
            args.append(now)
        elif state is KeyState.SUSPENDED:
            where.append("revoked_at IS NULL AND expires_at > ? AND suspended_at IS NOT NULL")
            args.append(now)
        if expiring_before is not None:
            where.append("revoked_at IS NULL AND expires_at > ? AND expires_at <= ?")
            args.extend((now, expiring_before))
        if rotation_due:
            where.append(
                "revoked_at IS NULL AND expires_at > ? AND replaced_by = '' "
                "AND rotation_period > 0 AND created_at + rotation_period <= ?"
            )
            args.extend((now, now))
        if after is not None:
            where.append("(created_at, id) < (?, ?)")
            args.extend(after)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._conn.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys {clause} "
            "ORDER BY created_at DESC, id DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [_key_from_row(r) for r in rows]

    def due_for_sweep(self, now: int) -> list[ApiKey]:
        rows = self._conn.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE revoked_at IS NULL AND "
            "((expires_at <= ? AND expiry_recorded = 0) OR grace_deadline <= ?)",
            (now, now),
        ).fetchall()
        return [_key_from_row(r) for r in rows]

    def due_for_notice(self, now: int, warn_before: int) -> list[ApiKey]:
        rows = self._conn.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE revoked_at IS NULL AND expires_at > ? "
            "AND ((expiry_warned = 0 AND expires_at <= ?) OR (rotation_due_recorded = 0 "
            "AND replaced_by = '' AND rotation_period > 0 AND created_at + rotation_period <= ?))",
            (now, warn_before, now),
        ).fetchall()
        return [_key_from_row(r) for r in rows]

    def expiring_by_workspace(self, now: int, before: int) -> dict[str, int]:
        rows = self._conn.execute(
            "SELECT workspace, COUNT(*) FROM api_keys WHERE revoked_at IS NULL "
            f"AND expires_at > ? AND expires_at <= ? GROUP BY {self.expiring_group}",
            (now, before),
        ).fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def usable(self, now: int) -> Iterator[ApiKey]:
        cursor = self._conn.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE revoked_at IS NULL AND expires_at > ?",
            (now,),
        )
        for row in cursor:
            yield _key_from_row(row)

    def replica_rows(self, now: int) -> Iterator[KeyRow]:
        cursor = self._conn.execute(
            "SELECT id, digest, workspace, scopes, expires_at, rate_limit, rate_period, "
            "grace_deadline, suspended_at, client_cidrs FROM api_keys "
            "WHERE revoked_at IS NULL AND expires_at > ?",
            (now,),
        )
        # Scope and network lists repeat across keys: parsed once per distinct text.
        scopes: dict[str, frozenset[str]] = {}
        cidrs: dict[str, tuple[str, ...]] = {}
        for r in cursor:
            s = scopes.get(r[3])
            if s is None:
                s = scopes.setdefault(r[3], frozenset(r[3].split()))
            c = cidrs.get(r[9])
            if c is None:
                c = cidrs.setdefault(r[9], tuple(r[9].split()))
            yield (r[0], bytes(r[1]), r[2], s, r[4], r[5], r[6], False, r[7], r[8] is not None, c)

    def packing_rows(self, now: int, *, ordered: bool = True) -> Iterator[PackRow]:
        order = f" ORDER BY {self.packing_order}" if ordered else ""
        sql = PACKING_ROWS.format(profile=self.packing_profile) + order
        return iter(self._conn.execute(sql, (now,)))

    def has_operator(self) -> bool:
        row = self._conn.execute("SELECT 1 FROM api_keys WHERE workspace = '*' LIMIT 1").fetchone()
        return row is not None

    def active_operators(self, now: int) -> list[ApiKey]:
        rows = self._conn.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE workspace = '*' AND revoked_at IS NULL "
            "AND expires_at > ? ORDER BY expires_at DESC, id DESC",
            (now,),
        ).fetchall()
        return [_key_from_row(r) for r in rows]


class SqliteChanges:
    """ChangeLog over one connection."""

    def __init__(self, conn: sqlite3.Connection, appended: list[int]) -> None:
        self._conn = conn
        self._appended = appended

    def append(self, change: Change) -> int:
        cursor = self._conn.execute(
            "INSERT INTO changes (kind, subject, payload) VALUES (?, ?, ?)",
            (change.kind, change.subject, json.dumps(change.payload, sort_keys=True)),
        )
        revision = int(cursor.lastrowid or 0)
        self._appended.append(revision)
        return revision

    def since(self, revision: int, limit: int) -> list[Change]:
        rows = self._conn.execute(
            "SELECT revision, kind, subject, payload FROM changes WHERE revision > ? "
            "ORDER BY revision LIMIT ?",
            (revision, limit),
        ).fetchall()
        return [Change(kind=k, subject=s, payload=json.loads(p), revision=r) for r, k, s, p in rows]

    def head(self) -> int:
        row = self._conn.execute("SELECT COALESCE(MAX(revision), 0) FROM changes").fetchone()
        return int(row[0])

    def log_id(self) -> str:
        row = self._conn.execute("SELECT log_id FROM change_log_meta WHERE id = 1").fetchone()
        return str(row[0]) if row else ""


class SqliteUnitOfWork:
    """The repositories bound to one connection and transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.appended: list[int] = []
        self.keys = SqlKeys(conn)
        self.audit = SqlAudit(conn)
        self.changes = SqliteChanges(conn, self.appended)
        self.oauth = SqlOAuthRepositories(conn)
        self.webhooks = SqlWebhooks(conn)
        self.usage = SqlUsage(conn)
        self.conn = conn


class SqliteStore:
    """The embedded default store."""

    def __init__(self, path: Path, *, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._listeners = CommitListeners()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate()

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False, timeout=30
                )
            except sqlite3.Error as exc:
                raise Unavailable(f"store unavailable: {exc}") from exc
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _migrate(self) -> None:
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)"
            )
            applied = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            for version, sql in migrations.load("sqlite"):
                if version in applied:
                    continue
                for statement in migrations.statements(sql):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))
            link_unchained(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextmanager
    def transaction(self) -> Iterator[SqliteUnitOfWork]:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise Unavailable(f"store unavailable: {exc}") from exc
        uow = SqliteUnitOfWork(conn)
        try:
            yield uow
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self._rollback(conn)
            raise Unavailable(f"store unavailable: {exc}") from exc
        except BaseException:
            self._rollback(conn)
            raise
        if uow.appended:
            self._listeners.notify(max(uow.appended))

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    @contextmanager
    def read(self) -> Iterator[SqliteUnitOfWork]:
        conn = self._connect()
        conn.execute("BEGIN")
        try:
            yield SqliteUnitOfWork(conn)
        except sqlite3.OperationalError as exc:
            raise Unavailable(f"store unavailable: {exc}") from exc
        finally:
            self._rollback(conn)

    def subscribe(self, callback: Callable[[int], None]) -> Callable[[], None]:
        return self._listeners.subscribe(callback)

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
        self._local = threading.local()
