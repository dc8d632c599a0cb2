-- Per-workspace webhooks (issue 17). The signing secret is stored sealed (AES-256-GCM under
-- the control plane's webhook key file, hex): the database alone cannot sign a delivery.
CREATE TABLE webhooks (
    id TEXT PRIMARY KEY,
    workspace TEXT NOT NULL,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    sealed_secret TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    deleted_at BIGINT
);
CREATE INDEX webhooks_workspace ON webhooks (workspace, created_at);
-- The durable outbox: a delivery is written in the transaction of the change it reports, and
-- sent (at least once) by the control plane's delivery loop, retried with backoff.
CREATE TABLE webhook_deliveries (
    id TEXT PRIMARY KEY,
    webhook_id TEXT NOT NULL,
    event TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    delivered_at BIGINT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
CREATE INDEX webhook_deliveries_hook ON webhook_deliveries (webhook_id, created_at)
