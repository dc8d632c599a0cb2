"""Shares a WindowRateLimiter's counts across sidecars through Redis, from a background thread:
the Check path never waits on Redis.

Every ``interval`` seconds the thread pushes the events counted here since the last push into one
Redis hash per name (field = bucket index, so every process's buckets line up on wall-clock time),
reads each hash back in the same script, and reads the names other processes blocked. Between two
pushes each process decides on the last shared view plus its own new events, so a limit shared by
N processes can be exceeded by what the other N-1 admit within one interval (see
docs/scaleout-redis.md for the bound). When Redis cannot be reached for ``stale_after`` seconds
the shared views are dropped and every process enforces its limits alone: limits loosen, checks
carry on, no valid request is refused because of Redis."""

from __future__ import annotations

import logging
import threading

import redis
from redis.backoff import AbstractBackoff, EqualJitterBackoff

from sidecar.core.clock import Clock
from sidecar.ratelimit.local import KEY, SOURCE, Delta, WindowRateLimiter

log = logging.getLogger("sidecar.ratelimit")

PREFIX = "spauth:rl"
MAX_NAMES = 5000  # per push; the rest waits for the next one

# KEYS: one hash per name. ARGV per name: the oldest bucket in its window, the hash's ttl in ms,
# the number of (bucket, count) pairs, the pairs. Adds the counts, drops buckets that left the
# window and returns what remains, per name, as a flat [bucket, count, ...] list.
_PUSH = """
local out = {}
local a = 1
for i, key in ipairs(KEYS) do
  local oldest = tonumber(ARGV[a])
  local ttl = ARGV[a + 1]
  local n = tonumber(ARGV[a + 2])
  a = a + 3
  for _ = 1, n do
    redis.call('HINCRBY', key, ARGV[a], ARGV[a + 1])
    a = a + 2
  end
  local flat = redis.call('HGETALL', key)
  local kept = {}
  for j = 1, #flat, 2 do
    if tonumber(flat[j]) < oldest then
      redis.call('HDEL', key, flat[j])
    else
      kept[#kept + 1] = flat[j]
      kept[#kept + 1] = flat[j + 1]
    end
  end
  if n > 0 then
    redis.call('PEXPIRE', key, ttl)
  end
  out[i] = kept
end
return out
"""

# Redis errors that mean "unreachable or failing": retried with backoff, never raised further.
RETRYABLE: tuple[type[BaseException], ...] = (redis.RedisError, OSError)


def hash_key(delta: Delta) -> str:
    return f"{PREFIX}:{delta.scope}:{round(delta.width * 1000)}:{delta.name}"


def blocked_key(scope: str) -> str:
    return f"{PREFIX}:blocked:{scope}"


class RedisLimitSync:
    """The background thread that feeds ``limiter`` shared counts. ``start()``/``stop()``."""

    def __init__(
        self,
        limiter: WindowRateLimiter,
        url: str,
        clock: Clock,
        *,
        interval: float = 0.2,
        stale_after: float = 2.0,
        backoff: AbstractBackoff | None = None,
    ) -> None:
        limiter.sharing = True
        self.limiter = limiter
        self.clock = clock
        self.interval = interval
        self.stale_after = stale_after
        self.backoff = backoff or EqualJitterBackoff(cap=5.0, base=0.1)
        self.client = redis.Redis.from_url(
            url, socket_timeout=1.0, socket_connect_timeout=1.0, retry=None
        )
        self._push = self.client.register_script(_PUSH)
        self.connected = False
        self.syncs = 0
        self._failures = 0
        self._last_ok = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spauth-ratelimit", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            delay = self.interval
            try:
                self.sync_once()
            except RETRYABLE as exc:
                delay = self._failed(exc)
            self._stop.wait(delay)

    def _failed(self, exc: BaseException) -> float:
        self._failures += 1
        if self.connected or self._failures == 1:
            log.warning(
                "rate-limit sync: redis unreachable; limits are local", extra={"error": str(exc)}
            )
        self.connected = False
        if self.clock.now() - self._last_ok > self.stale_after:
            self.limiter.forget_shared()
        return max(self.interval, float(self.backoff.compute(self._failures)))

    def sync_once(self) -> None:
        """Push, read back, absorb, publish new blocks. Raises a RETRYABLE error (after
        restoring what it took, to push it next time)."""
        limiter = self.limiter
        now = self.clock.now()
        deltas = limiter.drain(now)
        if len(deltas) > MAX_NAMES:
            limiter.restore(deltas[MAX_NAMES:])
            deltas = deltas[:MAX_NAMES]
        blocks = limiter.take_blocks()
        try:
            views, blocked = self._exchange(deltas, blocks, now)
        except RETRYABLE:
            limiter.restore(deltas, blocks)
            raise
        limiter.absorb(views, blocked, now, self.stale_after)
        # Blocks the read-back just decided go out now rather than one interval later.
        blocks = limiter.take_blocks()
        if blocks:
            try:
                self._publish_blocks(blocks)
            except RETRYABLE:
                limiter.restore([], blocks)
                raise
        if not self.connected:
            log.info("rate-limit sync: redis reachable; limits are shared")
        self.connected = True
        self._failures = 0
        self._last_ok = now
        self.syncs += 1

    def _publish_blocks(self, blocks: list[tuple[str, str, float]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for scope, name, until in blocks:
            pipe.zadd(blocked_key(scope), {name: until}, gt=True)
        pipe.execute()

    def _exchange(
        self, deltas: list[Delta], blocks: list[tuple[str, str, float]], now: float
    ) -> tuple[list[tuple[Delta, dict[int, int]]], dict[str, dict[str, float]]]:
        pipe = self.client.pipeline(transaction=False)
        if deltas:
            keys = [hash_key(d) for d in deltas]
            # A hash outlives its window by one bucket, then Redis forgets it.
            buckets = self.limiter.limits.buckets + 1
            args: list[float | int] = []
            for d in deltas:
                args += [d.oldest, round(d.width * 1000 * buckets), len(d.counts)]
                for k, n in d.counts.items():
                    args += [k, n]
            self._push(keys=keys, args=args, client=pipe)
        for scope, name, until in blocks:
            pipe.zadd(blocked_key(scope), {name: until}, gt=True)
        for scope in (SOURCE, KEY):
            pipe.zremrangebyscore(blocked_key(scope), "-inf", now)
            pipe.zrangebyscore(
                blocked_key(scope), now, "+inf", start=0, num=10_000, withscores=True
            )
        results = pipe.execute()
        views: list[tuple[Delta, dict[int, int]]] = []
        if deltas:
            for d, flat in zip(deltas, results[0], strict=True):
                views.append((d, {int(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}))
        blocked = {
            SOURCE: {m.decode(): float(s) for m, s in results[-3]},
            KEY: {m.decode(): float(s) for m, s in results[-1]},
        }
        return views, blocked
