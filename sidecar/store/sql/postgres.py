"""PostgreSQL backend (psycopg 3, psycopg_pool): the same Protocols as SQLite, for several
control-plane replicas sharing one database.

Every write transaction first takes one transaction-scoped advisory lock, so writers commit one
at a time, as they do under SQLite's ``BEGIN IMMEDIATE``. That is what keeps the change log
gap-free in commit order: with a bare sequence, transaction A could take revision 5 and B
revision 6, B commit first, and a replica that resumes after 6 would never see 5. Under the lock,
B takes its revision only after A has committed (PostgreSQL releases an xact lock after the
commit is visible), so revision order is commit order, and so is the audit trail's storage order.
It also keeps the read-check-write use cases (single-use codes, refresh-token rotation, the audit
hash chain) correct across replicas without SERIALIZABLE retries. Reads take no lock: they run in
a REPEATABLE READ snapshot, which sees a prefix of the log and the tables as of that prefix.

Lost connections, a database that is down, lock and pool timeouts raise ``Unavailable``; the pool
checks each connection before handing it out and reconnects in the background, so the store
recovers by itself when the database comes back."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import pq
from psycopg_pool import ConnectionPool

from sidecar.core.errors import Unavailable
from sidecar.core.models import Change
from sidecar.store.sql import migrations
from sidecar.store.sql.audit import link_unchained

# The row mapping is shared with SQLite, so a new column is mapped in one place.
from sidecar.store.sql.listeners import CommitListeners
from sidecar.store.sql.postgres_audit import PgAudit
from sidecar.store.sql.postgres_oauth import PgOAuthRepositories
from sidecar.store.sql.qmark import QmarkConnection
from sidecar.store.sql.sqlite import SqlKeys
from sidecar.store.sql.usage import SqlUsage
from sidecar.store.sql.webhooks import SqlWebhooks

log = logging.getLogger("sidecar.store.postgres")

Conn = psycopg.Connection[Any]

# Advisory lock keys (any 64-bit numbers no other application on the database uses).
WRITER_LOCK = 0x7370_6175_7468_0001  # "spauth" + 1: one writer at a time
MIGRATION_LOCK = 0x7370_6175_7468_0002  # replicas starting together migrate once

# Per-session limits: a writer waiting longer than LOCK_TIMEOUT for the writer lock (or a row)
# gives up with Unavailable instead of hanging an admin call; a session that dies mid-transaction
# (a replica frozen or cut off) releases the writer lock after IDLE_IN_TRANSACTION_TIMEOUT.
LOCK_TIMEOUT_MS = 5000
IDLE_IN_TRANSACTION_TIMEOUT_MS = 30000


def is_postgres_url(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL database."""
    return url.startswith(("postgresql://", "postgres://"))


class PgKeys(SqlKeys):
    """KeyRepository over one PostgreSQL connection."""

    packing_profile = (
        "json_build_array(workspace, scopes, rate_limit, rate_period, client_cidrs, "
        "suspended_at IS NOT NULL)::text"
    )
    packing_order = "digest"
    expiring_group = "workspace"

    def __init__(self, conn: Conn) -> None:
        super().__init__(QmarkConnection(conn))


class PgChanges:
    """ChangeLog over one connection. Appends happen under the writer lock (see the module
    docstring), so a revision is taken only once every earlier one has committed."""

    def __init__(self, conn: Conn, appended: list[int]) -> None:
        self._conn = conn
        self._appended = appended

    def append(self, change: Change) -> int:
        row = self._conn.execute(
            "INSERT INTO changes (kind, subject, payload) VALUES (%s, %s, %s) RETURNING revision",
            (change.kind, change.subject, json.dumps(change.payload, sort_keys=True)),
        ).fetchone()
        assert row is not None
        revision = int(row[0])
        self._appended.append(revision)
        return revision

    def since(self, revision: int, limit: int) -> list[Change]:
        rows = self._conn.execute(
            "SELECT revision, kind, subject, payload FROM changes WHERE revision > %s "
            "ORDER BY revision LIMIT %s",
            (revision, limit),
        ).fetchall()
        return [Change(kind=k, subject=s, payload=json.loads(p), revision=r) for r, k, s, p in rows]

    def head(self) -> int:
        row = self._conn.execute("SELECT COALESCE(MAX(revision), 0) FROM changes").fetchone()
        return int(row[0]) if row else 0

    def log_id(self) -> str:
        row = self._conn.execute("SELECT log_id FROM change_log_meta WHERE id = 1").fetchone()
        return str(row[0]) if row else ""


class PgUnitOfWork:
    """The repositories bound to one connection and transaction."""

    def __init__(self, conn: Conn) -> None:
        self.appended: list[int] = []
        self.keys = PgKeys(conn)
        self.audit = PgAudit(conn)
        self.changes = PgChanges(conn, self.appended)
        self.oauth = PgOAuthRepositories(conn)
        self.webhooks = SqlWebhooks(QmarkConnection(conn))
        self.usage = SqlUsage(QmarkConnection(conn))
        self.conn = conn


def _configure(conn: Conn) -> None:
    """Session settings of every pooled connection (see LOCK_TIMEOUT_MS)."""
    conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
    conn.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_TIMEOUT_MS}")


class PostgresStore:
    """A pool of connections to one PostgreSQL database, shared by any number of replicas."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 3.0,
        connect_timeout: int = 3,
        reconnect_timeout: float = 5.0,
        startup_timeout: float = 0.0,
    ) -> None:
        self.url = url
        self._timeout = timeout
        self._listeners = CommitListeners()
        # check: a connection the server dropped (restart, failover) is replaced before use
        # rather than failing the call that drew it. reconnect_timeout: after that long without
        # the database the pool stops retrying in the background and shrinks; the next call
        # grows it again, so recovery never waits on a long exponential backoff.
        self._pool: ConnectionPool[Conn] = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            reconnect_timeout=reconnect_timeout,
            kwargs={
                "autocommit": True,
                "connect_timeout": connect_timeout,
                "application_name": "spauth",
                # A database that vanished without closing the connection (a partition, a host
                # that died) is noticed in seconds, not after the kernel's retransmission limit.
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
                "tcp_user_timeout": 15000,
            },
            configure=_configure,
            check=ConnectionPool.check_connection,
            open=False,
            name="spauth-store",
        )
        self._pool.open(wait=False)
        self._migrate_when_reachable(startup_timeout)

    # -- connections and errors ---------------------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[Conn]:
        try:
            conn = self._pool.getconn(self._timeout)
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc
        try:
            yield conn
        finally:
            _rollback(conn)
            self._pool.putconn(conn)

    def _migrate_when_reachable(self, startup_timeout: float) -> None:
        """Migrate, waiting up to ``startup_timeout`` seconds for the database to be reachable
        (a replica may start before its database); then Unavailable."""
        deadline = time.monotonic() + startup_timeout
        while True:
            try:
                self._migrate()
                return
            except Unavailable:
                if time.monotonic() >= deadline:
                    self._pool.close()
                    raise
                log.warning("waiting for the database")
                time.sleep(1.0)

    def _migrate(self) -> None:
        with self._connection() as conn, _translated(conn):
            conn.execute("BEGIN")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)"
            )
            applied = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            for version, sql in migrations.load("postgres"):
                if version in applied:
                    continue
                for statement in migrations.statements(sql):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                log.info("migrated", extra={"version": version})
            link_unchained(QmarkConnection(conn))
            _commit(conn)

    # -- the Store protocol -------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[PgUnitOfWork]:
        with self._connection() as conn:
            with _translated(conn):
                conn.execute("BEGIN")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITER_LOCK,))
            uow = PgUnitOfWork(conn)
            with _translated(conn):
                yield uow
                _commit(conn)
        if uow.appended:
            self._listeners.notify(max(uow.appended))

    @contextmanager
    def read(self) -> Iterator[PgUnitOfWork]:
        with self._connection() as conn, _translated(conn):
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield PgUnitOfWork(conn)

    def subscribe(self, callback: Callable[[int], None]) -> Callable[[], None]:
        return self._listeners.subscribe(callback)

    def close(self) -> None:
        self._pool.close()


@contextmanager
def _translated(conn: Conn) -> Iterator[None]:
    """Database faults become ``Unavailable`` (the operation did not take effect); other errors
    (constraint violations, bugs) pass through unchanged."""
    try:
        yield
    except psycopg.OperationalError as exc:
        raise _unavailable(exc) from exc
    except psycopg.Error as exc:
        if conn.broken or conn.closed:
            raise _unavailable(exc) from exc
        raise


def _unavailable(exc: psycopg.Error) -> Unavailable:
    # The driver's message names hosts, ports and users: logged here, never sent to a client.
    log.warning("database unavailable", extra={"error": str(exc).strip()})
    return Unavailable("store unavailable; try again")


def _commit(conn: Conn) -> None:
    # COMMIT of a transaction that failed part-way answers ROLLBACK without an error (a caller
    # swallowed a database error): report it rather than a success that did not happen.
    if conn.info.transaction_status == pq.TransactionStatus.INERROR:
        raise Unavailable("store transaction aborted; nothing was written")
    conn.execute("COMMIT")


def _rollback(conn: Conn) -> None:
    if conn.closed or conn.broken:
        return
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error:
            log.debug("rollback failed; the pool discards the connection")
