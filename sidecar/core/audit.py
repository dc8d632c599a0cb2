"""Audit events. Every issuance and revocation writes one, in the same transaction as the change
it records. Events carry ids and names, never a secret."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One record of the audit trail."""

    id: str
    time: float
    actor: str
    action: str
    workspace: str
    target: str
    outcome: str = "success"
    reason: str = ""
    request_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


def new_event_id() -> str:
    """A random, unique event id (de-duplication key for at-least-once delivery)."""
    return "evt_" + secrets.token_hex(12)


def event(
    time: float,
    actor: str,
    action: str,
    workspace: str,
    target: str,
    *,
    request_id: str = "",
    outcome: str = "success",
    reason: str = "",
    metadata: dict[str, str] | None = None,
) -> AuditEvent:
    """Build an event with a fresh id."""
    return AuditEvent(
        id=new_event_id(),
        time=time,
        actor=actor,
        action=action,
        workspace=workspace,
        target=target,
        outcome=outcome,
        reason=reason,
        request_id=request_id,
        metadata=metadata or {},
    )
