"""Token introspection. https://www.rfc-editor.org/rfc/rfc7662

§2.1: the caller must authenticate — here a confidential client (which sees only its own
tokens) or an admin API key holding ``admin:full`` (which sees its workspace's tokens; the
operator key sees all). §2.2: an unknown, expired or revoked token, or one the caller may not
see, yields ``{"active": false}`` and nothing else."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.core.clock import Clock
from sidecar.core.models import Principal
from sidecar.core.oauth_models import OAuthApp
from sidecar.core.scopes import ADMIN_FULL, satisfies, sort_scopes
from sidecar.core.storage import Store
from sidecar.oauth.config import OAuthConfig
from sidecar.oauth.lookup import ACCESS_TOKEN, TokenFacts, find_token
from sidecar.oauth.signing import SigningKeys

INACTIVE: dict[str, object] = {"active": False}


@dataclass(frozen=True, slots=True)
class Introspector:
    """Who asks: an authenticated client or an admin key's principal."""

    app: OAuthApp | None = None
    principal: Principal | None = None

    def may_see(self, facts: TokenFacts) -> bool:
        if self.app is not None:
            return self.app.id == facts.grant.app_id
        if self.principal is not None and satisfies(self.principal.scopes, ADMIN_FULL):
            return self.principal.is_operator or self.principal.workspace == facts.grant.workspace
        return False


class IntrospectionEndpoint:
    """POST /oauth/introspect."""

    def __init__(self, store: Store, clock: Clock, config: OAuthConfig, keys: SigningKeys) -> None:
        self._store = store
        self._clock = clock
        self._config = config
        self._keys = keys

    def introspect(self, caller: Introspector, token: str) -> dict[str, object]:
        """The RFC 7662 §2.2 response for ``token``."""
        if not token:
            return dict(INACTIVE)
        keys = self._keys.verification_keys()
        now = self._clock.now()
        with self._store.read() as uow:
            facts = find_token(uow, token, keys=keys, config=self._config, now=now)
            member = uow.oauth.members.get(facts.grant.user_id) if facts else None
        if facts is None or not facts.active or not caller.may_see(facts):
            return dict(INACTIVE)
        out: dict[str, object] = {
            "active": True,
            "scope": " ".join(sort_scopes(facts.scopes)),
            "client_id": facts.grant.app_id,
            "token_type": "Bearer" if facts.kind == ACCESS_TOKEN else "refresh_token",
            "exp": facts.expires_at,
            "iat": facts.issued_at,
            "sub": facts.grant.user_id,
            "iss": self._config.issuer,
            "workspace": facts.grant.workspace,
            "sid": facts.grant.id,
        }
        if member is not None:
            out["username"] = member.email
        if facts.kind == ACCESS_TOKEN:
            out.update(aud=self._config.audience, jti=facts.jti)
        return out
