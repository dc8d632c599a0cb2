"""The token endpoint: authorization-code exchange (RFC 6749 §4.1.3, RFC 7636 §4.6) and
refresh with rotation (RFC 6749 §6, RFC 9700 §4.14).
https://www.rfc-editor.org/rfc/rfc6749#section-3.2

A replayed code or a reused refresh token revokes the grant in a committed transaction before
the error is returned, so the revocation happens even though the request fails."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from sidecar.core import credentials, webhooks
from sidecar.core.audit import event
from sidecar.core.clock import Clock
from sidecar.core.grants import revoke_grant
from sidecar.core.oauth_models import AuthorizationCode, Grant, OAuthApp, RefreshToken
from sidecar.core.scopes import sort_scopes
from sidecar.core.storage import Store, UnitOfWork
from sidecar.oauth import client_auth, rfc7636, rfc9068
from sidecar.oauth.config import OAuthConfig
from sidecar.oauth.errors import (
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    OAuth2Error,
    UnsupportedGrantType,
)
from sidecar.oauth.signing import SigningKeys

AUTHORIZATION_CODE = "authorization_code"
REFRESH_TOKEN = "refresh_token"  # noqa: S105 (a grant type name)
GRANT_TYPES = (AUTHORIZATION_CODE, REFRESH_TOKEN)

TokenEvents = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class TokenResponse:
    """RFC 6749 §5.1."""

    access_token: str
    expires_in: int
    refresh_token: str
    scopes: frozenset[str]

    def body(self) -> dict[str, object]:
        return {
            "access_token": self.access_token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "refresh_token": self.refresh_token,
            "scope": " ".join(sort_scopes(self.scopes)),
        }


def _ignore(_: str) -> None:
    return None


class TokenEndpoint:
    """POST /oauth/token."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        config: OAuthConfig,
        keys: SigningKeys,
        clients: client_auth.ClientAuthenticator,
        events: TokenEvents = _ignore,
    ) -> None:
        self._store = store
        self._clock = clock
        self._config = config
        self._keys = keys
        self._clients = clients
        self._events = events

    def handle(self, form: Mapping[str, str], authorization: str, request_id: str) -> TokenResponse:
        """Authenticate the client, then run the grant; raises OAuth2Error."""
        app = self._clients.authenticate_client(authorization, form)
        grant_type = form.get("grant_type", "")
        if not grant_type:
            raise InvalidRequest("grant_type is required")
        if grant_type == AUTHORIZATION_CODE:
            return self._exchange_code(app, form, request_id)
        if grant_type == REFRESH_TOKEN:
            return self._refresh(app, form, request_id)
        raise UnsupportedGrantType(f"grant_type must be one of: {', '.join(GRANT_TYPES)}")

    # -- authorization_code --------------------------------------------------------------------

    def _exchange_code(
        self, app: OAuthApp, form: Mapping[str, str], request_id: str
    ) -> TokenResponse:
        code = form.get("code", "")
        if not code:
            raise InvalidRequest("code is required")
        if not credentials.is_well_formed(code, credentials.AUTHORIZATION_CODE):
            raise InvalidGrant("unknown authorization code")
        now = self._clock.now()
        replayed: OAuth2Error | None = None
        response: TokenResponse | None = None
        with self._store.transaction() as uow:
            stored = uow.oauth.codes.get(credentials.digest(code))
            if stored is None:
                raise InvalidGrant("unknown authorization code")
            if stored.used_at is not None:
                # §4.1.2: "If an authorization code is used more than once, the authorization
                # server MUST deny the request and SHOULD revoke (when possible) all tokens
                # previously issued based on that authorization code."
                grant = uow.oauth.grants.get(stored.grant_id)
                if grant is not None:
                    revoke_grant(
                        uow,
                        grant,
                        now=now,
                        actor=app.id,
                        reason="authorization code replayed",
                        request_id=request_id,
                    )
                replayed = InvalidGrant("authorization code was already used")
            else:
                self._check_code(stored, app, form, now)
                response = self._issue_from_code(uow, app, stored, now, request_id)
        if response is None:
            raise replayed or InvalidGrant("unknown authorization code")
        self._events("issued")
        return response

    def _check_code(
        self, stored: AuthorizationCode, app: OAuthApp, form: Mapping[str, str], now: float
    ) -> None:
        # §4.1.3: "ensure that the authorization code was issued to the authenticated
        # confidential client, or if the client is public, ensure that the code was issued to
        # "client_id" in the request".
        if stored.app_id != app.id:
            raise InvalidGrant("authorization code was issued to another client")
        if now >= stored.expires_at:
            raise InvalidGrant("authorization code expired")
        # §4.1.3: redirect_uri is required if it was in the authorization request, "and their
        # values MUST be identical".
        given = form.get("redirect_uri")
        if stored.redirect_uri_given and given is None:
            raise InvalidGrant("redirect_uri is required: it was in the authorization request")
        if given is not None and given != stored.redirect_uri:
            raise InvalidGrant("redirect_uri does not match the authorization request")
        rfc7636.verify(
            form.get("code_verifier", ""), stored.code_challenge, stored.code_challenge_method
        )

    def _issue_from_code(
        self,
        uow: UnitOfWork,
        app: OAuthApp,
        stored: AuthorizationCode,
        now: float,
        request_id: str,
    ) -> TokenResponse:
        member = uow.oauth.members.get(stored.user_id)
        if member is None or not member.active:
            raise InvalidGrant("the member who granted this code no longer exists")
        grant = Grant(
            id=credentials.mint_id("grt_"),
            app_id=app.id,
            user_id=stored.user_id,
            workspace=stored.workspace,
            scopes=stored.scopes,
            created_at=int(now),
            last_used_at=int(now),
        )
        uow.oauth.codes.update(replace(stored, used_at=int(now), grant_id=grant.id))
        response, grant = self._mint(uow, grant, grant.scopes, now, new=True)
        self._audit(uow, app, grant, "token.issued", request_id, response.scopes)
        return response

    # -- refresh_token -------------------------------------------------------------------------

    def _refresh(self, app: OAuthApp, form: Mapping[str, str], request_id: str) -> TokenResponse:
        presented = form.get("refresh_token", "")
        if not presented:
            raise InvalidRequest("refresh_token is required")
        if not credentials.is_well_formed(presented, credentials.REFRESH_TOKEN):
            raise InvalidGrant("unknown refresh token")
        now = self._clock.now()
        response: TokenResponse | None = None
        with self._store.transaction() as uow:
            stored = uow.oauth.refresh_tokens.get(credentials.digest(presented))
            grant = uow.oauth.grants.get(stored.grant_id) if stored else None
            # §6: "validate the refresh token and ensure that it was issued to the
            # authenticated client".
            if stored is None or grant is None or grant.app_id != app.id:
                raise InvalidGrant("unknown refresh token")
            if grant.revoked:
                raise InvalidGrant("refresh token revoked")
            # The member is loaded on every refresh: a disabled or deleted member's grant
            # stops here even if its revocation had not been written.
            member = uow.oauth.members.get(grant.user_id)
            if member is None or not member.active:
                raise InvalidGrant("the member who granted this token is disabled")
            if now >= grant.created_at + self._config.grant_lifetime:
                raise InvalidGrant("the grant reached its absolute lifetime: sign in again")
            if stored.rotated_at is not None:
                # RFC 9700 §4.14.2: a rotated token used again means one of two parties holds a
                # stolen copy; revoke the whole grant so neither can continue.
                revoke_grant(
                    uow,
                    grant,
                    now=now,
                    actor=app.id,
                    reason="refresh token reused",
                    request_id=request_id,
                )
                self._audit(uow, app, grant, "refresh.reuse_detected", request_id, grant.scopes)
                webhooks.emit(
                    uow,
                    now,
                    grant.workspace,
                    webhooks.REFRESH_TOKEN_REUSE,
                    {"client_id": app.id, "grant_id": grant.id, "subject": grant.user_id},
                )
            else:
                if now >= stored.expires_at:
                    raise InvalidGrant("refresh token expired")
                scopes = _narrowed(grant.scopes, form.get("scope"))
                uow.oauth.refresh_tokens.update(replace(stored, rotated_at=int(now)))
                response, grant = self._mint(uow, grant, scopes, now, new=False)
                self._audit(uow, app, grant, "token.refreshed", request_id, scopes)
        if response is None:
            self._events("reuse_detected")
            raise InvalidGrant("refresh token was already used; the grant is revoked")
        self._events("refreshed")
        return response

    # -- shared --------------------------------------------------------------------------------

    def _mint(
        self, uow: UnitOfWork, grant: Grant, scopes: frozenset[str], now: float, *, new: bool
    ) -> tuple[TokenResponse, Grant]:
        cfg = self._config
        access = rfc9068.issue(
            self._keys.signer(uow),
            issuer=cfg.issuer,
            audience=cfg.audience,
            subject=grant.user_id,
            client_id=grant.app_id,
            scopes=scopes,
            workspace=grant.workspace,
            grant_id=grant.id,
            now=now,
            ttl=cfg.access_token_ttl,
        )
        refresh = credentials.mint(credentials.REFRESH_TOKEN)
        uow.oauth.refresh_tokens.insert(
            RefreshToken(
                digest=credentials.digest(refresh),
                grant_id=grant.id,
                created_at=int(now),
                # Never beyond the grant's absolute lifetime (rotation does not extend it).
                expires_at=min(
                    int(now) + cfg.refresh_token_ttl, grant.created_at + cfg.grant_lifetime
                ),
            )
        )
        grant = replace(
            grant,
            last_used_at=int(now),
            access_expires_at=max(grant.access_expires_at, access.expires_at),
        )
        if new:
            uow.oauth.grants.insert(grant)
        else:
            uow.oauth.grants.update(grant)
        response = TokenResponse(access.token, cfg.access_token_ttl, refresh, scopes)
        return response, grant

    def _audit(
        self,
        uow: UnitOfWork,
        app: OAuthApp,
        grant: Grant,
        action: str,
        request_id: str,
        scopes: frozenset[str],
    ) -> None:
        uow.audit.append(
            event(
                self._clock.now(),
                app.id,
                action,
                grant.workspace,
                grant.id,
                outcome="failure" if action == "refresh.reuse_detected" else "success",
                request_id=request_id,
                metadata={
                    "client_id": app.id,
                    "user_id": grant.user_id,
                    "scopes": " ".join(sort_scopes(scopes)),
                },
            )
        )


def _narrowed(granted: frozenset[str], raw: str | None) -> frozenset[str]:
    """§6: a refresh may ask for fewer scopes, never for one the grant lacks."""
    if raw is None or not raw.strip():
        return granted
    requested = frozenset(raw.split())
    extra = sort_scopes(requested - granted)
    if extra:
        raise InvalidScope(f"scope {extra[0]} exceeds the original grant")
    return requested
