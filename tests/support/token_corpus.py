"""A corpus of access tokens — issued ones and hostile mutations — with the verdict the verifier
gave each when the corpus was recorded: tests/fixtures/access_token_corpus.json.

    python -m tests.support.token_corpus > tests/fixtures/access_token_corpus.json

The file holds tokens already signed and the public keys only (no private key). It was recorded
with the verifier as it stood before the lean rewrite of issue #19 (commit c4ee2ab), so
tests/test_access_token_corpus.py holds every later verifier to the same accept/deny, reason
code, identity and attribution on every case."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
from collections.abc import Iterator
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from sidecar.authz.access_tokens import TokenRejected, verification_key, verify_access_token

NOW = 1_800_000_000
ISSUER = "https://auth.statuspulse.test"
AUDIENCE = "statuspulse-api"
LEEWAY = 30
MAX_LIFETIME = 3600
RSA_KID, EC_KID, OTHER_KID = "key-rsa-1", "key-ec-1", "key-rsa-2"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _int_b64(n: int, size: int) -> str:
    return b64(n.to_bytes(size, "big"))


def claims(**override: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "usr_1",
        "aud": AUDIENCE,
        "client_id": "app_1",
        "scope": "dashboard:read checks:read",
        "workspace": "acme",
        "sid": "grt_1",
        "jti": "at_1",
        "iat": NOW,
        "exp": NOW + 3600,
    }
    base.update(override)
    return {k: v for k, v in base.items() if v is not None}


class Signers:
    """The corpus's keys: ours (RSA and EC, published) and a foreign RSA key (not published)."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.foreign = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())

    def jwks(self) -> list[dict[str, Any]]:
        out = []
        for kid, key in ((RSA_KID, self.rsa), (OTHER_KID, self.other)):
            n = key.public_key().public_numbers()
            jwk = {"kty": "RSA", "n": _int_b64(n.n, 256), "e": _int_b64(n.e, 3)}
            out.append({"kid": kid, "alg": "RS256", "jwk": jwk})
        p = self.ec.public_key().public_numbers()
        ec_jwk = {"kty": "EC", "crv": "P-256", "x": _int_b64(p.x, 32), "y": _int_b64(p.y, 32)}
        out.append({"kid": EC_KID, "alg": "ES256", "jwk": ec_jwk})
        return out

    def sign(self, signer: str, signing_input: bytes) -> bytes:
        if signer in ("rsa", "other", "foreign"):
            key = {"rsa": self.rsa, "other": self.other, "foreign": self.foreign}[signer]
            return key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        if signer == "ec":
            r, s = decode_dss_signature(self.ec.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        if signer == "hmac-public":  # HS256 keyed with our public key (the alg confusion)
            pem = self.rsa.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            return hmac.new(pem, signing_input, hashlib.sha256).digest()
        return b""  # alg none

    def token(
        self,
        payload: dict[str, Any] | bytes,
        signer: str = "rsa",
        **header: Any,
    ) -> str:
        head = {"alg": "RS256", "typ": "at+jwt", "kid": RSA_KID, **header}
        head = {k: v for k, v in head.items() if v is not None}
        raw_payload = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        signing_input = f"{b64(json.dumps(head).encode())}.{b64(raw_payload)}"
        return f"{signing_input}.{b64(self.sign(signer, signing_input.encode()))}"

    def raw(self, header: bytes, payload: bytes, signer: str = "rsa") -> str:
        signing_input = f"{b64(header)}.{b64(payload)}"
        return f"{signing_input}.{b64(self.sign(signer, signing_input.encode()))}"


def _cases(s: Signers) -> Iterator[tuple[str, str, float]]:
    """(name, token, now) for every case."""
    good = s.token(claims())
    h, p, sig = good.split(".")
    yield "issued", good, NOW + 10
    yield "issued, application/at+jwt", s.token(claims(), typ="application/at+jwt"), NOW
    yield "issued, typ in capitals", s.token(claims(), typ="AT+JWT"), NOW
    yield "issued, EC key", s.token(claims(), "ec", alg="ES256", kid=EC_KID), NOW
    yield "issued, second key", s.token(claims(), "other", kid=OTHER_KID), NOW
    yield "aud as a list", s.token(claims(aud=["other", AUDIENCE])), NOW
    yield "no scope claim", s.token(claims(scope=None)), NOW
    yield "float dates", s.token(claims(iat=NOW + 0.9, exp=NOW + 3600.5)), NOW
    yield "nbf in the past", s.token(claims(nbf=NOW - 5)), NOW
    yield "extra members, nested", s.token(claims(cnf={"x5t#S256": "abc"}, roles=[1, 2])), NOW
    yield "non-ASCII subject", s.token(claims(sub="usér ☃")), NOW
    head = json.dumps(s_head()).encode()
    body = json.dumps(claims())
    yield "UTF-16 payload", s.raw(head, body.encode("utf-16")), NOW
    yield "UTF-8 BOM payload", s.raw(head, b"\xef\xbb\xbf" + body.encode()), NOW
    # Time, at the leeway boundaries.
    for offset in (3600 + LEEWAY - 1, 3600 + LEEWAY, 3600 + LEEWAY + 1, 10**9):
        yield f"now = iat + {offset}", good, NOW + offset
    for offset in (-LEEWAY - 1, -LEEWAY, -LEEWAY + 1):
        yield f"now = iat {offset:+}", good, NOW + offset
    yield "nbf in the future", s.token(claims(nbf=NOW + 600)), NOW
    yield "nbf = now + leeway", s.token(claims(nbf=NOW + LEEWAY)), NOW
    yield "nbf = now + leeway + 1", s.token(claims(nbf=NOW + LEEWAY + 1)), NOW
    yield "expired", s.token(claims(exp=NOW - 100, iat=NOW - 200)), NOW
    yield "lifetime too long", s.token(claims(exp=NOW + 10**8)), NOW
    yield "lifetime = max + leeway", s.token(claims(exp=NOW + MAX_LIFETIME + LEEWAY)), NOW
    yield "lifetime = max + leeway + 1", s.token(claims(exp=NOW + MAX_LIFETIME + LEEWAY + 1)), NOW
    # The algorithm and the key.
    yield "alg none", s.token(claims(), "none", alg="none"), NOW
    unsigned = s.token(claims(), alg="none").rsplit(".", 1)[0]
    yield "alg none, signature kept", f"{unsigned}.{sig}", NOW
    yield "HS256 keyed with the public key", s.token(claims(), "hmac-public", alg="HS256"), NOW
    yield "ES256 header on the RSA kid", s.token(claims(), "ec", alg="ES256"), NOW
    yield "RS256 header on the EC kid", s.token(claims(), "rsa", kid=EC_KID), NOW
    yield "alg missing", s.token(claims(), alg=None), NOW
    yield "alg not a string", s.token(claims(), alg=["RS256"]), NOW
    yield "alg RS512", s.token(claims(), alg="RS512"), NOW
    yield "alg lower case", s.token(claims(), alg="rs256"), NOW
    yield "wrong kid", s.token(claims(), kid="nope"), NOW
    yield "kid missing", s.token(claims(), kid=None), NOW
    yield "kid not a string", s.token(claims(), kid=7), NOW
    yield "signed by a foreign key", s.token(claims(), "foreign"), NOW
    yield "signed by our other key, kid of the first", s.token(claims(), "other"), NOW
    yield "crit", s.token(claims(), crit=["exp"]), NOW
    yield "b64 false", s.token(claims(), b64=False), NOW
    yield "jku (ignored)", s.token(claims(), jku="https://evil.test/jwks"), NOW
    # The type.
    yield "typ JWT", s.token(claims(), typ="JWT"), NOW
    yield "typ missing", s.token(claims(), typ=None), NOW
    yield "typ not a string", s.token(claims(), typ=1), NOW
    # Claims.
    yield "another issuer", s.token(claims(iss="https://evil.test")), NOW
    yield "issuer with a trailing slash", s.token(claims(iss=ISSUER + "/")), NOW
    yield "issuer missing", s.token(claims(iss=None)), NOW
    yield "wrong audience", s.token(claims(aud="other")), NOW
    yield "audience list without us", s.token(claims(aud=["a", "b"])), NOW
    yield "audience list with a number", s.token(claims(aud=[AUDIENCE, 1])), NOW
    yield "audience missing", s.token(claims(aud=None)), NOW
    yield "audience empty list", s.token(claims(aud=[])), NOW
    for name in ("exp", "iat", "sub", "client_id", "workspace", "sid", "jti"):
        yield f"{name} missing", s.token(claims(**{name: None})), NOW
    for name in ("exp", "iat", "nbf"):
        yield f"{name} a string", s.token(claims(**{name: str(NOW)})), NOW
        yield f"{name} true", s.token(claims(**{name: True})), NOW
    yield "exp NaN", s.raw(head, json.dumps(claims(exp=float("nan"))).encode()), NOW
    yield "exp Infinity", s.raw(head, json.dumps(claims(exp=float("inf"))).encode()), NOW
    yield "exp huge integer", s.token(claims(exp=10**400)), NOW
    overflowing = body.replace(f'"exp": {NOW + 3600}', '"exp": 1e400')
    yield "exp 1e400", s.raw(head, overflowing.encode()), NOW
    yield "scope a list", s.token(claims(scope=["checks:read"])), NOW
    yield "sub empty", s.token(claims(sub="")), NOW
    yield "jti a number", s.token(claims(jti=1)), NOW
    yield "operator workspace", s.token(claims(workspace="*")), NOW
    yield "workspace upper case", s.token(claims(workspace="Acme")), NOW
    yield "workspace with a slash", s.token(claims(workspace="acme/x")), NOW
    yield "workspace 64 characters", s.token(claims(workspace="a" * 64)), NOW
    yield "workspace 63 characters", s.token(claims(workspace="a" * 63)), NOW
    # JSON.
    yield "duplicate claim", s.raw(head, (body[:-1] + ', "sub": "usr_2"}').encode()), NOW
    twice = f'{{"alg":"RS256","typ":"at+jwt","kid":"{RSA_KID}","alg":"none"}}'
    yield "duplicate header member", s.raw(twice.encode(), body.encode()), NOW
    nested = body[:-1] + ', "x": {"a": 1, "a": 2}}'
    yield "duplicate nested member", s.raw(head, nested.encode()), NOW
    yield "payload an array", s.raw(head, b"[1, 2]"), NOW
    yield "payload a string", s.raw(head, b'"x"'), NOW
    yield "payload not JSON", s.raw(head, b"{not json"), NOW
    yield "payload not UTF-8", s.raw(head, b'{"sub": "\xff\xfe"}'), NOW
    yield "payload trailing garbage", s.raw(head, body.encode() + b" x"), NOW
    yield "payload empty", s.raw(head, b""), NOW
    yield "lone surrogate escape", s.raw(head, (body[:-1] + ', "n": "\\ud800"}').encode()), NOW
    yield "header an array", s.raw(b"[]", body.encode()), NOW
    yield "header not UTF-8", s.raw(b'{"alg":"RS256","typ":"\xff"}', body.encode()), NOW
    yield "header not JSON", s.raw(b"{", body.encode()), NOW
    big = {"x": "y" * 1000}
    yield "header over 512 characters", s.token(claims(), **big), NOW
    yield "token over 8192 characters", s.token(claims(), x="y" * 8000), NOW
    # Encodings and shapes.
    flipped = sig[:5] + ("A" if sig[5] != "A" else "B") + sig[6:]
    yield "flipped signature character", f"{h}.{p}.{flipped}", NOW
    yield "signature truncated", f"{h}.{p}.{sig[:-4]}", NOW
    yield "signature empty", f"{h}.{p}.", NOW
    yield "signature one character", f"{h}.{p}.A", NOW
    yield "padding on the signature", f"{h}.{p}.{sig}==", NOW
    yield "standard base64 characters", f"{h}.{p}.{sig.replace('-', '+').replace('_', '/')}", NOW
    yield "whitespace inside", f"{h}.{p[:10]} {p[10:]}.{sig}", NOW
    yield "four segments", f"{good}.{sig}", NOW
    yield "two segments", f"{h}.{p}", NOW
    yield "empty payload segment", f"{h}..{sig}", NOW
    other_payload = b64(json.dumps(claims(sub="usr_2")).encode())
    yield "payload of another token", f"{h}.{other_payload}.{sig}", NOW
    yield "payload one character short", f"{h}.{p[:-1]}.{sig}", NOW
    yield "non-ASCII character", f"{h}.{p}é.{sig}", NOW
    yield "empty", "", NOW
    yield "dots only", "..", NOW


def s_head() -> dict[str, str]:
    return {"alg": "RS256", "typ": "at+jwt", "kid": RSA_KID}


def verdict(token: str, keys: dict[str, Any], now: float) -> dict[str, Any]:
    """What the verifier says of ``token`` at ``now``, as recorded in the corpus."""
    try:
        found = verify_access_token(
            token,
            keys,
            issuer=ISSUER,
            audience=AUDIENCE,
            now=now,
            leeway=LEEWAY,
            max_lifetime=MAX_LIFETIME,
        )
    except TokenRejected as exc:
        return {"reason": exc.reason.value, "claims": dict(exc.claims)}
    return {
        "identity": {
            "subject": found.subject,
            "client_id": found.client_id,
            "workspace": found.workspace,
            "scopes": sorted(found.scopes),
            "jti": found.jti,
            "grant_id": found.grant_id,
            "expires_at": found.expires_at,
            "issued_at": found.issued_at,
            "key_id": found.key_id,
        }
    }


def load_keys(jwks: list[dict[str, Any]]) -> dict[str, Any]:
    return {k["kid"]: verification_key(k["kid"], k["alg"], k["jwk"]) for k in jwks}


def main() -> None:
    signers = Signers()
    jwks = signers.jwks()
    keys = load_keys(jwks)
    cases = [
        {"name": name, "token": token, "now": now, "verdict": verdict(token, keys, now)}
        for name, token, now in _cases(signers)
    ]
    json.dump({"keys": jwks, "cases": cases}, sys.stdout, indent=1, ensure_ascii=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
