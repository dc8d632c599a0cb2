"""Limits shared through a real Redis: two limiters stand for two sidecars; each runs its sync
step by hand (the background thread does the same every interval) under an injected clock."""

from __future__ import annotations

import pytest
import redis

from sidecar.core.clock import FakeClock
from sidecar.ratelimit import AbuseLimits, WindowRateLimiter
from sidecar.ratelimit.shared import RedisLimitSync
from tests.support.redis import RedisServer

pytestmark = pytest.mark.redis

LIMITS = AbuseLimits(source_failures=5, key_failures=3, failure_window=60)


def sidecar(url: str, clock: FakeClock) -> tuple[WindowRateLimiter, RedisLimitSync]:
    limiter = WindowRateLimiter(LIMITS)
    return limiter, RedisLimitSync(limiter, url, clock, stale_after=2.0)


def admitted(limiter: WindowRateLimiter, clock: FakeClock, n: int) -> int:
    return sum(limiter.admit("key_a", 10, 1, clock.now()) for _ in range(n))


def test_a_key_rate_is_shared_by_two_sidecars(redis_url: str, clock: FakeClock) -> None:
    (a, sync_a), (b, sync_b) = sidecar(redis_url, clock), sidecar(redis_url, clock)
    try:
        assert admitted(b, clock, 1) == 1  # b serves the key too, so it reads its count back
        assert admitted(a, clock, 6) == 6
        sync_a.sync_once()
        sync_b.sync_once()
        assert admitted(b, clock, 10) == 3
        sync_b.sync_once()
        sync_a.sync_once()
        assert admitted(a, clock, 5) == 0  # the limit is spent across both
        clock.advance(1.0)
        sync_a.sync_once()
        assert admitted(a, clock, 1) == 1  # the window slid
    finally:
        sync_a.stop()
        sync_b.stop()


def test_without_sync_each_sidecar_enforces_the_limit_alone(
    redis_url: str, clock: FakeClock
) -> None:
    (a, sync_a), (b, sync_b) = sidecar(redis_url, clock), sidecar(redis_url, clock)
    try:
        # Between two syncs each one only knows its own count: the documented overshoot.
        assert admitted(a, clock, 10) == 10
        assert admitted(b, clock, 10) == 10
        sync_a.sync_once()
        sync_b.sync_once()
        sync_a.sync_once()
        assert admitted(a, clock, 1) == 0
        assert admitted(b, clock, 1) == 0
    finally:
        sync_a.stop()
        sync_b.stop()


def test_a_source_blocked_on_one_sidecar_is_blocked_on_the_other(
    redis_url: str, clock: FakeClock
) -> None:
    (a, sync_a), (b, sync_b) = sidecar(redis_url, clock), sidecar(redis_url, clock)
    try:
        for _ in range(3):
            a.failed("203.0.113.7", "", clock.now())
        for _ in range(2):
            b.failed("203.0.113.7", "", clock.now())
        assert not a.source_blocked("203.0.113.7", clock.now())
        sync_a.sync_once()
        sync_b.sync_once()  # b's push makes five: b blocks and publishes the block
        assert b.source_blocked("203.0.113.7", clock.now())
        sync_a.sync_once()  # a learns the block without having seen the fifth failure
        assert a.source_blocked("203.0.113.7", clock.now())
        assert not a.source_blocked("198.51.100.2", clock.now())
        clock.advance(61)
        assert not a.source_blocked("203.0.113.7", clock.now())
    finally:
        sync_a.stop()
        sync_b.stop()


def test_redis_down_degrades_to_local_limits_and_recovers(clock: FakeClock) -> None:
    with RedisServer() as server:
        (a, sync_a), (b, sync_b) = sidecar(server.url, clock), sidecar(server.url, clock)
        try:
            assert admitted(b, clock, 1) == 1
            assert admitted(a, clock, 7) == 7
            sync_a.sync_once()
            sync_b.sync_once()
            server.stop()
            with pytest.raises(redis.ConnectionError):
                sync_b.sync_once()
            # Still inside the freshness bound: b keeps the shared view it had.
            assert admitted(b, clock, 5) == 2
            clock.advance(1.0)
            for sync in (sync_a, sync_b):
                clock.advance(1.5)
                assert sync._failed(redis.ConnectionError("down")) > 0
            # Past it: each sidecar enforces the limit alone, nothing refused because of Redis.
            assert admitted(a, clock, 10) == 10
            assert admitted(b, clock, 12) == 10
            a.failed("203.0.113.7", "", clock.now())
            assert not a.source_blocked("203.0.113.7", clock.now())
            server.start()
            sync_a.sync_once()  # the events counted during the outage are pushed now
            sync_b.sync_once()
            sync_a.sync_once()
            assert admitted(a, clock, 1) == 0
            assert sync_a.connected and sync_b.connected
        finally:
            sync_a.stop()
            sync_b.stop()


def test_the_background_thread_syncs(redis_url: str, clock: FakeClock) -> None:
    from tests.conftest import wait_until

    (a, sync_a), (b, sync_b) = sidecar(redis_url, clock), sidecar(redis_url, clock)
    sync_a.interval = sync_b.interval = 0.02
    sync_a.start()
    sync_b.start()
    try:
        assert admitted(b, clock, 1) == 1
        assert admitted(a, clock, 9) == 9
        wait_until(lambda: sync_b.syncs > 2 and sync_a.syncs > 2)
        start = sync_b.syncs
        wait_until(lambda: sync_b.syncs > start + 1)
        assert admitted(b, clock, 1) == 0
    finally:
        sync_a.stop()
        sync_b.stop()
