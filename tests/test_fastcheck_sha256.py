"""The compiled Check path's own SHA-256 (sidecar/dataplane/_fastcheck.c): the digest it looks
API keys and cached access tokens up by must be hashlib's, byte for byte, with the SHA
extensions (SHA-NI, used where the CPU has them) and with the portable compression, on every
length around the block and padding boundaries and on arbitrary bytes."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.dataplane import fastcheck

native = fastcheck._native
pytestmark = pytest.mark.skipif(native is None, reason=f"not built: {fastcheck.unavailable()}")


def test_every_length_up_to_four_blocks_and_a_token_long_one() -> None:
    rng = random.Random(19)
    for n in [*range(0, 260), 737, 1024, 4096, 8192]:
        data = rng.randbytes(n)
        expected = hashlib.sha256(data).digest()
        assert native.sha256(data) == expected, n
        assert native.sha256(data, portable=True) == expected, n


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=1500))
def test_any_bytes(data: bytes) -> None:
    expected = hashlib.sha256(data).digest()
    assert native.sha256(data) == expected
    assert native.sha256(data, portable=True) == expected


def test_the_extensions_are_used_where_the_cpu_has_them() -> None:
    # /proc/cpuinfo's flag and the extension's CPUID test agree (the test above then covers the
    # SHA-NI compression here; on a CPU without it, the portable one twice).
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next(line for line in cpuinfo if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags")
    has = {"sha_ni", "ssse3", "sse4_1"} <= set(flags)
    assert int(has) == native.SHA_NI
