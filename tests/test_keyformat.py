"""The key format: prefix, entropy, checksum; a single-character change never passes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core import keyformat


def test_minted_keys_are_well_formed_and_unique() -> None:
    keys = {keyformat.mint_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith("spk_")
        assert len(key) == keyformat.KEY_LENGTH == 42
        assert keyformat.is_well_formed(key)


def test_random_part_carries_at_least_160_bits() -> None:
    import math

    assert keyformat.RANDOM_CHARS * math.log2(62) >= 160


@settings(max_examples=500)
@given(
    st.integers(min_value=0, max_value=keyformat.KEY_LENGTH - 1),
    st.characters(codec="utf-8"),
)
def test_any_single_character_change_is_rejected(position: int, replacement: str) -> None:
    key = keyformat.mint_key()
    changed = key[:position] + replacement + key[position + 1 :]
    if changed != key:
        assert not keyformat.is_well_formed(changed)


@given(st.integers(min_value=0, max_value=keyformat.KEY_LENGTH - 1))
def test_truncated_or_extended_keys_are_rejected(cut: int) -> None:
    key = keyformat.mint_key()
    assert not keyformat.is_well_formed(key[:cut])
    assert not keyformat.is_well_formed(key + "A")


def test_digest_is_not_the_key() -> None:
    key = keyformat.mint_key()
    assert key.encode() not in keyformat.digest(key)
    assert len(keyformat.digest(key)) == 32
