-- Signed chain heads (sidecar/core/audit_chain.py, SignedHeads): every chain's head at one
-- moment, signed with the audit signing key, which is kept outside this database. Verification
-- reads the newest row: a chain shorter than it, rewritten from it, or gone is reported.
CREATE TABLE audit_signed_heads (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL,
    signature TEXT NOT NULL
)
