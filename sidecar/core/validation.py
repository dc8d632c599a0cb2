"""Input checks that name the field they reject."""

from __future__ import annotations

import re

from sidecar.core.errors import InvalidArgument

_WORKSPACE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_NAME = 100


def workspace(value: str, field: str = "workspace") -> str:
    """A workspace slug: lower-case letters, digits and inner dashes, 1-63 characters."""
    if not _WORKSPACE.fullmatch(value):
        raise InvalidArgument(
            field,
            f"malformed workspace {value[:80]!r}: use 1-63 lower-case letters, digits and "
            "dashes, starting and ending with a letter or digit",
        )
    return value


def name(value: str, field: str = "name") -> str:
    """A human name: 1-100 printable characters, surrounding blanks trimmed."""
    value = value.strip()
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > MAX_NAME:
        raise InvalidArgument(field, f"must be at most {MAX_NAME} characters, got {len(value)}")
    if not value.isprintable():
        raise InvalidArgument(field, "must not contain control characters")
    return value


def parse_duration(text: str, field: str) -> int:
    """``90d``, ``24h``, ``30m``, ``45s``, ``2w`` or a combination (``1d12h``) in seconds."""
    text = text.strip()
    parts = _DURATION.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise InvalidArgument(field, f"malformed duration {text[:40]!r}: use e.g. 90d, 24h, 30m")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def in_range(value: int, low: int, high: int, field: str) -> int:
    """``value`` seconds within [low, high], or an error that states the range."""
    if not low <= value <= high:
        raise InvalidArgument(
            field, f"must be between {format_duration(low)} and {format_duration(high)}"
        )
    return value


def format_duration(seconds: int) -> str:
    """The shortest exact spelling of ``seconds`` in one unit."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
