"""The signature on every delivery: ``X-Spauth-Signature: t=<unix seconds>,v1=<hex>`` where
``v1 = HMAC-SHA256(secret, f"{t}.{body}")`` (the Stripe scheme). A receiver recomputes it over
the raw body, compares in constant time, and rejects a ``t`` more than ``REPLAY_WINDOW``
seconds from its own clock; with the delivery id (``X-Spauth-Delivery``, also the body's
``id``) it drops repeats, since delivery is at least once."""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Spauth-Signature"
DELIVERY_HEADER = "X-Spauth-Delivery"
EVENT_HEADER = "X-Spauth-Event"
REPLAY_WINDOW = 300


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(
    secret: bytes, header: str, body: bytes, now: float, window: int = REPLAY_WINDOW
) -> bool:
    """What a receiver does (also used by ``spauth`` tests): the header's MAC matches and its
    time is within ``window`` seconds of ``now``."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > window:
        return False
    expected = signature(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))
