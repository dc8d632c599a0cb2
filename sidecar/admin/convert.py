"""Domain records to protobuf messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as pb
from sidecar.core.models import ApiKey, KeyState
from sidecar.core.scopes import sort_scopes
from sidecar.core.usage import format_day

STATE_TO_PB = {
    KeyState.ACTIVE: pb.API_KEY_STATE_ACTIVE,
    KeyState.EXPIRED: pb.API_KEY_STATE_EXPIRED,
    KeyState.REVOKED: pb.API_KEY_STATE_REVOKED,
    KeyState.SUSPENDED: pb.API_KEY_STATE_SUSPENDED,
}
PB_TO_STATE = {v: k for k, v in STATE_TO_PB.items()}


def timestamp(seconds: float | None) -> Timestamp | None:
    """A protobuf Timestamp, or None for an unset time."""
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromSeconds(int(seconds))
    return ts


def api_key(key: ApiKey, now: float, last_used: int | None = None) -> pb.ApiKey:
    """A key's metadata as the API shows it (never the digest), with its last use if known."""
    return pb.ApiKey(
        id=key.id,
        name=key.name,
        workspace=key.workspace,
        scopes=sort_scopes(key.scopes),
        state=STATE_TO_PB[key.state(now)],
        create_time=timestamp(key.created_at),
        expire_time=timestamp(key.expires_at),
        revoke_time=timestamp(key.revoked_at),
        revoke_reason=key.revoke_reason,
        replaces=key.replaces,
        replaced_by=key.replaced_by,
        last_four=key.last_four,
        grace_deadline=timestamp(key.grace_deadline),
        created_by=key.created_by,
        rate_limit=(
            pb.RateLimit(requests=key.rate_limit, period_seconds=key.rate_period)
            if key.rate_limit
            else None
        ),
        last_use_time=timestamp(last_used),
        description=key.description,
        client_cidrs=list(key.client_cidrs),
        suspend_time=timestamp(key.suspended_at),
        rotation_period_seconds=key.rotation_period,
        rotation_due_time=timestamp(key.rotation_due_at),
    )


def daily_uses(daily: list[tuple[int, int]]) -> list[pb.DailyUse]:
    """(epoch day, uses) pairs as DailyUse messages."""
    return [pb.DailyUse(date=format_day(day), uses=uses) for day, uses in daily]
