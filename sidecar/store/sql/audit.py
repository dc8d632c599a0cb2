"""AuditRepository over SQLite: append links each record into its workspace's hash chain inside
the caller's transaction (writes are serialised by ``BEGIN IMMEDIATE``, so the head read here is
the head the record is appended after). A batch is looked up with one statement and inserted
with a few multi-row statements; each workspace's head is read once per batch."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from sidecar.core import audit_native
from sidecar.core.audit import AuditEvent, AuditQuery, scrub
from sidecar.core.audit_batch import PreparedBatch, linked_rows
from sidecar.core.audit_chain import (
    ChainedRecord,
    Checkpoint,
    Link,
    SignedHeads,
    next_link,
)
from sidecar.core.storage import IdAlreadyStored
from sidecar.store.sql.qmark import Executes

_COLUMNS = (
    "seq, id, time, actor, action, workspace, target, outcome, reason, request_id, metadata, "
    "chain_seq, prev_digest, digest"
)

# SQLite only (PostgreSQL's repository writes with COPY). OR ROLLBACK: a constraint that fails
# rolls the whole transaction back, which the store's transaction does on any error anyway;
# it spares SQLite the statement journal a plain multi-row INSERT keeps (every page the
# statement dirties copied first, so a failure at row 200 could undo rows 1-199 alone).
_INSERT = (
    "INSERT OR ROLLBACK INTO audit_events (id, time, actor, action, workspace, target, outcome, "
    "reason, request_id, metadata, chain_seq, prev_digest, digest) VALUES "
)
_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
# Rows per INSERT statement, largest first. One statement inserting many rows keeps SQLite's
# cursors at the end of the table and of each index from one row to the next, where
# ``executemany`` of a one-row statement pays a reset and a descent into all six B-trees per
# row: 7.7 -> 5.0 us per row in process (docs/performance.md). A message's 500 records are two
# statements of 250 (3,250 parameters: SQLite's limit is 32,766 since 3.32, 999 before); what
# is left after a refusal goes 25 rows, then one row, at a time. A fixed set of texts, each
# prepared once per connection (the sqlite3 module's statement cache).
_ROWS_PER_INSERT = (250 if sqlite3.sqlite_version_info >= (3, 32) else 64, 25, 1)
_INSERTS = tuple((n, _INSERT + ", ".join([_ROW] * n)) for n in _ROWS_PER_INSERT)
# What SQLite says when a row's id is stored already (the UNIQUE index on id).
_ID_TAKEN = "UNIQUE constraint failed: audit_events.id"


# Every workspace with records or a retention checkpoint. The distinct names of audit_events
# are found by one index probe each (the next name after the last), not by reading every row:
# verify, retention and the periodic head signing all start here.
_WORKSPACES = (
    "WITH RECURSIVE w(name) AS ("
    "SELECT MIN(workspace) FROM audit_events UNION ALL "
    "SELECT (SELECT MIN(workspace) FROM audit_events WHERE workspace > w.name) "
    "FROM w WHERE w.name IS NOT NULL) "
    "SELECT name FROM w WHERE name IS NOT NULL "
    "UNION SELECT workspace FROM audit_checkpoints ORDER BY 1"
)


def _record(row: tuple[Any, ...]) -> ChainedRecord:
    seq, eid, time, actor, action, ws, target, outcome, reason, rid, meta, cseq, prev, dig = row
    ev = AuditEvent(
        id=str(eid),
        time=float(time),
        actor=str(actor),
        action=str(action),
        workspace=str(ws),
        target=str(target),
        outcome=str(outcome),
        reason=str(reason),
        request_id=str(rid),
        metadata=json.loads(str(meta)),
    )
    return ChainedRecord(ev, int(seq), Link(int(cseq), str(prev), str(dig)))


def _where(query: AuditQuery) -> tuple[list[str], list[object]]:
    where: list[str] = []
    args: list[object] = []
    if query.workspaces is not None:
        where.append(f"workspace IN ({', '.join('?' * len(query.workspaces))})")
        args.extend(sorted(query.workspaces))
    for column, value in (("action", query.action), ("actor", query.actor)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if query.since is not None:
        where.append("time >= ?")
        args.append(query.since)
    if query.until is not None:
        where.append("time < ?")
        args.append(query.until)
    return where, args


class SqlAudit:
    """AuditRepository over one connection (PostgreSQL's too, through ``QmarkConnection``)."""

    def __init__(self, conn: Executes) -> None:
        self._conn = conn

    def append(self, event: AuditEvent) -> bool:
        if self.get_many([event.id]):
            return False
        self.append_new([event])
        return True

    def append_new(self, events: Sequence[AuditEvent]) -> None:
        """Scrub, link and insert ``events``, whose ids are not stored (the caller looked them
        up in this transaction): one head read per workspace, each record hashed once, one
        ``executemany`` (see ``AuditRepository.append_new``)."""
        scrubbed = [scrub(event) for event in events]
        heads = self._heads(ev.workspace for ev in scrubbed)
        if scrubbed:
            self._insert(linked_rows(scrubbed, heads))

    def append_batch(self, batch: PreparedBatch, indices: Sequence[int]) -> None:
        """Link and insert the records of ``batch`` at ``indices`` (ids not stored, as for
        ``append_new``): its rows come linked from the batch, the compiled step's or Python's."""
        if indices:
            heads = self._heads(batch.workspaces(indices))
            self._insert(batch.rows(indices, heads))

    def _heads(self, workspaces: Iterable[str]) -> dict[str, Link | None]:
        """Each workspace's chain head, read once."""
        heads: dict[str, Link | None] = {}
        for workspace in workspaces:
            if workspace not in heads:
                heads[workspace] = self.head(workspace)
        return heads

    def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        """``rows`` in order, as few statements as ``_INSERTS`` allow. A stored id raises
        ``IdAlreadyStored``, the transaction rolled back (``OR ROLLBACK``)."""
        try:
            self._insert_rows(rows)
        except sqlite3.IntegrityError as exc:
            if str(exc) == _ID_TAKEN:
                raise IdAlreadyStored from None
            raise

    def _insert_rows(self, rows: list[tuple[Any, ...]]) -> None:
        at = 0
        for size, sql in _INSERTS:
            end = at + (len(rows) - at) // size * size
            if end == at:
                continue
            if size == 1:
                self._conn.executemany(sql, rows[at:end])
            else:
                self._conn.executemany(sql, audit_native.flat(rows[at:end], size))
            at = end

    def get_many(self, event_ids: Collection[str]) -> dict[str, AuditEvent]:
        found: dict[str, AuditEvent] = {}
        for params in self._id_params(event_ids):
            rows = self._conn.execute(self._GET_MANY, params).fetchall()
            found.update((str(r[1]), _record(r).event) for r in rows)
        return found

    # Ids looked up per statement, as a fixed-length IN list padded with NULL (which matches
    # nothing): one statement text whatever the count (statement caches key on the text).
    # 0.51 -> 0.36 us per id against a JSON array expanded by json_each, at 150,000 rows.
    _IDS_PER_LOOKUP = 500
    _GET_MANY = (
        f"SELECT {_COLUMNS} FROM audit_events WHERE id IN ({', '.join('?' * _IDS_PER_LOOKUP)})"
    )

    def _id_params(self, event_ids: Collection[str]) -> list[tuple[object, ...]]:
        ids, n = list(event_ids), self._IDS_PER_LOOKUP
        return [(*ids[at : at + n], *[None] * (at + n - len(ids))) for at in range(0, len(ids), n)]

    def get(self, event_id: str) -> AuditEvent | None:
        row = self._conn.execute(
            f"SELECT {_COLUMNS} FROM audit_events WHERE id = ?", (event_id,)
        ).fetchone()
        return None if row is None else _record(row).event

    def recent(self, limit: int) -> list[AuditEvent]:
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM audit_events ORDER BY seq DESC LIMIT ?", (limit,)
        ).fetchall()
        return [_record(r).event for r in rows]

    def page(
        self, query: AuditQuery, limit: int, before: tuple[float, int] | None
    ) -> list[ChainedRecord]:
        where, args = _where(query)
        if before is not None:
            where.append("(time, seq) < (?, ?)")
            args.extend(before)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM audit_events {clause} ORDER BY time DESC, seq DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [_record(r) for r in rows]

    def after(self, seq: int, query: AuditQuery, limit: int) -> list[ChainedRecord]:
        where, args = _where(query)
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM audit_events WHERE {' AND '.join(['seq > ?', *where])} "
            "ORDER BY seq LIMIT ?",
            (seq, *args, limit),
        ).fetchall()
        return [_record(r) for r in rows]

    def last_seq(self) -> int:
        row = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM audit_events").fetchone()
        return int(row[0])

    def head(self, workspace: str) -> Link | None:
        row = self._conn.execute(
            "SELECT chain_seq, prev_digest, digest FROM audit_events "
            "WHERE workspace = ? AND chain_seq > 0 ORDER BY chain_seq DESC LIMIT 1",
            (workspace,),
        ).fetchone()
        if row is not None:
            return Link(int(row[0]), str(row[1]), str(row[2]))
        cp = self.checkpoint(workspace)
        return Link(cp.chain_seq, "", cp.digest) if cp else None

    def chain(self, workspace: str, after_chain_seq: int, limit: int) -> list[ChainedRecord]:
        rows = self._conn.execute(
            # chain_seq > 0 (every linked row's) lets the partial chain index serve a walk that
            # resumes after a position: ``chain_seq > ?`` alone does not imply it, and SQLite
            # then read and sorted the workspace's whole trail for every batch of a verify.
            f"SELECT {_COLUMNS} FROM audit_events WHERE workspace = ? AND chain_seq > 0 "
            "AND chain_seq > ? ORDER BY chain_seq LIMIT ?",
            (workspace, after_chain_seq, limit),
        ).fetchall()
        return [_record(r) for r in rows]

    def workspaces(self) -> list[str]:
        rows = self._conn.execute(_WORKSPACES).fetchall()
        return [str(r[0]) for r in rows]

    def checkpoint(self, workspace: str) -> Checkpoint | None:
        row = self._conn.execute(
            "SELECT workspace, chain_seq, digest, time, signature FROM audit_checkpoints "
            "WHERE workspace = ? ORDER BY chain_seq DESC LIMIT 1",
            (workspace,),
        ).fetchone()
        if row is None:
            return None
        return Checkpoint(str(row[0]), int(row[1]), str(row[2]), float(row[3]), str(row[4]))

    def prune_point(self, workspace: str, before: float) -> Link | None:
        # The first record of the chain not older than ``before``, walking the chain from its
        # start: it reads what is about to be pruned, where MIN(chain_seq) over the time index
        # read every record kept.
        row = self._conn.execute(
            "SELECT chain_seq FROM audit_events WHERE workspace = ? AND chain_seq > 0 "
            "AND time >= ? ORDER BY chain_seq LIMIT 1",
            (workspace, before),
        ).fetchone()
        newer = row[0] if row else None
        bound = "chain_seq < ?" if newer is not None else "chain_seq <= ?"
        row = self._conn.execute(
            "SELECT chain_seq, prev_digest, digest FROM audit_events "
            f"WHERE workspace = ? AND chain_seq > 0 AND {bound} ORDER BY chain_seq DESC LIMIT 1",
            (workspace, newer if newer is not None else 2**62),
        ).fetchone()
        return Link(int(row[0]), str(row[1]), str(row[2])) if row else None

    def latest_signed_heads(self) -> SignedHeads | None:
        row = self._conn.execute(
            "SELECT body, signature FROM audit_signed_heads ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        return None if row is None else SignedHeads(str(row[0]), str(row[1]))

    def add_signed_heads(self, signed: SignedHeads) -> None:
        self._conn.execute(
            "INSERT INTO audit_signed_heads (body, signature) VALUES (?, ?)",
            (signed.body, signed.signature),
        )

    def prune(self, checkpoint: Checkpoint) -> int:
        self._conn.execute(
            "INSERT INTO audit_checkpoints (workspace, chain_seq, digest, time, signature) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                checkpoint.workspace,
                checkpoint.chain_seq,
                checkpoint.digest,
                checkpoint.time,
                checkpoint.signature,
            ),
        )
        cursor = self._conn.execute(
            # chain_seq > 0 (every stored row's) lets the partial chain index find them.
            "DELETE FROM audit_events WHERE workspace = ? AND chain_seq > 0 AND chain_seq <= ?",
            (checkpoint.workspace, checkpoint.chain_seq),
        )
        return int(cursor.rowcount)


def link_unchained(conn: Executes) -> int:
    """Link rows stored before the chain existed (chain_seq 0), in storage order; run inside
    the migration transaction. Returns how many rows it linked."""
    audit = SqlAudit(conn)
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM audit_events WHERE chain_seq = 0 ORDER BY seq"
    ).fetchall()
    for row in rows:
        ev = _record(row).event
        link = next_link(ev, audit.head(ev.workspace))
        conn.execute(
            "UPDATE audit_events SET chain_seq = ?, prev_digest = ?, digest = ? WHERE seq = ?",
            (link.chain_seq, link.prev_digest, link.digest, row[0]),
        )
    return len(rows)
