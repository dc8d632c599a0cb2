-- Audit indexes in insertion order (issue #19). New records carry the newest times, so an index
-- on (time DESC, ...) took every one at its front, where a full page splits in two half-full
-- ones; ascending, they land at the end, where SQLite and PostgreSQL fill pages whole. Both
-- read an ascending index backwards for ORDER BY time DESC, seq DESC, ties still by seq.
DROP INDEX audit_events_time;
DROP INDEX audit_events_workspace_time;
CREATE INDEX audit_events_time ON audit_events (time, seq);
CREATE INDEX audit_events_workspace_time ON audit_events (workspace, time, seq);

-- Rows not yet linked into their chain (chain_seq 0: stored before 0003, or by a control plane
-- older than it during a rolling upgrade), which every start links. Without this the start
-- read the whole table to find none; a linked row is never in this index, so inserts skip it.
CREATE INDEX audit_events_unchained ON audit_events (seq) WHERE chain_seq = 0
