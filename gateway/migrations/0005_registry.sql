-- The plugin registry (docs/registry.md): plugins, their signed versions, and each
-- version's state. Every change to these rows is a revision in `changes` (kind
-- `registry`), written in the same transaction. The rows hold the PluginVersion and
-- Plugin messages (protobuf, base64); the columns beside them are what is looked up.
CREATE TABLE plugins (
    uid TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    revision BIGINT NOT NULL,
    body TEXT NOT NULL
);

CREATE TABLE plugin_versions (
    plugin_uid TEXT NOT NULL,
    version TEXT NOT NULL,
    -- One digest is one version of one plugin: admission looks versions up by digest.
    digest TEXT NOT NULL UNIQUE,
    spiffe_id TEXT NOT NULL,
    state TEXT NOT NULL,
    revision BIGINT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (plugin_uid, version)
);
CREATE INDEX plugin_versions_spiffe ON plugin_versions (spiffe_id);

-- The plugin version an execution runs (empty for executions opened without a registry).
ALTER TABLE executions ADD COLUMN plugin_uid TEXT NOT NULL DEFAULT '';
ALTER TABLE executions ADD COLUMN plugin_version TEXT NOT NULL DEFAULT '';
ALTER TABLE executions ADD COLUMN image_digest TEXT NOT NULL DEFAULT '';
