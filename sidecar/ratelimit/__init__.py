"""Abuse limits for the engine (``sidecar.authz.ratelimit.RateLimiter``): in-memory sliding
windows per process, optionally shared across sidecars through Redis by a background thread
(``sidecar.ratelimit.shared``, imported only when Redis is configured: redis-py loads
OpenTelemetry on import, which a sidecar without tracing must not pay for)."""

from sidecar.ratelimit.local import AbuseLimits, WindowRateLimiter
from sidecar.ratelimit.window import BucketWindow

__all__ = ["AbuseLimits", "BucketWindow", "WindowRateLimiter"]
