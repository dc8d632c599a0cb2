"""Records the domain passes around. Frozen: a change is a new record."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

OPERATOR_WORKSPACE = "*"


class KeyState(enum.StrEnum):
    """A key's state, derived from its timestamps and the clock."""

    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"
    SUSPENDED = "suspended"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as stored: metadata and the digest of its secret, never the secret."""

    id: str
    digest: bytes
    last_four: str
    name: str
    workspace: str
    scopes: frozenset[str]
    created_at: int
    expires_at: int
    created_by: str
    revoked_at: int | None = None
    revoke_reason: str = ""
    replaces: str = ""
    replaced_by: str = ""
    grace_deadline: int | None = None
    expiry_recorded: bool = False
    # Requests allowed per ``rate_period`` seconds (0: no limit), enforced by the sidecars.
    rate_limit: int = 0
    rate_period: int = 0
    description: str = ""
    # Set while suspended: denied (suspended_credential) until resumed.
    suspended_at: int | None = None
    # Networks (normalized CIDRs) the key may be used from, enforced by the sidecars; empty:
    # anywhere.
    client_cidrs: tuple[str, ...] = ()
    # Seconds after creation the key is due for rotation (0: no schedule); replacements
    # inherit it.
    rotation_period: int = 0
    expiry_warned: bool = False
    rotation_due_recorded: bool = False

    def state(self, now: float) -> KeyState:
        """The state at time ``now``: revoked beats expired beats suspended beats active."""
        if self.revoked_at is not None:
            return KeyState.REVOKED
        if now >= self.expires_at:
            return KeyState.EXPIRED
        if self.suspended_at is not None:
            return KeyState.SUSPENDED
        return KeyState.ACTIVE

    @property
    def rotation_due_at(self) -> int | None:
        """When the key is due for rotation, if it has a schedule."""
        return self.created_at + self.rotation_period if self.rotation_period else None

    @property
    def is_operator(self) -> bool:
        return self.workspace == OPERATOR_WORKSPACE


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an authenticated key's identity, without its secret."""

    key_id: str
    workspace: str
    scopes: frozenset[str]

    @property
    def is_operator(self) -> bool:
        return self.workspace == OPERATOR_WORKSPACE


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What every admin operation knows about its caller and request."""

    principal: Principal
    request_id: str
    source: str = ""


@dataclass(frozen=True, slots=True)
class Minted:
    """A key together with its secret: returned exactly once, at creation or replacement."""

    key: ApiKey
    secret: str
    replaced: ApiKey | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing."""

    items: list[ApiKey]
    next_token: str = ""
    # Last use time per key id of ``items`` (keys never seen used are absent).
    last_used: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the change log that feeds sidecar replicas; ``revision`` is set by the store."""

    kind: str
    subject: str
    payload: dict[str, object] = field(default_factory=dict)
    revision: int = 0
