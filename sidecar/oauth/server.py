"""The authorization server assembled from its parts, for the HTTP transport and the control
plane's housekeeping."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from sidecar.core import kek
from sidecar.core.clock import Clock
from sidecar.core.kek import KeyEncryption
from sidecar.core.storage import Store
from sidecar.oauth import rfc8414
from sidecar.oauth.authorization import AuthorizationEndpoint
from sidecar.oauth.client_auth import ClientAuthenticator
from sidecar.oauth.config import OAuthConfig
from sidecar.oauth.rfc7009 import RevocationEndpoint
from sidecar.oauth.rfc7662 import IntrospectionEndpoint
from sidecar.oauth.sessions import BrowserSessions
from sidecar.oauth.signing import SigningKeys
from sidecar.oauth.throttle import SignInThrottle, ThrottlePolicy
from sidecar.oauth.token import TokenEndpoint


def _ignore(_: str) -> None:
    return None


def signing_keys(
    store: Store, clock: Clock, config: OAuthConfig, encryption: KeyEncryption
) -> SigningKeys:
    """The signing key set as ``config`` schedules it."""
    return SigningKeys(
        store,
        clock,
        rotation_interval=config.signing_key_rotation,
        access_token_ttl=config.access_token_ttl,
        encryption=encryption,
        lead_time=config.signing_key_lead_time,
    )


class AuthorizationServer:
    """Every OAuth endpoint's use cases over one store and clock. ``token_events`` receives
    ``issued``, ``refreshed``, ``revoked`` and ``reuse_detected`` (for metrics)."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        config: OAuthConfig,
        *,
        throttle: ThrottlePolicy | None = None,
        token_events: Callable[[str], None] = _ignore,
        keys: SigningKeys | None = None,
        encryption: KeyEncryption | None = None,
    ) -> None:
        self.config = config
        self._store = store
        self._clock = clock
        # Without keys from the control plane (tests), a random in-memory KEK: keys created
        # under it are unusable after a restart, never readable from the store.
        self.keys = keys or signing_keys(
            store,
            clock,
            config,
            encryption or KeyEncryption([secrets.token_bytes(kek.KEK_BYTES)]),
        )
        self.throttle = SignInThrottle(clock, throttle)
        self.sessions = BrowserSessions(store, clock, config.session_ttl)
        self.authorization = AuthorizationEndpoint(store, clock, config, self.throttle)
        self.clients = ClientAuthenticator(store, clock)
        self.token = TokenEndpoint(store, clock, config, self.keys, self.clients, token_events)
        self.revocation = RevocationEndpoint(store, clock, config, self.keys, token_events)
        self.introspection = IntrospectionEndpoint(store, clock, config, self.keys)

    def start(self) -> None:
        """Create the first signing key if there is none (blocking: call from a thread)."""
        self.keys.ensure_current()

    def metadata(self) -> dict[str, object]:
        return rfc8414.metadata(self.config)

    def sweep(self) -> int:
        """Rotate and retire signing keys, and drop expired codes and sessions."""
        changed = self.keys.sweep()
        now = int(self._clock.now())
        with self._store.transaction() as uow:
            uow.oauth.codes.purge(now - self.config.code_ttl)
            uow.oauth.sessions.purge(now)
        return changed
