"""Sends due deliveries from the outbox: POST the JSON body, signed, with a 10 s timeout. A 2xx
answer delivers; anything else (an error status, a timeout, a refused connection, an address
the policy forbids) schedules a retry after ``min(cap, base · 2^(attempts-1))`` seconds scaled
by a random factor in [0.5, 1) (jitter, so a receiver coming back is not hit by every retry at
once), until ``max_attempts`` (then ``failed``). Delivery is at least once: a crash after the
POST and before the update sends it again.

Where a tenant's URL may point is decided here, at delivery time, after DNS: by default only
``https`` to public addresses (no loopback, private, link-local or metadata addresses), so a
workspace admin cannot make the control plane call into its own network (SSRF).
``allow_private`` (setting ``webhook_allow_private``) lifts that for development and tests."""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from sidecar.core.clock import Clock
from sidecar.core.storage import Store
from sidecar.core.webhooks import Delivery, Sealer, Webhook, sealing_context
from sidecar.webhooks.signing import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, signature

log = logging.getLogger("sidecar.webhooks")


class DeliveryRefused(Exception):
    """The URL may not be called (scheme or address); retried in case DNS changes."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base: float = 5.0
    cap: float = 3600.0
    max_attempts: int = 15  # about a day with the defaults

    def delay(self, attempts: int, rand: float) -> float:
        return float(min(self.cap, self.base * 2 ** max(0, attempts - 1)) * (0.5 + rand / 2))


def check_destination(url: str, allow_private: bool) -> None:
    parts = urlsplit(url)
    if allow_private:
        return
    if parts.scheme != "https":
        raise DeliveryRefused("only https webhook URLs are called")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise DeliveryRefused(f"cannot resolve {parts.hostname}: {exc.strerror}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise DeliveryRefused(f"{parts.hostname} resolves to a non-public address")


class Deliverer:
    """One pass (``run_once``) sends up to ``batch`` due deliveries."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        sealer: Sealer,
        *,
        policy: RetryPolicy | None = None,
        allow_private: bool = False,
        timeout: float = 10.0,
        batch: int = 50,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._clock = clock
        self._sealer = sealer
        self.policy = policy or RetryPolicy()
        self._allow_private = allow_private
        self._timeout = timeout
        self._batch = batch
        self._rand = rand

    def run_once(self) -> int:
        """Attempt every due delivery once; returns how many were delivered."""
        now = int(self._clock.now())
        with self._store.read() as uow:
            due = uow.webhooks.due(now, self._batch)
            hooks = {d.webhook_id: uow.webhooks.get(d.webhook_id) for d in due}
        delivered = 0
        for delivery in due:
            hook = hooks.get(delivery.webhook_id)
            if hook is None or hook.deleted_at is not None:
                outcome = replace(delivery, status="failed", last_error="webhook deleted")
            else:
                error = self._post(hook, delivery)
                outcome = self._after(delivery, error)
                delivered += outcome.status == "delivered"
            with self._store.transaction() as uow:
                uow.webhooks.record_attempt(outcome)
        return delivered

    def _post(self, hook: Webhook, delivery: Delivery) -> str:
        """'' when the receiver answered 2xx, else what went wrong (no secret in it)."""
        body = delivery.body.encode()
        url = hook.url
        try:
            check_destination(url, self._allow_private)
            secret = self._sealer.open(hook.sealed_secret, sealing_context(hook.id))
        except (DeliveryRefused, ValueError) as exc:
            return str(exc)
        request = urllib.request.Request(url, data=body, method="POST")  # noqa: S310 (checked)
        request.add_header("Content-Type", "application/json")
        request.add_header("User-Agent", "spauth-webhooks/1")
        request.add_header(DELIVERY_HEADER, delivery.id)
        request.add_header(EVENT_HEADER, delivery.event)
        request.add_header(SIGNATURE_HEADER, signature(secret, int(self._clock.now()), body))
        try:
            with _OPENER.open(request, timeout=self._timeout) as resp:
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return f"request failed: {getattr(exc, 'reason', exc)}"[:300]
        return "" if 200 <= status < 300 else f"HTTP {status}"

    def _after(self, delivery: Delivery, error: str) -> Delivery:
        now = int(self._clock.now())
        attempts = delivery.attempts + 1
        if not error:
            return replace(delivery, status="delivered", attempts=attempts, delivered_at=now)
        if attempts >= self.policy.max_attempts:
            log.warning("webhook delivery gave up", extra={"delivery": delivery.id, "error": error})
            return replace(delivery, status="failed", attempts=attempts, last_error=error)
        delay = self.policy.delay(attempts, self._rand())
        return replace(
            delivery, attempts=attempts, next_attempt_at=now + max(1, int(delay)), last_error=error
        )


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect could lead past the destination check: treat it as a failed delivery."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)
