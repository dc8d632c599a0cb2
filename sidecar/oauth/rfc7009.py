"""Token revocation. https://www.rfc-editor.org/rfc/rfc7009

Revoking a refresh token revokes its whole grant (and so the access tokens issued from it);
revoking an access token revokes that token until it expires. A store failure propagates as
``Unavailable`` and is answered ``temporarily_unavailable`` (503), never as a false success."""

from __future__ import annotations

from collections.abc import Callable

from sidecar.core.audit import event
from sidecar.core.clock import Clock
from sidecar.core.grants import revoke_access_token, revoke_grant
from sidecar.core.oauth_models import OAuthApp
from sidecar.core.storage import Store
from sidecar.oauth.config import OAuthConfig
from sidecar.oauth.errors import InvalidRequest, UnauthorizedClient, UnsupportedTokenType
from sidecar.oauth.lookup import REFRESH_TOKEN, TOKEN_TYPE_HINTS, find_token
from sidecar.oauth.signing import SigningKeys


def _ignore(_: str) -> None:
    return None


class RevocationEndpoint:
    """POST /oauth/revoke (the caller is an authenticated client)."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        config: OAuthConfig,
        keys: SigningKeys,
        events: Callable[[str], None] = _ignore,
    ) -> None:
        self._store = store
        self._clock = clock
        self._config = config
        self._keys = keys
        self._events = events

    def revoke(self, app: OAuthApp, token: str, hint: str, request_id: str) -> None:
        """Revoke ``token`` if it is one of ``app``'s; unknown tokens change nothing."""
        if not token:
            raise InvalidRequest("token is required")
        # §2.2.1: unsupported_token_type for a type we cannot revoke. Both of ours can be; an
        # unknown hint value is refused the same way rather than silently ignored.
        if hint and hint not in TOKEN_TYPE_HINTS:
            raise UnsupportedTokenType(f"token_type_hint must be one of {TOKEN_TYPE_HINTS}")
        keys = self._keys.verification_keys()
        now = self._clock.now()
        with self._store.transaction() as uow:
            facts = find_token(uow, token, keys=keys, config=self._config, now=now)
            # §2.2: "invalid tokens do not cause an error response" — answer 200 and stop.
            if facts is None:
                return
            # §2.1: "verifies whether the token was issued to the client making the revocation
            # request. If this validation fails, the request is refused".
            if facts.grant.app_id != app.id:
                raise UnauthorizedClient("the token was issued to another client")
            if facts.kind == REFRESH_TOKEN:
                # §2.1: revoking a refresh token SHOULD also invalidate the access tokens of
                # the same grant: revoking the grant does both.
                if not facts.grant.revoked:
                    uow.audit.append(
                        event(
                            now,
                            app.id,
                            "token.revoked",
                            facts.grant.workspace,
                            facts.grant.id,
                            request_id=request_id,
                            metadata={"client_id": app.id, "type": REFRESH_TOKEN},
                        )
                    )
                    revoke_grant(
                        uow,
                        facts.grant,
                        now=now,
                        actor=app.id,
                        reason="refresh token revoked by the client",
                        request_id=request_id,
                    )
            elif facts.active:
                revoke_access_token(
                    uow,
                    jti=facts.jti,
                    grant=facts.grant,
                    expires_at=facts.expires_at,
                    now=now,
                    actor=app.id,
                    request_id=request_id,
                )
        self._events("revoked")
