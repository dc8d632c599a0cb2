-- Hash chain per workspace (sidecar/core/audit_chain.py), as sqlite/0003_audit_chain.sql: each
-- record's position in its workspace's chain, the previous record's digest and its own. Rows
-- stored before this migration are linked by the store right after migrating (SHA-256 in Python).
ALTER TABLE audit_events ADD COLUMN chain_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE audit_events ADD COLUMN prev_digest TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_events ADD COLUMN digest TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX audit_events_chain ON audit_events (workspace, chain_seq) WHERE chain_seq > 0;

-- Listing is newest first by record time; ingested decision records arrive late, so time
-- order and storage (seq) order differ.
CREATE INDEX audit_events_time ON audit_events (time DESC, seq DESC);
CREATE INDEX audit_events_workspace_time ON audit_events (workspace, time DESC, seq DESC);

-- Retention: where a pruned chain resumes, signed with HMAC-SHA256 under the server's key.
CREATE TABLE audit_checkpoints (
    workspace TEXT NOT NULL,
    chain_seq BIGINT NOT NULL,
    digest TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (workspace, chain_seq)
);
