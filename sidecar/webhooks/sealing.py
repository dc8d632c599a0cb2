"""Webhook signing secrets at rest: sealed under the key-encryption keys (``sidecar.core.kek``),
like the OAuth signing keys, with ``webhook:<id>`` as associated data, so a sealed secret copied
onto another row (another workspace's webhook) does not open. Rotating the KEK (``NEW,OLD``,
restart) re-seals them at start-up (``WebhookService.rewrap``); one key to keep and rotate.

Secrets sealed before that, with the per-file ``webhook-key`` (AES-256-GCM, nonce ‖ ciphertext,
fixed associated data), still open with that key when it is configured (``webhook_key`` or the
file in ``data_dir``), and ``rewrap`` moves them under the KEK on the first start."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecar.core import kek
from sidecar.core.kek import KeyEncryption

LEGACY_FILE = "webhook-key"
_LEGACY_NONCE = 12
_LEGACY_AAD = b"spauth-webhook-secret-v1"


class WebhookSealer:
    """``seal`` under the newest KEK; ``open`` under any KEK, or a legacy webhook key. Errors
    are ValueError (``KekError`` is one) and never carry the secret."""

    def __init__(self, encryption: KeyEncryption, legacy_keys: Sequence[bytes] = ()) -> None:
        self._encryption = encryption
        self._legacy = [AESGCM(key) for key in legacy_keys]

    def seal(self, plaintext: bytes, context: str) -> bytes:
        return self._encryption.encrypt(plaintext, context)

    def open(self, sealed: bytes, context: str) -> bytes:
        if sealed.startswith(kek.PREFIX):
            return self._encryption.decrypt(sealed, context, "webhook secret")
        for aead in self._legacy:
            try:
                return aead.decrypt(sealed[:_LEGACY_NONCE], sealed[_LEGACY_NONCE:], _LEGACY_AAD)
            except InvalidTag:
                continue
        raise ValueError(
            f"webhook secret {context} was sealed with a webhook key that is not configured "
            "(webhook_key, or data_dir/webhook-key)"
        )

    def is_current(self, sealed: bytes) -> bool:
        """Whether ``sealed`` is under the newest KEK (nothing to re-seal)."""
        return self._encryption.is_current(sealed)


def legacy_keys(setting: str, data_dir: Path) -> list[bytes]:
    """The pre-KEK webhook key, from ``webhook_key`` (64 hex digits) or ``<data_dir>/webhook-key``
    when that file exists (never created any more); empty when neither is there."""
    if setting:
        return [bytes.fromhex(setting)]
    try:
        return [bytes.fromhex((data_dir / LEGACY_FILE).read_text().strip())]
    except FileNotFoundError:
        return []
    except ValueError:
        raise kek.KekError(f"{data_dir / LEGACY_FILE}: not a 64-hex-digit key") from None
