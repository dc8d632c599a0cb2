"""Signing keys for tests that sign tokens themselves: a fresh key and its private part."""

from __future__ import annotations

import secrets

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.core.kek import KEK_BYTES, KeyEncryption
from sidecar.core.oauth_models import SigningKey
from sidecar.oauth.signing import generate_key

TEST_KEK = KeyEncryption([secrets.token_bytes(KEK_BYTES)])


def key_pair(now: int) -> tuple[SigningKey, rsa.RSAPrivateKey]:
    """A new signing key (private part encrypted under ``TEST_KEK``) and its private key."""
    key = generate_key(now, TEST_KEK)
    private = serialization.load_der_private_key(
        TEST_KEK.decrypt(key.private_pem, key.kid), password=None
    )
    assert isinstance(private, rsa.RSAPrivateKey)
    return key, private
