-- Fleet baselines of the anomaly watch (docs/anomaly.md): one row per workload (all the
-- pods of one SPIFFE ID together), per second while active, shared by every gateway
-- replica. Updated only from reports by the workload's own sidecars, and never faster
-- than baselines.max_growth per baselines.growth_period of the gateway's clock.
CREATE TABLE baselines (
    workload TEXT PRIMARY KEY,
    rate_per_s DOUBLE PRECISION NOT NULL,
    bytes_per_s DOUBLE PRECISION NOT NULL,
    long_rate_per_s DOUBLE PRECISION NOT NULL,
    long_bytes_per_s DOUBLE PRECISION NOT NULL,
    reports BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
