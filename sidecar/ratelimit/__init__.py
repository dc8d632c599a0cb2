"""Abuse limits for the engine (``sidecar.core.ratelimit.RateLimiter``): in-memory sliding
windows per process, optionally shared across sidecars through Redis by a background thread."""

from sidecar.ratelimit.local import AbuseLimits, WindowRateLimiter
from sidecar.ratelimit.shared import RedisLimitSync
from sidecar.ratelimit.window import BucketWindow

__all__ = ["AbuseLimits", "BucketWindow", "RedisLimitSync", "WindowRateLimiter"]
