-- The same change as sqlite/0007_usage.sql, in PostgreSQL types.
CREATE TABLE credential_uses_daily (
    credential_id TEXT NOT NULL,
    day INTEGER NOT NULL,
    uses BIGINT NOT NULL,
    PRIMARY KEY (credential_id, day)
);
CREATE INDEX credential_uses_daily_day ON credential_uses_daily (day);
CREATE TABLE credential_last_use (
    credential_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    last_used_at BIGINT NOT NULL
);
CREATE TABLE usage_reports (
    id TEXT PRIMARY KEY,
    received_at BIGINT NOT NULL
);
CREATE INDEX usage_reports_received ON usage_reports (received_at);
