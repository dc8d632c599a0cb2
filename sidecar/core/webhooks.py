"""Per-workspace webhooks: registrations and the durable outbox of deliveries.

``emit(uow, …)`` is called by the use cases inside the transaction of the change it reports
(a key revoked, entering its expiry window, due for rotation; a refresh token reused; a member
disabled), so a delivery exists if and only if the change committed. The delivery loop
(``sidecar.webhooks.delivery``) sends each at least once, signed, retried with capped backoff.

A webhook's signing secret is shown once at creation and stored sealed (``Sealer``: AES-GCM
under the key-encryption keys the control plane keeps outside the database, bound to the
webhook's id), because signing needs the secret itself; a stolen database alone cannot forge
deliveries."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from sidecar.core import keyformat, permissions
from sidecar.core.audit import acted
from sidecar.core.clock import Clock
from sidecar.core.errors import InvalidArgument, NotFound
from sidecar.core.models import OPERATOR_WORKSPACE, RequestContext
from sidecar.core.oauth_models import Member
from sidecar.core.scopes import KEYS_MANAGE
from sidecar.core.validation import workspace as valid_workspace

if TYPE_CHECKING:
    from sidecar.core.storage import Store, UnitOfWork

KEY_EXPIRING = "key.expiring"
KEY_REVOKED = "key.revoked"
KEY_ROTATION_DUE = "key.rotation_due"
REFRESH_TOKEN_REUSE = "oauth.refresh_token_reuse"  # noqa: S105 (an event name)
MEMBER_DISABLED = "member.disabled"
TEST = "webhook.test"
EVENTS = (KEY_EXPIRING, KEY_REVOKED, KEY_ROTATION_DUE, REFRESH_TOKEN_REUSE, MEMBER_DISABLED)
MAX_WEBHOOKS_PER_WORKSPACE = 20
MAX_URL = 2000
SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix)


class Sealer(Protocol):
    """Encrypts secrets at rest (``seal``) and opens them to sign (``open``, ValueError when it
    cannot); ``context`` (``webhook:<id>``) binds a sealed secret to its row."""

    def seal(self, plaintext: bytes, context: str) -> bytes: ...

    def open(self, sealed: bytes, context: str) -> bytes: ...

    def is_current(self, sealed: bytes) -> bool: ...


def sealing_context(webhook_id: str) -> str:
    """The associated data a webhook's secret is sealed with."""
    return f"webhook:{webhook_id}"


@dataclass(frozen=True, slots=True)
class Webhook:
    id: str
    workspace: str
    url: str
    events: frozenset[str]
    sealed_secret: bytes
    created_at: int
    created_by: str
    deleted_at: int | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event for one webhook. ``status``: pending, delivered or failed (gave up)."""

    id: str
    webhook_id: str
    event: str
    body: str
    created_at: int
    status: str = "pending"
    attempts: int = 0
    next_attempt_at: int = 0
    last_error: str = ""
    delivered_at: int | None = None


def emit(uow: UnitOfWork, now: float, workspace: str, event: str, data: dict[str, object]) -> int:
    """Queue ``event`` for every webhook of ``workspace`` subscribed to it, in the current
    transaction; returns how many deliveries were queued."""
    queued = 0
    for hook in uow.webhooks.of_workspace(workspace):
        if event not in hook.events and event != TEST:
            continue
        uow.webhooks.enqueue(_delivery(hook, event, workspace, data, int(now)))
        queued += 1
    return queued


def member_disabled(uow: UnitOfWork, now: float, member: Member) -> int:
    """The hook for the member-disabling use case (issue 14): call it in the transaction that
    disables ``member``, so the ``member.disabled`` delivery exists exactly when that commits."""
    data: dict[str, object] = {"user_id": member.id, "email": member.email}
    return emit(uow, now, member.workspace, MEMBER_DISABLED, data)


def _delivery(
    hook: Webhook, event: str, workspace: str, data: dict[str, object], now: int
) -> Delivery:
    delivery_id = keyformat.mint_id("whd_")
    body = json.dumps(
        {"id": delivery_id, "type": event, "workspace": workspace, "created_at": now, "data": data},
        sort_keys=True,
        separators=(",", ":"),
    )
    return Delivery(delivery_id, hook.id, event, body, now, next_attempt_at=now)


def check_url(url: str) -> str:
    """An absolute http(s) URL without credentials. Where it may point (https only, no private
    addresses) is decided at delivery time, against the control plane's settings."""
    url = url.strip()
    parts = urlsplit(url)
    if len(url) > MAX_URL or parts.scheme not in ("https", "http") or not parts.hostname:
        raise InvalidArgument("url", "must be an absolute http(s) URL of at most 2000 characters")
    if parts.username or parts.password:
        raise InvalidArgument("url", "must not carry credentials")
    return url


def check_events(events: list[str]) -> frozenset[str]:
    unknown = sorted(set(events) - set(EVENTS))
    if unknown or not events:
        raise InvalidArgument("events", f"use one or more of {', '.join(EVENTS)}")
    return frozenset(events)


class WebhookService:
    """Registering, listing, removing and testing a workspace's webhooks (``keys:manage``)."""

    def __init__(self, store: Store, clock: Clock, sealer: Sealer) -> None:
        self._store = store
        self._clock = clock
        self._sealer = sealer

    def add(
        self, ctx: RequestContext, *, workspace: str, url: str, events: list[str]
    ) -> tuple[Webhook, str]:
        """Register a webhook; returns it and its signing secret (shown this once)."""
        if workspace != OPERATOR_WORKSPACE:
            valid_workspace(workspace)
        permissions.require(ctx.principal, workspace, KEYS_MANAGE)
        url, wanted = check_url(url), check_events(events)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        now = int(self._clock.now())
        hook_id = keyformat.mint_id("whk_")
        hook = Webhook(
            hook_id,
            workspace,
            url,
            wanted,
            self._sealer.seal(secret.encode(), sealing_context(hook_id)),
            now,
            ctx.principal.key_id,
        )
        with self._store.transaction() as uow:
            if len(uow.webhooks.of_workspace(workspace)) >= MAX_WEBHOOKS_PER_WORKSPACE:
                raise InvalidArgument("workspace", f"at most {MAX_WEBHOOKS_PER_WORKSPACE} webhooks")
            uow.webhooks.insert(hook)
            self._audit(uow, ctx, "webhook.created", hook)
        return hook, secret

    def rewrap(self) -> tuple[int, int]:
        """Re-seal every secret not under the newest key-encryption key (after a KEK rotation,
        or sealed by the pre-KEK webhook key). Returns (re-sealed, unopened): a secret no
        configured key opens is left as it is (its deliveries fail, saying why)."""
        changed = unopened = 0
        with self._store.transaction() as uow:
            for hook in uow.webhooks.all():
                if self._sealer.is_current(hook.sealed_secret):
                    continue
                context = sealing_context(hook.id)
                try:
                    secret = self._sealer.open(hook.sealed_secret, context)
                except ValueError:
                    unopened += 1
                    continue
                uow.webhooks.update(replace(hook, sealed_secret=self._sealer.seal(secret, context)))
                changed += 1
        return changed, unopened

    def in_workspace(self, ctx: RequestContext, workspace: str) -> list[Webhook]:
        permissions.require(ctx.principal, workspace, KEYS_MANAGE)
        with self._store.read() as uow:
            return uow.webhooks.of_workspace(workspace)

    def remove(self, ctx: RequestContext, webhook_id: str) -> Webhook:
        with self._store.transaction() as uow:
            hook = self._load(uow, ctx, webhook_id)
            removed = replace(hook, deleted_at=int(self._clock.now()))
            uow.webhooks.update(removed)
            self._audit(uow, ctx, "webhook.deleted", hook)
        return removed

    def test(self, ctx: RequestContext, webhook_id: str) -> Delivery:
        """Queue a ``webhook.test`` delivery to one webhook."""
        with self._store.transaction() as uow:
            hook = self._load(uow, ctx, webhook_id)
            delivery = _delivery(
                hook, TEST, hook.workspace, {"webhook_id": hook.id}, int(self._clock.now())
            )
            uow.webhooks.enqueue(delivery)
        return delivery

    def deliveries(self, ctx: RequestContext, webhook_id: str, limit: int = 20) -> list[Delivery]:
        with self._store.read() as uow:
            self._load(uow, ctx, webhook_id)
            return uow.webhooks.recent_deliveries(webhook_id, limit)

    def _load(self, uow: UnitOfWork, ctx: RequestContext, webhook_id: str) -> Webhook:
        hook = uow.webhooks.get(webhook_id) if webhook_id else None
        # Another workspace's webhook is "not found" (``permissions.visible``).
        if (
            hook is None
            or hook.deleted_at is not None
            or not permissions.visible(ctx.principal, hook.workspace)
        ):
            raise NotFound(f"no webhook with id {webhook_id[:64]!r}")
        permissions.require(ctx.principal, hook.workspace, KEYS_MANAGE)
        return hook

    def _audit(self, uow: UnitOfWork, ctx: RequestContext, action: str, hook: Webhook) -> None:
        about = {"url": hook.url, "events": " ".join(sorted(hook.events))}
        uow.audit.append(
            acted(ctx, self._clock.now(), action, hook.workspace, hook.id, metadata=about)
        )
