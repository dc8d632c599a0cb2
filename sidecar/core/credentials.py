"""Opaque OAuth credentials: refresh tokens (``sprt_``), authorization codes (``spac_``) and
client secrets (``spcs_``), in the API key's format: prefix + 32 base62 characters from
``secrets`` (190 bits, RFC 6749 §10.10 asks ≤ 2⁻¹²⁸ odds of guessing) + 6 base62 characters of
CRC32, so secret scanners match them and a truncated one is rejected without a lookup.

Only ``digest()`` (SHA-256) is stored: NIST SP 800-63B needs no slow hash for ≥ 112-bit secrets."""

from __future__ import annotations

import hashlib

from sidecar.core import keyformat

REFRESH_TOKEN = "sprt_"  # noqa: S105 (a name, not a secret)
AUTHORIZATION_CODE = "spac_"
CLIENT_SECRET = "spcs_"  # noqa: S105 (a name, not a secret)
_RANDOM = keyformat.RANDOM_CHARS
_ALPHABET = frozenset(keyformat.ALPHABET)


def mint(prefix: str) -> str:
    """A new credential with ``prefix``."""
    body = prefix + keyformat.random_token(_RANDOM)
    return body + keyformat.checksum(body)


def is_well_formed(value: str, prefix: str) -> bool:
    """Prefix, length, alphabet and checksum all match."""
    if len(value) != len(prefix) + _RANDOM + keyformat.CHECKSUM_CHARS:
        return False
    if not value.startswith(prefix) or not _ALPHABET.issuperset(value[len(prefix) :]):
        return False
    cut = -keyformat.CHECKSUM_CHARS
    return keyformat.checksum(value[:cut]) == value[cut:]


def digest(value: str) -> bytes:
    """The stored form of a credential."""
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def mint_id(prefix: str) -> str:
    """A random, non-secret identifier (``app_``, ``usr_``, ``grt_``, ``jti_``)."""
    return keyformat.mint_id(prefix)
