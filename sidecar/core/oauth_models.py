"""OAuth records: applications, members, grants, codes, refresh tokens, signing keys. Frozen: a
change is a new record. Secrets appear only as digests (SHA-256) or password hashes (scrypt)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.core.models import Principal


@dataclass(frozen=True, slots=True)
class OAuthApp:
    """A registered third-party application; ``id`` is its ``client_id`` (RFC 6749 §2.2)."""

    id: str
    workspace: str
    name: str
    redirect_uris: tuple[str, ...]
    scopes: frozenset[str]
    confidential: bool
    created_at: int
    created_by: str
    secret_digest: bytes | None = None
    secret_last_four: str = ""
    previous_secret_digest: bytes | None = None
    previous_secret_expires_at: int | None = None
    deleted_at: int | None = None

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None


@dataclass(frozen=True, slots=True)
class RegisteredApp:
    """An app with its client secret, returned exactly once (registration or rotation)."""

    app: OAuthApp
    client_secret: str = ""


@dataclass(frozen=True, slots=True)
class Member:
    """A workspace member who can sign in at the authorization endpoint."""

    id: str
    workspace: str
    email: str
    password_hash: str
    scopes: frozenset[str]
    created_at: int
    created_by: str
    disabled_at: int | None = None
    last_signin_at: int | None = None
    deleted_at: int | None = None

    @property
    def state(self) -> str:
        """``active``, ``disabled`` or ``deleted``: only an active member signs in or refreshes."""
        if self.deleted_at is not None:
            return "deleted"
        return "active" if self.disabled_at is None else "disabled"

    @property
    def active(self) -> bool:
        return self.disabled_at is None and self.deleted_at is None

    def principal(self) -> Principal:
        """The member as the caller of a use case (the web console): the use cases check its
        workspace and scopes exactly as a key's, and audit it by member id as the actor."""
        return Principal(key_id=self.id, workspace=self.workspace, scopes=self.scopes)


@dataclass(frozen=True, slots=True)
class Grant:
    """One member's consent to one app: the refresh-token chain and the access tokens issued
    from one authorization code. Shown to admins as an app's "session"."""

    id: str
    app_id: str
    user_id: str
    workspace: str
    scopes: frozenset[str]
    created_at: int
    last_used_at: int
    access_expires_at: int = 0
    revoked_at: int | None = None
    revoke_reason: str = ""

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True, slots=True)
class AppSession:
    """A grant as an admin sees it: with the member's e-mail address."""

    grant: Grant
    email: str


@dataclass(frozen=True, slots=True)
class AuthorizationCode:
    """An issued authorization code (stored by digest), bound to the PKCE challenge."""

    digest: bytes
    app_id: str
    user_id: str
    workspace: str
    scopes: frozenset[str]
    redirect_uri: str
    redirect_uri_given: bool
    code_challenge: str
    code_challenge_method: str
    created_at: int
    expires_at: int
    used_at: int | None = None
    grant_id: str = ""


@dataclass(frozen=True, slots=True)
class RefreshToken:
    """A refresh token (stored by digest); ``rotated_at`` is set when it was exchanged."""

    digest: bytes
    grant_id: str
    created_at: int
    expires_at: int
    rotated_at: int | None = None


@dataclass(frozen=True, slots=True)
class RevokedToken:
    """An access token revoked on its own (RFC 7009), remembered until it expires."""

    jti: str
    grant_id: str
    expires_at: int
    revoked_at: int


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A JWT signing key. Published (JWKS, replicas) from ``created_at``, it signs from
    ``activates_at`` until ``superseded_at``, then stays in the JWKS until ``retired_at`` so
    tokens it signed keep verifying until they expire. ``private_pem`` is the private key
    encrypted under a key-encryption key (sidecar/core/kek.py); empty once superseded."""

    kid: str
    alg: str
    private_pem: bytes = field(repr=False)
    public_jwk: dict[str, str]
    created_at: int
    superseded_at: int | None = None
    retired_at: int | None = None
    activates_at: int = 0


@dataclass(frozen=True, slots=True)
class BrowserSession:
    """A member signed in at the authorization endpoint (stored by digest of the cookie)."""

    digest: bytes
    user_id: str
    workspace: str
    created_at: int
    expires_at: int
