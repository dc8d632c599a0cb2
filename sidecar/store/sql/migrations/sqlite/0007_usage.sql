-- Credential usage (issue 17): what sidecars count off the Check path and report.
-- One row per credential and UTC day (epoch day), for the daily counts.
CREATE TABLE credential_uses_daily (
    credential_id TEXT NOT NULL,
    day INTEGER NOT NULL,
    uses INTEGER NOT NULL,
    PRIMARY KEY (credential_id, day)
);
CREATE INDEX credential_uses_daily_day ON credential_uses_daily (day);
-- The latest use of each credential (API key id or OAuth grant id).
CREATE TABLE credential_last_use (
    credential_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    last_used_at INTEGER NOT NULL
);
-- Report ids seen: a resent report is acknowledged but not counted twice.
CREATE TABLE usage_reports (
    id TEXT PRIMARY KEY,
    received_at INTEGER NOT NULL
);
CREATE INDEX usage_reports_received ON usage_reports (received_at);
