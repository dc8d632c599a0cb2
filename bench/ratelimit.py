"""Per-check cost of the abuse limiter on the allow path, in-process (no gRPC): the engine's
``check`` with and without a limiter, with blocked names present, and for a key with its own
rate limit. Run: ``python -m bench.ratelimit``. Prints microseconds per check (best of 7)."""

from __future__ import annotations

import hashlib
import timeit
from collections.abc import Callable

from envoy.service.auth.v3 import external_auth_pb2 as ext

from sidecar.authz.engine import CheckInput, Engine
from sidecar.authz.policy import parse_policy
from sidecar.authz.policy_source import default_policy_text
from sidecar.authz.replica import Replica
from sidecar.core import keyformat
from sidecar.core.clock import SystemClock
from sidecar.core.models import Change
from sidecar.dataplane.envoy_check import request_view
from sidecar.ratelimit import WindowRateLimiter

N = 100_000


def _replica(keys: dict[str, tuple[str, int]], now: float) -> Replica:
    replica = Replica()
    entries = []
    for key_id, (secret, rate) in keys.items():
        payload: dict[str, object] = {
            "id": key_id,
            "digest": hashlib.sha256(secret.encode()).hexdigest(),
            "workspace": "acme",
            "scopes": ["checks:read"],
            "expires_at": int(now + 86400),
        }
        if rate:
            payload.update(rate_limit=rate, rate_period=1)
        entries.append(Change("credential.upserted", key_id, payload))
    replica.load_snapshot(1, entries)
    replica.last_contact = now
    return replica


def best_us(cases: dict[str, Callable[[], object]], rounds: int = 9) -> dict[str, float]:
    """Best time per call of each case, rounds interleaved so drift hits every case alike."""
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(rounds):
        for name, fn in cases.items():
            best[name] = min(best[name], timeit.Timer(fn).timeit(N) / N * 1e6)
    return best


def main() -> None:
    clock = SystemClock()
    plain, limited = keyformat.mint_key(), keyformat.mint_key()
    replica = _replica({"key_plain": (plain, 0), "key_limited": (limited, 10**9)}, clock.now())
    policy = parse_policy(default_policy_text())

    def request(key: str) -> CheckInput:
        headers = {"authorization": f"Bearer {key}"}
        return CheckInput("GET", "/v1/workspaces/acme/checks", "api", headers, {}, "203.0.113.7")

    bare = Engine(replica, policy, clock)
    idle = Engine(replica, policy, clock, limiter=WindowRateLimiter())
    busy_limiter = WindowRateLimiter()
    now = clock.now()
    for i in range(1000):
        busy_limiter._block("source", f"10.0.{i // 256}.{i % 256}", now + 3600, now)
        busy_limiter._block("key", f"key_{i}", now + 3600, now)
    busy = Engine(replica, policy, clock, limiter=busy_limiter)
    req_plain, req_limited = request(plain), request(limited)
    msg = ext.CheckRequest()
    msg.attributes.source.address.socket_address.address = "203.0.113.7"
    msg.attributes.request.http.headers["authorization"] = f"Bearer {plain}"
    rows = best_us(
        {
            "no limiter": lambda: bare.check(req_plain),
            "limiter, nothing blocked": lambda: idle.check(req_plain),
            "limiter, 1000 sources + 1000 keys blocked": lambda: busy.check(req_plain),
            "key with its own rate limit (admit)": lambda: idle.check(req_limited),
        }
    )
    base = rows["no limiter"]
    for name, us in rows.items():
        print(f"{name:42s} {us:6.2f} µs/check  ({us - base:+5.2f})")
    view = best_us({"view": lambda: request_view(msg)})["view"]
    print(f"{'request_view (with the source address)':42s} {view:6.2f} µs")


if __name__ == "__main__":
    main()
