"""The replication contract: every kind of change-log entry a sidecar replica learns, as an enum,
with one builder (``Message.change()``) and one parser (``parse``) per kind. The payload travels
as JSON; only this module writes or reads its fields.

- ``credential.upserted`` ``{"id", "digest", "workspace", "scopes", "expires_at"[, "rate_limit",
  "rate_period"][, "suspended"][, "client_cidrs"][, "grace_deadline"][, "revoked"]}``: a usable
  API key (its digest, never the secret); a replaced key carries its grace deadline, which the
  replica enforces as an expiry.
- ``credential.revoked`` / ``credential.expired`` ``{"id"}``: the key stops working.
- ``signing_key.upserted`` ``{"kid", "alg", "public_jwk": {...}}``: a key joined the JWKS.
- ``signing_key.retired`` ``{"kid"}``: the key left the JWKS; tokens it signed are all expired.
- ``grant.revoked`` ``{"grant_id", "expires_at"}``: deny tokens whose ``sid`` is this grant;
  ``expires_at`` is the latest ``exp`` of its access tokens, after which the entry can go.
- ``token.revoked`` ``{"jti", "expires_at"}``: deny the access token with this ``jti``.

A kind this module does not know raises ``UnknownChangeKind``: the sidecar counts and reports it
(health and metrics) instead of skipping it silently."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core.models import ApiKey, Change
from sidecar.core.oauth_models import Grant, RevokedToken, SigningKey
from sidecar.core.scopes import sort_scopes
from sidecar.core.storage import UnitOfWork


class ChangeKind(enum.StrEnum):
    CREDENTIAL_UPSERTED = "credential.upserted"
    CREDENTIAL_REVOKED = "credential.revoked"
    CREDENTIAL_EXPIRED = "credential.expired"
    SIGNING_KEY_UPSERTED = "signing_key.upserted"
    SIGNING_KEY_RETIRED = "signing_key.retired"
    GRANT_REVOKED = "grant.revoked"
    TOKEN_REVOKED = "token.revoked"  # noqa: S105 (a name, not a secret)


class ChangeError(ValueError):
    """A change-log entry that cannot be read."""


class UnknownChangeKind(ChangeError):
    """An entry of a kind this version does not know (e.g. from a newer control plane)."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"unknown change kind {kind[:64]!r}")
        self.kind = kind


class MalformedChange(ChangeError):
    """An entry of a known kind whose payload lacks a field or has one of the wrong type."""


# -- messages: one dataclass per kind, each with its builder and parser -------------------------


@dataclass(frozen=True, slots=True)
class CredentialUpserted:
    id: str
    digest: bytes
    workspace: str
    scopes: frozenset[str]
    expires_at: int
    rate_limit: int = 0
    rate_period: int = 0
    revoked: bool = False  # only in a replica's own snapshot (a tombstone)
    # A replaced key's grace deadline: the replicas end the key then, even offline.
    grace_deadline: int | None = None
    suspended: bool = False
    client_cidrs: tuple[str, ...] = ()  # the networks it may be used from (empty: any)

    @classmethod
    def of(cls, key: ApiKey) -> CredentialUpserted:
        return cls(
            key.id,
            key.digest,
            key.workspace,
            key.scopes,
            key.expires_at,
            key.rate_limit,
            key.rate_period,
            grace_deadline=key.grace_deadline,
            suspended=key.suspended_at is not None,
            client_cidrs=tuple(key.client_cidrs),
        )

    def change(self) -> Change:
        payload: dict[str, object] = {
            "id": self.id,
            "digest": self.digest.hex(),
            "workspace": self.workspace,
            "scopes": sort_scopes(self.scopes),
            "expires_at": self.expires_at,
        }
        if self.rate_limit:
            payload["rate_limit"] = self.rate_limit
            payload["rate_period"] = self.rate_period
        if self.suspended:
            payload["suspended"] = True
        if self.client_cidrs:
            payload["client_cidrs"] = list(self.client_cidrs)
        if self.revoked:
            payload["revoked"] = True
        if self.grace_deadline is not None:
            payload["grace_deadline"] = self.grace_deadline
        return Change(ChangeKind.CREDENTIAL_UPSERTED.value, self.id, payload)

    @classmethod
    def parse(cls, p: Mapping[str, Any]) -> CredentialUpserted:
        return cls(
            id=str(p["id"]),
            digest=bytes.fromhex(str(p["digest"])),
            workspace=str(p["workspace"]),
            scopes=frozenset(str(s) for s in p["scopes"]),
            expires_at=int(p["expires_at"]),
            rate_limit=int(p.get("rate_limit", 0)),
            rate_period=int(p.get("rate_period", 0)),
            revoked=bool(p.get("revoked", False)),
            grace_deadline=None if p.get("grace_deadline") is None else int(p["grace_deadline"]),
            suspended=bool(p.get("suspended", False)),
            client_cidrs=tuple(str(c) for c in p.get("client_cidrs", ())),
        )


@dataclass(frozen=True, slots=True)
class CredentialRevoked:
    id: str

    def change(self) -> Change:
        return Change(ChangeKind.CREDENTIAL_REVOKED.value, self.id, {"id": self.id})

    @classmethod
    def parse(cls, p: Mapping[str, Any]) -> CredentialRevoked:
        return cls(str(p["id"]))


@dataclass(frozen=True, slots=True)
class CredentialExpired:
    id: str

    def change(self) -> Change:
        return Change(ChangeKind.CREDENTIAL_EXPIRED.value, self.id, {"id": self.id})

    @classmethod
    def parse(cls, p: Mapping[str, Any]) -> CredentialExpired:
        return cls(str(p["id"]))


@dataclass(frozen=True, slots=True)
class SigningKeyUpserted:
    """A key that verifies tokens (public part only)."""

    kid: str
    alg: str
    public_jwk: Mapping[str, Any]

    def change(self) -> Change:
        payload: dict[str, object] = {
            "kid": self.kid,
            "alg": self.alg,
            "public_jwk": self.public_jwk,
        }
        return Change(ChangeKind.SIGNING_KEY_UPSERTED.value, self.kid, payload)

    @classmethod
    def parse(cls, p: Mapping[str, Any]) -> SigningKeyUpserted:
        # The JWK's own fields are the verifier's to judge (it skips a key it cannot use).
        return cls(str(p["kid"]), str(p["alg"]), p["public_jwk"])


@dataclass(frozen=True, slots=True)
class SigningKeyRetired:
    kid: str

    def change(self) -> Change:
        return Change(ChangeKind.SIGNING_KEY_RETIRED.value, self.kid, {"kid": self.kid})

    @classmethod
    def parse(cls, p: Mapping[str, Any]) -> SigningKeyRetired:
        return cls(str(p["kid"]))


@dataclass(frozen=True, slots=True)
class GrantRevoked:
    grant_id: str
    expires_at: float

    def change(self) -> Change:
        payload: dict[str, object] = {"grant_id": self.grant_id, "expires_at": self.expires_at}
        return Change(ChangeKind.GRANT_REVOKED.value, self.grant_id, payload)

    @classmethod
    def parse(cls, p: Mapping[str, Any]) -> GrantRevoked:
        return cls(str(p["grant_id"]), float(p.get("expires_at", 0)))


@dataclass(frozen=True, slots=True)
class TokenRevoked:
    jti: str
    expires_at: float

    def change(self) -> Change:
        payload: dict[str, object] = {"jti": self.jti, "expires_at": self.expires_at}
        return Change(ChangeKind.TOKEN_REVOKED.value, self.jti, payload)

    @classmethod
    def parse(cls, p: Mapping[str, Any]) -> TokenRevoked:
        return cls(str(p["jti"]), float(p.get("expires_at", 0)))


Message = (
    CredentialUpserted
    | CredentialRevoked
    | CredentialExpired
    | SigningKeyUpserted
    | SigningKeyRetired
    | GrantRevoked
    | TokenRevoked
)

PARSERS: dict[ChangeKind, Callable[[Mapping[str, Any]], Message]] = {
    ChangeKind.CREDENTIAL_UPSERTED: CredentialUpserted.parse,
    ChangeKind.CREDENTIAL_REVOKED: CredentialRevoked.parse,
    ChangeKind.CREDENTIAL_EXPIRED: CredentialExpired.parse,
    ChangeKind.SIGNING_KEY_UPSERTED: SigningKeyUpserted.parse,
    ChangeKind.SIGNING_KEY_RETIRED: SigningKeyRetired.parse,
    ChangeKind.GRANT_REVOKED: GrantRevoked.parse,
    ChangeKind.TOKEN_REVOKED: TokenRevoked.parse,
}


def parse(change: Change) -> Message:
    """The typed message of ``change``; UnknownChangeKind or MalformedChange otherwise."""
    try:
        kind = ChangeKind(change.kind)
    except ValueError:
        raise UnknownChangeKind(change.kind) from None
    try:
        return PARSERS[kind](change.payload)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MalformedChange(f"bad {kind} payload at revision {change.revision}") from exc


# -- what the use cases commit ------------------------------------------------------------------


def credential_upserted(key: ApiKey) -> Change:
    return CredentialUpserted.of(key).change()


def credential_revoked(key_id: str) -> Change:
    return CredentialRevoked(key_id).change()


def credential_expired(key_id: str) -> Change:
    return CredentialExpired(key_id).change()


def signing_key_upserted(key: SigningKey) -> Change:
    return SigningKeyUpserted(key.kid, key.alg, key.public_jwk).change()


def signing_key_retired(kid: str) -> Change:
    return SigningKeyRetired(kid).change()


def grant_revoked(grant: Grant) -> Change:
    return GrantRevoked(grant.id, grant.access_expires_at).change()


def token_revoked(token: RevokedToken) -> Change:
    return TokenRevoked(token.jti, token.expires_at).change()


def oauth_snapshot(uow: UnitOfWork, now: float) -> list[Change]:
    """The OAuth part of a replica snapshot: every published signing key, and every revoked
    grant or access token whose tokens may still be unexpired at ``now``."""
    at = int(now)
    out = [signing_key_upserted(k) for k in uow.oauth.signing_keys.published()]
    out.extend(grant_revoked(g) for g in uow.oauth.grants.revoked_unexpired(at))
    out.extend(token_revoked(t) for t in uow.oauth.revoked_tokens.unexpired(at))
    return out
