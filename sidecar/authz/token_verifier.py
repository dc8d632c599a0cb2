"""The sidecar's TokenVerifier for OAuth access tokens: ``verify_access_token`` with the signing
keys the replica received from the control plane (no JWKS fetch on the hot path). The engine
caches the Identity by token digest until it expires and checks revoked grants and jtis on every
request, so this runs once per distinct token (the compiled Check path answers the repeats from
that same cache, through ``Engine.cached_token``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from sidecar.authz.access_tokens import (
    TokenRejected,
    VerificationKey,
    verification_key,
    verified_claims,
)
from sidecar.authz.decision import Identity, Reason
from sidecar.authz.engine import TokenDenied
from sidecar.authz.replica import Replica

log = logging.getLogger("sidecar.tokens")
ACCESS_TOKEN = "access_token"  # noqa: S105 (an identity kind)


class ReplicaTokenVerifier:
    """``(token, replica, now) -> Identity``; raises TokenDenied with the stable reason."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        leeway: float = 30,
        max_lifetime: float | None = None,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.max_lifetime = max_lifetime
        self._lock = threading.Lock()
        # (what the replica held, those payloads, the keys loaded from them), swapped as one.
        self._state: tuple[
            tuple[tuple[str, int], ...], tuple[object, ...], dict[str, VerificationKey]
        ] = ((), (), {})

    def __call__(self, token: str, replica: Replica, now: float) -> Identity:
        try:
            # Straight into the sidecar's Identity: no TokenIdentity built first.
            subject, client_id, workspace, scopes, jti, grant_id, expires_at, _, key_id = (
                verified_claims(
                    token,
                    self.keys(replica.signing_keys),
                    issuer=self.issuer,
                    audience=self.audience,
                    now=now,
                    leeway=self.leeway,
                    max_lifetime=self.max_lifetime,
                )
            )
        except TokenRejected as exc:
            # The verifier's reasons are a subset of the engine's, with the same spelling.
            raise TokenDenied(Reason(exc.reason.value), identity=_signed_by_us(exc)) from None
        return Identity(
            kind=ACCESS_TOKEN,
            id=jti,
            workspace=workspace,
            scopes=scopes,
            expires_at=expires_at,
            subject=subject,
            client_id=client_id,
            grant_id=grant_id,
            key_id=key_id,
        )

    def keys(self, published: Mapping[str, Mapping[str, Any]]) -> dict[str, VerificationKey]:
        """The replica's keys loaded once; reloaded only when the replica's entries change
        (payload objects are replaced, never mutated, when a key is upserted). The state keeps
        the payloads it was loaded from alive, so no later payload can reuse their addresses."""
        seen = tuple((kid, id(payload)) for kid, payload in published.items())
        state = self._state
        if seen == state[0]:
            return state[2]
        with self._lock:
            loaded: dict[str, VerificationKey] = {}
            for kid, payload in published.items():
                try:
                    jwk = payload["public_jwk"]
                    loaded[kid] = verification_key(kid, str(payload["alg"]), jwk)
                except (KeyError, TypeError, ValueError):
                    log.warning("ignoring unusable signing key", extra={"kid": kid})
            self._state = (seen, tuple(published.values()), loaded)
        return loaded


def _signed_by_us(exc: TokenRejected) -> Identity | None:
    """Who a refused token named, when its signature verified (an expired or wrong-audience
    token of a real user): its use is recorded in that workspace, not as anonymous."""
    claims = exc.claims

    def text(name: str) -> str:
        value = claims.get(name)
        return value[:256] if isinstance(value, str) else ""

    if not text("workspace"):
        return None
    return Identity(
        kind=ACCESS_TOKEN,
        id=text("jti"),
        workspace=text("workspace"),
        scopes=frozenset(),
        expires_at=0.0,
        subject=text("sub"),
        client_id=text("client_id"),
        grant_id=text("sid"),
    )
