"""The control plane's side of the audit stream: a consumer in one consumer group shared by every
control-plane replica. Each record is read by one replica, stored through the audit trail (which
keeps each event id once), and only then acknowledged (XACK) and deleted from the stream, so a
replica that dies between reading and committing leaves its records pending: after ``claim_idle``
seconds another replica claims them (XAUTOCLAIM) and stores them.

Redis or the store unavailable: log, back off (bounded), retry; records stay in the stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import AbstractBackoff, EqualJitterBackoff, NoBackoff
from redis.exceptions import RedisError, ResponseError

from sidecar.auditship.codec import decode, ingest_request
from sidecar.bus.audit_dead_letter import DeadLetter, DeadLetterStream, refused, undecodable
from sidecar.bus.audit_stream import FIELD_ID, FIELD_RECORD, STREAM
from sidecar.core import audit_native
from sidecar.core.audit import AuditEvent
from sidecar.core.audit_trail import SIDECAR, AuditTrail
from sidecar.core.errors import SpauthError
from sidecar.core.models import RequestContext
from sidecar.core.tasks import stop_task

log = logging.getLogger("sidecar.bus.audit")

GROUP = "spauth-control-plane"
RETRYABLE: tuple[type[BaseException], ...] = (RedisError, OSError, SpauthError)
Entry = tuple[bytes, dict[bytes, bytes]]


class AuditStreamConsumer:
    """Reads the audit stream into ``trail``. ``start()``/``aclose()`` on the event loop."""

    def __init__(
        self,
        url: str,
        trail: AuditTrail,
        *,
        stream: str = STREAM,
        group: str = GROUP,
        consumer: str = "",
        batch: int = 500,
        block: float = 1.0,
        claim_idle: float = 30.0,
        backoff: AbstractBackoff | None = None,
        dead_letters: DeadLetterStream | None = None,
    ) -> None:
        self.stream = stream
        self.group = group
        self.consumer = consumer or f"{os.uname().nodename}:{os.getpid()}:{os.urandom(3).hex()}"
        self.batch = batch
        self.block_ms = int(block * 1000)
        self.claim_idle_ms = int(claim_idle * 1000)
        self.backoff = backoff or EqualJitterBackoff(cap=5.0, base=0.1)
        self.ingested = 0
        self.dead_lettered = 0
        self.claimed = 0
        self.dead_letters = dead_letters or DeadLetterStream()
        self._trail = trail
        self._ctx = RequestContext(principal=SIDECAR, request_id="audit-stream", source="redis")
        self._client = aioredis.Redis.from_url(
            url, socket_connect_timeout=1.0, socket_timeout=block + 5.0, retry=Retry(NoBackoff(), 0)
        )
        self._task: asyncio.Task[None] | None = None
        self._own_pending = True  # read our own unacknowledged entries first ("0")
        self._next_claim = 0.0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="spauth-audit-stream")

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._ensure_group()
                while True:
                    await self.step()
                    failures = 0
            except RETRYABLE as exc:
                failures += 1
                if failures == 1:
                    log.warning("audit stream: cannot ingest; retrying", extra={"error": str(exc)})
                await asyncio.sleep(self.backoff.compute(failures))

    async def _ensure_group(self) -> None:
        # From the stream's start: records added before any control plane ran are ingested too.
        try:
            await self._client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def step(self) -> int:
        """One round: claim what dead consumers left (now and then), read, store, acknowledge.
        Returns how many entries it handled."""
        handled = 0
        if time.monotonic() >= self._next_claim:
            handled = await self.claim()
            self._next_claim = time.monotonic() + self.claim_idle_ms / 3000
        entries: list[Entry] = []
        if self._own_pending:
            entries = await self._read("0", None)
            self._own_pending = bool(entries)
        if not self._own_pending:
            entries = await self._read(">", self.block_ms)
        try:
            return handled + await self._store(entries)
        except BaseException:
            self._own_pending = True  # left pending: read them again first
            raise

    async def _read(self, start: str, block: int | None) -> list[Entry]:
        reply: Any = await self._client.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=self.batch, block=block
        )
        return reply[0][1] if reply else []

    async def claim(self) -> int:
        """Take over entries another consumer read but did not acknowledge in ``claim_idle``."""
        reply: Any = await self._client.xautoclaim(
            self.stream, self.group, self.consumer, self.claim_idle_ms, "0-0", count=self.batch
        )
        entries: list[Entry] = [e for e in reply[1] if e is not None]
        self.claimed += len(entries)
        try:
            return await self._store(entries)
        except BaseException:
            self._own_pending = True  # claimed, so ours now
            raise

    async def _store(self, entries: list[Entry]) -> int:
        if not entries:
            return 0
        # One trail call stores a chunk in one transaction; the records it refuses (each
        # logged there with its reason) become dead letters, and the rest are stored.
        dead: list[DeadLetter] = []
        stored = 0
        most = self._trail.policy.max_ingest_batch
        for start in range(0, len(entries), most):
            chunk_stored, chunk_dead = await asyncio.to_thread(
                self._ingest, entries[start : start + most]
            )
            stored += chunk_stored
            dead.extend(chunk_dead)
        # Only after the trail committed: the dead letters written and every entry
        # acknowledged and deleted (so the stream holds the backlog), in one transaction.
        ids = [entry_id for entry_id, _ in entries]
        await self.dead_letters.settle(
            self._client, (self.stream, self.group, self.consumer), ids, dead
        )
        if dead:
            log.warning(
                "audit stream: refused records moved to the dead-letter stream",
                extra={"n": len(dead), "dead_letter_stream": self.dead_letters.stream},
            )
        self.dead_lettered += len(dead)
        self.ingested += stored
        return len(entries)

    def _ingest(self, entries: list[Entry]) -> tuple[int, list[DeadLetter]]:
        """Store one chunk of entries (each a serialized AuditRecord): as one message through
        the compiled step when it takes them, else decoded one by one (an entry that is not a
        record is dead-lettered alone). Returns (acknowledged, dead letters)."""
        records = [
            (entry_id, (fields or {}).get(FIELD_RECORD, b""), fields)
            for entry_id, fields in entries
        ]
        latest = self._trail.latest_record_time()
        batch = audit_native.parse(ingest_request([record for _, record, _ in records]), latest)
        if batch is not None:
            result = self._trail.ingest_batch(self._ctx, batch)
            dead = [refused(*records[r.index][:2], r) for r in result.refused]
            return len(result.acknowledged), dead
        events: list[AuditEvent] = []
        kept: list[tuple[bytes, bytes]] = []  # each event's entry id and record bytes
        dead = []
        for entry_id, record, fields in records:
            try:
                events.append(decode(record))
            except ValueError:
                dead.append(undecodable(entry_id, record, (fields or {}).get(FIELD_ID, b"")))
                continue
            kept.append((entry_id, record))
        result = self._trail.ingest(self._ctx, events)
        dead += [refused(*kept[r.index], r) for r in result.refused]
        return len(result.acknowledged), dead

    async def aclose(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()
