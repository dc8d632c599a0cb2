"""Audit events as spool payloads: compact JSON arrays (field order fixed, version first)."""

from __future__ import annotations

import json

from sidecar.core.audit import AuditEvent

VERSION = 1


def encode(ev: AuditEvent) -> bytes:
    """The spool payload of an event."""
    return json.dumps(
        [
            VERSION,
            ev.id,
            ev.time,
            ev.actor,
            ev.action,
            ev.workspace,
            ev.target,
            ev.outcome,
            ev.reason,
            ev.request_id,
            ev.metadata,
        ],
        separators=(",", ":"),
    ).encode()


def decode(payload: bytes) -> AuditEvent:
    """An event from a spool payload; ValueError when it is not one."""
    try:
        version, eid, time, actor, action, ws, target, outcome, reason, rid, meta = json.loads(
            payload
        )
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an audit spool record: {exc}") from None
    if version != VERSION:
        raise ValueError(f"unknown audit spool record version {version!r}")
    return AuditEvent(
        id=eid,
        time=float(time),
        actor=actor,
        action=action,
        workspace=ws,
        target=target,
        outcome=outcome,
        reason=reason,
        request_id=rid,
        metadata=dict(meta),
    )
