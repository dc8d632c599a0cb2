"""WebhookRepository over ``Executes`` (SQLite, and PostgreSQL through ``QmarkConnection``)."""

from __future__ import annotations

from typing import Any

from sidecar.core.webhooks import Delivery, Webhook
from sidecar.store.sql.qmark import Executes

_HOOK = "id, workspace, url, events, sealed_secret, created_at, created_by, deleted_at"
_DELIVERY = (
    "id, webhook_id, event, body, created_at, status, attempts, next_attempt_at, last_error, "
    "delivered_at"
)


def _hook(row: Any) -> Webhook:
    return Webhook(
        id=row[0],
        workspace=row[1],
        url=row[2],
        events=frozenset(row[3].split()),
        sealed_secret=bytes.fromhex(row[4]),
        created_at=row[5],
        created_by=row[6],
        deleted_at=row[7],
    )


def _delivery(row: Any) -> Delivery:
    return Delivery(*row)


class SqlWebhooks:
    """Webhooks and their outbox of deliveries."""

    def __init__(self, conn: Executes) -> None:
        self._conn = conn

    def insert(self, hook: Webhook) -> None:
        self._conn.execute(
            f"INSERT INTO webhooks ({_HOOK}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                hook.id,
                hook.workspace,
                hook.url,
                " ".join(sorted(hook.events)),
                hook.sealed_secret.hex(),
                hook.created_at,
                hook.created_by,
                hook.deleted_at,
            ),
        )

    def update(self, hook: Webhook) -> None:
        self._conn.execute(
            "UPDATE webhooks SET url = ?, events = ?, sealed_secret = ?, deleted_at = ? "
            "WHERE id = ?",
            (
                hook.url,
                " ".join(sorted(hook.events)),
                hook.sealed_secret.hex(),
                hook.deleted_at,
                hook.id,
            ),
        )

    def get(self, webhook_id: str) -> Webhook | None:
        row = self._conn.execute(
            f"SELECT {_HOOK} FROM webhooks WHERE id = ?", (webhook_id,)
        ).fetchone()
        return _hook(row) if row else None

    def of_workspace(self, workspace: str) -> list[Webhook]:
        rows = self._conn.execute(
            f"SELECT {_HOOK} FROM webhooks WHERE workspace = ? AND deleted_at IS NULL "
            "ORDER BY created_at, id",
            (workspace,),
        ).fetchall()
        return [_hook(r) for r in rows]

    def all(self) -> list[Webhook]:
        rows = self._conn.execute(f"SELECT {_HOOK} FROM webhooks ORDER BY created_at, id")
        return [_hook(r) for r in rows.fetchall()]

    def enqueue(self, delivery: Delivery) -> None:
        d = delivery
        self._conn.execute(
            f"INSERT INTO webhook_deliveries ({_DELIVERY}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                d.id,
                d.webhook_id,
                d.event,
                d.body,
                d.created_at,
                d.status,
                d.attempts,
                d.next_attempt_at,
                d.last_error,
                d.delivered_at,
            ),
        )

    def due(self, now: int, limit: int) -> list[Delivery]:
        rows = self._conn.execute(
            f"SELECT {_DELIVERY} FROM webhook_deliveries WHERE status = 'pending' "
            "AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?",
            (now, limit),
        ).fetchall()
        return [_delivery(r) for r in rows]

    def record_attempt(self, delivery: Delivery) -> None:
        d = delivery
        self._conn.execute(
            "UPDATE webhook_deliveries SET status = ?, attempts = ?, next_attempt_at = ?, "
            "last_error = ?, delivered_at = ? WHERE id = ?",
            (d.status, d.attempts, d.next_attempt_at, d.last_error, d.delivered_at, d.id),
        )

    def recent_deliveries(self, webhook_id: str, limit: int) -> list[Delivery]:
        rows = self._conn.execute(
            f"SELECT {_DELIVERY} FROM webhook_deliveries WHERE webhook_id = ? "
            "ORDER BY created_at DESC, id DESC LIMIT ?",
            (webhook_id, limit),
        ).fetchall()
        return [_delivery(r) for r in rows]
