"""The client's address of an HTTP request, for sign-in throttling and the audit trail.

The TCP peer is the client unless it is a trusted proxy (setting ``trusted_proxies``). Then the
client is the right-most address in ``X-Forwarded-For`` that is not itself a trusted proxy:
each proxy appends the address it received the request from, so entries to the right of the
last trusted hop were written by proxies we trust, and everything to the left was written by the
client and can be forged (MDN, "X-Forwarded-For: Selecting an IP address")."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from starlette.requests import Request

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def resolve(peer: str, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str:
    """The client's address given the peer and every ``X-Forwarded-For`` header's value."""
    if not trusted or not _trusted(peer, trusted):
        return peer
    hops = [h.strip() for value in forwarded_for for h in value.split(",")]
    for hop in reversed(hops):
        if not hop:
            continue
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return peer  # a malformed hop: trust nothing the chain says beyond the peer
        if not _trusted(hop, trusted):
            return hop
    return peer


def client_address(request: Request, trusted: Sequence[Network]) -> str:
    peer = request.client.host if request.client else "unknown"
    return resolve(peer, request.headers.getlist("x-forwarded-for"), trusted)
