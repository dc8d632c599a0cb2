-- The same schema as sqlite/0001_init.sql, in PostgreSQL types. Booleans stay INTEGER 0/1 so
-- both backends share their row mapping.

-- API keys: only the digest of the secret is stored.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    digest BYTEA NOT NULL UNIQUE,
    last_four TEXT NOT NULL,
    name TEXT NOT NULL,
    workspace TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    revoked_at BIGINT,
    revoke_reason TEXT NOT NULL DEFAULT '',
    replaces TEXT NOT NULL DEFAULT '',
    replaced_by TEXT NOT NULL DEFAULT '',
    grace_deadline BIGINT,
    expiry_recorded INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX api_keys_listing ON api_keys (workspace, created_at DESC, id DESC);
CREATE INDEX api_keys_created ON api_keys (created_at DESC, id DESC);

-- Audit trail (append-only). seq is taken under the store's writer lock, so seq order is
-- commit order (see postgres.py).
CREATE TABLE audit_events (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    time DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    workspace TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    request_id TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_events_workspace ON audit_events (workspace, seq);

-- Change log feeding sidecar replicas; revision order is the replication order. Revisions are
-- taken under the writer lock, so they are also commit order (gaps after a rollback are
-- harmless: replicas only need them increasing).
CREATE TABLE changes (
    revision BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    payload TEXT NOT NULL
);
