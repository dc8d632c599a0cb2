"""Key-encryption keys (KEKs): the secrets the control plane must be able to use, not only check,
are stored only encrypted: the OAuth signing keys' private parts and the webhooks' signing
secrets. Read access to the store (a backup, a replica, a leaked file) is then not the power to
mint tokens or to forge a workspace's webhook calls.

AES-256-GCM (NIST SP 800-38D) with a fresh 96-bit nonce per encryption and the row's identity
as associated data (a signing key's ``kid``, ``webhook:<id>``), so a ciphertext cannot be moved
to another row — another workspace's webhook included. The stored form is
``spk1.<kek id>.<base64url(nonce || ciphertext)>``: the KEK id (the first 8 bytes of the KEK's
SHA-256, hex) says which KEK to decrypt with. Rotation follows Hydra's ``SECRETS_SYSTEM`` and
``MultiFernet``: the list is newest first; the first KEK encrypts, every KEK decrypts, and the
control plane re-encrypts under the first at start-up (``SigningKeys.rewrap``,
``WebhookService.rewrap``).

A KEK is 32 random bytes written as base64url (``spauth oauth generate-kek``); the setting takes
one or more, comma- or newline-separated, newest first."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = b"spk1."
KEK_BYTES = 32
NONCE_BYTES = 12
KEK_FILE = "key-encryption-key"


class KekError(ValueError):
    """A KEK setting is malformed, or a stored key cannot be decrypted with any KEK."""


def generate() -> str:
    """A new KEK as it is written in a file or variable: 32 random bytes, base64url."""
    return base64.urlsafe_b64encode(secrets.token_bytes(KEK_BYTES)).decode("ascii")


def parse(text: str, where: str) -> list[bytes]:
    """KEKs from a setting's text (comma- or newline-separated, ``#`` comments), newest first."""
    keks = []
    for raw in text.replace(",", "\n").splitlines():
        item = raw.split("#", 1)[0].strip()
        if not item:
            continue
        try:
            key = base64.urlsafe_b64decode(item + "=" * (-len(item) % 4))
        except (binascii.Error, ValueError):
            raise KekError(f"{where}: a key-encryption key is not base64") from None
        if len(key) != KEK_BYTES:
            raise KekError(f"{where}: a key-encryption key must be 32 bytes, got {len(key)}")
        keks.append(key)
    if not keks:
        raise KekError(f"{where}: no key-encryption key")
    return keks


def load_or_create(path: Path) -> list[bytes]:
    """The KEKs in ``path``; on first start (no file) a new KEK is written there, mode 0600."""
    try:
        return parse(path.read_text(), str(path))
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(generate() + "\n")
    return parse(path.read_text(), str(path))


def _kek_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


class KeyEncryption:
    """Encrypts under the newest KEK and decrypts under any."""

    def __init__(self, keks: Sequence[bytes]) -> None:
        if not keks:
            raise KekError("no key-encryption key")
        self._by_id = {_kek_id(k): AESGCM(k) for k in keks}
        self.current_id = _kek_id(keks[0])
        self._current = self._by_id[self.current_id]

    def encrypt(self, plaintext: bytes, context: str) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._current.encrypt(nonce, plaintext, context.encode())
        body = base64.urlsafe_b64encode(nonce + sealed)
        return PREFIX + self.current_id.encode() + b"." + body

    def decrypt(self, stored: bytes, context: str, what: str = "signing key") -> bytes:
        """The plaintext of ``stored``, encrypted for ``context``; ``what`` names the row in
        errors (never the plaintext)."""
        if not stored.startswith(PREFIX):
            raise KekError(f"{what} {context} is not encrypted")
        kek_id, _, body = stored[len(PREFIX) :].partition(b".")
        aead = self._by_id.get(kek_id.decode("ascii", "replace"))
        if aead is None:
            raise KekError(
                f"{what} {context} is encrypted under key-encryption key "
                f"{kek_id.decode('ascii', 'replace')}, which is not configured"
            )
        try:
            raw = base64.urlsafe_b64decode(body)
            return aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode())
        except (InvalidTag, binascii.Error, ValueError):
            raise KekError(f"{what} {context} does not decrypt (tampered?)") from None

    def is_current(self, stored: bytes) -> bool:
        """Whether ``stored`` is encrypted under the newest KEK (nothing to re-encrypt)."""
        return stored.startswith(PREFIX + self.current_id.encode() + b".")
