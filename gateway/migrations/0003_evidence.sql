-- Evidence for anomaly signals (docs/threat-model.md): a signal cites the decision ids
-- of the requests it rests on, and the gateway looks them up among the records its
-- reporter shipped. Records stored before this migration keep empty columns and are
-- never evidence.
ALTER TABLE records ADD COLUMN decision_id TEXT NOT NULL DEFAULT '';
ALTER TABLE records ADD COLUMN source TEXT NOT NULL DEFAULT '';
ALTER TABLE records ADD COLUMN destination TEXT NOT NULL DEFAULT '';
ALTER TABLE records ADD COLUMN time_ms BIGINT NOT NULL DEFAULT 0;
CREATE INDEX records_evidence ON records (sidecar, decision_id);

-- What a signal cites (a JSON array of decision ids) and what the gateway verified
-- (a JSON object, the policy's input.signal.verification).
ALTER TABLE signals ADD COLUMN decision_ids TEXT NOT NULL DEFAULT '[]';
ALTER TABLE signals ADD COLUMN verification TEXT NOT NULL DEFAULT '{}';
