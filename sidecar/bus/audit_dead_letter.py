"""Audit-stream entries ingest refused, kept in a dead-letter stream: the Redis path's counterpart
of the sidecar's dead-letter file (``sidecar.auditship.shipper``), which over gRPC keeps exactly
the records the control plane names as refused.

An entry of ``spauth:audit`` that the trail refuses (forged, future-dated, malformed, an id stored
with other content) or that is not an ``AuditRecord`` at all is added to
``spauth:audit:dead-letter`` with the record's bytes unchanged and its stable reason code
(``AuditRefusalReason`` as in ``sidecar.core.audit_trail.RefusalReason``). The dead letters and
the acknowledgement of the whole batch go to Redis in one script, all or nothing: nothing is
acknowledged before its dead letter is written, and a consumer that dies before the script ran
leaves the batch pending for a retry that writes each dead letter once. Never trimmed: an operator
reads and deletes (docs/audit.md, "Dead letters on the Redis path")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from sidecar.core.audit import redact
from sidecar.core.audit_batch import Refusal, RefusalReason

DEAD_LETTER_STREAM = "spauth:audit:dead-letter"
# An entry whose bytes are not an AuditRecord: no decision record, as the wire's reason says.
UNDECODABLE = RefusalReason.NOT_A_DECISION
# A dead letter's fields: the reason code, the field at fault, why in words, the record's event id
# (redacted), its entry id in the audit stream, the consumer that refused it, the record's bytes.
FIELDS = ("reason", "field", "detail", "id", "entry", "consumer", "record")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One refused entry: the audit stream's entry id, the record's bytes as shipped, its event
    id (cut and redacted, as in the refusal), and why (code, field, words)."""

    entry: bytes
    record: bytes
    event_id: str
    reason: RefusalReason
    field: str
    detail: str

    def fields(self, consumer: str) -> dict[str, bytes | str]:
        """The dead-letter stream entry's fields (:data:`FIELDS`, in that order)."""
        values = (self.reason.value, self.field, self.detail, self.event_id, self.entry)
        return dict(zip(FIELDS, (*values, consumer, self.record), strict=True))


def refused(entry: bytes, record: bytes, refusal: Refusal) -> DeadLetter:
    """The dead letter of a record the trail refused."""
    return DeadLetter(entry, record, refusal.id, refusal.reason, refusal.field, refusal.message)


def undecodable(entry: bytes, record: bytes, event_id: bytes) -> DeadLetter:
    """The dead letter of an entry whose ``record`` is not an AuditRecord (only a writer other
    than ``RedisStreamTransport`` can add one: the transport decodes what it adds)."""
    shown = redact(event_id[:64].decode("utf-8", "replace"))
    return DeadLetter(entry, record, shown, UNDECODABLE, "record", "not an AuditRecord")


# KEYS[1] the dead-letter stream, KEYS[2] the audit stream. ARGV[1] the group, ARGV[2] n, ARGV[3]
# the values per dead letter (FIELDS as name/value pairs), then n entry ids, then the dead letters.
# A script, not MULTI/EXEC: EXEC runs the XACK even when an XADD before it failed, a script stops
# at its first error (and Redis refuses a writing script before it starts when out of memory), and
# the one other way XADD fails, a key of another type, is checked before anything is written: all
# of it happens, or none.
_SETTLE = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'none' and kind ~= 'stream' then
  return redis.error_reply('SPAUTH_DEAD_LETTER ' .. KEYS[1] .. ' is a ' .. kind .. ', not a stream')
end
local n = tonumber(ARGV[2])
local width = tonumber(ARGV[3])
for i = 4 + n, #ARGV, width do
  redis.call('XADD', KEYS[1], '*', unpack(ARGV, i, i + width - 1))
end
-- In slices: unpack() is bounded by Lua's stack (~8000 values), a batch setting is not.
for first = 4, 3 + n, 1000 do
  local last = math.min(first + 999, 3 + n)
  redis.call('XACK', KEYS[2], ARGV[1], unpack(ARGV, first, last))
  redis.call('XDEL', KEYS[2], unpack(ARGV, first, last))
end
return n
"""


class DeadLetterStream:
    """Writes dead letters and acknowledges batches of the audit stream, in one script each;
    ``on_dead_letter(reason)`` is called per dead letter once it is written (metrics)."""

    def __init__(
        self,
        stream: str = DEAD_LETTER_STREAM,
        on_dead_letter: Callable[[str], None] | None = None,
    ) -> None:
        self.stream = stream
        self.written = 0
        self._on_dead_letter = on_dead_letter

    async def settle(
        self,
        client: aioredis.Redis,
        source: tuple[str, str, str],
        entries: Sequence[bytes],
        letters: Sequence[DeadLetter],
    ) -> None:
        """XADD ``letters`` here, then XACK and XDEL ``entries`` (every entry of the batch, stored
        or refused) from ``source`` = (stream, group, consumer): all of it, or nothing
        (``redis.ResponseError``, the entries stay pending)."""
        stream, group, consumer = source
        args: list[bytes | str | int] = [group, len(entries), 2 * len(FIELDS), *entries]
        for letter in letters:
            for name, value in letter.fields(consumer).items():
                args += [name, value]
        await client.register_script(_SETTLE)(keys=[self.stream, stream], args=args)
        self.written += len(letters)
        if self._on_dead_letter is not None:
            for letter in letters:
                self._on_dead_letter(letter.reason.value)
