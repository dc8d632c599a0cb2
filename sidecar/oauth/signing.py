"""JWT signing keys: creation, scheduled rotation, retirement, and the JWKS (RFC 7517).

RS256 with 2048-bit RSA keys, chosen by measurement (docs/oauth.md): with PyJWT on this machine
an RS256 verification costs ≈ 60 µs against ≈ 100 µs for ES256, and verification is what every
sidecar does for every new token, while signing (≈ 270 µs) happens once per issuance. RFC 9068
§4 also makes RS256 the one algorithm every resource server must support.

``kid`` is the key's RFC 7638 thumbprint. The current key signs; after a rotation the previous
key stays published until every token it signed has expired, then it is retired (leaves the
JWKS). Each step writes its change-log entry so replicas learn keys before tokens use them."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import replace

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.authz.access_tokens import VerificationKey, verification_key
from sidecar.core.audit import event
from sidecar.core.changes import signing_key_retired, signing_key_upserted
from sidecar.core.clock import Clock
from sidecar.core.oauth_models import SigningKey
from sidecar.core.storage import Store, UnitOfWork

ALG = "RS256"
KEY_BITS = 2048
SYSTEM_ACTOR = "system"
# Extra time a superseded key stays published beyond the access-token lifetime (clock skew).
RETIRE_MARGIN = 120


def _b64(number: int) -> str:
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 §3: SHA-256 over the required members in lexicographic order, no whitespace."""
    required = {k: jwk[k] for k in ("e", "kty", "n")}
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()


def generate_key(now: int) -> SigningKey:
    """A fresh RS256 key."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    numbers = private.public_key().public_numbers()
    jwk = {"kty": "RSA", "n": _b64(numbers.n), "e": _b64(numbers.e)}
    kid = thumbprint(jwk)
    jwk.update(kid=kid, alg=ALG, use="sig")
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return SigningKey(kid=kid, alg=ALG, private_pem=pem, public_jwk=jwk, created_at=now)


class SigningKeys:
    """The key set in the store, with the current private key cached by ``kid``."""

    def __init__(
        self, store: Store, clock: Clock, *, rotation_interval: int, access_token_ttl: int
    ) -> None:
        self._store = store
        self._clock = clock
        self.rotation_interval = rotation_interval
        self.access_token_ttl = access_token_ttl
        self._loaded: dict[str, rsa.RSAPrivateKey] = {}
        self._public: dict[str, VerificationKey] = {}
        self._lock = threading.Lock()

    def ensure_current(self) -> SigningKey:
        """The current key, created on first start."""
        with self._store.transaction() as uow:
            current = uow.oauth.signing_keys.current()
            if current is None:
                current = self._rotate(uow, int(self._clock.now()), SYSTEM_ACTOR, "")
        return current

    def rotate(self, *, actor: str = SYSTEM_ACTOR, request_id: str = "") -> SigningKey:
        """Make a new key current now; the old one stays published until its tokens expire."""
        with self._store.transaction() as uow:
            return self._rotate(uow, int(self._clock.now()), actor, request_id)

    def sweep(self) -> int:
        """Rotate when the current key is due and retire keys no live token needs; returns how
        many keys changed."""
        now = int(self._clock.now())
        changed = 0
        with self._store.transaction() as uow:
            current = uow.oauth.signing_keys.current()
            if current is None or current.created_at + self.rotation_interval <= now:
                self._rotate(uow, now, SYSTEM_ACTOR, "")
                changed += 1
            superseded = [k for k in uow.oauth.signing_keys.published() if k.superseded_at]
            # The newest superseded key ("previous") always stays; older ones go once every
            # token they signed has expired.
            for key in superseded[1:]:
                assert key.superseded_at is not None
                if key.superseded_at + self.access_token_ttl + RETIRE_MARGIN <= now:
                    self._retire(uow, key, now)
                    changed += 1
        return changed

    def signer(self, uow: UnitOfWork) -> tuple[str, rsa.RSAPrivateKey]:
        """The current key's ``kid`` and private key, read in the caller's transaction."""
        current = uow.oauth.signing_keys.current()
        if current is None:
            raise RuntimeError("no signing key: ensure_current() was not called")
        with self._lock:
            key = self._loaded.get(current.kid)
            if key is None:
                loaded = serialization.load_pem_private_key(current.private_pem, password=None)
                if not isinstance(loaded, rsa.RSAPrivateKey):
                    raise RuntimeError(f"signing key {current.kid} is not an RSA key")
                self._loaded = {current.kid: loaded}
                key = loaded
        return current.kid, key

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The published public keys (RFC 7517 §5), current first."""
        with self._store.read() as uow:
            keys = uow.oauth.signing_keys.published()
        return {"keys": [dict(k.public_jwk) for k in keys]}

    def published(self) -> list[SigningKey]:
        with self._store.read() as uow:
            return uow.oauth.signing_keys.published()

    def verification_keys(self) -> dict[str, VerificationKey]:
        """The published keys, loaded for ``verify_access_token`` (cached by ``kid``)."""
        published = self.published()
        with self._lock:
            cache = {k.kid: self._public.get(k.kid) for k in published}
            for key in published:
                if cache[key.kid] is None:
                    cache[key.kid] = verification_key(key.kid, key.alg, key.public_jwk)
            self._public = {kid: v for kid, v in cache.items() if v is not None}
            return dict(self._public)

    def _rotate(self, uow: UnitOfWork, now: int, actor: str, request_id: str) -> SigningKey:
        current = uow.oauth.signing_keys.current()
        new = generate_key(now)
        # Insert first so that, ordered by revision, replicas know the new key before any
        # token signed with it can reach them.
        uow.oauth.signing_keys.insert(new)
        uow.changes.append(signing_key_upserted(new))
        if current is not None:
            uow.oauth.signing_keys.update(replace(current, superseded_at=now))
        uow.audit.append(
            event(
                now,
                actor,
                "signing_key.rotated" if current else "signing_key.created",
                "*",
                new.kid,
                request_id=request_id,
                metadata={"alg": new.alg, "previous": current.kid if current else ""},
            )
        )
        return new

    def _retire(self, uow: UnitOfWork, key: SigningKey, now: int) -> None:
        uow.oauth.signing_keys.update(replace(key, retired_at=now))
        uow.changes.append(signing_key_retired(key.kid))
        uow.audit.append(event(now, SYSTEM_ACTOR, "signing_key.retired", "*", key.kid))
