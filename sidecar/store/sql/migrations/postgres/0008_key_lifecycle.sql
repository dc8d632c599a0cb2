-- Key lifecycle (issue 17): editing without re-issue, suspension, client networks, expiry
-- warnings and rotation schedules.
ALTER TABLE api_keys ADD COLUMN description TEXT NOT NULL DEFAULT '';
-- Set while the key is suspended (denied as suspended_credential, can be resumed).
ALTER TABLE api_keys ADD COLUMN suspended_at BIGINT;
-- Space-separated CIDRs the key may be used from; empty: anywhere.
ALTER TABLE api_keys ADD COLUMN client_cidrs TEXT NOT NULL DEFAULT '';
-- Seconds after creation the key is due for rotation; 0: no schedule.
ALTER TABLE api_keys ADD COLUMN rotation_period BIGINT NOT NULL DEFAULT 0;
-- Whether the "expiring" and "rotation due" events were recorded (each once per key).
ALTER TABLE api_keys ADD COLUMN expiry_warned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN rotation_due_recorded INTEGER NOT NULL DEFAULT 0
