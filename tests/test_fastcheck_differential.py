"""The compiled Check path against the pure-Python one (the reference), request by request: the
same bytes go to both — CheckRequests captured from a real Envoy, built from the policies'
routes (every decision the C path makes and every reason it must hand over), the hostile paths
of test_adversarial_paths, forged identity headers, raw header_map, huge and many headers, and
hypothesis-fuzzed, truncated and bit-flipped mutations, and bearer access tokens (cached, expired,
retired keys, revoked grants and jtis, fuzzed Authorization headers) — and the answers must be
byte-identical (or the same gRPC error), with equal decisions and observer inputs. Two engines
with the same replica, policy, fake clock and seeded decision-id randomness; only the handler
differs."""

from __future__ import annotations

import hashlib
import http.client
import random
import re
import tempfile
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as ext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from sidecar.auditship import AuditPipeline, ShipConfig
from sidecar.auditship.codec import decode
from sidecar.auditship.observer import DecisionRecorder
from sidecar.auditship.records import PendingDecision
from sidecar.authz.decision import Decision, DecisionIds
from sidecar.authz.engine import CheckInput, Engine
from sidecar.authz.policy import Policy, parse_policy
from sidecar.authz.policy_source import load_policy
from sidecar.authz.replica import Replica
from sidecar.authz.token_verifier import ReplicaTokenVerifier
from sidecar.core import keyformat
from sidecar.core.audit import scrub
from sidecar.core.changes import signing_key_retired, signing_key_upserted
from sidecar.core.clock import FakeClock
from sidecar.core.models import Change
from sidecar.dataplane import envoy_check, fastcheck
from sidecar.dataplane.envoy_check import SERVICE, CheckHandler, parse_check_request
from sidecar.dataplane.fastcheck import FastCheckHandler, unavailable
from sidecar.devtools.echo_upstream import EchoUpstream
from sidecar.oauth import rfc9068
from sidecar.ops.denial_log import DenialLog
from sidecar.ops.metrics import DecisionMetrics, Metrics
from sidecar.ratelimit import AbuseLimits, WindowRateLimiter
from sidecar.usage import UsageTally
from tests.support.envoy import EnvoyProcess
from tests.support.signing import key_pair
from tests.test_adversarial_paths import PATH_TRICKS

pytestmark = pytest.mark.skipif(bool(unavailable()), reason=f"not built: {unavailable()}")

NOW = 1_800_000_000.0
HOST = "api.statuspulse.test"
# A second policy that uses what the default one does not: hosts, context extensions, '*' and
# named segments, a trailing slash, escaped literals, the operator key allowed, no stripping,
# a custom credential header.
EXTRA_POLICY = """
[credentials]
headers = ["x-key", "authorization"]
strip = false
allow_operator_key = true

[[routes]]
path = "/status/"
public = true

[[routes]]
methods = ["GET"]
path = "/v2/{workspace}/items/*/detail"
hosts = ["Admin.Example.:443", "api.example"]
scopes = ["checks:read"]

[[routes]]
path = "/v2/{workspace}/c+c (x)/{thing}/**"
context = { tier = "gold", zone = "eu" }
scopes = ["checks:write", "metrics:read"]

[[routes]]
methods = ["DELETE"]
path = "/"
scopes = ["admin:full"]
"""

# name -> (workspace, scopes, extra payload)
KEYS: dict[str, tuple[str, list[str], dict[str, Any]]] = {
    "reader": ("acme", ["checks:read"], {}),
    "writer": ("acme", ["checks:read", "checks:write", "metrics:read", "metrics:write"], {}),
    "admin": ("acme", ["admin:full"], {}),
    "globex": ("globex", ["checks:read", "keys:manage"], {}),
    "operator": ("*", ["admin:full"], {}),
    "revoked": ("acme", ["checks:read"], {"revoked": True}),
    "suspended": ("acme", ["checks:read"], {"suspended": True}),
    "expired": ("acme", ["checks:read"], {"expires_at": int(NOW) - 1}),
    "networks": ("acme", ["checks:read"], {"client_cidrs": ["10.0.0.0/8"]}),
    "rated": ("acme", ["checks:read"], {"rate_limit": 2, "rate_period": 60}),
}
SECRETS = {name: keyformat.mint_key() for name in KEYS}
ISSUER = "http://127.0.0.1:8080"
AUDIENCE = "statuspulse-api"
# Two published signing keys: tokens of the second survive the first one's retirement.
SIGNING = [key_pair(int(NOW) - 60) for _ in range(2)]


def _replica() -> Replica:
    replica = Replica()
    entries = []
    for name, (workspace, scopes, extra) in KEYS.items():
        payload = {
            "id": f"key_{name}",
            "digest": hashlib.sha256(SECRETS[name].encode()).hexdigest(),
            "workspace": workspace,
            "scopes": scopes,
            "expires_at": 4_000_000_000,
            **extra,
        }
        entries.append(Change("credential.upserted", f"key_{name}", payload))
    entries += [signing_key_upserted(key) for key, _ in SIGNING]
    replica.load_snapshot(1, entries)
    return replica


class Aborted(Exception):
    pass


class Context:
    """What the handlers use of grpc.ServicerContext: abort, which raises."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


@dataclass
class Side:
    """One engine and handler, with what its observers were told."""

    handler: Callable[[bytes, Any], bytes] = field(repr=False)
    engine: Engine = field(repr=False)
    seen: list[tuple[Any, ...]] = field(default_factory=list, repr=False)
    errors: list[str] = field(default_factory=list, repr=False)

    def answer(self, data: bytes) -> tuple[Any, ...]:
        try:
            return ("ok", self.handler(data, Context()))
        except Aborted as exc:
            return ("aborted", *exc.args)


def _observe(seen: list[tuple[Any, ...]]) -> Callable[[Decision, CheckInput, str, float], None]:
    def observe(decision: Decision, view: CheckInput, source: str, elapsed: float) -> None:
        assert type(decision) is Decision and type(view) is CheckInput
        seen.append((decision, *view[:3], dict(view.headers), dict(view.context), view[5], source))

    return observe


def _side(policy: Policy, compiled: bool, seed: int) -> Side:
    rng = random.Random(seed)
    limiter = WindowRateLimiter(AbuseLimits(source_failures=5, key_failures=3))
    verifier = ReplicaTokenVerifier(ISSUER, AUDIENCE, max_lifetime=3600)
    engine = Engine(_replica(), policy, FakeClock(NOW), limiter=limiter, token_verifier=verifier)
    engine.ids = DecisionIds(rng.randbytes, engine.clock)
    return wired(engine, compiled)


def wired(engine: Engine, compiled: bool) -> Side:
    """``engine`` behind the compiled handler or the Python path, its observations and
    errors kept."""
    side = Side(lambda data, ctx: b"", engine)
    handler = CheckHandler(engine, [_observe(side.seen)], lambda r, _t: side.errors.append(r))
    if compiled:
        side.handler = FastCheckHandler(handler)
    else:
        side.handler = lambda data, ctx: handler(parse_check_request(data), ctx)
    return side


@pytest.fixture(params=["default", "extra"])
def pair(request: pytest.FixtureRequest) -> tuple[Side, Side]:
    policy = load_policy(None) if request.param == "default" else parse_policy(EXTRA_POLICY)
    return _side(policy, False, 7), _side(policy, True, 7)


def _same(pair: tuple[Side, Side], data: bytes) -> tuple[Any, ...]:
    python, compiled = pair
    expected = python.answer(data)
    assert compiled.answer(data) == expected, data
    assert compiled.seen == python.seen
    assert compiled.errors == python.errors
    for side in pair:
        side.seen.clear()
        side.errors.clear()
    return expected


# -- the corpus ------------------------------------------------------------------------------


def request_bytes(
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    *,
    host: str = HOST,
    context: dict[str, str] | None = None,
    source: str = "127.0.0.1",
    raw: list[tuple[str, str]] | None = None,
) -> bytes:
    req = ext.CheckRequest()
    attrs = req.attributes
    http = attrs.request.http
    http.method, http.path, http.host = method, path, host
    http.headers.update({":method": method, ":path": path, ":authority": host})
    http.headers.update(headers or {})
    for key, value in raw or ():
        http.header_map.headers.add(key=key, raw_value=value.encode())
    attrs.context_extensions.update(context or {})
    if source:
        attrs.source.address.socket_address.address = source
    return req.SerializeToString()


def _credentials() -> list[dict[str, str]]:
    out: list[dict[str, str]] = [{}]
    for secret in SECRETS.values():
        out += [{"authorization": f"Bearer {secret}"}, {"x-api-key": secret}, {"x-key": secret}]
    reader = SECRETS["reader"]
    out += [
        {"authorization": f"bearer   {reader}  "},
        {"authorization": f"BEARER {reader}"},
        {"authorization": f"Basic {reader}"},
        {"authorization": reader},
        {"authorization": "Bearer"},
        {"authorization": "Bearer "},
        {"authorization": f"Bearer {reader}x"},
        {"authorization": "Bearer spk_" + "A" * 40},
        {"authorization": "Bearer a.b.c"},
        {"authorization": f"Bearer {reader}\t"},
        {"authorization": f"Bearer {reader}é"},
        {"authorization": "Bearer spk_" + "x" * 9000},
        {"x-api-key": "", "authorization": f"Bearer {reader}"},
        {"authorization": f"Bearer {SECRETS['globex']}", "x-api-key": reader},
        {"x-key": reader, "authorization": f"Bearer {SECRETS['admin']}"},
    ]
    return out


def _paths() -> list[tuple[str, str]]:
    out = []
    for ws in ("acme", "globex", "*"):
        for area in ("checks", "metrics", "dashboards", "alerts", "keys", "admin", "nothing"):
            out.append(("GET", f"/v1/workspaces/{ws}/{area}"))
            out.append(("POST", f"/v1/workspaces/{ws}/{area}/a/b?x=1&y=/../"))
        out += [
            ("GET", f"/v2/{ws}/items/7/detail"),
            ("POST", f"/v2/{ws}/c+c (x)/t/deep/er"),
            ("PATCH", f"/v2/{ws}/c+c (x)/t"),
        ]
    out += [
        ("GET", "/healthz"),
        ("HEAD", "/healthz?x"),
        ("POST", "/healthz"),
        ("GET", "/status/"),
        ("GET", "/status"),
        ("DELETE", "/"),
        ("GET", "/"),
        ("POST", "/v1/ingest/metrics"),
        ("get", "/v1/workspaces/acme/checks"),
        ("GET", ""),
        ("GET", "v1/workspaces/acme/checks"),
        ("GET", "/v1/workspaces/acme/checks/é"),
        ("GET", "/v1/workspaces//checks"),
        ("GET", "/v1/workspaces/acme/checks\n"),
    ]
    out += [("GET", path) for _, path in PATH_TRICKS]
    return out


def corpus() -> list[bytes]:
    items = []
    for method, path in _paths():
        for headers in _credentials():
            items.append(request_bytes(method, path, headers))
    reader = {"authorization": f"Bearer {SECRETS['reader']}"}
    writer = {"x-key": SECRETS["writer"], "x-statuspulse-workspace": "globex"}
    items += [
        # forged identity headers, and the header-bound workspace of the ingest route
        request_bytes(
            "GET",
            "/v1/workspaces/acme/checks",
            {**reader, "x-statuspulse-workspace": "globex", "x_statuspulse_scopes": "admin:full"},
        ),
        request_bytes(
            "POST", "/v1/ingest/metrics", {**reader, "x-statuspulse-workspace-id": "acme"}
        ),
        # hosts and context extensions of the extra policy
        *(
            request_bytes("GET", "/v2/acme/items/7/detail", {"x-key": SECRETS["reader"]}, host=h)
            for h in (
                "admin.example",
                "ADMIN.example.:443",
                "api.example:8080",
                "api.example:x",
                "[::1]:80",
                "api.example.",
                "other",
                "",
            )
        ),
        *(
            request_bytes("POST", "/v2/acme/c+c (x)/t/u", writer, context=c)
            for c in (
                {"tier": "gold", "zone": "eu"},
                {"tier": "gold"},
                {"tier": "gold", "zone": "us", "x": "y"},
                {},
            )
        ),
        # sources: none, IPv6, a network key from inside and outside its networks
        request_bytes("GET", "/v1/workspaces/acme/checks", reader, source=""),
        request_bytes("GET", "/v1/workspaces/acme/checks", reader, source="::1"),
        request_bytes(
            "GET",
            "/v1/workspaces/acme/checks",
            {"authorization": f"Bearer {SECRETS['networks']}"},
            source="10.1.2.3",
        ),
        # raw header_map (encode_raw_headers), alone and with headers
        request_bytes(
            "GET",
            "/v1/workspaces/acme/checks",
            raw=[("authorization", f"Bearer {SECRETS['reader']}"), ("X-A", "1"), ("x-a", "2")],
        ),
        request_bytes("GET", "/v1/workspaces/acme/checks", reader, raw=[("x", "y")]),
        # many and huge headers
        request_bytes(
            "GET", "/v1/workspaces/acme/checks", {**reader, **{f"h{i}": "v" for i in range(250)}}
        ),
        request_bytes(
            "GET", "/v1/workspaces/acme/checks", {**reader, **{f"h{i}": "v" for i in range(300)}}
        ),
        request_bytes("GET", "/v1/workspaces/acme/checks", {**reader, "big": "x" * 200_000}),
        request_bytes("GET", "/v1/workspaces/acme/checks", {**reader, "big": "x" * 300_000}),
        # duplicate map entries and repeated fields: protobuf keeps the last
        request_bytes("GET", "/v1/workspaces/acme/checks", {"authorization": "Bearer nope"})
        + request_bytes("GET", "/v1/workspaces/acme/checks", reader)[0:0],
    ]
    base = request_bytes("GET", "/v1/workspaces/globex/checks", reader)
    items += [base + request_bytes("GET", "/v1/workspaces/acme/checks", reader), base + base]
    return items


CORPUS = corpus()


def test_the_corpus_is_answered_identically(pair: tuple[Side, Side]) -> None:
    for data in CORPUS:
        _same(pair, data)
    decided, fell_back = pair[1].handler.counts()  # type: ignore[attr-defined]
    # Both paths were exercised: the C path is not a no-op, and it hands over what it must.
    assert decided > 200 and fell_back > 200


# -- captured from a real Envoy ---------------------------------------------------------------


class Capture:
    """An ext_authz server that keeps each CheckRequest's bytes as Envoy sent them."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.ok = ext.CheckResponse()
        self.ok.status.code = 0

    def __call__(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        self.requests.append(data)
        return bytes(self.ok.SerializeToString())


@pytest.fixture(scope="module")
def captured() -> list[bytes]:
    capture = Capture()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    method = grpc.unary_unary_rpc_method_handler(capture)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Check": method}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    reader = SECRETS["reader"]
    sends = [
        ("GET", "/v1/workspaces/acme/checks", {"authorization": f"Bearer {reader}"}),
        ("GET", "/v1/workspaces/acme/checks/1?x=2", {"x-api-key": reader}),
        ("POST", "/v1/workspaces/acme/checks", {"authorization": f"Bearer {reader}"}),
        ("GET", "/v1/workspaces/globex/checks", {"authorization": f"Bearer {reader}"}),
        ("GET", "/v1/workspaces/acme/keys", {"authorization": f"Bearer {SECRETS['globex']}"}),
        ("GET", "/v1/workspaces/acme/checks", {"authorization": f"Bearer {SECRETS['operator']}"}),
        ("GET", "/v1/workspaces/acme/checks", {}),
        ("GET", "/v1/workspaces/acme/checks", {"authorization": "Bearer spk_nope"}),
        ("GET", "/v1/workspaces/acme/checks/%2e%2e/globex", {"authorization": f"Bearer {reader}"}),
        ("GET", "/nothing", {"authorization": f"Bearer {reader}"}),
        (
            "GET",
            "/v1/workspaces/acme/checks",
            {
                "authorization": f"Bearer {reader}",
                "x-statuspulse-workspace": "globex",
                "x-statuspulse-key-id": "k",
            },
        ),
    ]
    try:
        with (
            EchoUpstream() as echo,
            EnvoyProcess(authz=("127.0.0.1", port), upstream=("127.0.0.1", echo.port)) as envoy,
        ):
            for method_name, path, headers in sends:
                conn = http.client.HTTPConnection(envoy.host, envoy.listen_port, timeout=10)
                try:
                    conn.request(method_name, path, headers={"host": HOST, **headers})
                    conn.getresponse().read()
                finally:
                    conn.close()
    finally:
        server.stop(None)
    assert len(capture.requests) == len(sends)
    return capture.requests


@pytest.mark.envoy
def test_requests_captured_from_envoy_are_answered_identically(
    pair: tuple[Side, Side], captured: list[bytes]
) -> None:
    answers = [_same(pair, data) for data in captured]
    assert all(a[0] == "ok" for a in answers)
    decided, _ = pair[1].handler.counts()  # type: ignore[attr-defined]
    assert decided >= 5  # Envoy's real requests take the C path


# -- mutations ------------------------------------------------------------------------------

_FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_SEEDS = [c for c in CORPUS if len(c) < 4096][::20]


@_FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes_are_answered_identically(pair: tuple[Side, Side], data: bytes) -> None:
    _same(pair, data)


@_FUZZ
@given(n=st.integers(0, len(_SEEDS) - 1), at=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_bit_flips_are_answered_identically(
    pair: tuple[Side, Side], n: int, at: int, bit: int
) -> None:
    seed = _SEEDS[n]
    flipped = bytearray(seed)
    flipped[at % len(flipped)] ^= 1 << bit
    _same(pair, bytes(flipped))


@_FUZZ
@given(n=st.integers(0, len(_SEEDS) - 1), cut=st.integers(0, 10_000), junk=st.binary(max_size=20))
def test_truncations_and_splices_are_answered_identically(
    pair: tuple[Side, Side], n: int, cut: int, junk: bytes
) -> None:
    seed = _SEEDS[n]
    cut %= len(seed) + 1
    _same(pair, seed[:cut])
    _same(pair, seed[:cut] + junk + seed[cut:])


def test_a_policy_reload_is_followed(pair: tuple[Side, Side]) -> None:
    reader = {"authorization": f"Bearer {SECRETS['reader']}"}
    data = request_bytes("GET", "/v1/workspaces/acme/checks", reader)
    first = _same(pair, data)
    reloaded = parse_policy(
        EXTRA_POLICY.replace('"x-key", ', "").replace("/status/", "/v1/workspaces/acme/checks")
    )
    for side in pair:
        side.engine.policy = reloaded
    second = _same(pair, data)
    assert first != second and b"public_route" in second[1]


# -- bearer access tokens -------------------------------------------------------------------


def _jwt(
    signer: int = 0,
    *,
    audience: str = AUDIENCE,
    workspace: str = "acme",
    scopes: tuple[str, ...] = ("checks:read",),
    grant: str = "grt_1",
    ttl: int = 3600,
) -> str:
    key, private = SIGNING[signer]
    return rfc9068.issue(
        (key.kid, private),
        issuer=ISSUER,
        audience=audience,
        subject="usr_1",
        client_id="app_1",
        scopes=frozenset(scopes),
        workspace=workspace,
        grant_id=grant,
        now=NOW,
        ttl=ttl,
    ).token


TOKENS = {
    "reader": _jwt(),
    "writer": _jwt(1, scopes=("checks:read", "checks:write", "metrics:read")),
    "admin": _jwt(scopes=("admin:full",)),
    "globex": _jwt(workspace="globex", scopes=("checks:read", "keys:manage")),
    "wrong-audience": _jwt(audience="someone-else"),
    "too-long-lived": _jwt(ttl=7200),
}
_TOKEN_PATHS = [
    ("GET", "/v1/workspaces/acme/checks"),
    ("GET", "/v1/workspaces/globex/checks?x=1"),
    ("GET", "/v1/workspaces/acme/keys"),
    ("POST", "/v1/workspaces/acme/metrics/a"),
    ("GET", "/v2/acme/items/7/detail"),
    ("POST", "/v2/acme/c+c (x)/t/deep"),
    ("GET", "/nothing"),
    ("GET", "/healthz"),
]
_sources = iter(range(1 << 24))


def _source() -> str:
    """A new client address per request: the source failure limit never mixes cases."""
    n = next(_sources)
    return f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


def _token_request(method: str, path: str, header: dict[str, str], host: str = HOST) -> bytes:
    context = {"tier": "gold", "zone": "eu"}
    return request_bytes(method, path, header, host=host, context=context, source=_source())


def _allowed(pair: tuple[Side, Side], token: str) -> bytes:
    """A request a reader's token may make under the pair's policy."""
    header = {"authorization": f"Bearer {token}"}
    if "x-key" in pair[0].engine.policy.credential_headers:  # EXTRA_POLICY
        return _token_request("GET", "/v2/acme/items/7/detail", header, "api.example")
    return _token_request("GET", "/v1/workspaces/acme/checks", header)


def _reason(answer: tuple[Any, ...]) -> bytes:
    assert answer[0] == "ok", answer
    meta = ext.CheckResponse.FromString(answer[1]).dynamic_metadata
    return str(meta.fields["reason"].string_value).encode()


def _twice(pair: tuple[Side, Side], data: bytes) -> tuple[bytes, bytes]:
    """The reasons of a first (verifying) and a second (cached) answer to the same request."""
    return _reason(_same(pair, data)), _reason(_same(pair, data))


def test_cached_tokens_are_answered_identically_and_decided_in_c(pair: tuple[Side, Side]) -> None:
    reasons = set()
    for method, path in _TOKEN_PATHS:
        for token in TOKENS.values():
            for header in (
                {"authorization": f"Bearer {token}"},
                {"authorization": f"bearer  {token} "},
                {"x-key": token},
                {"x-api-key": token},
            ):
                first, second = _twice(pair, _token_request(method, path, header))
                assert first == second
                reasons.add(second)
    decided, _ = pair[1].handler.counts()  # type: ignore[attr-defined]
    # Second answers of cached tokens: allows and route denials are the C path's.
    assert decided >= 40
    assert {b"ok", b"workspace_mismatch", b"insufficient_scope"} <= reasons
    assert {b"wrong_audience", b"lifetime_too_long"} <= reasons


def _apply(pair: tuple[Side, Side], change: Change) -> None:
    for side in pair:
        revision = side.engine.replica.revision + 1
        side.engine.replica.apply(Change(change.kind, change.subject, change.payload, revision))


def _advance(pair: tuple[Side, Side], seconds: float) -> None:
    for side in pair:
        clock = side.engine.clock
        assert isinstance(clock, FakeClock)
        clock.advance(seconds)


def _fell_back(pair: tuple[Side, Side], data: bytes) -> bytes:
    """The reason of an answer the C path must hand to the Python path."""
    before = pair[1].handler.counts()  # type: ignore[attr-defined]
    reason = _reason(_same(pair, data))
    after = pair[1].handler.counts()  # type: ignore[attr-defined]
    assert after[1] == before[1] + 1, reason
    return reason


def test_a_cached_token_stops_at_expiry_key_retirement_and_revocation(
    pair: tuple[Side, Side],
) -> None:
    def warmed(token: str) -> bytes:
        data = _allowed(pair, token)
        assert _twice(pair, data) == (b"ok", b"ok")
        return data

    short = warmed(_jwt(ttl=600))
    by_first = warmed(_jwt(grant="grt_9"))
    by_second = warmed(_jwt(1, grant="grt_9"))
    grant = warmed(_jwt(1, grant="grt_2"))
    jti = _jwt(1, grant="grt_3")
    by_jti = warmed(jti)
    _advance(pair, 600)  # at exp, inside the verifier's 30 s leeway: still allowed, from C
    assert _twice(pair, short) == (b"ok", b"ok")
    _advance(pair, 30)
    assert _fell_back(pair, short) == b"token_expired"
    _apply(pair, signing_key_retired(SIGNING[0][0].kid))
    assert _fell_back(pair, by_first) == b"unknown_key"
    assert _twice(pair, by_second) == (b"ok", b"ok")
    _apply(pair, Change("grant.revoked", "grt_2", {"grant_id": "grt_2", "expires_at": NOW + 3600}))
    assert _fell_back(pair, grant) == b"token_revoked"
    identity = pair[0].engine._token_cache[hashlib.sha256(jti.encode()).digest()]
    revoked = {"jti": identity.id, "expires_at": NOW + 3600}
    _apply(pair, Change("token.revoked", identity.id, revoked))
    assert _fell_back(pair, by_jti) == b"token_revoked"
    _advance(pair, 3600)
    assert _fell_back(pair, by_second) == b"token_expired"


def test_without_a_token_verifier_tokens_are_not_decided_in_c(pair: tuple[Side, Side]) -> None:
    data = _allowed(pair, TOKENS["reader"])
    assert _twice(pair, data) == (b"ok", b"ok")
    for side in pair:
        side.engine.token_verifier = None
    assert _fell_back(pair, data) == b"malformed_credential"


_TOKEN_CHARS = st.sampled_from([*"aAzZ09-_.= \t+/", "é", "\x00", "\x7f"])


@st.composite
def _authorization(draw: st.DrawFn) -> str:
    token = draw(st.sampled_from([*TOKENS.values(), SECRETS["reader"]]))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(token)))
        cut = draw(st.integers(0, 3))
        token = token[:at] + draw(st.text(_TOKEN_CHARS, max_size=4)) + token[at + cut :]
    scheme = draw(
        st.sampled_from(["Bearer ", "bearer ", "BEARER  ", "Bearer\t", "Basic ", "", " Bearer "])
    )
    return scheme + token + draw(st.sampled_from(["", " ", "  ", "\t"]))


@_FUZZ
@given(value=_authorization(), path=st.sampled_from(_TOKEN_PATHS))
def test_fuzzed_authorization_headers_are_answered_identically(
    pair: tuple[Side, Side], value: str, path: tuple[str, str]
) -> None:
    _twice(pair, _token_request(*path, {"authorization": value}))


# The C path reads header text eight bytes at a time (printable ASCII, UTF-8, the token's dots):
# a byte at each offset of a word and in the tail, at each boundary of those tests, in a
# cached token and in another header, must be answered as the byte-at-a-time Python path does.
_BOUNDARY_BYTES = [0x00, 0x1F, 0x20, 0x2E, 0x7E, 0x7F, 0x80, 0xBF, 0xC3, 0xFF]


def test_every_byte_at_every_word_offset_is_answered_identically(pair: tuple[Side, Side]) -> None:
    token = TOKENS["reader"].encode()
    other = b"0123456789abcdefghijklmnopqrstuvwxy"
    header = {"authorization": f"Bearer {token.decode()}", "x-other": other.decode()}
    placeholder = b"10.255.255.255"  # each request gets its own source: no failure limit
    path, host = "/v1/workspaces/acme/checks", HOST
    if "x-key" in pair[0].engine.policy.credential_headers:  # EXTRA_POLICY
        path, host = "/v2/acme/items/7/detail", "api.example"
    request = request_bytes("GET", path, header, host=host, source=placeholder.decode())
    assert _twice(pair, request) == (b"ok", b"ok")
    assert request.count(token) == request.count(other) == request.count(placeholder) == 1
    sources = iter(range(1 << 24))
    for text in (token, other, path.encode()):  # the path: in the request and its ':path'
        assert len(text) >= 16
        for at in [*range(24), *range(len(text) - 9, len(text))]:
            for byte in _BOUNDARY_BYTES:
                n = next(sources)
                source = f"11.{n >> 16 & 255:03}.{n >> 8 & 255:03}.{n & 255:03}".encode()
                changed = text[:at] + bytes([byte]) + text[at + 1 :]
                mutated = request.replace(text, changed).replace(placeholder, source)
                _same(pair, mutated)
                _same(pair, mutated)  # a second time: a token cached by the first answer
    decided, _ = pair[1].handler.counts()  # type: ignore[attr-defined]
    assert decided > 100  # the C path decided the printable ones


def _text_tests(data: bytes) -> tuple[bool, bool, bool]:
    """What the C walk's word-at-a-time tests must say, byte by byte in Python."""
    try:
        data.decode("utf-8")  # strict: no overlongs, surrogates or code points over U+10FFFF
        utf8 = True
    except UnicodeDecodeError:
        utf8 = False
    return all(0x20 <= b <= 0x7E for b in data), utf8, data.count(b".") == 2


def test_the_word_at_a_time_text_tests_agree_with_byte_by_byte_ones() -> None:
    native = fastcheck._native
    assert native is not None
    for length in range(0, 26):
        base = bytes(0x41 + i % 26 for i in range(length))
        for at in range(length):
            for byte in range(256):
                data = base[:at] + bytes([byte]) + base[at + 1 :]
                assert native.text_tests(data) == _text_tests(data), (data, at)
    for text in ("é", "€", "𝄞", "\ud7ff", "\ue000", "\U0010ffff"):
        for at in range(10):
            data = b"a" * at + text.encode() + b"bcdefghij.."
            assert native.text_tests(data) == _text_tests(data) == (False, True, True)
    for bad in (b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80"):
        for at in range(10):
            data = b"a" * at + bad + b"bcdefghij"
            assert native.text_tests(data) == _text_tests(data) == (False, False, False)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=64) | st.text(max_size=40).map(lambda t: t.encode()))
def test_the_text_tests_agree_on_any_bytes(data: bytes) -> None:
    assert fastcheck._native.text_tests(data) == _text_tests(data)


# -- the observers as shipped: metrics, decision records, usage ------------------------------
#
# With exactly the sidecar's observers, the C path observes the decisions it takes in C (the
# tally, the record's spool payload, the usage count, a denial's log line;
# sidecar.dataplane.fastcheck.observe_in_c).
# Both sides then must leave the same spool payloads, byte for byte and in the same order, the
# same /metrics text, queue counters and usage reports. Time is mocked: the engines' and the
# recorders' clocks are fake, and so is the timer both paths time a check with (a constant
# step, so every check takes the same 2**-16 s on both sides).

STEP = 2.0**-16


class StepTimer:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += STEP
        return self.t


@dataclass
class Shipped:
    """One engine and handler with the sidecar's observers."""

    handler: Callable[[bytes, Any], bytes] = field(repr=False)
    metrics: Metrics = field(repr=False)
    pipeline: AuditPipeline = field(repr=False)
    usage: UsageTally = field(repr=False)
    payloads: list[bytes] = field(default_factory=list, repr=False)
    engine: Engine | None = field(default=None, repr=False)

    def answer(self, data: bytes) -> tuple[Any, ...]:
        try:
            return ("ok", self.handler(data, Context()))
        except Aborted as exc:
            return ("aborted", *exc.args)

    def flush(self) -> None:
        self.pipeline.flush(sync=False)
        spool = self.pipeline.spool
        payloads, position = spool.read(spool.acked, 1 << 30)
        spool.ack(position)
        self.payloads += payloads


def _shipped(
    policy: Policy,
    compiled: bool,
    spool: Path,
    capacity: int,
    sample_rate: float,
    max_entries: int = 6,
    *,
    denials: DenialLog | None = None,
    limits: AbuseLimits | None = None,
    token_cache_size: int = 100_000,
) -> Shipped:
    clock = FakeClock(NOW)
    # Limits the corpus does not reach: the time never moves, and a blocked source would send
    # every later check to the Python path.
    limits = limits or AbuseLimits(source_failures=10**6, key_failures=10**6)
    limiter = WindowRateLimiter(limits)
    verifier = ReplicaTokenVerifier(ISSUER, AUDIENCE, max_lifetime=3600)
    engine = Engine(
        _replica(),
        policy,
        clock,
        limiter=limiter,
        token_verifier=verifier,
        token_cache_size=token_cache_size,
    )
    engine.ids = DecisionIds(random.Random(7).randbytes, clock)
    metrics = Metrics()
    config = ShipConfig(
        spool, queue_capacity=capacity, deny_headroom=2, allow_sample_rate=sample_rate
    )
    pipeline = AuditPipeline(config, None, rand=random.Random(11).random)
    usage = UsageTally(clock.now, max_entries=max_entries)
    decisions = DecisionMetrics(metrics)
    observers = [decisions, denials or DenialLog(), DecisionRecorder(pipeline, clock), usage]
    handler = CheckHandler(engine, observers, decisions.error)
    side = Shipped(lambda data, ctx: b"", metrics, pipeline, usage, engine=engine)
    if compiled:
        fast = FastCheckHandler(handler)
        assert fast.observed_in_c
        side.handler = fast
    else:
        side.handler = lambda data, ctx: handler(parse_check_request(data), ctx)
    return side


RECORD_CASES = [
    # what the Python recorder redacts or the C path must hand over: credential-shaped
    # paths, query strings cut off the target, long paths, a non-ASCII source
    request_bytes("GET", f"/v1/workspaces/acme/checks/{SECRETS['writer']}", reader_h)
    for reader_h in ({"x-api-key": SECRETS["reader"]},)
] + [
    request_bytes("GET", path, {"authorization": f"Bearer {SECRETS['reader']}"}, source=source)
    for path, source in (
        ("/v1/workspaces/acme/checks/eyJhbGciOi.eyJzdWIi.x", "10.0.0.1"),
        ("/v1/workspaces/acme/checks/Bearer%20x", "10.0.0.1"),
        ("/v1/workspaces/acme/checks/bearer", "10.0.0.1"),
        ("/v1/workspaces/acme/checks/sp_x", "10.0.0.1"),
        ("/v1/workspaces/acme/checks?api_key=spk_" + "a" * 30, "10.0.0.1"),
        ("/v1/workspaces/acme/checks#frag", "10.0.0.1"),
        ("/v1/workspaces/acme/checks/" + "x" * 700, "10.0.0.1"),
        ("/v1/workspaces/acme/checks", "spk_" + "b" * 30),
        ("/v1/workspaces/acme/checks", "fe80::1%é"),
        ("/v1/workspaces/acme/checks", ""),
        ("/v1/workspaces/acme/checksp", "_"),
        ("/healthz", "eyJ"),
        ("/healthz?token=abc", "10.0.0.2"),
    )
]


@pytest.fixture
def step_timer(monkeypatch: pytest.MonkeyPatch) -> StepTimer:
    """The timer of both paths, mocked (set before the handlers are built)."""
    timer = StepTimer()
    monkeypatch.setattr(envoy_check, "_perf_counter", timer)
    monkeypatch.setattr(fastcheck, "_perf_counter", timer)
    return timer


@pytest.mark.parametrize(("capacity", "sample_rate"), [(100_000, 1.0), (40, 1.0), (100_000, 0.5)])
@pytest.mark.parametrize("policy_name", ["default", "extra"])
def test_shipped_observers_leave_the_same_records_metrics_and_usage(
    policy_name: str,
    capacity: int,
    sample_rate: float,
    tmp_path: Path,
    step_timer: StepTimer,
) -> None:
    policy = load_policy(None) if policy_name == "default" else parse_policy(EXTRA_POLICY)
    python = _shipped(policy, False, tmp_path / "python", capacity, sample_rate)
    compiled = _shipped(policy, True, tmp_path / "compiled", capacity, sample_rate)
    # Tokens twice each: the repeat is a cached token the C path decides and observes.
    tokens = [
        request_bytes("GET", path, {"authorization": f"Bearer {token}"}, source="10.1.0.1")
        for token in TOKENS.values()
        for _, path in _TOKEN_PATHS[:3]
    ]
    for n, data in enumerate(RECORD_CASES + CORPUS + tokens + tokens):
        assert compiled.answer(data) == python.answer(data), data
        if n % 97 == 0:
            python.flush()
            compiled.flush()
    assert python.pipeline.queue.stats() == compiled.pipeline.queue.stats()
    python.flush()
    compiled.flush()
    assert len(python.payloads) > 100
    assert compiled.payloads == python.payloads
    text = generate_latest(python.metrics.registry)
    assert re.search(rb"reason=\"ok\"} [1-9]", text) and re.search(rb"public_route\"} [1-9]", text)
    assert generate_latest(compiled.metrics.registry) == text
    for final in (False, True):
        assert compiled.usage.harvest(final=final)[0] == python.usage.harvest(final=final)[0]
    assert compiled.usage.dropped == python.usage.dropped
    assert python.usage.dropped > 0  # the corpus reaches the usage bound
    decided, _ = compiled.handler.counts()  # type: ignore[attr-defined]
    assert decided > 200


def test_an_allow_observed_in_c_is_queued_as_its_spool_payload(
    tmp_path: Path, step_timer: StepTimer
) -> None:
    """The record of an allow the C path decided reaches the queue already encoded, equal to
    the record the Python recorder builds for the same decision."""
    policy = load_policy(None)
    python = _shipped(policy, False, tmp_path / "python", 100, 1.0)
    compiled = _shipped(policy, True, tmp_path / "compiled", 100, 1.0)
    data = request_bytes("GET", "/v1/workspaces/acme/checks", {"x-api-key": SECRETS["reader"]})
    assert compiled.answer(data) == python.answer(data)
    [(queued, allowed)] = compiled.pipeline.queue.drain_items()
    [(pending, _)] = python.pipeline.queue.drain_items()
    assert allowed and isinstance(queued, bytes) and isinstance(pending, PendingDecision)
    assert decode(queued) == scrub(pending.event())
    assert queued == pending.payload()


# Tokens of five grants and two API keys, the usage bound small: a token's every use is decided
# and observed in C (its first use verified from there), an API key's too, and one token's use
# on a path that looks like it carries a token ("eyJ") is observed in Python (its record is
# redacted there) — all counted under the one bound (UsageTally.use_store), so both sides keep
# and drop the same uses, interval after interval.
GRANT_TOKENS = [_jwt(grant=f"grt_u{n}") for n in range(5)]
_USERS = [{"authorization": f"Bearer {token}"} for token in GRANT_TOKENS] + [
    {"x-api-key": SECRETS["reader"]},
    {"authorization": f"Bearer {SECRETS['writer']}"},
]
_USES = [request_bytes("GET", "/v1/workspaces/acme/checks", header) for header in _USERS] + [
    request_bytes("GET", "/v1/workspaces/acme/checks/eyJx", _USERS[0])
]
_OBSERVED_IN_PYTHON = len(_USES) - 1


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(st.one_of(st.integers(0, len(_USES) - 1), st.just(-1)), max_size=40),
    max_entries=st.integers(0, 4),
)
def test_usage_is_kept_and_dropped_alike_with_tokens_observed_in_c(
    steps: list[int], max_entries: int
) -> None:
    policy = load_policy(None)
    with tempfile.TemporaryDirectory() as spool:
        python = _shipped(policy, False, Path(spool, "p"), 100_000, 1.0, max_entries)
        compiled = _shipped(policy, True, Path(spool, "c"), 100_000, 1.0, max_entries)
        expected_in_c = 0
        for step in steps:
            if step < 0:  # the reporter's harvest, between checks
                assert compiled.usage.harvest() == python.usage.harvest()
                continue
            assert compiled.answer(_USES[step]) == python.answer(_USES[step])
            # Every use is observed in C, but for the path the Python recorder redacts.
            expected_in_c += step != _OBSERVED_IN_PYTHON
        assert compiled.handler.observed() == expected_in_c  # type: ignore[attr-defined]
        for final in (False, True):
            assert compiled.usage.harvest(final=final) == python.usage.harvest(final=final)
        assert compiled.usage.dropped == python.usage.dropped
        python.pipeline.close(0)
        compiled.pipeline.close(0)
