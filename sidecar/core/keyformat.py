"""The API key format: ``spk_`` + 32 base62 random characters (190 bits from ``secrets``) + 6 base62
characters of CRC32 over everything before them, GitHub-style, so that secret scanners match keys
with few false positives and a mistyped or truncated key is rejected without a lookup.

Only ``digest(key)`` (SHA-256; NIST SP 800-63B: a ≥112-bit random secret needs only an approved
one-way hash) and the non-secret id and last four characters are ever stored.
"""

from __future__ import annotations

import hashlib
import secrets
import zlib

PREFIX = "spk_"
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_CHARS = 32
CHECKSUM_CHARS = 6
KEY_LENGTH = len(PREFIX) + RANDOM_CHARS + CHECKSUM_CHARS
_ALPHABET_SET = frozenset(ALPHABET)


def _base62(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, rem = divmod(number, 62)
        chars.append(ALPHABET[rem])
    return "".join(reversed(chars))


def checksum(body: str) -> str:
    """Six base62 characters of CRC32 over ``body`` (62**6 > 2**32, so no information is lost)."""
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_CHARS)


def random_token(length: int) -> str:
    """``length`` base62 characters from the OS CSPRNG."""
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def mint_key() -> str:
    """A new API key secret."""
    body = PREFIX + random_token(RANDOM_CHARS)
    return body + checksum(body)


def mint_id(prefix: str = "key_") -> str:
    """A non-secret identifier (random so ids leak no creation order or count)."""
    return prefix + random_token(16)


def is_well_formed(key: str) -> bool:
    """True when ``key`` has the prefix, the length, the alphabet and a matching checksum."""
    if len(key) != KEY_LENGTH or not key.startswith(PREFIX):
        return False
    if not _ALPHABET_SET.issuperset(key[len(PREFIX) :]):
        return False
    body, check = key[:-CHECKSUM_CHARS], key[-CHECKSUM_CHARS:]
    return checksum(body) == check


def digest(key: str) -> bytes:
    """The stored form of a secret."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
