"""Measure what the ops observers add to one Check, in-process (``python -m
bench.overhead``). Numbers are per call, best of five runs; docs/operating.md quotes them.
Not a test: timings on a shared machine are noise, so nothing asserts on them."""

from __future__ import annotations

import hashlib
import logging
import timeit
from collections.abc import Callable

from envoy.service.auth.v3 import external_auth_pb2 as ext

from sidecar.authz.decision import Decision, Identity, Reason
from sidecar.authz.engine import CheckInput, Engine
from sidecar.authz.policy_source import load_policy
from sidecar.authz.replica import Replica
from sidecar.core import keyformat
from sidecar.core.clock import SystemClock
from sidecar.core.models import Change
from sidecar.dataplane.envoy_check import CheckHandler
from sidecar.ops.denial_log import DenialLog
from sidecar.ops.metrics import DecisionMetrics, Metrics
from sidecar.ratelimit import WindowRateLimiter

PATH = "/v1/workspaces/acme/checks/1"


def per_call_us(fn: Callable[[], object], number: int) -> float:
    """Microseconds per call of ``fn``, best of five."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def key_change(secret: str) -> Change:
    """The replica change that holds one key, ``secret``, allowed ``checks:read`` in acme."""
    payload = {
        "id": "key_bench",
        "digest": hashlib.sha256(secret.encode()).hexdigest(),
        "workspace": "acme",
        "scopes": ["checks:read"],
        "expires_at": 4_000_000_000,
    }
    return Change("credential.upserted", "key_bench", payload)


def _engine(secret: str, limiter: WindowRateLimiter | None = None) -> Engine:
    """An engine whose replica holds one key, ``secret``, allowed ``checks:read`` in acme."""
    replica = Replica()
    replica.load_snapshot(1, [key_change(secret)])
    return Engine(replica, load_policy(None), SystemClock(), limiter=limiter)


def _request(secret: str) -> ext.CheckRequest:
    req = ext.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "GET", PATH, "api"
    http.headers.update({":path": PATH, "authorization": f"Bearer {secret}"})
    return req


def main() -> None:
    logging.getLogger().handlers[:] = [logging.NullHandler()]
    logging.getLogger().setLevel(logging.INFO)
    metrics = DecisionMetrics(Metrics())
    denials = DenialLog(100.0)
    view = CheckInput("GET", PATH, "api", {}, {})
    ident = Identity("api_key", "key_bench", "acme", frozenset({"checks:read"}), 4e9)
    allow, deny = Decision(Reason.OK, "dec_1", ident), Decision(Reason.UNKNOWN_CREDENTIAL, "dec_2")
    base = per_call_us(lambda: None, 500_000)
    rows = [
        (
            "metrics (counter + histogram)",
            per_call_us(lambda: metrics(allow, view, "", 8e-5), 500_000),
        ),
        ("denial log, allowed check", per_call_us(lambda: denials(allow, view, "", 8e-5), 500_000)),
    ]
    for _ in range(1000):
        denials(deny, view, "", 0.0)  # empty the bucket
    rows.append(
        (
            "denial log, suppressed denial",
            per_call_us(lambda: denials(deny, view, "", 0.0), 500_000),
        )
    )
    every = DenialLog(0)
    rows.append(
        ("denial log, line written", per_call_us(lambda: every(deny, view, "", 0.0), 50_000))
    )
    secret = keyformat.mint_key()
    engine, request = _engine(secret), _request(secret)
    bare, full = CheckHandler(engine, []), CheckHandler(engine, [metrics, denials])
    a = per_call_us(lambda: bare(request, None), 100_000)  # type: ignore[arg-type]
    b = per_call_us(lambda: full(request, None), 100_000)  # type: ignore[arg-type]
    for name, value in rows:
        print(f"{name:34s} {value - base:6.2f} µs")
    print(f"{'Check handler without observers':34s} {a:6.2f} µs")
    print(f"{'Check handler with both':34s} {b:6.2f} µs")


if __name__ == "__main__":
    main()
