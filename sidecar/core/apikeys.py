"""API key lifecycle: create, list, get, create replacement, revoke, expire; and authentication
of a presented key. Every change writes its audit event and change-log entry in one transaction."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from sidecar.core import changes, key_notices, keyformat, permissions, validation, webhooks
from sidecar.core.audit import acted, event
from sidecar.core.clock import Clock
from sidecar.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from sidecar.core.models import (
    OPERATOR_WORKSPACE,
    ApiKey,
    Change,
    KeyState,
    Minted,
    Page,
    Principal,
    RequestContext,
)
from sidecar.core.scopes import ADMIN_FULL, KEYS_MANAGE, parse_scopes, sort_scopes
from sidecar.core.storage import KeyRow, Store, UnitOfWork

DAY = 86400
SYSTEM_ACTOR = key_notices.SYSTEM_ACTOR
BREAK_GLASS_ACTOR = "break-glass"
# The operator may hold two keys at once, so it can rotate without a gap.
MAX_OPERATOR_KEYS = 2
ROTATION_STEPS = (
    "started",
    "secret_written",
    "verified",
    "old_key_unused",
    "grace_ended",
    "completed",
    "failed",
)


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """Lifetimes and paging limits for API keys."""

    default_lifetime: int = 90 * DAY
    max_lifetime: int = 365 * DAY
    min_lifetime: int = 60
    max_grace: int = 30 * DAY
    default_page_size: int = 50
    max_page_size: int = 1000
    # A key expiring within this window is "expiring": one key.expiring event, the metric.
    expiry_warning: int = 14 * DAY
    min_rotation_period: int = DAY


@dataclass(frozen=True, slots=True)
class KeyEdit:
    """Fields to change on a key; None leaves a field as it is. ``rate_limit`` (0, 0) removes
    the limit, ``client_cidrs`` () allows every network, ``rotation_period`` 0 removes the
    schedule."""

    name: str | None = None
    description: str | None = None
    rate_limit: tuple[int, int] | None = None
    client_cidrs: list[str] | None = None
    rotation_period: int | None = None


def key_rows(uow: UnitOfWork, now: int) -> Iterator[KeyRow]:
    """Every usable key as a replica keeps it (the API-key part of a snapshot)."""
    return uow.keys.replica_rows(now)


def key_entries(rows: Iterable[KeyRow]) -> list[Change]:
    """Keys as replica entries, one per key: the snapshot form a sidecar that predates the
    packed key table applies (and the fallback when a key cannot be packed)."""
    return [changes.CredentialUpserted(*row).change() for row in rows]


class ApiKeyService:
    """The API key use cases; transports call these and map their errors."""

    def __init__(self, store: Store, clock: Clock, policy: KeyPolicy | None = None) -> None:
        self._store = store
        self._clock = clock
        self.policy = policy or KeyPolicy()

    # -- authentication -------------------------------------------------------------------

    def authenticate(self, secret: str) -> Principal:
        """The principal for a presented key, or Unauthenticated saying why it is refused."""
        if not secret:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")
        if not keyformat.is_well_formed(secret):
            raise Unauthenticated("malformed API key (bad prefix, length or checksum)")
        digest = keyformat.digest(secret)
        with self._store.read() as uow:
            key = uow.keys.get_by_digest(digest)
        if key is None or not hmac.compare_digest(key.digest, digest):
            raise Unauthenticated("unknown API key")
        state = key.state(self._clock.now())
        if state is not KeyState.ACTIVE:
            raise Unauthenticated(f"API key {state.value}")
        return Principal(key_id=key.id, workspace=key.workspace, scopes=key.scopes)

    # -- use cases --------------------------------------------------------------------------

    def require_manager(self, ctx: RequestContext, workspace: str) -> None:
        """Refuse unless the caller may manage keys in ``workspace``: the check ``create`` makes,
        for a transport that shows a form before calling it (the web console)."""
        permissions.require(ctx.principal, workspace, KEYS_MANAGE)

    def create(
        self,
        ctx: RequestContext,
        *,
        workspace: str,
        name: str,
        scopes: list[str],
        expires_in: int = 0,
        rate_limit: tuple[int, int] | None = None,
        description: str = "",
        client_cidrs: list[str] | None = None,
        rotation_period: int = 0,
    ) -> Minted:
        """Mint a key in ``workspace``; the caller must hold every scope it grants.
        ``rate_limit`` is (requests, period seconds), enforced by the sidecars, as are
        ``client_cidrs``; ``rotation_period`` seconds after creation the key is due for
        rotation."""
        if workspace != OPERATOR_WORKSPACE:
            workspace = validation.workspace(workspace)
        name = validation.name(name)
        granted = parse_scopes(scopes)
        lifetime = self._lifetime(expires_in)
        requests, period = validation.rate_limit(*rate_limit) if rate_limit else (0, 0)
        about = validation.description(description)
        networks = validation.client_cidrs(client_cidrs or [])
        rotation = self._rotation_period(rotation_period)
        permissions.require(ctx.principal, workspace, KEYS_MANAGE)
        permissions.require_grantable(ctx.principal, granted)
        now = int(self._clock.now())
        secret = keyformat.mint_key()
        key = ApiKey(
            id=keyformat.mint_id(),
            digest=keyformat.digest(secret),
            last_four=secret[-4:],
            name=name,
            workspace=workspace,
            scopes=granted,
            created_at=now,
            expires_at=now + lifetime,
            created_by=ctx.principal.key_id,
            rate_limit=requests,
            rate_period=period,
            description=about,
            client_cidrs=networks,
            rotation_period=rotation,
        )
        meta = {"scopes": " ".join(sort_scopes(granted))}
        if requests:
            meta["rate_limit"] = validation.format_rate(requests, period)
        if networks:
            meta["client_cidrs"] = " ".join(networks)
        if rotation:
            meta["rotation_period"] = validation.format_duration(rotation)
        with self._store.transaction() as uow:
            if key.is_operator:
                _require_operator_room(uow, now)
            uow.keys.insert(key)
            self._record(uow, ctx, "key.created", key, meta)
            uow.changes.append(changes.credential_upserted(key))
        return Minted(key=key, secret=secret)

    def list(
        self,
        ctx: RequestContext,
        *,
        workspace: str = "",
        state: KeyState | None = None,
        page_size: int = 0,
        page_token: str = "",
        unused_for: int = 0,
        expiring_within: int = 0,
        rotation_due: bool = False,
    ) -> Page:
        """Keys the caller may see, newest first, one page at a time, with their last use.
        ``unused_for`` > 0 keeps keys unused (or, never used, created) for that many seconds."""
        if workspace:
            if workspace != OPERATOR_WORKSPACE:
                validation.workspace(workspace)
            permissions.require(ctx.principal, workspace, KEYS_MANAGE)
            scope: str | None = workspace
        else:
            permissions.require(ctx.principal, ctx.principal.workspace, KEYS_MANAGE)
            scope = None if ctx.principal.is_operator else ctx.principal.workspace
        size = page_size or self.policy.default_page_size
        if not 1 <= size <= self.policy.max_page_size:
            raise InvalidArgument("page_size", f"must be between 1 and {self.policy.max_page_size}")
        after = _decode_token(page_token) if page_token else None
        for field, value in (("unused_for", unused_for), ("expiring_within", expiring_within)):
            if value < 0:
                raise InvalidArgument(field, "must not be negative")
        now = int(self._clock.now())
        with self._store.read() as uow:
            items = uow.keys.page(
                workspace=scope,
                state=state,
                now=now,
                limit=size + 1,
                after=after,
                unused_since=now - unused_for if unused_for else None,
                expiring_before=now + expiring_within if expiring_within else None,
                rotation_due=rotation_due,
            )
            more = len(items) > size
            items = items[:size]
            last_used = uow.usage.last_used([k.id for k in items])
        token = _encode_token(items[-1]) if more else ""
        return Page(items=items, next_token=token, last_used=last_used)

    def get(self, ctx: RequestContext, key_id: str) -> ApiKey:
        """One key the caller may see."""
        with self._store.read() as uow:
            key = _load(uow, key_id, ctx.principal)
        permissions.require(ctx.principal, key.workspace, KEYS_MANAGE)
        return key

    def whoami(self, ctx: RequestContext) -> ApiKey:
        """The calling key itself: any authenticated key may read its own metadata."""
        with self._store.read() as uow:
            return _load(uow, ctx.principal.key_id, ctx.principal)

    def replace(
        self, ctx: RequestContext, key_id: str, *, grace: int = 0, expires_in: int = 0
    ) -> Minted:
        """Create Replacement: a new key with the same workspace, name and scopes, linked to the
        old one, which stays valid until revoked or until the optional grace deadline."""
        lifetime = self._lifetime(expires_in)
        if grace:
            validation.in_range(grace, 1, self.policy.max_grace, "grace")
        now = int(self._clock.now())
        secret = keyformat.mint_key()
        with self._store.transaction() as uow:
            old = _load(uow, key_id, ctx.principal)
            permissions.require(ctx.principal, old.workspace, KEYS_MANAGE)
            permissions.require_grantable(ctx.principal, old.scopes)
            if old.revoked_at is not None:
                raise FailedPrecondition(f"key {old.id} is revoked; create a new key instead")
            if old.replaced_by:
                raise FailedPrecondition(
                    f"key {old.id} was already replaced by {old.replaced_by}; replace that one"
                )
            if old.is_operator:
                _require_operator_room(uow, now)
            new = ApiKey(
                id=keyformat.mint_id(),
                digest=keyformat.digest(secret),
                last_four=secret[-4:],
                name=old.name,
                workspace=old.workspace,
                scopes=old.scopes,
                created_at=now,
                expires_at=now + lifetime,
                created_by=ctx.principal.key_id,
                replaces=old.id,
                rate_limit=old.rate_limit,
                rate_period=old.rate_period,
                description=old.description,
                client_cidrs=old.client_cidrs,
                rotation_period=old.rotation_period,
            )
            deadline = now + grace if grace else None
            if deadline is not None and old.grace_deadline is not None:
                deadline = min(deadline, old.grace_deadline)
            old = replace(old, replaced_by=new.id, grace_deadline=deadline or old.grace_deadline)
            uow.keys.insert(new)
            uow.keys.update(old)
            meta = {"replaces": old.id}
            if deadline is not None:
                meta["grace_deadline"] = str(deadline)
            self._record(uow, ctx, "key.replaced", new, meta)
            uow.changes.append(changes.credential_upserted(new))
            if deadline is not None:
                uow.changes.append(changes.credential_upserted(old))
        return Minted(key=new, secret=secret, replaced=old)

    def update(self, ctx: RequestContext, key_id: str, edit: KeyEdit) -> ApiKey:
        """Edit a key without re-issuing it; each change is audited (old and new values, never
        a secret) and replicated. Changing nothing changes nothing (and records nothing)."""
        fields = self._edited_fields(edit)
        with self._store.transaction() as uow:
            key = _load(uow, key_id, ctx.principal)
            permissions.require(ctx.principal, key.workspace, KEYS_MANAGE)
            if key.revoked_at is not None:
                raise FailedPrecondition(f"key {key.id} is revoked; it cannot be edited")
            changed = {f: v for f, v in fields.items() if getattr(key, f) != v}
            if not changed:
                return key
            new = replace(key, **changed)  # type: ignore[arg-type]
            if "rotation_period" in changed:
                new = replace(new, rotation_due_recorded=False)
            uow.keys.update(new)
            meta = {name: _describe(name, getattr(new, name), new) for name in changed}
            self._record(uow, ctx, "key.updated", new, meta)
            self._replicate(uow, new)
        return new

    def suspend(self, ctx: RequestContext, key_id: str, *, reason: str = "") -> ApiKey:
        """Deny a key (reason ``suspended_credential``) until it is resumed; idempotent."""
        reason = _reason(reason)
        with self._store.transaction() as uow:
            key = _load(uow, key_id, ctx.principal)
            permissions.require(ctx.principal, key.workspace, KEYS_MANAGE)
            if key.revoked_at is not None:
                raise FailedPrecondition(f"key {key.id} is revoked; it cannot be suspended")
            if key.suspended_at is not None:
                return key
            key = replace(key, suspended_at=int(self._clock.now()))
            uow.keys.update(key)
            self._record(uow, ctx, "key.suspended", key, {}, reason=reason)
            self._replicate(uow, key)
        return key

    def resume(self, ctx: RequestContext, key_id: str) -> ApiKey:
        """Lift a suspension; idempotent."""
        with self._store.transaction() as uow:
            key = _load(uow, key_id, ctx.principal)
            permissions.require(ctx.principal, key.workspace, KEYS_MANAGE)
            if key.revoked_at is not None:
                raise FailedPrecondition(f"key {key.id} is revoked; it cannot be resumed")
            if key.suspended_at is None:
                return key
            key = replace(key, suspended_at=None)
            uow.keys.update(key)
            self._record(uow, ctx, "key.resumed", key, {})
            self._replicate(uow, key)
        return key

    def record_rotation_step(
        self, ctx: RequestContext, key_id: str, step: str, *, target: str, detail: str = ""
    ) -> None:
        """Audit a step of a client-driven rotation (``spauth keys rotate``) of ``key_id``."""
        if step not in ROTATION_STEPS:
            raise InvalidArgument("step", f"must be one of {', '.join(ROTATION_STEPS)}")
        target = _reason(target)
        if not target:
            raise InvalidArgument("target", "must not be empty")
        detail = _reason(detail)
        with self._store.transaction() as uow:
            key = _load(uow, key_id, ctx.principal)
            permissions.require(ctx.principal, key.workspace, KEYS_MANAGE)
            meta = {"step": step, "target": target}
            if key.replaced_by:
                meta["replaced_by"] = key.replaced_by
            self._record(uow, ctx, "key.rotation", key, meta, reason=detail)

    def _edited_fields(self, edit: KeyEdit) -> dict[str, object]:
        fields: dict[str, object] = {}
        if edit.name is not None:
            fields["name"] = validation.name(edit.name)
        if edit.description is not None:
            fields["description"] = validation.description(edit.description)
        if edit.rate_limit is not None:
            requests, period = edit.rate_limit
            if requests or period:
                requests, period = validation.rate_limit(requests, period)
            fields["rate_limit"], fields["rate_period"] = requests, period
        if edit.client_cidrs is not None:
            fields["client_cidrs"] = validation.client_cidrs(edit.client_cidrs)
        if edit.rotation_period is not None:
            fields["rotation_period"] = self._rotation_period(edit.rotation_period)
        return fields

    def _replicate(self, uow: UnitOfWork, key: ApiKey) -> None:
        """Tell the sidecars about a changed key, unless it can no longer authenticate."""
        if key.state(self._clock.now()) in (KeyState.ACTIVE, KeyState.SUSPENDED):
            uow.changes.append(changes.credential_upserted(key))

    def revoke(
        self, ctx: RequestContext, key_id: str, *, reason: str = "", force: bool = False
    ) -> ApiKey:
        """Revoke now. Revoking a revoked key returns it unchanged (idempotent). Like creating
        and replacing, revoking needs every scope the key holds: a ``keys:manage`` key cannot
        lock a workspace out of administration by revoking its ``admin:full`` keys. Revoking
        the last usable operator key needs ``force`` (recovery is then the break-glass
        command)."""
        reason = _reason(reason)
        now = int(self._clock.now())
        with self._store.transaction() as uow:
            key = _load(uow, key_id, ctx.principal)
            permissions.require(ctx.principal, key.workspace, KEYS_MANAGE)
            permissions.require_grantable(ctx.principal, key.scopes, "revoke a key with")
            if key.revoked_at is not None:
                return key
            if key.is_operator and not force:
                others = [k for k in uow.keys.active_operators(now) if k.id != key.id]
                if not others:
                    raise FailedPrecondition(
                        f"key {key.id} is the last usable operator key: create a second one "
                        "first, or pass force (recovery then needs `spauth operator mint`)"
                    )
            key = replace(key, revoked_at=now, revoke_reason=reason)
            uow.keys.update(key)
            self._record(uow, ctx, "key.revoked", key, {}, reason=reason)
            uow.changes.append(changes.credential_revoked(key.id))
            key_notices.notify(uow, self._clock.now(), webhooks.KEY_REVOKED, key, reason=reason)
        return key

    def sweep(self) -> int:
        """Record expiries and carry out grace-deadline revocations that are due; returns how
        many keys changed. Run periodically by the control plane."""
        now = int(self._clock.now())
        with self._store.transaction() as uow:
            due = uow.keys.due_for_sweep(now)
            for key in due:
                if key.grace_deadline is not None and key.grace_deadline <= now:
                    revoked = replace(key, revoked_at=now, revoke_reason="replacement grace ended")
                    uow.keys.update(revoked)
                    key_notices.system_event(
                        uow, self._clock.now(), "key.revoked", revoked, revoked.revoke_reason
                    )
                    uow.changes.append(changes.credential_revoked(key.id))
                    key_notices.notify(
                        uow,
                        self._clock.now(),
                        webhooks.KEY_REVOKED,
                        revoked,
                        reason=revoked.revoke_reason,
                    )
                else:
                    uow.keys.update(replace(key, expiry_recorded=True))
                    key_notices.system_event(uow, self._clock.now(), "key.expired", key, "")
                    uow.changes.append(changes.credential_expired(key.id))
            noticed = key_notices.record(uow, now, self.policy.expiry_warning)
        return len(due) + noticed

    def expiring_counts(self) -> dict[str, int]:
        """Usable keys inside the expiry warning window, per workspace (for the metric)."""
        now = int(self._clock.now())
        with self._store.read() as uow:
            return uow.keys.expiring_by_workspace(now, now + self.policy.expiry_warning)

    def bootstrap_operator_key(self, name: str = "operator") -> Minted | None:
        """On first start: an ``admin:full`` key for every workspace, or None if one exists."""
        now = int(self._clock.now())
        secret = keyformat.mint_key()
        key = ApiKey(
            id=keyformat.mint_id(),
            digest=keyformat.digest(secret),
            last_four=secret[-4:],
            name=name,
            workspace=OPERATOR_WORKSPACE,
            scopes=frozenset({ADMIN_FULL}),
            created_at=now,
            expires_at=now + self.policy.default_lifetime,
            created_by=SYSTEM_ACTOR,
        )
        with self._store.transaction() as uow:
            if uow.keys.has_operator():
                return None
            uow.keys.insert(key)
            key_notices.system_event(
                uow, self._clock.now(), "key.created", key, "bootstrap operator key"
            )
            uow.changes.append(changes.credential_upserted(key))
        return Minted(key=key, secret=secret)

    def break_glass_operator_key(self, os_user: str, name: str = "break-glass") -> Minted:
        """Recovery with local access to the store (``spauth operator mint``): a new operator
        key whatever keys exist, audited as break-glass with the local user's name."""
        now = int(self._clock.now())
        secret = keyformat.mint_key()
        key = ApiKey(
            id=keyformat.mint_id(),
            digest=keyformat.digest(secret),
            last_four=secret[-4:],
            name=validation.name(name),
            workspace=OPERATOR_WORKSPACE,
            scopes=frozenset({ADMIN_FULL}),
            created_at=now,
            expires_at=now + self.policy.default_lifetime,
            created_by=BREAK_GLASS_ACTOR,
        )
        with self._store.transaction() as uow:
            uow.keys.insert(key)
            uow.audit.append(
                event(
                    now,
                    BREAK_GLASS_ACTOR,
                    "key.created",
                    key.workspace,
                    key.id,
                    reason="break-glass: operator key minted with local access to the store",
                    metadata={"name": key.name, "os_user": os_user[:100], "break_glass": "true"},
                )
            )
            uow.changes.append(changes.credential_upserted(key))
        return Minted(key=key, secret=secret)

    def operator_expiry(self) -> int:
        """When the last usable operator key expires (0: none is usable)."""
        with self._store.read() as uow:
            operators = uow.keys.active_operators(int(self._clock.now()))
        return operators[0].expires_at if operators else 0

    # -- helpers ----------------------------------------------------------------------------

    def _lifetime(self, expires_in: int) -> int:
        if not expires_in:
            return self.policy.default_lifetime
        return validation.in_range(
            expires_in, self.policy.min_lifetime, self.policy.max_lifetime, "expires_in"
        )

    def _record(
        self,
        uow: UnitOfWork,
        ctx: RequestContext,
        action: str,
        key: ApiKey,
        metadata: dict[str, str],
        reason: str = "",
    ) -> None:
        uow.audit.append(
            acted(
                ctx,
                self._clock.now(),
                action,
                key.workspace,
                key.id,
                reason=reason,
                metadata={"name": key.name, **metadata},
            )
        )

    def _rotation_period(self, seconds: int) -> int:
        if not seconds:
            return 0
        return validation.in_range(
            seconds, self.policy.min_rotation_period, self.policy.max_lifetime, "rotation_period"
        )


def _reason(reason: str) -> str:
    reason = reason.strip()
    if len(reason) > 500 or not reason.isprintable():
        raise InvalidArgument("reason", "must be at most 500 printable characters")
    return reason


def _describe(name: str, value: object, key: ApiKey) -> str:
    """An edited field's new value as an audit metadata string."""
    if name in ("rate_limit", "rate_period"):
        return validation.format_rate(key.rate_limit, key.rate_period) if key.rate_limit else ""
    if name == "client_cidrs":
        return " ".join(key.client_cidrs)
    if name == "rotation_period":
        return validation.format_duration(key.rotation_period) if key.rotation_period else ""
    return str(value)


def _load(uow: UnitOfWork, key_id: str, principal: Principal) -> ApiKey:
    """The key ``principal`` may see: another workspace's key is "not found", as a missing one
    is, so a tenant cannot learn which ids exist elsewhere (``permissions.visible``)."""
    if not key_id:
        raise InvalidArgument("id", "must not be empty")
    key = uow.keys.get(key_id)
    if key is None or not permissions.visible(principal, key.workspace):
        raise NotFound(f"no API key with id {key_id[:64]!r}")
    return key


def _require_operator_room(uow: UnitOfWork, now: int) -> None:
    if len(uow.keys.active_operators(now)) >= MAX_OPERATOR_KEYS:
        raise FailedPrecondition(
            f"the operator holds {MAX_OPERATOR_KEYS} usable keys already: revoke one first"
        )


def _encode_token(key: ApiKey) -> str:
    raw = json.dumps([key.created_at, key.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created_at, key_id = json.loads(raw)
        if not isinstance(created_at, int) or not isinstance(key_id, str):
            raise ValueError
    except (ValueError, binascii.Error, TypeError):
        raise InvalidArgument("page_token", "malformed page token") from None
    return created_at, key_id
