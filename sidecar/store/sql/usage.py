"""UsageRepository over ``Executes`` (SQLite, and PostgreSQL through ``QmarkConnection``): the
upserts are ``INSERT … ON CONFLICT … DO UPDATE``, which both dialects speak."""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.core.usage import CredentialUse
from sidecar.store.sql.qmark import Executes


class SqlUsage:
    """Daily counts, last use per credential, and the report ids already counted."""

    def __init__(self, conn: Executes) -> None:
        self._conn = conn

    def record(self, report_id: str, uses: Sequence[CredentialUse], now: int) -> bool:
        cursor = self._conn.execute(
            "INSERT INTO usage_reports (id, received_at) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
            (report_id, now),
        )
        if cursor.rowcount == 0:
            return False
        for use in uses:
            self._conn.execute(
                "INSERT INTO credential_uses_daily (credential_id, day, uses) VALUES (?, ?, ?) "
                "ON CONFLICT (credential_id, day) "
                "DO UPDATE SET uses = credential_uses_daily.uses + excluded.uses",
                (use.credential_id, use.day, use.uses),
            )
            # Reports may arrive out of order (a resend after a newer one): keep the latest.
            self._conn.execute(
                "INSERT INTO credential_last_use (credential_id, kind, last_used_at) "
                "VALUES (?, ?, ?) ON CONFLICT (credential_id) DO UPDATE SET last_used_at = "
                "CASE WHEN excluded.last_used_at > credential_last_use.last_used_at "
                "THEN excluded.last_used_at ELSE credential_last_use.last_used_at END",
                (use.credential_id, use.kind.value, use.last_used_at),
            )
        return True

    def last_used(self, credential_ids: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        ids = list(credential_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            rows = self._conn.execute(
                "SELECT credential_id, last_used_at FROM credential_last_use "
                f"WHERE credential_id IN ({marks})",
                chunk,
            ).fetchall()
            found.update((str(r[0]), int(r[1])) for r in rows)
        return found

    def daily(self, credential_id: str, since_day: int) -> list[tuple[int, int]]:
        rows = self._conn.execute(
            "SELECT day, uses FROM credential_uses_daily WHERE credential_id = ? AND day >= ? "
            "ORDER BY day",
            (credential_id, since_day),
        ).fetchall()
        return [(int(r[0]), int(r[1])) for r in rows]

    def prune(self, before_day: int, reports_before: int) -> int:
        daily = self._conn.execute(
            "DELETE FROM credential_uses_daily WHERE day < ?", (before_day,)
        ).rowcount
        reports = self._conn.execute(
            "DELETE FROM usage_reports WHERE received_at < ?", (reports_before,)
        ).rowcount
        return int(daily) + int(reports)
