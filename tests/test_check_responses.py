"""The hand-assembled CheckResponse bytes parse back, with the real protobuf classes, into exactly
the response Envoy must see — for every reason code."""

from __future__ import annotations

import json

import pytest
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3 import external_auth_pb2 as ext
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.authz.decision import Decision, Identity, Outcome, Reason
from sidecar.core.scopes import sort_scopes
from sidecar.dataplane import check_responses
from sidecar.dataplane.check_responses import (
    FOREIGN_SPELLINGS,
    GRPC_CODE,
    IDENTITY_HEADERS,
    OVERWRITE,
    ResponseEncoder,
    _allow_part,
)
from sidecar.protowire import ld

STRIP = ("authorization", "x-api-key")
KEY = Identity("api_key", "key_abc", "acme", frozenset({"metrics:read", "checks:read"}), 2e9)
TOKEN = Identity("access_token", "jti_1", "acme", frozenset({"dashboard:read"}), 2e9,
                 subject="user_1", client_id="app_1", grant_id="g1")  # fmt: skip


def parse(data: bytes) -> ext.CheckResponse:
    resp = ext.CheckResponse()
    resp.ParseFromString(data)
    return resp


@pytest.mark.parametrize("identity", [KEY, TOKEN])
def test_allow_with_identity(identity: Identity) -> None:
    enc = ResponseEncoder()
    for n in range(3):  # the second and third use the cache
        did = f"dec_test_{n:x}" * (n + 1)
        resp = parse(enc.encode(Decision(Reason.OK, did, identity), STRIP))
        assert resp.HasField("status")
        assert resp.status.code == 0
        assert resp.HasField("ok_response")
        assert not resp.HasField("denied_response")
        headers = {o.header.key: o.header.value for o in resp.ok_response.headers}
        assert all(o.append_action == HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
                   for o in resp.ok_response.headers)  # fmt: skip
        assert headers["x-statuspulse-decision-id"] == did
        assert headers["x-statuspulse-workspace"] == "acme"
        assert headers["x-statuspulse-scopes"] == " ".join(
            s for s in ("checks:read", "metrics:read", "dashboard:read") if s in identity.scopes
        )
        removed = set(resp.ok_response.headers_to_remove)
        assert set(STRIP) <= removed
        if identity.kind == "api_key":
            assert headers["x-statuspulse-key-id"] == "key_abc"
            assert "x-statuspulse-subject" in removed
        else:
            assert headers["x-statuspulse-subject"] == "user_1"
            assert headers["x-statuspulse-client-id"] == "app_1"
            assert "x-statuspulse-key-id" in removed
        assert not (set(headers) & removed)
        meta = resp.dynamic_metadata.fields
        assert meta["decision_id"].string_value == did
        assert meta["reason"].string_value == "ok"


def test_public_route_allow_strips_credentials_and_identity_headers() -> None:
    resp = parse(ResponseEncoder().encode(Decision(Reason.PUBLIC_ROUTE, "dec_1"), STRIP))
    assert resp.status.code == 0
    assert set(resp.ok_response.headers_to_remove) == {
        *STRIP,
        *IDENTITY_HEADERS,
        *FOREIGN_SPELLINGS,
    }


def test_policy_without_stripping_keeps_the_credential_header() -> None:
    resp = parse(ResponseEncoder().encode(Decision(Reason.OK, "dec_1", KEY), ()))
    assert "authorization" not in resp.ok_response.headers_to_remove


@pytest.mark.parametrize(
    "reason", [r for r in Reason if Decision(r, "").outcome is not Outcome.ALLOW]
)
def test_every_denial(reason: Reason) -> None:
    detail = "checks:read" if reason is Reason.INSUFFICIENT_SCOPE else ""
    decision = Decision(reason, "dec_" + "f" * 200, None, detail)  # long id: 2-byte lengths
    resp = parse(ResponseEncoder().encode(decision, STRIP))
    assert resp.status.code == GRPC_CODE[decision.outcome] != 0
    assert resp.status.message == reason.value
    assert resp.denied_response.status.code == decision.http_status
    body = json.loads(resp.denied_response.body)
    assert body == {
        "error": body["error"],
        "reason": reason.value,
        "decision_id": decision.decision_id,
    }
    headers = {o.header.key: o.header.value for o in resp.denied_response.headers}
    assert headers["content-type"] == "application/json"
    assert headers["x-statuspulse-decision-id"] == decision.decision_id
    if decision.http_status == 401:
        assert headers["www-authenticate"].startswith('Bearer realm="statuspulse"')
        assert body["error"] == "invalid_token"
    if reason is Reason.INSUFFICIENT_SCOPE:
        assert headers["www-authenticate"].endswith('scope="checks:read"')
    assert not resp.HasField("ok_response")
    assert resp.dynamic_metadata.fields["reason"].string_value == reason.value


def test_identity_cache_never_serves_a_stale_identity() -> None:
    enc = ResponseEncoder()
    enc.encode(Decision(Reason.OK, "d1", KEY), STRIP)
    changed = Identity("api_key", "key_abc", "acme", frozenset({"admin:full"}), 2e9)
    resp = parse(enc.encode(Decision(Reason.OK, "d2", changed), STRIP))
    headers = {o.header.key: o.header.value for o in resp.ok_response.headers}
    assert headers["x-statuspulse-scopes"] == "admin:full"


@pytest.mark.parametrize("identity", [KEY, TOKEN, None])
def test_templates_equal_a_fresh_build_for_every_id_length(identity: Identity | None) -> None:
    """Answers come from per-shape templates split at the decision id; whatever the id's length
    (one- and two-byte length prefixes, prefixes that end in the placeholder's first byte), the
    bytes equal the response built piece by piece, and a second id of the same length reuses
    the template correctly."""
    enc = ResponseEncoder()
    reasons = (Reason.OK, Reason.UNKNOWN_CREDENTIAL, Reason.INSUFFICIENT_SCOPE)
    for n in range(1, 300):
        for reason in reasons:
            detail = "checks:read" if reason is Reason.INSUFFICIENT_SCOPE else ""
            for did in ("a" * n, "b" * (n - 1) + "c"):
                decision = Decision(reason, did, identity, detail)
                assert enc.encode(decision, STRIP) == enc.build(decision, STRIP), (n, reason)
    tricky = Identity("api_key", "key_\x01\x02", "acme\x01", frozenset({"checks:read"}), 2e9)
    decision = Decision(Reason.OK, "d", tricky)  # a one-byte placeholder occurs in the identity
    assert parse(enc.encode(decision, STRIP)) == parse(enc.build(decision, STRIP))


RATED_MINUTE = Identity("api_key", "key_r", "acme", frozenset(), 2e9, rate_limit=5, rate_period=60)
RATED_SECOND = Identity("api_key", "key_s", "acme", frozenset(), 2e9, rate_limit=5, rate_period=1)


@pytest.mark.parametrize(
    ("identity", "detail", "expected"),
    [
        (RATED_MINUTE, "rate", "60"),
        (RATED_SECOND, "rate", "1"),
        (KEY, "key", "30"),
        (None, "source", "30"),
    ],
)  # fmt: skip
def test_a_429_says_when_to_retry(identity: Identity | None, detail: str, expected: str) -> None:
    enc = ResponseEncoder(failure_window=29.5)
    for n in range(2):  # built, then from the template cache
        decision = Decision(Reason.RATE_LIMITED, f"dec_{n}", identity, detail)
        denied = parse(enc.encode(decision, STRIP)).denied_response
        assert denied.status.code == 429
        headers = {o.header.key: o.header.value for o in denied.headers}
        assert headers["retry-after"] == expected


def test_only_a_429_carries_retry_after() -> None:
    enc = ResponseEncoder()
    for reason in Reason:
        if reason is Reason.RATE_LIMITED:
            continue
        resp = parse(enc.encode(Decision(reason, "dec_1", KEY), STRIP))
        headers = [o.header.key for o in resp.denied_response.headers]
        assert "retry-after" not in headers


class CountingEncoder(ResponseEncoder):
    """The real encoder, counting its full builds."""

    builds = 0

    def build(self, decision: Decision, strip: tuple[str, ...]) -> bytes:
        self.builds += 1
        return super().build(decision, strip)


def test_an_allow_shape_is_templated_on_its_second_answer_only() -> None:
    """Each new access token is a new shape: templating it on its first answer cost two more
    full builds (placeholder and check) for a template never used again."""
    encoder = CountingEncoder()
    strip = ("authorization",)
    answers = [Decision(Reason.OK, f"dec_{n:024x}", TOKEN) for n in range(4)]
    out = []
    builds = []
    for decision in answers:
        out.append(encoder.encode(decision, strip))
        builds.append(encoder.builds)
    # First answer: one build. Second: the template (two). Then no build at all.
    assert builds == [1, 3, 3, 3]
    assert out == [ResponseEncoder().build(d, strip) for d in answers]


def test_a_token_verified_again_is_built_once_per_answer() -> None:
    """With the token cache off, every answer for one token carries a new, equal Identity: the
    template (placeholder and check builds) made for one would never serve the next."""
    encoder = CountingEncoder()
    strip = ("authorization",)
    answers = [Decision(Reason.OK, f"dec_{n:024x}", TOKEN._replace()) for n in range(4)]
    out = []
    builds = []
    for decision in answers:
        out.append(encoder.encode(decision, strip))
        builds.append(encoder.builds)
    assert builds == [1, 2, 3, 4]
    assert out == [ResponseEncoder().build(d, strip) for d in answers]


def _protobuf_allow_part(ident: Identity, strip: tuple[str, ...]) -> bytes:
    """The identity part of an allow as protobuf serializes the message (what the encoder
    built before it assembled the bytes itself): the oracle."""
    values = (
        "" if ident.workspace == "*" else ident.workspace,
        ident.id if ident.kind == "api_key" else "",
        ident.subject,
        ident.client_id,
        " ".join(sort_scopes(ident.scopes)),
    )
    ok = ext.OkHttpResponse(headers_to_remove=[*strip, *FOREIGN_SPELLINGS])
    for name, value in zip(IDENTITY_HEADERS, values, strict=True):
        if value:
            ok.headers.add(header=HeaderValue(key=name, value=value), append_action=OVERWRITE)
        else:
            ok.headers_to_remove.append(name)
    return bytes(ok.SerializeToString())


# Empty, short, non-ASCII and > 127 bytes (a two-byte length prefix).
_texts = st.one_of(st.just(""), st.text(max_size=8), st.text(min_size=120, max_size=300))


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["api_key", "access_token"]),
    ident_id=_texts,
    workspace=st.one_of(st.just("*"), _texts),
    subject=_texts,
    client_id=_texts,
    scopes=st.frozensets(st.one_of(st.sampled_from(["checks:read", "admin:full"]), _texts)),
    strip=st.sampled_from([(), ("authorization",), STRIP, ("x-é-key", "a" * 200)]),
)
def test_an_allow_is_the_bytes_protobuf_serializes(
    kind: str,
    ident_id: str,
    workspace: str,
    subject: str,
    client_id: str,
    scopes: frozenset[str],
    strip: tuple[str, ...],
) -> None:
    ident = Identity(kind, ident_id, workspace, scopes, 2e9, subject=subject, client_id=client_id)
    try:
        expected = _protobuf_allow_part(ident, strip)
    except UnicodeEncodeError:  # a lone surrogate: protobuf refuses it, and so must we
        with pytest.raises(UnicodeEncodeError):
            _allow_part(ident, strip)
        return
    assert _allow_part(ident, strip) == expected
    # The whole allow: its decision-id header, then exactly that part.
    ok = parse(ResponseEncoder().build(Decision(Reason.OK, "dec_1", ident), strip)).ok_response
    assert ok.headers[0].header.key == "x-statuspulse-decision-id"
    del ok.headers[0]
    assert ok == ext.OkHttpResponse.FromString(expected)


def _reference_allow(decision: Decision, strip: tuple[str, ...]) -> bytes:
    """An allow assembled field by field, every length prefix computed for this answer (what
    ``build`` did before it looked the prefixes around a value up by the value's length)."""
    did = decision.decision_id.encode()
    value = ld(3, did)
    entry = ld(1, ld(1, b"decision_id") + ld(2, value))
    reason = ld(1, ld(1, b"reason") + ld(2, ld(3, decision.reason.value.encode())))
    append = HeaderValueOption(append_action=OVERWRITE).SerializeToString()
    header = ld(1, ld(1, b"x-statuspulse-decision-id") + ld(2, did)) + append
    ident = decision.identity
    part = _allow_part(None, strip) if ident is None else _protobuf_allow_part(ident, strip)
    ok = ld(2, header) + part
    # CheckResponse: status 1 (code 0: empty), ok_response 3, dynamic_metadata 4.
    return ld(1, b"") + ld(3, ok) + ld(4, entry + reason)


_ids = st.one_of(st.text(max_size=4), st.text(min_size=100, max_size=300), st.just("é" * 64))
_identities = st.one_of(
    st.none(),
    st.builds(
        Identity,
        kind=st.sampled_from(["api_key", "access_token"]),
        id=_texts,
        workspace=st.one_of(st.just("*"), _texts),
        scopes=st.frozensets(st.one_of(st.sampled_from(["checks:read", "admin:full"]), _texts)),
        expires_at=st.just(2e9),
        subject=_texts,
        client_id=_texts,
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    did=_ids,
    reason=st.sampled_from([Reason.OK, Reason.PUBLIC_ROUTE]),
    ident=_identities,
    strip=st.sampled_from([(), ("authorization",), STRIP]),
)
def test_an_allow_is_its_field_by_field_assembly(
    did: str, reason: Reason, ident: Identity | None, strip: tuple[str, ...]
) -> None:
    """The prefixes looked up by length give the bytes of the field-by-field assembly, for ids
    and identity values of every length (one- and two-byte prefixes, non-ASCII), and the
    response parses back to the decision."""
    decision = Decision(reason, did, ident)
    try:
        expected = _reference_allow(decision, strip)
    except UnicodeEncodeError:  # a lone surrogate: refused by both
        with pytest.raises(UnicodeEncodeError):
            ResponseEncoder().build(decision, strip)
        return
    assert ResponseEncoder().build(decision, strip) == expected
    resp = parse(expected)
    assert resp.dynamic_metadata.fields["decision_id"].string_value == did
    assert resp.dynamic_metadata.fields["reason"].string_value == reason.value


def test_the_prefixes_by_length_are_bounded() -> None:
    """Each value length adds a prefix entry: past the bound the table starts again, and the
    answers stay the field-by-field assembly."""
    heads = check_responses._HEADS
    for n in range(0, 3 * check_responses._HEADS_MAX // 5 + 50, 7):
        ident = TOKEN._replace(subject="s" * n, client_id="c" * (n + 1))
        decision = Decision(Reason.OK, "d" * (n % 400), ident)
        assert ResponseEncoder().build(decision, STRIP) == _reference_allow(decision, STRIP)
        assert len(heads) <= check_responses._HEADS_MAX


def test_identity_is_immutable_hashable_and_equal_by_value() -> None:
    """Identity is a NamedTuple (cheaper to build than the frozen dataclass it was) and keeps
    its contract: no field can be set, two built from the same values are equal and hash the
    same (it is used as a key), and any field's difference makes them unequal."""
    import typing

    def make(**changed: typing.Any) -> Identity:
        fields: dict[str, typing.Any] = {
            "kind": "access_token", "id": "jti_1", "workspace": "acme",
            "scopes": frozenset({"checks:read"}), "expires_at": 2e9, "subject": "usr_1",
            "client_id": "app_1", "grant_id": "g_1", "key_id": "k_1",
        }  # fmt: skip
        return Identity(**{**fields, **changed})

    a, b = make(), make()
    assert a == b and hash(a) == hash(b) and a is not b and {a: 1}[b] == 1
    with pytest.raises(AttributeError):
        a.workspace = "other"  # type: ignore[misc]
    for name, other in [("workspace", "other"), ("kind", "api_key"), ("scopes", frozenset()),
                        ("key_id", "k_2"), ("rate_limit", 5), ("networks", ("x",))]:  # fmt: skip
        assert make(**{name: other}) != a
    assert a.workspace == "acme"
