-- The same change as sqlite/0004_rate_limits.sql, in PostgreSQL types.

-- Per-key request-rate limits (issue 8): rate_limit requests per rate_period seconds; 0 = none.
-- Enforced by the sidecars from the replicated credential payload.
ALTER TABLE api_keys ADD COLUMN rate_limit INTEGER NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN rate_period INTEGER NOT NULL DEFAULT 0;
