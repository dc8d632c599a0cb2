"""The hand-written JWT verifier (sidecar/core/access_tokens.py) gives PyJWT's verdict.

Hypothesis builds tokens at random and mutates them — headers (alg, typ, kid, crit, b64), claims
(dropped, retyped, moved in time, duplicated, NaN), signatures (foreign key, HMAC keyed with the
public key, ``none``, ECDSA under an RSA kid) and encodings (flipped, inserted, deleted or padded
characters, extra segments) — and requires the same verdict, and the same identity when both
accept, as PyJWT's ``jwt.decode`` with the algorithm bound to the key plus the RFC 9068 profile
rules PyJWT does not know (``typ``, required string claims, the workspace, the maximum lifetime,
NumericDates as JSON numbers, no duplicate members, no extensions).

PyJWT reads the wall clock; its ``datetime`` is replaced by a frozen one (time is the one thing
tests may mock)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime, tzinfo
from typing import Any
from unittest import mock

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.authz.access_tokens import (
    TokenRejected,
    VerificationKey,
    verification_key,
    verify_access_token,
)
from tests.support.signing import key_pair

NOW = 1_800_000_000
ISSUER = "https://auth.statuspulse.test"
AUDIENCE = "statuspulse-api"
LEEWAY = 30
MAX_LIFETIME = 3600
KEEP, DROP = "<keep>", "<drop>"

RSA_KEY, RSA_PRIVATE = key_pair(NOW)
FOREIGN_PRIVATE = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_PRIVATE = ec.generate_private_key(ec.SECP256R1())
EC_KID = "ec-key-1"


def _ec_jwk() -> dict[str, str]:
    numbers = EC_PRIVATE.public_key().public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

    return {"kty": "EC", "crv": "P-256", "x": b64(numbers.x), "y": b64(numbers.y)}


OURS: dict[str, VerificationKey] = {
    RSA_KEY.kid: verification_key(RSA_KEY.kid, "RS256", RSA_KEY.public_jwk),
    EC_KID: verification_key(EC_KID, "ES256", _ec_jwk()),
}
PYJWT_KEYS: dict[str, tuple[str, Any]] = {
    RSA_KEY.kid: ("RS256", RSA_PRIVATE.public_key()),
    EC_KID: ("ES256", EC_PRIVATE.public_key()),
}
PUBLIC_PEM = RSA_PRIVATE.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_WORKSPACE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


# -- building tokens ------------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _sign(signer: str, signing_input: bytes) -> bytes:
    if signer == "rsa":
        return RSA_PRIVATE.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    if signer == "foreign":
        return FOREIGN_PRIVATE.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    if signer == "ec":
        r, s = decode_dss_signature(EC_PRIVATE.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    if signer == "hmac-public":  # the classic confusion: HS256 keyed with the public key
        return hmac.new(PUBLIC_PEM, signing_input, hashlib.sha256).digest()
    return b""  # "none"


def _json(members: list[tuple[str, Any]]) -> bytes:
    # Written by hand so duplicate members and NaN can be expressed.
    return ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in members) + "}").encode()


def _members(base: Mapping[str, Any], changes: Mapping[str, Any]) -> list[tuple[str, Any]]:
    out = []
    for name, value in base.items():
        change = changes.get(name, KEEP)
        if change == DROP:
            continue
        out.append((name, value if change == KEEP else change))
    return out


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
times = st.integers(NOW - 100_000, NOW + 100_000) | st.floats(NOW - 5000, NOW + 5000)
claim_change = {
    "iss": st.sampled_from([DROP, ISSUER + "/", "", None]) | json_values,
    "sub": st.sampled_from([DROP, "", 5]) | json_values,
    "aud": st.sampled_from([DROP, [AUDIENCE], [AUDIENCE, "other"], [AUDIENCE, 5], "other", []])
    | json_values,
    "client_id": st.sampled_from([DROP, ""]) | json_values,
    "scope": st.sampled_from([DROP, "", ["checks:read"]]) | json_values,
    "workspace": st.sampled_from([DROP, "*", "Acme", "a--b", "-a", "x" * 64, ""]) | json_values,
    "sid": st.sampled_from([DROP, ""]) | json_values,
    "jti": st.sampled_from([DROP, ""]) | json_values,
    "iat": st.sampled_from([DROP, True, "1800000000", math.nan]) | times,
    "exp": st.sampled_from([DROP, True, "1900000000", math.inf, math.nan]) | times,
    "nbf": st.sampled_from([NOW, NOW + 100, "0", False]) | times,
}
header_change = {
    "alg": st.sampled_from([DROP, "ES256", "HS256", "none", "rs256", "PS256"]),
    "typ": st.sampled_from([DROP, "application/at+jwt", "AT+JWT", "JWT", "at+jwt ", None, 5]),
    "kid": st.sampled_from([DROP, EC_KID, "unknown", None, 5, ["x"]]),
}
extensions = st.sampled_from(
    [("crit", ["exp"]), ("b64", False), ("b64", True), ("x5u", "https://e.example")]
)
ids = st.from_regex(r"[a-z]{2,4}_[A-Za-z0-9]{1,8}", fullmatch=True)
SCOPES = ["checks:read", "dashboard:read", "alerts:manage", "admin:full"]
DIMENSIONS = [
    *claim_change,
    *header_change,
    "lifetime",
    "repeat",
    "extension",
    "signer",
    "encoding",
]


@st.composite
def tokens(draw: st.DrawFn) -> str:
    """A token with none, one or two of its parts changed (so that both verdicts occur)."""
    n = draw(st.sampled_from([0, 0, 1, 1, 1, 2]))
    changed = set(draw(st.lists(st.sampled_from(DIMENSIONS), min_size=n, max_size=n, unique=True)))
    # An honest token varies too: ids, scopes, workspace, and times around every boundary.
    iat = NOW + draw(st.integers(-MAX_LIFETIME, LEEWAY + 2))
    claims = {
        "iss": ISSUER,
        "sub": draw(ids),
        "aud": draw(st.sampled_from([AUDIENCE, [AUDIENCE], ["other", AUDIENCE]])),
        "client_id": draw(ids),
        "scope": " ".join(draw(st.lists(st.sampled_from(SCOPES), max_size=3))),
        "workspace": draw(st.from_regex(_WORKSPACE, fullmatch=True)),
        "sid": draw(ids),
        "jti": draw(ids),
        "iat": iat,
        "exp": iat + draw(st.integers(1, MAX_LIFETIME + LEEWAY)),
        "nbf": iat - draw(st.integers(0, 10)),
    }
    if "lifetime" in changed:
        claims["exp"] = NOW + draw(st.sampled_from([3630, 3631, 7200, 86400 * 365 * 100]))
    payload = _members(claims, {k: draw(v) for k, v in claim_change.items() if k in changed})
    if "repeat" in changed:  # a repeated member: two parsers could disagree
        payload.append(draw(st.sampled_from(payload or [("sub", "x")])))
    header = _members(
        {"alg": "RS256", "typ": "at+jwt", "kid": RSA_KEY.kid},
        {k: draw(v) for k, v in header_change.items() if k in changed},
    )
    if "extension" in changed:
        header.append(draw(extensions))
    signer = "rsa"
    if draw(st.booleans()):  # the EC key, under its own kid and algorithm
        header = [("alg", "ES256") if n == "alg" and v == "RS256" else (n, v) for n, v in header]
        header = [("kid", EC_KID) if n == "kid" and v == RSA_KEY.kid else (n, v) for n, v in header]
        signer = "ec"
    signing_input = f"{_b64(_json(header))}.{_b64(_json(payload))}".encode()
    if "signer" in changed:
        signer = draw(st.sampled_from(["rsa", "ec", "foreign", "hmac-public", "none"]))
    token = f"{signing_input.decode()}.{_b64(_sign(signer, signing_input))}"
    return _mutate(draw, token) if "encoding" in changed else token


def _mutate(draw: st.DrawFn, token: str) -> str:
    kind = draw(st.sampled_from(["flip", "insert", "delete", "pad", "segments"]))
    at = draw(st.integers(0, len(token) - 1))
    char = draw(st.sampled_from(list("AaZz09-_=+/.! \x00é")))
    if kind == "flip":
        return token[:at] + char + token[at + 1 :]
    if kind == "insert":
        return token[:at] + char + token[at:]
    if kind == "delete":
        return token[:at] + token[at + 1 :]
    if kind == "pad":
        return token + "=" * draw(st.integers(1, 2))
    return draw(st.sampled_from([token + ".e30", token.rpartition(".")[0], "." + token]))


# -- the two verdicts -----------------------------------------------------------------------------


class _FrozenDatetime(datetime):
    @classmethod
    def now(cls, tz: tzinfo | None = None) -> _FrozenDatetime:
        return cls.fromtimestamp(NOW, tz or UTC)


Identity = tuple[str, str, str, str, str, frozenset[str], int]


def ours(token: str) -> Identity | None:
    try:
        found = verify_access_token(
            token,
            OURS,
            issuer=ISSUER,
            audience=AUDIENCE,
            now=NOW,
            leeway=LEEWAY,
            max_lifetime=MAX_LIFETIME,
        )
    except TokenRejected:
        return None
    return (
        found.subject,
        found.client_id,
        found.workspace,
        found.jti,
        found.grant_id,
        found.scopes,
        found.expires_at,
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    if len(names) != len(set(names)):
        raise ValueError("duplicate member")
    return dict(pairs)


def _profile_allows(token: str) -> bool:
    """The RFC 9068 / RFC 7515 rules PyJWT does not apply, checked before asking it."""
    segments = token.split(".")
    if len(token) > 8192 or len(segments) != 3 or not all(map(_B64URL.fullmatch, segments)):
        return False  # RFC 7515 §2: base64url without padding
    try:
        for segment in segments[:2]:
            json.loads(jwt.utils.base64url_decode(segment), object_pairs_hook=_no_duplicates)
    except ValueError:
        return False
    return True


def _numeric_date(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def reference(token: str) -> Identity | None:
    if not _profile_allows(token):
        return None
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        return None
    kid, typ = header.get("kid"), header.get("typ")
    if "crit" in header or "b64" in header or not isinstance(kid, str) or kid not in PYJWT_KEYS:
        return None
    if not isinstance(typ, str) or typ.lower() not in ("at+jwt", "application/at+jwt"):
        return None
    alg, key = PYJWT_KEYS[kid]
    try:
        with mock.patch.object(jwt.api_jwt, "datetime", _FrozenDatetime):
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],  # the key's own algorithm, never the token's choice
                audience=AUDIENCE,
                issuer=ISSUER,
                leeway=LEEWAY,
                options={"require": ["exp", "iat"]},
            )
    except jwt.PyJWTError:
        return None
    strings = [claims.get(n) for n in ("sub", "client_id", "workspace", "jti", "sid")]
    if not all(isinstance(v, str) and v for v in strings):
        return None
    if not all(_numeric_date(claims[n]) for n in ("exp", "iat", "nbf") if n in claims):
        return None
    scope = claims.get("scope", "")
    if not isinstance(scope, str) or not _WORKSPACE.fullmatch(claims["workspace"]):
        return None
    if int(claims["exp"]) - int(claims["iat"]) > MAX_LIFETIME + LEEWAY:
        return None
    sub, client_id, workspace, jti, sid = strings
    return (sub, client_id, workspace, jti, sid, frozenset(scope.split()), int(claims["exp"]))


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(tokens())
def test_the_verifier_agrees_with_pyjwt(token: str) -> None:
    assert ours(token) == reference(token)


def _token(signer: str = "rsa", header: Mapping[str, Any] | None = None, **claims: Any) -> str:
    """A token as the issuer writes one, with ``header`` and ``claims`` changed (DROP drops)."""
    alg, kid = ("ES256", EC_KID) if signer == "ec" else ("RS256", RSA_KEY.kid)
    base = {
        "iss": ISSUER, "sub": "usr_1", "aud": AUDIENCE, "client_id": "app_1",
        "scope": "checks:read", "workspace": "acme", "sid": "grt_1", "jti": "at_1",
        "iat": NOW, "exp": NOW + 3600,
    }  # fmt: skip
    head = _members({"alg": alg, "typ": "at+jwt", "kid": kid}, header or {})
    head.extend((k, v) for k, v in (header or {}).items() if k not in ("alg", "typ", "kid"))
    payload = _members(base, claims)
    payload.extend((k, v) for k, v in claims.items() if k not in base)
    signing_input = f"{_b64(_json(head))}.{_b64(_json(payload))}".encode()
    return f"{signing_input.decode()}.{_b64(_sign(signer, signing_input))}"


# Known attacks and edge cases, always tried (hypothesis explores around them).
EDGES = [
    _token(),
    _token("ec"),
    _token(aud=[AUDIENCE, 5]),
    _token(aud=["other"]),
    _token(exp=math.nan),
    _token(exp=math.inf),
    _token(exp="1900000000"),
    _token(iat=True),
    _token(nbf=NOW + LEEWAY + 1),
    _token(exp=NOW - LEEWAY),
    _token(exp=NOW - LEEWAY + 1),
    _token(exp=NOW + 100 * 365 * 86400),
    _token(exp=NOW + MAX_LIFETIME + LEEWAY),
    _token(exp=NOW + MAX_LIFETIME + LEEWAY + 1),
    _token(workspace="*"),
    _token(scope=["checks:read"]),
    _token(header={"b64": False}),
    _token(header={"crit": ["exp"]}),
    _token(header={"typ": "JWT"}),
    _token(header={"alg": "HS256"}, signer="hmac-public"),
    _token(header={"alg": "ES256"}, signer="ec"),  # ECDSA under the RSA key's kid
    _token(header={"alg": "none"}, signer="none"),
    _token(signer="foreign"),
]


@pytest.mark.parametrize("token", EDGES)
def test_the_verifier_agrees_with_pyjwt_on_known_edges(token: str) -> None:
    assert ours(token) == reference(token)


@pytest.mark.parametrize("signer", ["rsa", "ec"])
def test_both_accept_a_well_formed_token(signer: str) -> None:
    """The property is not vacuous: an honest token passes both."""
    token = _token(signer)
    assert ours(token) is not None and ours(token) == reference(token)
