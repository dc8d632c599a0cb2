"""A route's denials on the compiled Check path — an authenticated API key or access token
refused for where it goes (insufficient_scope, workspace_mismatch, no_route,
operator_not_allowed) — and non-canonical paths: decided in C, and observed in C too with the
sidecar's own observers (the metrics tally, the decision record's spool payload, the usage
count of tally.USED's reasons, the denial log's line through ``DenialLog.deny``), leaving the
same records, lines, metrics and usage as the pure-Python path. The pair, corpus helpers and
shipped observers of tests/test_fastcheck_differential.py and tests/test_fastcheck_unknown.py."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from sidecar.authz.decision import Reason
from sidecar.authz.policy_source import load_policy
from sidecar.core import keyformat
from sidecar.core.models import Change
from sidecar.dataplane.fastcheck import _REASONS as REASONS
from sidecar.dataplane.fastcheck import unavailable
from sidecar.ratelimit import AbuseLimits
from tests.test_fastcheck_differential import (
    SECRETS,
    TOKENS,
    StepTimer,
    _shipped,
    request_bytes,
    step_timer,
)
from tests.test_fastcheck_unknown import _catching, shipped_pair

pytestmark = pytest.mark.skipif(bool(unavailable()), reason=f"not built: {unavailable()}")
__all__ = ["step_timer"]  # a fixture, imported to be used here

ACME = "/v1/workspaces/acme"
DENIAL_ENTRIES = 4096  # _fastcheck.c's bound on a denial's entries per reason


def _key(name: str) -> dict[str, str]:
    return {"x-api-key": SECRETS[name]}


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# (method, path, credential headers): one of each denial the C path decides on a route, for an
# API key and a token, and an allow between them (the same identities allow, then are refused).
ROUND = [
    ("GET", f"{ACME}/metrics", _key("reader")),  # insufficient_scope
    ("GET", f"{ACME}/checks", _key("globex")),  # workspace_mismatch
    ("GET", "/v1/nothing", _key("reader")),  # no_route
    ("GET", f"{ACME}/checks", _key("operator")),  # operator_not_allowed
    ("GET", f"{ACME}/../checks", _key("reader")),  # non_canonical_path
    ("GET", f"{ACME}/keys", _bearer(TOKENS["reader"])),  # insufficient_scope
    ("GET", "/v1/workspaces/globex/checks", _bearer(TOKENS["reader"])),  # workspace_mismatch
    ("GET", "/v1/nothing", _bearer(TOKENS["globex"])),  # no_route
    ("GET", f"{ACME}/checks", _key("reader")),  # ok
]
# What the Python recorder redacts (a token- or key-shaped path or source): the C path hands
# these checks' observers to Python.
HANDED_OVER = [
    ("GET", f"{ACME}/metrics/eyJx", _key("reader"), "10.2.0.1"),
    ("GET", f"{ACME}/metrics", _key("reader"), "spk_" + "b" * 30),
]


@pytest.mark.parametrize("capacity", [100_000, 40])
def test_route_denials_observed_in_c_leave_the_same_records_lines_metrics_and_usage(
    capacity: int, tmp_path: Path, step_timer: StepTimer
) -> None:
    limits = AbuseLimits(source_failures=10**6, key_failures=10**6)
    shipped = shipped_pair("default", tmp_path, capacity, limits)
    rounds = 12  # 96 denials of known identities: past the denial log's burst of 50
    requests = [
        request_bytes(method, path, headers, source=f"10.3.{n % 5}.1")
        for n in range(rounds)
        for method, path, headers in ROUND
    ]
    requests += [
        request_bytes(method, path, headers, source=source)
        for method, path, headers, source in HANDED_OVER
    ]
    shipped.answer_alike(requests)
    python, compiled = shipped.sides
    for log, sink in zip(shipped.denials, shipped.lines, strict=True):
        with _catching(sink):
            assert log.flush(force=True) > 0  # some lines were suppressed, on both sides alike
    for side in shipped.sides:
        side.flush()
    lines = shipped.lines
    assert len(lines[0].lines) > 50
    assert lines[1].lines == lines[0].lines
    assert {line["reason"] for line in lines[0].lines if "reason" in line} >= {
        "insufficient_scope",
        "workspace_mismatch",
        "no_route",
        "operator_not_allowed",
        "non_canonical_path",
    }
    assert compiled.payloads == python.payloads
    assert python.pipeline.queue.stats() == compiled.pipeline.queue.stats()
    if capacity > len(requests):
        assert len(python.payloads) == len(requests)
    text = generate_latest(python.metrics.registry)
    assert re.search(rb'reason="insufficient_scope"} 26\.0', text)
    assert re.search(rb'reason="operator_not_allowed"} 12\.0', text)
    assert generate_latest(compiled.metrics.registry) == text
    for final in (False, True):
        assert compiled.usage.harvest(final=final) == python.usage.harvest(final=final)
    # Every check but the two whose record Python redacts was decided and observed in C.
    decided, fell_back = compiled.handler.counts()  # type: ignore[attr-defined]
    assert (decided, fell_back) == (len(requests), 0)
    assert compiled.handler.observed() == len(requests) - len(HANDED_OVER)  # type: ignore[attr-defined]
    for side in shipped.sides:
        side.pipeline.close(0)


def test_a_denials_observer_entries_are_bounded_per_reason(
    tmp_path: Path, step_timer: StepTimer
) -> None:
    """The C path keeps one observer entry per reason and identity (its record part and usage
    key); a tenant chooses which denials it is refused, and an entry keeps a token's identity
    alive, so a denial's table keeps at most 4,096 (then starts over), the allows' 100,000."""
    side = _shipped(load_policy(None), True, tmp_path / "spool", 100_000, 1.0)
    assert side.engine is not None
    replica = side.engine.replica
    secrets = [keyformat.mint_key() for _ in range(DENIAL_ENTRIES + 50)]
    for n, secret in enumerate(secrets):
        payload = {
            "id": f"key_many{n}",
            "digest": hashlib.sha256(secret.encode()).hexdigest(),
            "workspace": "acme",
            "scopes": ["checks:read"],
            "expires_at": 4_000_000_000,
        }
        replica.apply(Change("credential.upserted", f"key_many{n}", payload, replica.revision + 1))
    for secret in secrets:
        for path in (f"{ACME}/checks", f"{ACME}/metrics"):  # an allow, an insufficient_scope
            side.answer(request_bytes("GET", path, {"x-api-key": secret}))
    counts = side.handler._native.entry_counts()  # type: ignore[attr-defined]
    assert counts[REASONS.index(Reason.OK)] == len(secrets)
    assert 0 < counts[REASONS.index(Reason.INSUFFICIENT_SCOPE)] <= DENIAL_ENTRIES
    assert side.handler.observed() == 2 * len(secrets)  # type: ignore[attr-defined]
    side.pipeline.close(0)
