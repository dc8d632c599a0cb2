"""The sidecar's audit transport in scale-out: shipped records go into a Redis stream (XADD)
instead of straight to a control plane, so a control-plane outage or failover never backs up the
sidecars' spools; the control planes drain the stream with a consumer group
(``sidecar.bus.audit_ingest``).

Idempotent by event id: the shipper re-sends a batch from the same spool position until it is
acknowledged, so the script below remembers, per batch (keyed by its first event id), how many
records it has already added and adds only the rest. Anything that still arrives twice (a sidecar
that crashed before persisting its acknowledgement) is stored once by the control plane, which
de-duplicates by event id.

When the stream holds ``max_backlog`` records not yet ingested (control planes down for long),
the script refuses the batch: the records wait in the sidecar's spool, never trimmed in Redis.
Runs on the shipper's background thread (sync client), never on the Check path."""

from __future__ import annotations

from collections.abc import Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sidecar.auditship.codec import decode
from sidecar.auditship.transport import TransportError

STREAM = "spauth:audit"
BATCH_PREFIX = "spauth:audit:batch:"
FIELD_ID = b"id"
FIELD_RECORD = b"record"
BACKLOG_FULL = "SPAUTH_BACKLOG_FULL"

# KEYS[1] stream, KEYS[2] the batch marker. ARGV[1] marker ttl (s), ARGV[2] max backlog, then
# (event id, record) pairs. Returns how many records of the batch the stream now holds.
_ADD = """
local done = tonumber(redis.call('GET', KEYS[2]) or '0')
local n = (#ARGV - 2) / 2
if n <= done then
  return n
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[2]) then
  return redis.error_reply('SPAUTH_BACKLOG_FULL audit stream backlog is full')
end
for i = done + 1, n do
  redis.call('XADD', KEYS[1], '*', 'id', ARGV[1 + 2 * i], 'record', ARGV[2 + 2 * i])
end
redis.call('SET', KEYS[2], n, 'EX', ARGV[1])
return n
"""


class RedisStreamTransport:
    """``sidecar.auditship.transport.Transport`` over a Redis stream."""

    def __init__(
        self,
        url: str,
        *,
        stream: str = STREAM,
        max_backlog: int = 1_000_000,
        marker_ttl: int = 86400,
        timeout: float = 5.0,
    ) -> None:
        self.stream = stream
        self.max_backlog = max_backlog
        self.marker_ttl = marker_ttl
        # The shipper retries with its own bounded backoff; the client does not.
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
        )
        self._add = self._client.register_script(_ADD)

    def send(self, records: Sequence[bytes]) -> int:
        """XADD the records not yet added from this batch; returns how many the stream holds
        (all of them). Raises TransportError: rejected for a record that is not one."""
        if not records:
            return 0
        args: list[bytes | int] = [self.marker_ttl, self.max_backlog]
        try:
            ids = [decode(r).id for r in records]
        except ValueError as exc:
            raise TransportError(str(exc), rejected=True) from None
        for event_id, record in zip(ids, records, strict=True):
            args += [event_id.encode(), record]
        try:
            added = self._add(keys=[self.stream, BATCH_PREFIX + ids[0]], args=args)
        except redis.ResponseError as exc:
            raise TransportError(f"redis refused the batch: {exc}") from None
        except (redis.RedisError, OSError) as exc:
            raise TransportError(f"redis unreachable: {exc}") from None
        return int(added)

    def close(self) -> None:
        self._client.close()
