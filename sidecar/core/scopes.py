"""The scope vocabulary and the one rule that relates scopes: ``admin:full`` satisfies any scope
in its workspace."""

from __future__ import annotations

from collections.abc import Iterable

from sidecar.core.errors import InvalidArgument

ADMIN_FULL = "admin:full"
KEYS_MANAGE = "keys:manage"

SCOPES: tuple[str, ...] = (
    "checks:read",
    "checks:write",
    "metrics:read",
    "metrics:write",
    "dashboard:read",
    "alerts:manage",
    KEYS_MANAGE,
    ADMIN_FULL,
)
_KNOWN = frozenset(SCOPES)
_ORDER = {s: i for i, s in enumerate(SCOPES)}


def parse_scopes(values: Iterable[str], field: str = "scopes") -> frozenset[str]:
    """Validate scope names; unknown ones raise InvalidArgument listing the valid names."""
    scopes = frozenset(v.strip() for v in values)
    if not scopes:
        raise InvalidArgument(field, f"at least one scope is required; valid: {', '.join(SCOPES)}")
    unknown = sorted(scopes - _KNOWN)
    if unknown:
        raise InvalidArgument(
            field, f"unknown scope {', '.join(map(repr, unknown))}; valid: {', '.join(SCOPES)}"
        )
    return scopes


def satisfies(held: Iterable[str], required: str) -> bool:
    """True when the held scopes grant ``required``."""
    held_set = held if isinstance(held, frozenset) else frozenset(held)
    return required in held_set or ADMIN_FULL in held_set


def sort_scopes(scopes: Iterable[str]) -> list[str]:
    """Scopes in the canonical vocabulary order (stable output for humans and tests)."""
    # Built once: every new access token's allow sorts its scopes (sidecar/dataplane).
    return sorted(scopes, key=lambda s: (_ORDER.get(s, len(_ORDER)), s))
