-- Each gateway replica's status (its connected sidecars and their acknowledged
-- revisions, its newest revocation's propagation), written every status.report_interval
-- so that `nexusctl status` through any replica shows all of them. Keyed by a per-process
-- instance id: replicas of one Deployment share a configured name.
CREATE TABLE replicas (
    instance TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    reported_ms BIGINT NOT NULL,
    -- The ReplicaStatus message (protobuf, base64).
    body TEXT NOT NULL
);
