-- Identity lifecycle (issue 14). Members: when they last signed in, and deletion by marking
-- (the audit history keeps naming the id). Signing keys: a key is published (JWKS and every
-- replica) at created_at and signs from activates_at on (ahead-of-time rollover); private_pem
-- now holds the private key encrypted under a key-encryption key, or nothing once superseded.
ALTER TABLE oauth_users ADD COLUMN last_signin_at BIGINT;
ALTER TABLE oauth_users ADD COLUMN deleted_at BIGINT;
ALTER TABLE oauth_signing_keys ADD COLUMN activates_at BIGINT NOT NULL DEFAULT 0;
CREATE INDEX oauth_grants_user ON oauth_grants (user_id, revoked_at)
