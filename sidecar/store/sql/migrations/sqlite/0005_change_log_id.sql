-- The change log's identity: revisions count within one log, so a sidecar resuming from a
-- revision must be talking to the log it got that revision from. A sidecar whose persisted
-- replica names another log (a different or re-created database) gets a full snapshot instead
-- of this log's later changes spliced onto a foreign state.
CREATE TABLE change_log_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    log_id TEXT NOT NULL
);
INSERT INTO change_log_meta (id, log_id) VALUES (1, lower(hex(randomblob(16))))
