"""Input checks that name the field they reject."""

from __future__ import annotations

import ipaddress
import re

from sidecar.core.errors import InvalidArgument

_WORKSPACE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_RATE = re.compile(r"(\d+)/(\d*)([smh])")
MAX_NAME = 100
MAX_RATE_REQUESTS = 1_000_000
MAX_RATE_PERIOD = 3600


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


def rate_limit(requests: int, period: int, field: str = "rate_limit") -> tuple[int, int]:
    """A per-key request limit: 1 to 1,000,000 requests per 1 s to 1 h."""
    if not 1 <= requests <= MAX_RATE_REQUESTS:
        raise InvalidArgument(field, f"requests must be between 1 and {MAX_RATE_REQUESTS}")
    if not 1 <= period <= MAX_RATE_PERIOD:
        raise InvalidArgument(field, "period must be between 1s and 1h")
    return requests, period


def parse_rate(text: str, field: str = "rate_limit") -> tuple[int, int]:
    """``100/s``, ``6000/m``, ``10/5s``, ``1000/h`` as (requests, period seconds)."""
    found = _RATE.fullmatch(text.strip())
    if found is None:
        raise InvalidArgument(field, f"malformed rate {text[:40]!r}: use e.g. 100/s, 6000/m")
    count, every, unit = found.groups()
    return rate_limit(int(count), int(every or 1) * _UNITS[unit], field)


def format_rate(requests: int, period: int) -> str:
    """The spelling ``parse_rate`` reads back (``100/s``, ``10/5s``, ``6000/m``)."""
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if period % size == 0:
            every = period // size
            return f"{requests}/{every if every > 1 else ''}{unit}"
    return f"{requests}/{period}s"


MAX_DESCRIPTION = 500
MAX_CLIENT_CIDRS = 32


def description(value: str, field: str = "description") -> str:
    """Free text about a key: at most 500 printable characters (newlines excluded)."""
    value = value.strip()
    if len(value) > MAX_DESCRIPTION or not value.isprintable():
        raise InvalidArgument(field, f"must be at most {MAX_DESCRIPTION} printable characters")
    return value


def client_cidrs(values: list[str], field: str = "client_cidrs") -> tuple[str, ...]:
    """Networks a key may be used from, normalized (``10.1.2.3/8`` → ``10.0.0.0/8``; a bare
    address is a /32 or /128), without repeats, at most 32."""
    if len(values) > MAX_CLIENT_CIDRS:
        raise InvalidArgument(field, f"at most {MAX_CLIENT_CIDRS} networks")
    out: list[str] = []
    for value in values:
        try:
            network = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise InvalidArgument(field, f"not a CIDR or address: {value[:60]!r}") from None
        text = str(network)
        if text not in out:
            out.append(text)
    return tuple(out)
