"""verify_access_token: the checks the sidecar relies on, including the classic JWT attacks."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from sidecar.authz import access_tokens
from sidecar.authz.access_tokens import (
    Reason,
    TokenRejected,
    VerificationKey,
    verification_key,
    verified_claims,
    verify_access_token,
)
from sidecar.oauth import rfc9068
from tests.support.signing import key_pair

ISSUER = "https://auth.statuspulse.test"
AUDIENCE = "statuspulse-api"
NOW = 1_800_000_000


@pytest.fixture(scope="module")
def signing() -> tuple[str, rsa.RSAPrivateKey, dict[str, VerificationKey]]:
    key, private = key_pair(NOW)
    keys = {key.kid: verification_key(key.kid, key.alg, key.public_jwk)}
    return key.kid, private, keys


def _claims(**override: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "usr_1",
        "aud": AUDIENCE,
        "client_id": "app_1",
        "scope": "dashboard:read alerts:manage",
        "workspace": "acme",
        "sid": "grt_1",
        "jti": "at_1",
        "iat": NOW,
        "exp": NOW + 3600,
    }
    claims.update(override)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(private: Any, kid: str, claims: dict[str, Any], **headers: Any) -> str:
    alg = headers.pop("alg", "RS256")
    return jwt.encode(
        claims, private, algorithm=alg, headers={"typ": "at+jwt", "kid": kid, **headers}
    )


def _verify(token: str, keys: dict[str, VerificationKey], now: float = NOW + 10) -> Any:
    return verify_access_token(token, keys, issuer=ISSUER, audience=AUDIENCE, now=now)


def _b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def test_issued_token_verifies_and_carries_the_identity(signing: Any) -> None:
    kid, private, keys = signing
    issued = rfc9068.issue(
        (kid, private),
        issuer=ISSUER,
        audience=AUDIENCE,
        subject="usr_9",
        client_id="app_9",
        scopes=frozenset({"dashboard:read"}),
        workspace="acme",
        grant_id="grt_9",
        now=NOW,
        ttl=3600,
    )
    header = jwt.get_unverified_header(issued.token)
    assert header == {"alg": "RS256", "typ": "at+jwt", "kid": kid}
    identity = _verify(issued.token, keys)
    assert identity.subject == "usr_9" and identity.client_id == "app_9"
    assert identity.workspace == "acme" and identity.grant_id == "grt_9"
    assert identity.scopes == frozenset({"dashboard:read"})
    assert identity.jti == issued.jti and identity.expires_at == NOW + 3600


def test_verified_claims_are_the_identity_as_a_plain_tuple(signing: Any) -> None:
    # What the sidecar's verifier builds its Identity from (no TokenIdentity first): the same
    # fields in TokenIdentity's order, and the same refusal with the verified claims attached.
    kid, private, keys = signing
    token = _sign(private, kid, _claims())
    claims = verified_claims(token, keys, issuer=ISSUER, audience=AUDIENCE, now=NOW + 10)
    assert type(claims) is tuple
    assert claims == tuple(_verify(token, keys))
    late = NOW + 7200
    with pytest.raises(TokenRejected) as info:
        verified_claims(token, keys, issuer=ISSUER, audience=AUDIENCE, now=late)
    assert info.value.reason is Reason.TOKEN_EXPIRED and info.value.claims["sid"] == "grt_1"


def _reason(call: Callable[[], object]) -> Reason:
    with pytest.raises(TokenRejected) as info:
        call()
    return info.value.reason


def test_alg_none_is_rejected(signing: Any) -> None:
    kid, _, keys = signing
    token = f"{_b64({'alg': 'none', 'typ': 'at+jwt', 'kid': kid})}.{_b64(_claims())}."
    assert _reason(lambda: _verify(token, keys)) is Reason.MALFORMED_TOKEN
    unsigned = f"{_b64({'alg': 'none', 'typ': 'at+jwt', 'kid': kid})}.{_b64(_claims())}.AAAA"
    assert _reason(lambda: _verify(unsigned, keys)) is Reason.ALG_NOT_ALLOWED


def test_hs256_keyed_with_the_public_key_is_rejected(signing: Any) -> None:
    kid, private, keys = signing
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # The classic key-confusion forgery; PyJWT refuses to build it, so build it by hand.
    import hashlib
    import hmac

    header = _b64({"alg": "HS256", "typ": "at+jwt", "kid": kid})
    body = _b64(_claims())
    mac = hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    token = f"{header}.{body}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    assert _reason(lambda: _verify(token, keys)) is Reason.ALG_NOT_ALLOWED


def test_es256_header_on_an_rsa_kid_is_rejected(signing: Any) -> None:
    kid, _, keys = signing
    other = ec.generate_private_key(ec.SECP256R1())
    token = _sign(other, kid, _claims(), alg="ES256")
    assert _reason(lambda: _verify(token, keys)) is Reason.ALG_NOT_ALLOWED


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        (_claims(iss="https://evil.test"), Reason.WRONG_ISSUER),
        (_claims(iss=ISSUER + "/"), Reason.WRONG_ISSUER),
        (_claims(aud="another-api"), Reason.WRONG_AUDIENCE),
        (_claims(aud=["another-api", "third"]), Reason.WRONG_AUDIENCE),
        (_claims(exp=NOW - 31), Reason.TOKEN_EXPIRED),
        (_claims(nbf=NOW + 120), Reason.TOKEN_NOT_YET_VALID),
        (_claims(iat=NOW + 120), Reason.TOKEN_NOT_YET_VALID),
        (_claims(exp=None), Reason.INSUFFICIENT_CLAIMS),
        (_claims(sub=None), Reason.INSUFFICIENT_CLAIMS),
        (_claims(sid=None), Reason.INSUFFICIENT_CLAIMS),
        (_claims(workspace=""), Reason.INSUFFICIENT_CLAIMS),
        (_claims(exp="tomorrow"), Reason.INSUFFICIENT_CLAIMS),
        (_claims(exp=True), Reason.INSUFFICIENT_CLAIMS),
    ],
)
def test_claims_are_checked(signing: Any, claims: dict[str, Any], reason: Reason) -> None:
    kid, private, keys = signing
    assert _reason(lambda: _verify(_sign(private, kid, claims), keys)) is reason


def test_audience_list_and_leeway(signing: Any) -> None:
    kid, private, keys = signing
    assert _verify(_sign(private, kid, _claims(aud=["x", AUDIENCE])), keys).subject == "usr_1"
    # Within the 30 s leeway an expired token still passes, beyond it not.
    token = _sign(private, kid, _claims(exp=NOW))
    assert _verify(token, keys, now=NOW + 29).jti == "at_1"
    assert _reason(lambda: _verify(token, keys, now=NOW + 30)) is Reason.TOKEN_EXPIRED


def test_unknown_kid_and_foreign_key(signing: Any) -> None:
    kid, private, keys = signing
    assert _reason(lambda: _verify(_sign(private, "other", _claims()), keys)) is Reason.UNKNOWN_KEY
    no_kid = jwt.encode(_claims(), private, algorithm="RS256", headers={"typ": "at+jwt"})
    assert _reason(lambda: _verify(no_kid, keys)) is Reason.UNKNOWN_KEY
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = _sign(stranger, kid, _claims())
    assert _reason(lambda: _verify(forged, keys)) is Reason.BAD_SIGNATURE


def test_tampered_payload_fails_the_signature(signing: Any) -> None:
    kid, private, keys = signing
    header, _, signature = _sign(private, kid, _claims()).split(".")
    tampered = f"{header}.{_b64(_claims(scope='admin:full'))}.{signature}"
    assert _reason(lambda: _verify(tampered, keys)) is Reason.BAD_SIGNATURE


@pytest.mark.parametrize("typ", [None, "JWT", "at+JWT-x", "id_token"])
def test_wrong_type_is_rejected(signing: Any, typ: str | None) -> None:
    kid, private, keys = signing
    # typ None: PyJWT then leaves the header out entirely (a missing typ).
    token = jwt.encode(_claims(), private, algorithm="RS256", headers={"kid": kid, "typ": typ})
    assert _reason(lambda: _verify(token, keys)) is Reason.WRONG_TYPE


def test_application_at_jwt_type_is_accepted(signing: Any) -> None:
    kid, private, keys = signing
    token = _sign(private, kid, _claims(), typ="application/at+jwt")
    assert _verify(token, keys).subject == "usr_1"


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c.d", "a b.c.d", "!!!.???.###", "x" * 9000, "e30.e30.", "W10.e30.AA"],
)
def test_malformed_tokens(signing: Any, token: str) -> None:
    _, _, keys = signing
    assert _reason(lambda: _verify(token, keys)) is Reason.MALFORMED_TOKEN


def test_duplicate_json_members_are_malformed(signing: Any) -> None:
    kid, _, keys = signing
    header = (
        base64.urlsafe_b64encode(
            b'{"alg":"RS256","typ":"at+jwt","kid":"%s","alg":"none"}' % kid.encode()
        )
        .rstrip(b"=")
        .decode()
    )
    token = f"{header}.{_b64(_claims())}.AAAA"
    assert _reason(lambda: _verify(token, keys)) is Reason.MALFORMED_TOKEN


def test_crit_header_is_rejected(signing: Any) -> None:
    kid, private, keys = signing
    token = _sign(private, kid, _claims(), crit=["exp"])
    assert _reason(lambda: _verify(token, keys)) is Reason.MALFORMED_TOKEN


def test_es256_keys_verify_es256_tokens() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    numbers = private.public_key().public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

    jwk = {"kty": "EC", "crv": "P-256", "x": b64(numbers.x), "y": b64(numbers.y)}
    keys = {"ec1": verification_key("ec1", "ES256", jwk)}
    token = _sign(private, "ec1", _claims(), alg="ES256")
    assert _verify(token, keys).subject == "usr_1"
    header, body, _ = token.split(".")
    bad = f"{header}.{body}.{base64.urlsafe_b64encode(bytes(63)).rstrip(b'=').decode()}"
    assert _reason(lambda: _verify(bad, keys)) is Reason.BAD_SIGNATURE


def test_verification_key_refuses_mismatched_or_weak_keys() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        verification_key("k", "HS256", {"kty": "oct", "k": "c2VjcmV0"})
    with pytest.raises(ValueError, match="unsupported"):
        verification_key("k", "ES256", {"kty": "RSA", "n": "AQAB", "e": "AQAB"})
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()  # noqa: S505
    n = weak.public_numbers().n
    jwk = {
        "kty": "RSA",
        "n": base64.urlsafe_b64encode(n.to_bytes(128, "big")).rstrip(b"=").decode(),
        "e": "AQAB",
    }
    with pytest.raises(ValueError, match="2048"):
        verification_key("k", "RS256", jwk)


def test_a_verification_key_holds_only_the_kind_of_key_its_algorithm_needs() -> None:
    """_check_signature picks the routine from ``alg``: a mismatched pair cannot be built."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert VerificationKey("k", "RS256", rsa_key).alg == "RS256"
    assert VerificationKey("k", "ES256", ec_key).alg == "ES256"
    for alg, key in (("RS256", ec_key), ("ES256", rsa_key), ("HS256", rsa_key)):
        with pytest.raises(ValueError, match="cannot verify"):
            VerificationKey("k", alg, key)


def test_a_decoded_header_is_reused_but_checked_against_the_current_keys(signing: Any) -> None:
    """Headers are decoded once per text (access_tokens._HEADERS); what they name is still
    checked on every token: a kid that left the keys is unknown, a refused header stays
    refused, and a flood of distinct headers leaves the memo bounded."""
    kid, private, keys = signing
    token = _sign(private, kid, _claims())
    assert _verify(token, keys).subject == "usr_1"
    assert token.split(".")[0] in access_tokens._HEADERS
    assert _reason(lambda: _verify(token, {})) is Reason.UNKNOWN_KEY
    assert _verify(token, keys).subject == "usr_1"
    duplicate = (
        base64.urlsafe_b64encode(b'{"alg":"RS256","typ":"at+jwt","kid":"k","kid":"k"}')
        .rstrip(b"=")
        .decode()
    )
    for _ in range(2):
        assert _reason(lambda: _verify(f"{duplicate}.e30.AAAA", keys)) is Reason.MALFORMED_TOKEN
    for n in range(access_tokens._HEADERS_MAX * 2):
        other = f"{_b64({'alg': 'RS256', 'typ': 'at+jwt', 'kid': f'k{n}'})}.e30.AAAA"
        assert _reason(lambda t=other: _verify(t, keys)) is Reason.UNKNOWN_KEY
        assert len(access_tokens._HEADERS) <= access_tokens._HEADERS_MAX


@pytest.mark.parametrize(
    ("exp", "reason"),
    [
        (float(NOW + 3600), None),
        (NOW + 3600.9, None),
        (float("nan"), Reason.INSUFFICIENT_CLAIMS),
        (False, Reason.INSUFFICIENT_CLAIMS),
        ([NOW + 3600], Reason.INSUFFICIENT_CLAIMS),
        (None, Reason.INSUFFICIENT_CLAIMS),
    ],
)
def test_numeric_dates_are_json_numbers(signing: Any, exp: Any, reason: Reason | None) -> None:
    """RFC 7519 §2 NumericDate: an integer or a float (compared in whole seconds); booleans,
    NaN, arrays are not numbers."""
    kid, private, keys = signing
    claims = _claims(exp=exp) if exp is not None else _claims(exp=None)
    # PyJWT refuses to sign NaN as JSON; the header and payload are assembled by hand.
    header = _b64({"alg": "RS256", "typ": "at+jwt", "kid": kid})
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    signature = private.sign(f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
    token = f"{header}.{payload}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"
    if reason is None:
        assert _verify(token, keys).expires_at == NOW + 3600
    else:
        assert _reason(lambda: _verify(token, keys)) is reason


def test_header_and_payload_decode_as_json_loads_decodes_bytes(signing: Any) -> None:
    """The JSON is decoded as json.loads decodes bytes (UTF-8, or the UTF-16/32 it detects),
    so the verifier and PyJWT read the same members."""
    kid, private, keys = signing
    for encoding in ("utf-8", "utf-16-le", "utf-32-be"):
        header = {"alg": "RS256", "typ": "at+jwt", "kid": kid}
        raw = json.dumps(header).encode(encoding)
        h = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        payload = _b64(_claims())
        signature = private.sign(f"{h}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
        token = f"{h}.{payload}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"
        assert _verify(token, keys).subject == "usr_1"


def _signed(private: Any, header: str, payload: str) -> tuple[str, bytes]:
    """The signing input and its RS256 signature."""
    signing_input = f"{header}.{payload}"
    return signing_input, private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())


def _segment(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_an_rs256_signature_must_be_as_long_as_the_modulus(signing: Any) -> None:
    """RFC 8017 §8.2.2 step 1. The RSA operation alone reads a signature as a number, so a
    valid signature whose leading zero byte is left out (or that gains one) is the same number:
    refused, as cryptography's verify and PyJWT refuse it. A signature not below the modulus is
    refused too."""
    kid, private, keys = signing
    header = _segment(json.dumps({"alg": "RS256", "typ": "at+jwt", "kid": kid}).encode())
    for jti in range(100_000):  # about one signature in 256 starts with a zero byte
        payload = _b64(_claims(jti=f"at_{jti}"))
        signing_input, signature = _signed(private, header, payload)
        if signature[0] == 0:
            break
    assert signature[0] == 0
    assert _verify(f"{signing_input}.{_segment(signature)}", keys).jti == f"at_{jti}"
    modulus = private.public_key().public_numbers().n.to_bytes(256, "big")
    for bad in (signature[1:], b"\x00" + signature, modulus, b"\xff" * 256, b"\x00" * 256):
        token = f"{signing_input}.{_segment(bad)}"
        assert _reason(lambda t=token: _verify(t, keys)) is Reason.BAD_SIGNATURE
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(token, private.public_key(), algorithms=["RS256"], audience=AUDIENCE)


def test_an_rs256_signature_must_cover_exactly_this_sha256(signing: Any) -> None:
    """What the RSA operation recovers is compared with the whole encoding (DigestInfo and
    hash): another input's signature, or one over the same input with another hash, fails."""
    kid, private, keys = signing
    header = _segment(json.dumps({"alg": "RS256", "typ": "at+jwt", "kid": kid}).encode())
    signing_input, _ = _signed(private, header, _b64(_claims()))
    others = [
        private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA384()),
        private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA512()),
        private.sign(signing_input.encode() + b" ", padding.PKCS1v15(), hashes.SHA256()),
        private.sign(
            signing_input.encode(),
            padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH),
            hashes.SHA256(),
        ),
    ]
    for signature in others:
        token = f"{signing_input}.{_segment(signature)}"
        assert _reason(lambda t=token: _verify(t, keys)) is Reason.BAD_SIGNATURE


@pytest.mark.parametrize(
    "token",
    [
        ".e30.AA", "e30..AA", "e30.e30.", "e30.e30.AA.", "e30.e30.AA.AA", "e30.e30+.AA",
        "e30/.e30.AA", "e30.e30.AA=", "e30 .e30.AA", "e30.e30.AA\n", "é30.e30.AA", "e30.e30.A\x00",
        "e30.e30.AA\u0660", "..", "...", "e30.e30",
    ],
)  # fmt: skip
def test_the_token_shape_is_three_base64url_segments(signing: Any, token: str) -> None:
    """RFC 7515 §7.1, checked without a regex: anything but three non-empty base64url
    segments joined by two dots is malformed, before any key or signature is looked at."""
    _, _, keys = signing
    assert _reason(lambda: _verify(token, keys)) is Reason.MALFORMED_TOKEN


@pytest.mark.parametrize(
    "text",
    [
        '{"a":1}', '{"a":1} ', '{"a":1}\n\t\r ', ' {"a":1}', '{"a":1}x', '{"a":1} x',
        '{"a":1}{}', '{"a":', "{", "{}", '{"a":1,"a":2}', '{"a":{"b":1,"b":1}}', "[]", "1",
        '{"a":NaN}', '{"a":1}\u00a0', '{"a":1}\x0b', "", " ", '{"a":"\\ud800"}',
    ],
)  # fmt: skip
def test_the_fast_json_decode_answers_as_the_decoder(text: str) -> None:
    """access_tokens._decode runs the decoder's scanner itself for a document starting with
    '{': the same value, or a ValueError wherever JSONDecoder.decode raises one."""

    def answer(decode: Callable[[str], Any]) -> tuple[bool, Any]:
        try:
            return True, decode(text)
        except ValueError:
            return False, None

    assert answer(access_tokens._decode) == answer(access_tokens._DECODER.decode)


@pytest.mark.parametrize("segment", ["header", "payload"])
def test_json_nested_past_the_recursion_limit_is_malformed(signing: Any, segment: str) -> None:
    """A header is decoded before any signature is checked: thousands of nested '[' in an
    8 KB token made the JSON scanner raise RecursionError out of the verifier (a crash, not a
    refusal). Now malformed, in the header as in a (signed) payload."""
    kid, private, keys = signing
    deep = b'{"a":' + b"[" * 2500 + b"]" * 2500 + b"}"
    header = json.dumps({"alg": "RS256", "typ": "at+jwt", "kid": kid}).encode()
    raw_header, raw_payload = (deep, b"{}") if segment == "header" else (header, deep)
    signing_input, signature = _signed(private, _segment(raw_header), _segment(raw_payload))
    token = f"{signing_input}.{_segment(signature)}"
    assert len(token) <= access_tokens.MAX_TOKEN_LENGTH
    assert _reason(lambda: _verify(token, keys)) is Reason.MALFORMED_TOKEN
