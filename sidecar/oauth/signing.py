"""JWT signing keys: creation, scheduled rotation, retirement, and the JWKS (RFC 7517).

RS256 with 2048-bit RSA keys, chosen by measurement (docs/oauth.md): with PyJWT on this machine
an RS256 verification costs ≈ 60 µs against ≈ 100 µs for ES256, and verification is what every
sidecar does for every new token, while signing (≈ 270 µs) happens once per issuance. RFC 9068
§4 also makes RS256 the one algorithm every resource server must support.

``kid`` is the key's RFC 7638 thumbprint. A key's life: *pending* (published to the JWKS and
every replica, not yet signing: ahead-of-time rollover, so no sidecar answers ``unknown_key``
for a fresh key), *current* (signs), *superseded* (its private part destroyed; stays published
until every token it signed has expired), *retired* (left the JWKS; replicas drop it and deny
tokens they had cached for it). Private parts are stored only encrypted (sidecar/core/kek.py).
Each step writes its change-log entry in the same transaction."""

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
from sidecar.core.kek import KeyEncryption
from sidecar.core.oauth_models import SigningKey
from sidecar.core.storage import Store, UnitOfWork

ALG = "RS256"
KEY_BITS = 2048
SYSTEM_ACTOR = "system"
# Extra time a superseded key stays published beyond the access-token lifetime (clock skew).
RETIRE_MARGIN = 120
# How long a new key is published before it signs, unless configured.
DEFAULT_LEAD_TIME = 300
_PLAINTEXT_PEM = b"-----BEGIN"


def _b64(number: int) -> str:
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 §3: SHA-256 over the required members in lexicographic order, no whitespace."""
    required = {k: jwk[k] for k in ("e", "kty", "n")}
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()


def generate_key(
    now: int, encryption: KeyEncryption, activates_at: int | None = None
) -> SigningKey:
    """A fresh RS256 key, its private part encrypted; it signs from ``activates_at`` (now)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    numbers = private.public_key().public_numbers()
    jwk = {"kty": "RSA", "n": _b64(numbers.n), "e": _b64(numbers.e)}
    kid = thumbprint(jwk)
    jwk.update(kid=kid, alg=ALG, use="sig")
    der = private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return SigningKey(
        kid=kid,
        alg=ALG,
        private_pem=encryption.encrypt(der, kid),
        public_jwk=jwk,
        created_at=now,
        activates_at=now if activates_at is None else activates_at,
    )


class SigningKeys:
    """The key set in the store, with the current private key cached by ``kid``."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        rotation_interval: int,
        access_token_ttl: int,
        encryption: KeyEncryption,
        lead_time: int = DEFAULT_LEAD_TIME,
    ) -> None:
        self._store = store
        self._clock = clock
        self.rotation_interval = rotation_interval
        self.access_token_ttl = access_token_ttl
        self.lead_time = lead_time
        self._encryption = encryption
        self._loaded: dict[str, rsa.RSAPrivateKey] = {}
        self._public: dict[str, VerificationKey] = {}
        self._lock = threading.Lock()

    def ensure_current(self) -> SigningKey:
        """The current key, created on first start (signing at once: no token exists yet).
        Stored private parts are first brought under the newest KEK (``rewrap``)."""
        self.rewrap()
        now = int(self._clock.now())
        with self._store.transaction() as uow:
            current = uow.oauth.signing_keys.current(now)
            if current is None:
                current = self._create(uow, now, now, SYSTEM_ACTOR, "", immediate=True)
        return current

    def rewrap(self) -> int:
        """Encrypt any private part stored in clear (from before encryption), re-encrypt under
        the newest KEK (after a KEK rotation), and destroy superseded keys' private parts;
        returns how many keys changed."""
        changed = 0
        with self._store.transaction() as uow:
            for key in uow.oauth.signing_keys.all():
                stored = key.private_pem
                if not stored:
                    continue
                if key.superseded_at is not None or key.retired_at is not None:
                    fresh = b""
                elif stored.startswith(_PLAINTEXT_PEM):
                    fresh = self._encryption.encrypt(_pem_to_der(stored), key.kid)
                elif not self._encryption.is_current(stored):
                    fresh = self._encryption.encrypt(
                        self._encryption.decrypt(stored, key.kid), key.kid
                    )
                else:
                    continue
                uow.oauth.signing_keys.update(replace(key, private_pem=fresh))
                changed += 1
        return changed

    def rotate(
        self, *, immediate: bool = False, actor: str = SYSTEM_ACTOR, request_id: str = ""
    ) -> tuple[SigningKey, list[str]]:
        """A new key. Scheduled (default): published now, signing after ``lead_time``, the old
        key retired once its tokens expired. ``immediate``: signing now, and every older key
        retired at once, so every sidecar denies tokens they signed, cached or not (after a
        suspected compromise). Returns the new key and the retired kids."""
        now = int(self._clock.now())
        with self._store.transaction() as uow:
            if not immediate:
                pending = uow.oauth.signing_keys.pending(now)
                if pending:
                    return pending[0], []
                activates = now + self.lead_time
                return self._create(uow, now, activates, actor, request_id, immediate=False), []
            new = self._create(uow, now, now, actor, request_id, immediate=True)
            retired = []
            for key in uow.oauth.signing_keys.published():
                if key.kid != new.kid:
                    self._retire(uow, key, now, actor)
                    retired.append(key.kid)
        return new, retired

    def sweep(self) -> int:
        """Schedule the next key ahead of time, let a due key take over, and retire keys no
        live token needs; returns how many keys changed."""
        now = int(self._clock.now())
        changed = 0
        with self._store.transaction() as uow:
            keys = uow.oauth.signing_keys
            current = keys.current(now)
            if current is None:
                self._create(uow, now, now, SYSTEM_ACTOR, "", immediate=True)
                return 1
            due = current.activates_at + self.rotation_interval <= now + self.lead_time
            if due and not keys.pending(now):
                self._create(uow, now, now + self.lead_time, SYSTEM_ACTOR, "", immediate=False)
                changed += 1
            for key in keys.published():
                # A key that took over supersedes every older unsuperseded one.
                older = key.activates_at <= current.activates_at
                if key.superseded_at is None and key.kid != current.kid and older:
                    keys.update(replace(key, superseded_at=now, private_pem=b""))
                    changed += 1
            superseded = [k for k in keys.published() if k.superseded_at]
            # The newest superseded key ("previous") always stays; older ones go once every
            # token they signed has expired.
            for key in superseded[1:]:
                assert key.superseded_at is not None
                if key.superseded_at + self.access_token_ttl + RETIRE_MARGIN <= now:
                    self._retire(uow, key, now, SYSTEM_ACTOR)
                    changed += 1
        return changed

    def signer(self, uow: UnitOfWork) -> tuple[str, rsa.RSAPrivateKey]:
        """The current key's ``kid`` and private key, read in the caller's transaction."""
        current = uow.oauth.signing_keys.current(int(self._clock.now()))
        if current is None:
            raise RuntimeError("no signing key: ensure_current() was not called")
        with self._lock:
            key = self._loaded.get(current.kid)
            if key is None:
                der = self._encryption.decrypt(current.private_pem, current.kid)
                loaded = serialization.load_der_private_key(der, password=None)
                if not isinstance(loaded, rsa.RSAPrivateKey):
                    raise RuntimeError(f"signing key {current.kid} is not an RSA key")
                self._loaded = {current.kid: loaded}
                key = loaded
        return current.kid, key

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The published public keys (RFC 7517 §5), newest first."""
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

    def _create(
        self,
        uow: UnitOfWork,
        now: int,
        activates_at: int,
        actor: str,
        request_id: str,
        *,
        immediate: bool,
    ) -> SigningKey:
        current = uow.oauth.signing_keys.current(now)
        new = generate_key(now, self._encryption, activates_at)
        # Insert first so that, ordered by revision, replicas know the new key before any
        # token signed with it can reach them.
        uow.oauth.signing_keys.insert(new)
        uow.changes.append(signing_key_upserted(new))
        if current is not None and immediate:
            uow.oauth.signing_keys.update(replace(current, superseded_at=now, private_pem=b""))
        uow.audit.append(
            event(
                now,
                actor,
                "signing_key.rotated" if current else "signing_key.created",
                "*",
                new.kid,
                request_id=request_id,
                metadata={
                    "alg": new.alg,
                    "previous": current.kid if current else "",
                    "activates_at": str(activates_at),
                    "immediate": str(immediate).lower(),
                },
            )
        )
        return new

    def _retire(self, uow: UnitOfWork, key: SigningKey, now: int, actor: str) -> None:
        superseded = key.superseded_at if key.superseded_at is not None else now
        retired = replace(key, superseded_at=superseded, retired_at=now, private_pem=b"")
        uow.oauth.signing_keys.update(retired)
        uow.changes.append(signing_key_retired(key.kid))
        uow.audit.append(event(now, actor, "signing_key.retired", "*", key.kid))


def _pem_to_der(pem: bytes) -> bytes:
    loaded = serialization.load_pem_private_key(pem, password=None)
    return loaded.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
