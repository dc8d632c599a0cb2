"""Signing keys for the operator (admin API ``SigningKeyService``): list, rotate on demand."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.core.clock import Clock
from sidecar.core.models import RequestContext
from sidecar.core.oauth_models import SigningKey
from sidecar.core.permissions import require_operator
from sidecar.oauth.signing import SigningKeys


def key_state(key: SigningKey, now: float) -> str:
    """``pending``, ``current``, ``superseded`` or ``retired``."""
    if key.retired_at is not None:
        return "retired"
    if key.superseded_at is not None:
        return "superseded"
    return "pending" if key.activates_at > now else "current"


@dataclass(frozen=True, slots=True)
class Rotation:
    key: SigningKey
    retired: list[str]


class SigningKeyAdmin:
    """Operator-only use cases over ``SigningKeys``."""

    def __init__(self, keys: SigningKeys, clock: Clock) -> None:
        self._keys = keys
        self._clock = clock

    def list(self, ctx: RequestContext) -> list[SigningKey]:
        require_operator(ctx.principal)
        return self._keys.published()

    def rotate(self, ctx: RequestContext, *, immediate: bool) -> Rotation:
        require_operator(ctx.principal)
        key, retired = self._keys.rotate(
            immediate=immediate, actor=ctx.principal.key_id, request_id=ctx.request_id
        )
        return Rotation(key, retired)
