-- The change log's identity (see the SQLite migration of the same name).
CREATE TABLE change_log_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    log_id TEXT NOT NULL
);
INSERT INTO change_log_meta (id, log_id) VALUES (1, replace(gen_random_uuid()::text, '-', ''))
