"""The change bus between control-plane replicas: after a commit that appended changes, this
replica PUBLISHes its head revision on a Redis channel; every replica SUBSCRIBEs and wakes its
replication streams, so a sidecar connected to replica B hears of a revocation made on replica A
at once instead of at B's next heartbeat re-read of the change log.

The bus only ever makes things faster: a lost message, or Redis down, leaves the heartbeat
re-read (``sync_heartbeat``, 1 s by default) as the bound. While Redis is unreachable the bus
logs, retries with bounded backoff, and wakes the streams once when it is back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import AbstractBackoff, EqualJitterBackoff, NoBackoff
from redis.exceptions import RedisError

from sidecar.core.storage import Store
from sidecar.core.tasks import stop_task

log = logging.getLogger("sidecar.bus")

CHANNEL = "spauth:changes"
RETRYABLE: tuple[type[BaseException], ...] = (RedisError, OSError)


def encode(origin: str, revision: int) -> bytes:
    return f"{origin} {revision}".encode()


def decode(data: object) -> tuple[str, int] | None:
    """(origin, revision) from a message body; None when it is not one of ours."""
    if not isinstance(data, bytes):
        return None
    origin, _, revision = data.decode("utf-8", "replace").partition(" ")
    return (origin, int(revision)) if revision.isdigit() else None


class RedisChangeBus:
    """Publishes this replica's commits and calls ``wake(revision)`` for other replicas'.
    ``start()`` and ``aclose()`` run on the control plane's event loop."""

    def __init__(
        self,
        url: str,
        store: Store,
        wake: Callable[[int], None],
        *,
        channel: str = CHANNEL,
        backoff: AbstractBackoff | None = None,
        origin: str = "",
        liveness: float = 5.0,
    ) -> None:
        self.url = url
        self.channel = channel
        self.origin = origin or f"{os.uname().nodename}:{os.getpid()}:{os.urandom(4).hex()}"
        self.backoff = backoff or EqualJitterBackoff(cap=5.0, base=0.1)
        # Each replica publishes at least every ``liveness`` seconds and hears itself: a
        # subscription silent for three periods is half-open (a dead peer, a dropped NAT entry)
        # and is opened again.
        self.liveness = liveness
        self.connected = False
        self.published = 0
        self.received = 0
        self._store = store
        self._wake = wake
        # Our own loop retries (with self.backoff); the client itself never does.
        self._client = aioredis.Redis.from_url(
            url, socket_connect_timeout=1.0, socket_timeout=2.0, retry=Retry(NoBackoff(), 0)
        )
        self._latest = 0
        self._to_publish = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe: Callable[[], None] | None = None

    async def start(self) -> None:
        """Begin listening and publishing; never fails because Redis is down."""
        self._loop = asyncio.get_running_loop()
        self._unsubscribe = self._store.subscribe(self._committed)
        self._tasks = [
            asyncio.create_task(self._listen(), name="spauth-bus-listen"),
            asyncio.create_task(self._publish(), name="spauth-bus-publish"),
        ]

    def _committed(self, revision: int) -> None:
        # Runs on the committing thread (a worker of asyncio.to_thread): hand over, never block.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._queue, revision)

    def _queue(self, revision: int) -> None:
        self._latest = max(self._latest, revision)
        self._to_publish.set()

    async def _publish(self) -> None:
        # Several commits in a row make one message with the newest head: a replica that
        # re-reads the log from its streams' positions gets every change up to it anyway.
        while True:
            revision = 0  # a keep-alive, unless a commit comes first
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._to_publish.wait(), self.liveness)
                revision = self._latest
            self._to_publish.clear()
            try:
                await self._client.publish(self.channel, encode(self.origin, revision))
                self.published += 1
            except RETRYABLE as exc:
                # Other replicas fall back to their heartbeat re-read; nothing to resend.
                log.debug("change bus: publish failed", extra={"error": str(exc)})

    async def _listen(self) -> None:
        failures = 0
        while True:
            try:
                await self._subscribed()
            except RETRYABLE as exc:
                failures += 1
                if self.connected or failures == 1:
                    log.warning(
                        "change bus: redis unreachable; replicas fall back to the heartbeat "
                        "re-read of the change log",
                        extra={"error": str(exc)},
                    )
                self.connected = False
                await asyncio.sleep(self.backoff.compute(failures))
            else:
                failures = 0

    async def _subscribed(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
            if not self.connected:
                log.info("change bus: subscribed", extra={"channel": self.channel})
            self.connected = True
            # Commits made elsewhere while we were not listening: look once now.
            self._wake(0)
            loop_time = asyncio.get_running_loop().time
            last = loop_time()
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    if loop_time() - last > 3 * self.liveness:
                        raise ConnectionError("change bus: subscription silent; reconnecting")
                    continue
                last = loop_time()
                parsed = decode(message.get("data"))
                if parsed is not None and parsed[0] != self.origin and parsed[1] > 0:
                    self.received += 1
                    self._wake(parsed[1])
        finally:
            with contextlib.suppress(*RETRYABLE):
                await pubsub.aclose()

    async def aclose(self) -> None:
        """Stop listening and publishing, and release the connections."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        for task in self._tasks:
            await stop_task(task)
        self._tasks = []
        with contextlib.suppress(*RETRYABLE):
            await self._client.aclose()
