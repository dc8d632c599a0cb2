"""Cold access tokens on the compiled Check path (issue #19, the cold RS256 row): a token the
engine's cache does not hold is verified from the C path through ``Engine.fresh_token`` (the
engine's own rule: verify, cache when the engine caches, revocation) and its allow is answered
and observed there, built once and kept nowhere; every refusal stays the Python path's answer.

Both paths get the same bytes (as in tests/test_fastcheck_differential.py): issued tokens on
every route, the recorded hostile corpus (alg none, HS256 keyed with the public key, wrong
kid/typ, leeway edges, bad base64, duplicate members, …) at its recorded times, and fuzzed
``Authorization`` values, with the token cache off (every check verifies) and on (the first
check verifies). Answers must be byte-identical with equal observer inputs, a refusal must come
from the Python path, and no refused token may be allowed."""

from __future__ import annotations

import base64
import gc
import json
import random
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2 as ext
from hypothesis import HealthCheck, given, settings

from sidecar.auditship import records
from sidecar.authz.decision import DecisionIds, Identity
from sidecar.authz.engine import Engine
from sidecar.authz.policy_source import load_policy
from sidecar.authz.replica import Replica
from sidecar.authz.token_verifier import ReplicaTokenVerifier
from sidecar.core.changes import SigningKeyUpserted
from sidecar.core.clock import FakeClock
from sidecar.core.models import Change
from sidecar.dataplane.fastcheck import unavailable
from sidecar.ratelimit import AbuseLimits, WindowRateLimiter
from tests.support import token_corpus
from tests.test_fastcheck_differential import (
    _TOKEN_PATHS,
    AUDIENCE,
    ISSUER,
    NOW,
    TOKENS,
    Side,
    _advance,
    _apply,
    _authorization,
    _jwt,
    _replica,
    _same,
    _shipped,
    _token_request,
    request_bytes,
    step_timer,  # noqa: F401 (a fixture)
    wired,
)

pytestmark = pytest.mark.skipif(bool(unavailable()), reason=f"no compiled path: {unavailable()}")

CORPUS = json.loads((Path(__file__).parent / "fixtures" / "access_token_corpus.json").read_text())
# The verifier's refusals: each is the Python path's answer, never an allow.
REFUSALS = {
    "malformed_token", "unknown_key", "bad_signature", "alg_not_allowed", "wrong_type",
    "wrong_issuer", "wrong_audience", "token_expired", "token_not_yet_valid",
    "insufficient_claims", "lifetime_too_long", "invalid_workspace", "token_revoked",
    "malformed_credential",
}  # fmt: skip


def _side(
    compiled: bool, cache: int, replica: Replica, verifier: ReplicaTokenVerifier, now: float
) -> Side:
    clock = FakeClock(now)
    limiter = WindowRateLimiter(AbuseLimits(source_failures=5, key_failures=3))
    engine = Engine(
        replica,
        load_policy(None),
        clock,
        limiter=limiter,
        token_verifier=verifier,
        token_cache_size=cache,
    )
    engine.ids = DecisionIds(random.Random(7).randbytes, clock)
    return wired(engine, compiled)


def _pair(cache: int) -> tuple[Side, Side]:
    def side(compiled: bool) -> Side:
        verifier = ReplicaTokenVerifier(ISSUER, AUDIENCE, max_lifetime=3600)
        return _side(compiled, cache, _replica(), verifier, NOW)

    return side(False), side(True)


@pytest.fixture(params=[0, 100_000], ids=["cache-off", "cache-on"])
def cache(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def _reason(answer: tuple[Any, ...]) -> str:
    assert answer[0] == "ok", answer
    meta = ext.CheckResponse.FromString(answer[1]).dynamic_metadata
    return str(meta.fields["reason"].string_value)


def _answer(pair: tuple[Side, Side], data: bytes) -> tuple[str, bool]:
    """The reason both paths answered ``data`` with, and whether the C path decided it."""
    before = pair[1].handler.counts()  # type: ignore[attr-defined]
    reason = _reason(_same(pair, data))
    after = pair[1].handler.counts()  # type: ignore[attr-defined]
    assert after[0] + after[1] == before[0] + before[1] + 1
    return reason, after[0] == before[0] + 1


def test_uncached_tokens_are_answered_identically_and_decided_in_c(cache: int) -> None:
    pair = _pair(cache)
    reasons = set()
    for method, path in _TOKEN_PATHS:
        for token in TOKENS.values():
            for header in ({"authorization": f"Bearer {token}"}, {"x-api-key": token}):
                reason, in_c = _answer(pair, _token_request(method, path, header))
                reasons.add(reason)
                # A verified token's route decision is the C path's from its first check; a
                # refusal (wrong audience, too long a lifetime) is the Python path's.
                assert in_c == (reason not in REFUSALS), (reason, path)
    assert {"ok", "workspace_mismatch", "insufficient_scope", "no_route"} <= reasons
    assert {"wrong_audience", "lifetime_too_long"} <= reasons


def _corpus_pair(cache: int, now: float) -> tuple[Side, Side]:
    changes = [SigningKeyUpserted(k["kid"], k["alg"], k["jwk"]).change() for k in CORPUS["keys"]]

    def side(compiled: bool) -> Side:
        replica = Replica()
        replica.load_snapshot(1, changes)
        verifier = ReplicaTokenVerifier(
            token_corpus.ISSUER,
            token_corpus.AUDIENCE,
            leeway=token_corpus.LEEWAY,
            max_lifetime=token_corpus.MAX_LIFETIME,
        )
        return _side(compiled, cache, replica, verifier, now)

    return side(False), side(True)


@pytest.mark.parametrize("case", CORPUS["cases"], ids=[c["name"] for c in CORPUS["cases"]])
def test_the_hostile_corpus_is_answered_identically_and_refusals_by_python(
    case: dict[str, Any], cache: int
) -> None:
    pair = _corpus_pair(cache, case["now"])
    data = _token_request(
        "GET", "/v1/workspaces/acme/checks", {"authorization": f"Bearer {case['token']}"}
    )
    expected = case["verdict"].get("reason")
    for _ in range(2):  # with the cache on, the second check is a cached one
        reason, in_c = _answer(pair, data)
        if expected is not None:
            token = case["token"]
            if len(token) > 8192 or token.count(".") != 2:  # refused before the verifier
                expected = "malformed_credential"
            assert reason == expected and not in_c
        else:  # accepted: the route decides, in C; past exp, inside the leeway, in Python
            in_leeway = case["now"] >= case["verdict"]["identity"]["expires_at"]
            assert reason not in REFUSALS and in_c != in_leeway


_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))


@_FUZZ
@given(value=_authorization())
def test_fuzzed_authorization_headers_are_answered_identically_uncached(value: str) -> None:
    pair = _pair(0)
    for method, path in _TOKEN_PATHS[:2]:
        _same(pair, _token_request(method, path, {"authorization": value}))


def test_revoked_and_expired_tokens_are_refused_by_the_python_path() -> None:
    pair = _pair(0)
    revoked, expiring = (
        _token_request("GET", "/v1/workspaces/acme/checks", {"authorization": f"Bearer {t}"})
        for t in (_jwt(grant="grt_7"), _jwt(grant="grt_8", ttl=600))
    )
    assert _answer(pair, revoked) == ("ok", True)
    _apply(pair, Change("grant.revoked", "grt_7", {"grant_id": "grt_7", "expires_at": NOW + 3600}))
    assert _answer(pair, revoked) == ("token_revoked", False)
    assert _answer(pair, expiring) == ("ok", True)
    _advance(pair, 600)  # at exp, inside the verifier's leeway: allowed, by the Python path
    assert _answer(pair, expiring) == ("ok", False)
    _advance(pair, 30)
    assert _answer(pair, expiring) == ("token_expired", False)


@pytest.mark.usefixtures("step_timer")
def test_uncached_tokens_keep_nothing_per_check(tmp_path: Path) -> None:
    """With the cache off every check brings a new, equal Identity: the C path must answer it
    once and keep neither a template nor an observer entry per Identity (memory would grow by
    one per check, as it would through the cached tokens' per-Identity caches), and its
    records and usage must be the Python path's."""
    policy = load_policy(None)
    python = _shipped(policy, False, tmp_path / "p", 10_000, 1.0, token_cache_size=0)
    compiled = _shipped(policy, True, tmp_path / "c", 10_000, 1.0, token_cache_size=0)
    data = request_bytes(
        "GET", "/v1/workspaces/acme/checks", {"authorization": f"Bearer {TOKENS['reader']}"}
    )

    def identities() -> int:
        python.flush()  # the Python recorder's queue holds its decisions until written
        compiled.flush()
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is Identity)

    assert compiled.answer(data) == python.answer(data)
    held = identities()
    for _ in range(200):
        assert compiled.answer(data) == python.answer(data)
    assert identities() - held < 20
    assert compiled.handler.observed() == 201  # type: ignore[attr-defined]
    python.flush()
    compiled.flush()
    assert compiled.payloads == python.payloads and len(python.payloads) == 201
    assert compiled.usage.harvest(final=True) == python.usage.harvest(final=True)
    python.pipeline.close(0)
    compiled.pipeline.close(0)


def test_distinct_uncached_tokens_keep_a_bounded_number_of_identities(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each new token is a new identity: with the cache off the records' fixed-part memo is
    the only thing that could keep them, and it keeps at most FIXED_TOKENS of them (here 8), so
    a sidecar that sees many distinct tokens does not grow by one identity per token."""
    monkeypatch.setattr(records, "FIXED_TOKENS", 8)
    monkeypatch.setattr(records, "_FIXED_TOKENS", {})
    policy = load_policy(None)
    compiled = _shipped(policy, True, tmp_path / "c", 10_000, 1.0, token_cache_size=0)

    def identities() -> int:
        compiled.flush()
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is Identity)

    def request(grant: int) -> bytes:
        token = _jwt(grant=f"grt_{grant}")
        return request_bytes(
            "GET", "/v1/workspaces/acme/checks", {"authorization": f"Bearer {token}"}
        )

    compiled.answer(request(0))
    held = identities()
    for grant in range(1, 41):
        compiled.answer(request(grant))
    assert compiled.handler.observed() == 41  # type: ignore[attr-defined]
    assert identities() - held <= 8
    compiled.flush()
    assert len(compiled.payloads) == 41
    compiled.pipeline.close(0)


class _Counting:
    """The real verifier, counting its calls (how many verifications a check cost)."""

    def __init__(self, verifier: ReplicaTokenVerifier) -> None:
        self.verifier = verifier
        self.leeway = verifier.leeway
        self.calls = 0

    def __call__(self, token: str, replica: Replica, now: float) -> Identity:
        self.calls += 1
        return self.verifier(token, replica, now)


def test_a_refused_token_sent_again_is_verified_once_and_a_later_valid_one_allowed() -> None:
    pair = _pair(0)
    counting = [_Counting(side.engine.token_verifier) for side in pair]  # type: ignore[arg-type]
    for side, verifier in zip(pair, counting, strict=True):
        side.engine.token_verifier = verifier
    later = _jwt(grant="grt_5")  # issued at NOW: not yet valid before NOW - leeway
    data = _token_request("GET", "/v1/workspaces/acme/checks", {"authorization": f"Bearer {later}"})
    _advance(pair, -3600)
    # The first refusal costs the C path's verification and the Python path's; the same token
    # again goes straight to the Python path: one verification, as on the pure-Python path.
    assert _answer(pair, data) == ("token_not_yet_valid", False)
    assert (counting[0].calls, counting[1].calls) == (1, 2)
    assert _answer(pair, data) == ("token_not_yet_valid", False)
    assert (counting[0].calls, counting[1].calls) == (2, 3)
    _advance(pair, 3600)  # valid now: allowed (by the Python path, which remembers nothing)
    assert _answer(pair, data) == ("ok", False)
    fresh = _token_request(
        "GET", "/v1/workspaces/acme/checks", {"authorization": f"Bearer {_jwt(grant='grt_6')}"}
    )
    assert _answer(pair, fresh) == ("ok", True)
    assert (counting[0].calls, counting[1].calls) == (4, 5)


def test_the_verification_hook_is_set_up_once() -> None:
    """A check in flight may be inside the hook: it is never replaced once set."""
    compiled = _pair(0)[1].handler
    with pytest.raises(RuntimeError, match="already set up"):
        compiled._native.verify_tokens(lambda *a: None, lambda *a: b"")  # type: ignore[attr-defined]


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_signature_lengths_and_deep_json_are_refused_by_the_python_path() -> None:
    """What the verifier's cheaper parts must still refuse, on both paths alike: a valid RS256
    signature with its leading zero byte left out or one added (the RSA recovery alone would
    read the same number), and a header nested past the recursion limit (it raised out of the
    verifier before: an internal error, not a refusal)."""
    pair = _pair(0)
    for grant in range(100_000):  # about one signature in 256 starts with a zero byte
        token = _jwt(grant=f"grt_{grant}")
        head, _, signature = token.rpartition(".")
        raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
        if raw[0] == 0:
            break
    assert raw[0] == 0
    deep = _b64url(b'{"a":' + b"[" * 2500 + b"]" * 2500 + b"}")
    longer = _b64url(bytes(1) + raw)
    cases = [
        (token, "ok"),
        (f"{head}.{_b64url(raw[1:])}", "bad_signature"),
        (f"{head}.{longer}", "bad_signature"),
        (f"{deep}.{head.partition('.')[2]}.{signature}", "malformed_token"),
    ]
    for credential, expected in cases:
        data = _token_request(
            "GET", "/v1/workspaces/acme/checks", {"authorization": f"Bearer {credential}"}
        )
        assert _answer(pair, data) == (expected, expected == "ok")
