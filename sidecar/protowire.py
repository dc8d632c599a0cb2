"""The few pieces of protobuf's wire format that hot paths assemble by hand (CheckResponses,
audit spool records): varints and length-delimited fields. Protobuf's encoding is
concatenative, so bytes built from these parse with the real generated classes — every user
has a test that parses its output back."""

from __future__ import annotations

_SMALL = [bytes([i]) for i in range(128)]


def varint(n: int) -> bytes:
    """An unsigned varint (n >= 0)."""
    if n < 128:
        return _SMALL[n]
    if n < 16384:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_LD_TAGS = {field: varint(field << 3 | 2) for field in range(1, 16)}
_VARINT_TAGS = {field: varint(field << 3) for field in range(1, 16)}


def ld(field: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes, message) numbered 1-15."""
    n = len(payload)
    return _LD_TAGS[field] + (_SMALL[n] if n < 128 else varint(n)) + payload


def uint(field: int, value: int) -> bytes:
    """A varint field numbered 1-15; empty for 0 (proto3 omits defaults)."""
    return _VARINT_TAGS[field] + varint(value) if value else b""
