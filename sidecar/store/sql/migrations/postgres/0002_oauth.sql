-- OAuth 2.0 (issue 4): the schema of sqlite/0002_oauth.sql in PostgreSQL types. Secrets are
-- stored only as SHA-256 digests (refresh tokens, codes, client secrets, browser sessions) or
-- scrypt hashes (member passwords). Revocation marks, never deletes.

-- Third-party applications (RFC 6749 §2). id is the client_id.
CREATE TABLE oauth_apps (
    id TEXT PRIMARY KEY,
    workspace TEXT NOT NULL,
    name TEXT NOT NULL,
    redirect_uris TEXT NOT NULL,
    scopes TEXT NOT NULL,
    confidential INTEGER NOT NULL,
    secret_digest BYTEA,
    secret_last_four TEXT NOT NULL DEFAULT '',
    previous_secret_digest BYTEA,
    previous_secret_expires_at BIGINT,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    deleted_at BIGINT
);
CREATE INDEX oauth_apps_listing ON oauth_apps (workspace, created_at DESC, id DESC);

-- Workspace members (resource owners) who sign in at /oauth/authorize.
CREATE TABLE oauth_users (
    id TEXT PRIMARY KEY,
    workspace TEXT NOT NULL,
    email TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    disabled_at BIGINT,
    UNIQUE (workspace, email)
);

-- A grant: one member's consent to one app, from one authorization code; the chain of refresh
-- tokens and the access tokens issued from it. access_expires_at is the latest exp of its
-- access tokens, so replicas know how long a revocation must be remembered.
CREATE TABLE oauth_grants (
    id TEXT PRIMARY KEY,
    app_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    workspace TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT NOT NULL,
    access_expires_at BIGINT NOT NULL DEFAULT 0,
    revoked_at BIGINT,
    revoke_reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX oauth_grants_app ON oauth_grants (app_id, revoked_at);
CREATE INDEX oauth_grants_revoked ON oauth_grants (revoked_at, access_expires_at);

-- Authorization codes (RFC 6749 §4.1.2): single use, short-lived, bound to the PKCE challenge.
CREATE TABLE oauth_codes (
    digest BYTEA PRIMARY KEY,
    app_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    workspace TEXT NOT NULL,
    scopes TEXT NOT NULL,
    redirect_uri TEXT NOT NULL,
    redirect_uri_given INTEGER NOT NULL,
    code_challenge TEXT NOT NULL,
    code_challenge_method TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    grant_id TEXT NOT NULL DEFAULT ''
);

-- Refresh tokens, rotated on every use (RFC 9700 §4.14.2).
CREATE TABLE oauth_refresh_tokens (
    digest BYTEA PRIMARY KEY,
    grant_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    rotated_at BIGINT
);
CREATE INDEX oauth_refresh_tokens_grant ON oauth_refresh_tokens (grant_id);

-- Access tokens revoked one by one (RFC 7009), remembered until they expire.
CREATE TABLE oauth_revoked_tokens (
    jti TEXT PRIMARY KEY,
    grant_id TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT NOT NULL
);
CREATE INDEX oauth_revoked_tokens_expiry ON oauth_revoked_tokens (expires_at);

-- JWT signing keys. superseded_at: no longer signs; retired_at: left the JWKS.
CREATE TABLE oauth_signing_keys (
    kid TEXT PRIMARY KEY,
    alg TEXT NOT NULL,
    private_pem BYTEA NOT NULL,
    public_jwk TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    superseded_at BIGINT,
    retired_at BIGINT,
    -- Insertion order, to break ties between keys created in the same second (SQLite's rowid).
    seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE
);

-- Signed-in browser sessions at the authorization endpoint.
CREATE TABLE oauth_sessions (
    digest BYTEA PRIMARY KEY,
    user_id TEXT NOT NULL,
    workspace TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- Server-side secrets shared by every control-plane process (e.g. the CSRF key).
CREATE TABLE oauth_server_secrets (
    name TEXT PRIMARY KEY,
    value BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
