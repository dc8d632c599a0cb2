"""Member passwords, hashed with scrypt (``hashlib.scrypt``; OWASP's N=2^14, r=8, p=5 profile:
16 MiB per hash, so concurrent sign-ins on a small box stay within memory).

The stored form names its parameters (``scrypt$14$8$5$<salt>$<hash>``), so they can be raised
later and old hashes still verify."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets

LOG2_N = 14
R = 8
P = 5
SALT_BYTES = 16
HASH_BYTES = 32
MIN_LENGTH = 12
MAX_LENGTH = 512


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _derive(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=1 << log2_n,
        r=r,
        p=p,
        maxmem=256 * 1024 * 1024,
        dklen=HASH_BYTES,
    )


def hash_password(password: str) -> str:
    """The stored form of ``password`` with a fresh salt."""
    salt = secrets.token_bytes(SALT_BYTES)
    derived = _derive(password, salt, LOG2_N, R, P)
    return f"scrypt${LOG2_N}${R}${P}${_b64(salt)}${_b64(derived)}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored``; False for a malformed stored value."""
    try:
        scheme, log2_n, r, p, salt, expected = stored.split("$")
        if scheme != "scrypt":
            return False
        derived = _derive(password, base64.b64decode(salt), int(log2_n), int(r), int(p))
        return hmac.compare_digest(derived, base64.b64decode(expected))
    except (ValueError, TypeError):
        return False


@functools.cache
def dummy_hash() -> str:
    """Verified against when the e-mail address is unknown, so that a miss costs as much as a
    wrong password and response times do not reveal which addresses are members."""
    return hash_password(secrets.token_urlsafe(16))


def password_problem(password: str) -> str:
    """Why ``password`` is not acceptable, or '' (NIST SP 800-63B §5.1.1: length, not rules)."""
    if len(password) < MIN_LENGTH:
        return f"must be at least {MIN_LENGTH} characters"
    if len(password) > MAX_LENGTH:
        return f"must be at most {MAX_LENGTH} characters"
    if not password.isprintable():
        return "must not contain control characters"
    return ""
