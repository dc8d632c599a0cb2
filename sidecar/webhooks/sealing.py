"""Webhook signing secrets at rest: AES-256-GCM under a key file kept next to the control
plane's data (``<data_dir>/webhook-key``, mode 0600, created on first start), the same pattern
as Hydra's ``SECRETS_SYSTEM``. Several control-plane replicas must share the file."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE = 12
_AAD = b"spauth-webhook-secret-v1"


class AesGcmSealer:
    """``seal`` → nonce ‖ ciphertext+tag; ``open`` raises ValueError on a wrong key or
    tampering."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + self._aead.encrypt(nonce, plaintext, _AAD)

    def open(self, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:NONCE], sealed[NONCE:], _AAD)
        except InvalidTag:
            raise ValueError("sealed secret does not open with this key") from None


def load_sealer(path: Path) -> AesGcmSealer:
    """The sealer for the key in ``path``, creating a random 256-bit key on first use."""
    try:
        return AesGcmSealer(bytes.fromhex(path.read_text().strip()))
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(AESGCM.generate_key(bit_length=256).hex() + "\n")
        return AesGcmSealer(bytes.fromhex(path.read_text().strip()))
