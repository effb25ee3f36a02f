-- The gateway's state. Portable SQL: the same file runs on SQLite and PostgreSQL
-- (through sqlx's Any driver), so no autoincrement and no engine-specific types.

-- Every change, in revision order: what sidecars receive as deltas, and who made it.
CREATE TABLE changes (
    revision BIGINT PRIMARY KEY,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    actor TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    -- The Delta message (protobuf, base64), exactly as pushed.
    body TEXT NOT NULL
);

-- Current revocations (a row per revoked ID or pattern).
CREATE TABLE revocations (
    subject TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    actor TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    revision BIGINT NOT NULL
);

CREATE TABLE executions (
    id TEXT PRIMARY KEY,
    plugin TEXT NOT NULL,
    clause TEXT NOT NULL,
    not_after_ms BIGINT NOT NULL,
    opened_by TEXT NOT NULL,
    opened_revision BIGINT NOT NULL,
    closed_revision BIGINT NOT NULL,
    close_reason TEXT NOT NULL
);

-- Anomaly signals as received, attributed to the reporting sidecar, with the
-- revocation policy's decision.
CREATE TABLE signals (
    id TEXT PRIMARY KEY,
    reporter TEXT NOT NULL,
    workload TEXT NOT NULL,
    kind TEXT NOT NULL,
    observed_as TEXT NOT NULL,
    score DOUBLE PRECISION NOT NULL,
    evidence TEXT NOT NULL,
    time_ms BIGINT NOT NULL,
    received_ms BIGINT NOT NULL,
    action TEXT NOT NULL,
    reasons TEXT NOT NULL
);
CREATE INDEX signals_workload ON signals (workload, received_ms);

-- Execution records shipped by sidecars; the hash is the record's own chain hash.
CREATE TABLE records (
    hash TEXT PRIMARY KEY,
    sidecar TEXT NOT NULL,
    line TEXT NOT NULL,
    stored_ms BIGINT NOT NULL
);
