-- Audit indexes in insertion order, as sqlite/0011_audit_index_order.sql. PostgreSQL too splits
-- a B-tree page at the right end by its fill factor (90 %) and elsewhere in halves, and caches
-- the rightmost leaf for appends; it reads an ascending index backwards for ORDER BY ... DESC.
DROP INDEX audit_events_time;
DROP INDEX audit_events_workspace_time;
CREATE INDEX audit_events_time ON audit_events (time, seq);
CREATE INDEX audit_events_workspace_time ON audit_events (workspace, time, seq);

-- Rows not yet linked into their chain (chain_seq 0), which every start links: found through
-- this index rather than by reading the table. A linked row is never in it.
CREATE INDEX audit_events_unchained ON audit_events (seq) WHERE chain_seq = 0
