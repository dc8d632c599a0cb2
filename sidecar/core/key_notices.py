"""What the control plane tells about keys on its own: the audit events of its sweep
(``key.expired``, ``key.expiring``, ``key.rotation_due``, grace-period revocations, the
bootstrap key) and the webhook deliveries about keys. ``key.expiring`` and
``key.rotation_due`` are recorded once per key (flags on the key)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from sidecar.core import webhooks
from sidecar.core.audit import event
from sidecar.core.models import ApiKey

if TYPE_CHECKING:
    from sidecar.core.storage import UnitOfWork

SYSTEM_ACTOR = "system"


def record(uow: UnitOfWork, now: int, warning: int) -> int:
    """Record, once per key, that it entered the expiry warning window of ``warning`` seconds
    and that its rotation is due; returns how many keys were noticed."""
    due = uow.keys.due_for_notice(now, now + warning)
    for key in due:
        updated = key
        if not key.expiry_warned and key.expires_at <= now + warning:
            updated = replace(updated, expiry_warned=True)
            system_event(uow, now, "key.expiring", key, "", {"expires_at": str(key.expires_at)})
            notify(uow, now, webhooks.KEY_EXPIRING, key)
        rotation_at = key.rotation_due_at
        if (
            not key.rotation_due_recorded
            and not key.replaced_by
            and rotation_at is not None
            and rotation_at <= now
        ):
            updated = replace(updated, rotation_due_recorded=True)
            meta = {"rotation_due_at": str(rotation_at)}
            system_event(uow, now, "key.rotation_due", key, "", meta)
            notify(uow, now, webhooks.KEY_ROTATION_DUE, key)
        uow.keys.update(updated)
    return len(due)


def notify(uow: UnitOfWork, now: float, event_type: str, key: ApiKey, reason: str = "") -> None:
    """Queue a webhook delivery about ``key`` (in the transaction of the change)."""
    data: dict[str, object] = {
        "key_id": key.id,
        "name": key.name,
        "expires_at": key.expires_at,
        "replaced_by": key.replaced_by or None,
    }
    if reason:
        data["reason"] = reason
    if key.rotation_due_at is not None:
        data["rotation_due_at"] = key.rotation_due_at
    webhooks.emit(uow, now, key.workspace, event_type, data)


def system_event(
    uow: UnitOfWork,
    now: float,
    action: str,
    key: ApiKey,
    reason: str,
    metadata: dict[str, str] | None = None,
) -> None:
    """An audit record of something the control plane did by itself (actor ``system``)."""
    uow.audit.append(
        event(now, SYSTEM_ACTOR, action, key.workspace, key.id, reason=reason, metadata=metadata)
    )
