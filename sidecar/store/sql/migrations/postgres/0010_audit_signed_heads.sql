-- Signed chain heads, as sqlite/0010_audit_signed_heads.sql.
CREATE TABLE audit_signed_heads (
    seq BIGSERIAL PRIMARY KEY,
    body TEXT NOT NULL,
    signature TEXT NOT NULL
)
