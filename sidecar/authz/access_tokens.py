"""Verification of JWT access tokens (RFC 9068 §4) with keys the caller already holds, so the
sidecar checks a token with no network call: https://www.rfc-editor.org/rfc/rfc9068#section-4

Pure: no transport, no clock (``now`` is passed in), no JWKS fetch. A rejection raises
``TokenRejected`` with a stable ``Reason`` (usable as a metric label and audit field).

The signature is checked with ``cryptography`` directly rather than through PyJWT: the algorithm
is bound to the key when the key is loaded (``VerificationKey``), so a token cannot choose how it
is verified (no ``none``, no HMAC keyed with a public key), and a verification costs the raw
RSA operation plus parsing (see docs/oauth.md for the measurements).

A cold token (one the sidecar has not cached) pays this whole function on the Check path, so
the parts around the RSA operation are kept lean: padding, hash and JSON decoder objects are
built once, the signature routine is chosen from the key's algorithm (a string compare, not an
ABC ``isinstance``), the shape is checked with one ``bytes.translate``, an RS256 signature is
compared by its encoding (``_check_rs256``), and the identity is built once. Every check and
its order stay as the RFCs cited below require."""

from __future__ import annotations

import binascii
import enum
import hashlib
import hmac
import json
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

# RFC 9068 §2.1: "typ" is "at+jwt"; §4: resource servers accept "at+jwt" or "application/at+jwt".
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
# Asymmetric only. RFC 9068 §4: RS256 must be supported; "none" must not be.
ALLOWED_ALGS = frozenset({"RS256", "ES256"})
MAX_TOKEN_LENGTH = 8192
# The base64url alphabet (RFC 4648 §5): a token's bytes less these must be its two dots.
_BASE64URL = (string.ascii_letters + string.digits + "-_").encode("ascii")
# A workspace slug (sidecar.core.validation.workspace).
_WORKSPACE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class Reason(enum.StrEnum):
    """Why a token was rejected: stable codes."""

    MALFORMED_TOKEN = "malformed_token"  # noqa: S105 (a name, not a secret)
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    ALG_NOT_ALLOWED = "alg_not_allowed"
    WRONG_TYPE = "wrong_type"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    TOKEN_EXPIRED = "token_expired"  # noqa: S105 (a name, not a secret)
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"  # noqa: S105 (a name, not a secret)
    INSUFFICIENT_CLAIMS = "insufficient_claims"
    LIFETIME_TOO_LONG = "lifetime_too_long"
    INVALID_WORKSPACE = "invalid_workspace"


class TokenRejected(Exception):
    """The token must not be accepted; ``reason`` says why. ``claims`` are the token's claims
    when its signature verified (so a refused use can be attributed to its workspace, subject
    and client), else empty: unverified claims are the attacker's words."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.claims: Mapping[str, Any] = {}


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key and the one algorithm it verifies."""

    kid: str
    alg: str
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey

    def __post_init__(self) -> None:
        # _check_signature picks the routine from ``alg``: the key must be of that kind.
        kind = {"RS256": rsa.RSAPublicKey, "ES256": ec.EllipticCurvePublicKey}.get(self.alg)
        if kind is None or not isinstance(self.key, kind):
            raise ValueError(f"a {type(self.key).__name__} cannot verify {self.alg!r}")


class TokenIdentity(NamedTuple):
    """Who a verified token speaks for (a NamedTuple: one is built for every cold token, and a
    frozen dataclass's field-by-field ``object.__setattr__`` cost ≈ 1 µs more)."""

    subject: str
    client_id: str
    workspace: str
    scopes: frozenset[str]
    jti: str
    grant_id: str
    expires_at: int
    issued_at: int = 0
    key_id: str = ""


# What a verified token says, in TokenIdentity's field order. A plain tuple: a caller with an
# identity type of its own (the sidecar's ``Identity``) builds it straight from this instead of
# from a TokenIdentity built first (≈ 1 µs per cold token).
VerifiedClaims = tuple[str, str, str, frozenset[str], str, str, int, int, str]


# Built once: they are stateless, and building them costs as much as the claim checks.
_PKCS1V15 = padding.PKCS1v15()
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
# RFC 8017 §9.2, note 1: the DER DigestInfo of SHA-256, in front of the hash in EMSA-PKCS1-v1_5.
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
_URLSAFE = bytes.maketrans(b"-_", b"+/")


def _b64decode(segment: bytes) -> bytes:
    """base64url without padding (RFC 7515 §2), as ``base64.urlsafe_b64decode`` decodes it."""
    raw = segment.translate(_URLSAFE)
    return binascii.a2b_base64(raw + b"=" * (-len(raw) % 4))


def _int_from_b64(value: object) -> int:
    if not isinstance(value, str) or not value:
        raise ValueError("missing JWK member")
    return int.from_bytes(_b64decode(value.encode("ascii")), "big")


def verification_key(kid: str, alg: str, jwk: Mapping[str, object]) -> VerificationKey:
    """Load a public JWK (RFC 7517) for ``alg``; raises ValueError if they do not fit together.

    This is what a replica does with a ``signing_key.upserted`` change payload."""
    if alg == "RS256" and jwk.get("kty") == "RSA":
        numbers = rsa.RSAPublicNumbers(_int_from_b64(jwk.get("e")), _int_from_b64(jwk.get("n")))
        rsa_key = numbers.public_key()
        if rsa_key.key_size < 2048:
            raise ValueError("RSA keys must have at least 2048 bits")
        return VerificationKey(kid, alg, rsa_key)
    if alg == "ES256" and jwk.get("kty") == "EC" and jwk.get("crv") == "P-256":
        ec_numbers = ec.EllipticCurvePublicNumbers(
            _int_from_b64(jwk.get("x")), _int_from_b64(jwk.get("y")), ec.SECP256R1()
        )
        return VerificationKey(kid, alg, ec_numbers.public_key())
    raise ValueError(f"unsupported key: alg {alg!r} with kty {jwk.get('kty')!r}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers that disagree on a repeated member would disagree on the token's meaning.
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate member")
    return out


# json.loads(..., object_pairs_hook=) builds a JSONDecoder per call; one is enough (its scanner
# keeps no state between documents).
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)
# The decoder's own scanner (the C one), and the whitespace JSON allows around a document.
_SCAN: Callable[[str, int], tuple[Any, int]] = cast(Any, _DECODER).scan_once
_WHITESPACE = re.compile(r"[ \t\n\r]*").fullmatch


def _decode(text: str) -> Any:
    """``_DECODER.decode(text)``: for a document starting with '{' (every token's), its
    scanner straight from index 0, then only whitespace may follow, as ``decode`` requires
    (skipping ``decode`` and ``raw_decode``'s Python frames and a whitespace match)."""
    if text[:1] != "{":
        return _DECODER.decode(text)
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:
        raise ValueError("not a JSON document") from None
    if end != len(text) and not _WHITESPACE(text, end):
        raise ValueError("extra data after the JSON document")
    return value


def _json_object(segment: bytes) -> dict[str, Any]:
    try:
        raw = _b64decode(segment)
        # What json.loads does with bytes: UTF-8 (or the UTF-16/32 it detects), surrogatepass.
        # An object's '{' then a non-NUL byte is what detect_encoding answers "utf-8" for
        # without a call (no BOM starts with '{'; a NUL second byte would mean UTF-16/32).
        if raw[:1] == b"{" and raw[1:2] != b"\x00":
            text = raw.decode("utf-8", "surrogatepass")
        else:
            text = raw.decode(json.detect_encoding(raw), "surrogatepass")
        value = _decode(text)
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        # RecursionError: arrays or objects nested deeper than the interpreter's recursion
        # limit (an 8 KB header holds thousands of '['), read before any signature is checked.
        raise TokenRejected(Reason.MALFORMED_TOKEN) from None
    if not isinstance(value, dict):
        raise TokenRejected(Reason.MALFORMED_TOKEN)
    return value


# Decoded JOSE headers by their base64url text. An issuer's tokens share a few headers (one per
# signing key: alg, kid, typ), so each is decoded once; the same text always decodes the same.
# Bounded in entries and size, so a flood of distinct headers only clears it.
_HEADERS: dict[str, dict[str, Any]] = {}
_HEADERS_MAX = 64
_HEADER_MAX_LENGTH = 512


def _header(segment: str) -> dict[str, Any]:
    """The token's JOSE header, decoded (read only: entries are shared between tokens)."""
    header = _HEADERS.get(segment)
    if header is None:
        header = _json_object(segment.encode("ascii"))
        if len(segment) <= _HEADER_MAX_LENGTH:
            if len(_HEADERS) >= _HEADERS_MAX:
                _HEADERS.clear()
            _HEADERS[segment] = header
    return header


def _check_signature(key: VerificationKey, signing_input: bytes, signature: bytes) -> None:
    try:
        if key.alg == "RS256":  # an RSA key (VerificationKey.__post_init__)
            _check_rs256(cast(rsa.RSAPublicKey, key.key), signing_input, signature)
            return
        # JWS (RFC 7518 §3.4) carries ECDSA signatures as raw R || S, 32 bytes each for P-256.
        if len(signature) != 64:
            raise TokenRejected(Reason.BAD_SIGNATURE)
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:], "big")
        der = encode_dss_signature(r, s)
        cast(ec.EllipticCurvePublicKey, key.key).verify(der, signing_input, _ECDSA_SHA256)
    except InvalidSignature:
        raise TokenRejected(Reason.BAD_SIGNATURE) from None


def _check_rs256(key: rsa.RSAPublicKey, signing_input: bytes, signature: bytes) -> None:
    """RSASSA-PKCS1-v1_5 verification with SHA-256 (RFC 8017 §8.2.2), its comparison by
    encoding (step 3-4): OpenSSL applies the RSA operation and checks the 00 01 FF..FF 00
    padding; what it recovers must then be exactly the DigestInfo of the input's SHA-256, byte
    for byte (no DigestInfo is parsed). ``verify`` did the same in cryptography, ≈ 1.5 µs more
    per call (a digest fetched by name, its context set up for the comparison)."""
    # Step 1: a signature must be as long as the modulus. The recovery alone would take a
    # shorter one (leading zero bytes left out) as the same number; verify refuses it.
    if len(signature) != (key.key_size + 7) // 8:
        raise TokenRejected(Reason.BAD_SIGNATURE)
    recovered = key.recover_data_from_signature(signature, _PKCS1V15, None)
    expected = _SHA256_DIGEST_INFO + hashlib.sha256(signing_input).digest()
    if not hmac.compare_digest(recovered, expected):
        raise TokenRejected(Reason.BAD_SIGNATURE)


def _verify_header(
    header: Mapping[str, Any], keys: Mapping[str, VerificationKey]
) -> VerificationKey:
    alg = header.get("alg")
    # RFC 8725 §3.1: the algorithm comes from an allow-list, never from the token alone.
    if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
        raise TokenRejected(Reason.ALG_NOT_ALLOWED)
    if "crit" in header or "b64" in header:
        # RFC 7515 §4.1.11: extensions we do not understand make the token invalid; RFC 7797's
        # unencoded payload ("b64") would change what the signature covers.
        raise TokenRejected(Reason.MALFORMED_TOKEN)
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise TokenRejected(Reason.UNKNOWN_KEY)
    # The key's own algorithm wins: an RS256 key never verifies an ES256 (or HS256) header.
    if key.alg != alg:
        raise TokenRejected(Reason.ALG_NOT_ALLOWED)
    # RFC 9068 §4: "Resource servers MUST verify that the typ header value is at+jwt or
    # application/at+jwt and reject tokens carrying any other value."
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in ACCESS_TOKEN_TYPES:
        raise TokenRejected(Reason.WRONG_TYPE)
    return key


def _number(claims: Mapping[str, Any], name: str) -> int | None:
    """A NumericDate (RFC 7519 §2): a JSON number, compared in whole seconds (as PyJWT does,
    so both agree at the boundary); NaN and infinities are refused."""
    value = claims.get(name)
    if value is None:
        return None
    kind = value.__class__
    if kind is int:  # the usual case, first
        return value  # type: ignore[no-any-return]
    # JSON numbers decode to int or float, never to a subclass; true/false are bools.
    if kind is not float:
        raise TokenRejected(Reason.INSUFFICIENT_CLAIMS)
    try:
        return int(value)
    except (ValueError, OverflowError):
        raise TokenRejected(Reason.INSUFFICIENT_CLAIMS) from None


def _verify_claims(
    claims: Mapping[str, Any],
    issuer: str,
    audience: str,
    now: float,
    leeway: float,
    max_lifetime: float | None,
    key_id: str,
) -> VerifiedClaims:
    # RFC 9068 §4: the issuer "MUST exactly match the value of the issuer" (RFC 8414).
    if claims.get("iss") != issuer:
        raise TokenRejected(Reason.WRONG_ISSUER)
    # RFC 9068 §4: "MUST validate that the aud claim contains a resource indicator value
    # corresponding to an identifier the resource server expects for itself".
    aud = claims.get("aud")
    if aud.__class__ is not str or aud != audience:  # the usual single string, first
        audiences = aud if isinstance(aud, list) else [aud]
        # RFC 7519 §4.1.3: a string or an array of strings; anything else is not an audience.
        if audience not in audiences or not all(isinstance(a, str) for a in audiences):
            raise TokenRejected(Reason.WRONG_AUDIENCE)
    get = claims.get
    exp = get("exp")
    if exp.__class__ is not int:  # an int is the usual case: no call
        exp = _number(claims, "exp")
    iat = get("iat")
    if iat.__class__ is not int:
        iat = _number(claims, "iat")
    if exp is None or iat is None:
        raise TokenRejected(Reason.INSUFFICIENT_CLAIMS)
    # RFC 7519 §4.1.4: not accepted on or after exp (with a small leeway for clock skew).
    if now >= exp + leeway:
        raise TokenRejected(Reason.TOKEN_EXPIRED)
    nbf = get("nbf")
    if nbf is not None and nbf.__class__ is not int:
        nbf = _number(claims, "nbf")
    if (nbf is not None and now + leeway < nbf) or now + leeway < iat:
        raise TokenRejected(Reason.TOKEN_NOT_YET_VALID)
    # The issuer never signs a token that lives longer than its access-token TTL: a longer
    # one was signed by someone else holding a key (a stolen key mints century-long tokens).
    if max_lifetime is not None and exp - iat > max_lifetime + leeway:
        raise TokenRejected(Reason.LIFETIME_TOO_LONG)
    scope = get("scope", "")
    if not isinstance(scope, str):
        raise TokenRejected(Reason.INSUFFICIENT_CLAIMS)
    workspace = get("workspace")
    if not isinstance(workspace, str) or not workspace:
        raise TokenRejected(Reason.INSUFFICIENT_CLAIMS)
    # An access token acts for one member in one workspace: never "*" (the operator's), never
    # something that is not a workspace name.
    if not _WORKSPACE.fullmatch(workspace):
        raise TokenRejected(Reason.INVALID_WORKSPACE)
    # Then sub, client_id, jti and sid, in that order, each a non-empty string (checked inline:
    # a call fewer per claim on every cold token; all four refuse with the same reason).
    sub, client_id, jti, sid = get("sub"), get("client_id"), get("jti"), get("sid")
    if not (
        isinstance(sub, str)
        and sub
        and isinstance(client_id, str)
        and client_id
        and isinstance(jti, str)
        and jti
        and isinstance(sid, str)
        and sid
    ):
        raise TokenRejected(Reason.INSUFFICIENT_CLAIMS)
    return sub, client_id, workspace, frozenset(scope.split()), jti, sid, exp, iat, key_id


def verify_access_token(
    token: str,
    keys: Mapping[str, VerificationKey],
    *,
    issuer: str,
    audience: str,
    now: float,
    leeway: float = 30,
    max_lifetime: float | None = None,
) -> TokenIdentity:
    """Verify ``token`` (JWS compact serialization) and return its identity, or raise
    TokenRejected. ``keys`` maps ``kid`` to the published keys; ``max_lifetime`` (the issuer's
    access-token TTL) bounds ``exp - iat``. Revocation (grant or jti) is the caller's next
    step: it needs the replica, not the token."""
    claims = verified_claims(
        token,
        keys,
        issuer=issuer,
        audience=audience,
        now=now,
        leeway=leeway,
        max_lifetime=max_lifetime,
    )
    return TokenIdentity(*claims)


def verified_claims(
    token: str,
    keys: Mapping[str, VerificationKey],
    *,
    issuer: str,
    audience: str,
    now: float,
    leeway: float = 30,
    max_lifetime: float | None = None,
) -> VerifiedClaims:
    """``verify_access_token``'s checks, answering the identity's fields as a tuple
    (``VerifiedClaims``, TokenIdentity's order) for a caller that builds its own identity."""
    if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        raise TokenRejected(Reason.MALFORMED_TOKEN)
    # Encoded once, its segments and the signing input sliced out. RFC 7515 §7.1: three
    # non-empty base64url segments separated by dots (one translate, not a regex: ≈ 0.8 µs).
    raw = token.encode("ascii")
    first = raw.find(b".")
    second = raw.find(b".", first + 1)
    if (
        raw.translate(None, _BASE64URL) != b".."
        or first < 1
        or second == first + 1
        or second == len(raw) - 1
    ):
        raise TokenRejected(Reason.MALFORMED_TOKEN)
    key = _verify_header(_header(token[:first]), keys)
    try:
        signature = _b64decode(raw[second + 1 :])
    except (ValueError, binascii.Error):
        raise TokenRejected(Reason.MALFORMED_TOKEN) from None
    _check_signature(key, raw[:second], signature)
    claims = _json_object(raw[first + 1 : second])
    try:
        return _verify_claims(claims, issuer, audience, now, leeway, max_lifetime, key.kid)
    except TokenRejected as exc:
        exc.claims = claims  # signed by us: worth naming in the audit trail
        raise
