"""Audit log: filter by action, actor and time, newest first, one page at a time; export the
matching records as JSON lines (the shape ``spauth audit`` prints, docs/audit.md)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from starlette.responses import Response, StreamingResponse

from sidecar.core.audit import AuditQuery
from sidecar.core.audit_chain import ChainedRecord
from sidecar.core.audit_trail import AuditTrail
from sidecar.core.errors import InvalidArgument
from sidecar.core.users import UserService
from sidecar.http.console import render
from sidecar.http.console.visit import Visit

_TIME_FORMATS = ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d")


def parse_time(value: str, field: str) -> float | None:
    """A ``datetime-local`` input value (or a date), read as UTC; empty means not given."""
    if not value:
        return None
    for fmt in _TIME_FORMATS:
        try:
            return datetime.strptime(value, fmt).replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
    raise InvalidArgument(field, "use YYYY-MM-DDTHH:MM (UTC)")


def record_json(rec: ChainedRecord) -> dict[str, object]:
    """A record as one JSON line of the export."""
    ev = rec.event
    moment = datetime.fromtimestamp(ev.time, UTC)
    return {
        "id": ev.id,
        "time": moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor": ev.actor,
        "action": ev.action,
        "workspace": ev.workspace,
        "target": ev.target,
        "outcome": ev.outcome,
        "reason": ev.reason,
        "request_id": ev.request_id,
        "metadata": dict(sorted(ev.metadata.items())),
        "cursor": str(rec.seq),
        "chain_seq": rec.link.chain_seq,
        "prev_digest": rec.link.prev_digest,
        "digest": rec.link.digest,
    }


class AuditPages:
    """The audit log of the member's workspace (needs admin:full, checked by the trail)."""

    def __init__(self, trail: AuditTrail, users: UserService) -> None:
        self._trail = trail
        self._users = users

    def _query(self, visit: Visit) -> AuditQuery:
        return self._trail.query(
            visit.ctx,
            workspace=visit.workspace,
            action=visit.query("action").strip(),
            actor=visit.query("actor").strip(),
            since=parse_time(visit.query("since"), "since"),
            until=parse_time(visit.query("until"), "until"),
        )

    async def list(self, visit: Visit) -> Response:
        query = self._query(visit)
        page = await asyncio.to_thread(
            self._trail.page, query, page_token=visit.query("page_token")
        )
        members = await asyncio.to_thread(self._users.list, visit.ctx, workspace=visit.workspace)
        filters = {k: visit.query(k) for k in ("action", "actor", "since", "until")}
        return visit.render(
            "audit.html",
            records=page.items,
            next_token=page.next_token,
            filters=filters,
            emails={m.id: m.email for m in members},
        )

    async def export(self, visit: Visit) -> Response:
        query = self._query(visit)
        end = await asyncio.to_thread(self._trail.end)
        headers = {
            **render.PAGE_HEADERS,
            "Content-Disposition": f'attachment; filename="audit-{visit.workspace}.jsonl"',
        }
        return StreamingResponse(
            self._lines(query, end), media_type="application/x-ndjson", headers=headers
        )

    async def _lines(self, query: AuditQuery, end: int) -> AsyncIterator[str]:
        """Every matching record stored when the export started, in storage order."""
        cursor = 0
        while cursor < end:
            found, scanned = await asyncio.to_thread(self._trail.after, query, cursor)
            for rec in found:
                if rec.seq > end:
                    return
                yield json.dumps(record_json(rec)) + "\n"
            if scanned <= cursor:
                return
            cursor = scanned
