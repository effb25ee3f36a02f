//! The plugin registry (docs/registry.md): which plugins the platform may run, their
//! versions (semantic version, image digest, SPIFFE ID, clause bindings, budgets), who
//! signed, registered, certified and retired each, in the gateway's store.
//!
//! Every change is a [`RegistryOp`] committed through the one change path
//! ([`Changes::apply`]), checked against the stored rows inside the transaction that
//! writes them, so a retire and an execution opening race safely and nothing is half
//! applied. A version enters only with a cosign signature by its plugin's publisher's
//! key ([`nexus_identity::cosign`]) over its image digest; it runs only once a reviewer
//! other than its registrar certified it; a retire revokes its SPIFFE ID through the
//! normal revocation path and closes its executions.
#![deny(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use nexus_identity::cosign::{self, PublicKey};
use nexus_proto::control::{
    ChangeResponse, Execution, Plugin, PluginVersion, RegisterPluginRequest, RegistryEvent,
    RegistryResponse,
};
use prost::Message;
use serde::{Deserialize, Serialize};
use sqlx::{Any, Row, Transaction};

use crate::changes::{ChangeError, Changes, random_hex, unix_ms};
use crate::config::RegistryConfig;
use crate::store::{Change, RegistryOp, Store, StoreError};

/// `registered`: signed and stored, not yet allowed to run.
pub const REGISTERED: &str = "registered";
/// `certified`: a reviewer approved it; executions and admission may use it.
pub const CERTIFIED: &str = "certified";
/// `retired`: never runs again.
pub const RETIRED: &str = "retired";
/// The license tiers a plugin may have.
pub const TIERS: [&str; 3] = ["public-good", "academic-only", "commercial"];
/// The bundle format's name and version (`plugin export`).
pub const BUNDLE_FORMAT: &str = "nexus.plugin-bundle/v1";

/// A publisher, plugin or version name: 1-64 of letters, digits, `-`, `_`, `.`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Reads and parses a publisher key file (for config validation and each check).
pub fn read_key(path: &Path) -> Result<PublicKey, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    PublicKey::from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))
}

/// A semantic version (semver.org 2.0): MAJOR.MINOR.PATCH, numbers without leading
/// zeros, optional `-pre.release` and `+build` of `[0-9A-Za-z-]` identifiers.
pub fn valid_semver(v: &str) -> bool {
    if v.len() > 64 {
        return false;
    }
    let (rest, build) = match v.split_once('+') {
        Some((r, b)) => (r, Some(b)),
        None => (v, None),
    };
    let (core, pre) = match rest.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (rest, None),
    };
    let ident_ok = |s: &str| {
        s.split('.')
            .all(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    };
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (p.len() == 1 || !p.starts_with('0'))
        })
        && pre.is_none_or(ident_ok)
        && build.is_none_or(ident_ok)
}

fn valid_uid(uid: &str) -> bool {
    uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit() && !b.is_ascii_uppercase(),
        })
}

fn new_uid() -> String {
    // A random (version 4) UUID.
    let h = random_hex(16);
    let variant = ["8", "9", "a", "b"][usize::from(h.as_bytes()[16] % 4)];
    format!(
        "{}-{}-4{}-{}{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        variant,
        &h[17..20],
        &h[20..32]
    )
}

fn conflict(message: impl Into<String>) -> StoreError {
    StoreError::Conflict(message.into())
}

fn encode<M: Message>(m: &M) -> String {
    data_encoding::BASE64.encode(&m.encode_to_vec())
}

fn decode<M: Message + Default>(body: &str, revision: i64) -> Result<M, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { revision, reason };
    let bytes = data_encoding::BASE64
        .decode(body.as_bytes())
        .map_err(|e| corrupt(e.to_string()))?;
    M::decode(bytes.as_slice()).map_err(|e| corrupt(e.to_string()))
}

async fn load_plugin(
    tx: &mut Transaction<'_, Any>,
    uid: &str,
) -> Result<Option<Plugin>, StoreError> {
    let row = sqlx::query("SELECT body, revision FROM plugins WHERE uid = $1")
        .bind(uid)
        .fetch_optional(&mut **tx)
        .await?;
    row.map(|r| decode(&r.try_get::<String, _>(0)?, r.try_get(1)?))
        .transpose()
}

async fn load_version(
    tx: &mut Transaction<'_, Any>,
    uid: &str,
    version: &str,
) -> Result<PluginVersion, StoreError> {
    let row = sqlx::query(
        "SELECT body, revision FROM plugin_versions WHERE plugin_uid = $1 AND version = $2",
    )
    .bind(uid)
    .bind(version)
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| {
        conflict(format!(
            "plugin {uid} has no version {version}: register it first (`nexusctl plugin register`)"
        ))
    })?;
    decode(&row.try_get::<String, _>(0)?, row.try_get(1)?)
}

async fn save_version(
    tx: &mut Transaction<'_, Any>,
    v: &PluginVersion,
    insert: bool,
) -> Result<(), StoreError> {
    let revision = i64::try_from(v.revision).unwrap_or(i64::MAX);
    let sql = if insert {
        "INSERT INTO plugin_versions (plugin_uid, version, digest, spiffe_id, state, revision, body) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)"
    } else {
        "UPDATE plugin_versions SET digest = $3, spiffe_id = $4, state = $5, revision = $6, body = $7 \
         WHERE plugin_uid = $1 AND version = $2"
    };
    let done = sqlx::query(sql)
        .bind(&v.plugin_uid)
        .bind(&v.version)
        .bind(&v.image_digest)
        .bind(&v.spiffe_id)
        .bind(&v.state)
        .bind(revision)
        .bind(encode(v))
        .execute(&mut **tx)
        .await;
    match done {
        Err(sqlx::Error::Database(db)) if db.is_unique_violation() => Err(conflict(format!(
            "image {} or version {} of plugin {} is already registered: a digest is one version of one plugin",
            v.image_digest, v.version, v.plugin_uid
        ))),
        other => other.map(|_| ()).map_err(StoreError::from),
    }
}

async fn add_version(
    tx: &mut Transaction<'_, Any>,
    plugin: &Plugin,
    version: &PluginVersion,
    revision: i64,
    plugins_out: &mut Vec<Plugin>,
) -> Result<PluginVersion, StoreError> {
    let stored = match load_plugin(tx, &plugin.uid).await? {
        Some(stored) => {
            if stored.publisher != plugin.publisher {
                return Err(conflict(format!(
                    "plugin {} ({}) is published by `{}`, not `{}`",
                    stored.name, stored.uid, stored.publisher, plugin.publisher
                )));
            }
            stored
        }
        None => {
            let mut new = plugin.clone();
            new.versions.clear();
            let done = sqlx::query(
                "INSERT INTO plugins (uid, name, revision, body) VALUES ($1, $2, $3, $4)",
            )
            .bind(&new.uid)
            .bind(&new.name)
            .bind(revision)
            .bind(encode(&new))
            .execute(&mut **tx)
            .await;
            if let Err(sqlx::Error::Database(db)) = &done
                && db.is_unique_violation()
            {
                return Err(conflict(format!(
                    "a plugin named `{}` already exists under another UUID",
                    new.name
                )));
            }
            done?;
            new
        }
    };
    let mut v = version.clone();
    v.plugin_uid = stored.uid.clone();
    v.state = REGISTERED.into();
    v.certified_by.clear();
    v.certified_unix_ms = 0;
    v.retired_by.clear();
    v.retired_unix_ms = 0;
    v.retire_reason.clear();
    v.revision = u64::try_from(revision).unwrap_or(0);
    save_version(tx, &v, true).await?;
    if !plugins_out.iter().any(|p| p.uid == stored.uid) {
        plugins_out.push(stored);
    }
    Ok(v)
}

/// Applies `op` inside the change's transaction; the event sidecars and replicas see.
pub(crate) async fn apply(
    tx: &mut Transaction<'_, Any>,
    op: &RegistryOp,
    revision: i64,
    at_ms: i64,
) -> Result<RegistryEvent, StoreError> {
    let at = u64::try_from(at_ms).unwrap_or(0);
    let mut event = RegistryEvent::default();
    match op {
        RegistryOp::Register { plugin, version } => {
            event.action = "registered".into();
            let v = add_version(tx, plugin, version, revision, &mut event.plugins).await?;
            event.versions.push(v);
        }
        RegistryOp::Import { plugins, versions } => {
            event.action = "imported".into();
            for version in versions {
                let plugin = plugins
                    .iter()
                    .find(|p| p.uid == version.plugin_uid)
                    .ok_or_else(|| {
                        conflict(format!(
                            "version {} names no plugin of the bundle",
                            version.version
                        ))
                    })?;
                let v = add_version(tx, plugin, version, revision, &mut event.plugins).await?;
                event.versions.push(v);
            }
        }
        RegistryOp::Certify { uid, version, by } => {
            event.action = "certified".into();
            let mut v = load_version(tx, uid, version).await?;
            match v.state.as_str() {
                REGISTERED => {}
                CERTIFIED => {
                    return Err(conflict(format!(
                        "version {version} of plugin {uid} is already certified (by {})",
                        v.certified_by
                    )));
                }
                _ => {
                    return Err(conflict(format!(
                        "version {version} of plugin {uid} is retired: it cannot be certified again; register a new version"
                    )));
                }
            }
            if v.registered_by == *by {
                return Err(conflict(format!(
                    "{by} registered version {version} of plugin {uid}: another reviewer must certify it (four eyes)"
                )));
            }
            v.state = CERTIFIED.into();
            v.certified_by = by.clone();
            v.certified_unix_ms = at;
            v.revision = u64::try_from(revision).unwrap_or(0);
            save_version(tx, &v, false).await?;
            event.versions.push(v);
        }
        RegistryOp::Retire {
            uid,
            version,
            by,
            reason,
        } => {
            event.action = "retired".into();
            let mut v = load_version(tx, uid, version).await?;
            if v.state == RETIRED {
                return Err(conflict(format!(
                    "version {version} of plugin {uid} is already retired"
                )));
            }
            v.state = RETIRED.into();
            v.retired_by = by.clone();
            v.retired_unix_ms = at;
            v.retire_reason = reason.clone();
            v.revision = u64::try_from(revision).unwrap_or(0);
            save_version(tx, &v, false).await?;
            event.versions.push(v);
        }
        RegistryOp::Bind {
            uid,
            version,
            clause,
            bind,
        } => {
            let mut v = load_version(tx, uid, version).await?;
            if v.state == RETIRED {
                return Err(conflict(format!(
                    "version {version} of plugin {uid} is retired: its bindings no longer change"
                )));
            }
            let present = v.clauses.iter().any(|c| c == clause);
            if *bind {
                event.action = "bound".into();
                if present {
                    return Err(conflict(format!(
                        "clause {clause} is already bound to version {version} of plugin {uid}"
                    )));
                }
                v.clauses.push(clause.clone());
            } else {
                event.action = "unbound".into();
                if !present {
                    return Err(conflict(format!(
                        "clause {clause} is not bound to version {version} of plugin {uid}"
                    )));
                }
                v.clauses.retain(|c| c != clause);
            }
            v.revision = u64::try_from(revision).unwrap_or(0);
            save_version(tx, &v, false).await?;
            event.versions.push(v);
        }
    }
    Ok(event)
}

/// A version as sidecars see it (snapshots and registry deltas): what enforcement
/// needs (plugin UID, version, image digest, SPIFFE ID, clauses, budgets, state,
/// revision, when it was certified), not who registered or certified it, nor the
/// payload and signature.
pub fn for_sidecars(v: &PluginVersion) -> PluginVersion {
    PluginVersion {
        plugin_uid: v.plugin_uid.clone(),
        version: v.version.clone(),
        image_digest: v.image_digest.clone(),
        spiffe_id: v.spiffe_id.clone(),
        clauses: v.clauses.clone(),
        budgets_json: v.budgets_json.clone(),
        state: v.state.clone(),
        certified_unix_ms: v.certified_unix_ms,
        revision: v.revision,
        ..PluginVersion::default()
    }
}

/// Refuses an execution whose version is not certified (or does not run as its plugin
/// workload, or does not bind its clause), read in the transaction that opens it.
pub(crate) async fn check_runnable(
    tx: &mut Transaction<'_, Any>,
    e: &Execution,
) -> Result<(), StoreError> {
    let v = load_version(tx, &e.plugin_uid, &e.plugin_version).await?;
    if v.state != CERTIFIED {
        return Err(conflict(format!(
            "version {} of plugin {} is {}, not certified: executions run only certified versions{}",
            v.version,
            v.plugin_uid,
            v.state,
            if v.state == REGISTERED {
                " (a reviewer certifies it with `nexusctl plugin certify`)"
            } else {
                ""
            }
        )));
    }
    if v.image_digest != e.image_digest || v.spiffe_id != e.plugin {
        return Err(conflict(format!(
            "version {} of plugin {} changed while the execution was opened; try again",
            v.version, v.plugin_uid
        )));
    }
    if !v.clauses.contains(&e.clause) {
        return Err(conflict(format!(
            "clause {} is not bound to version {} of plugin {} (bound: {}); bind it with `nexusctl plugin bind`",
            e.clause,
            v.version,
            v.plugin_uid,
            v.clauses.join(", ")
        )));
    }
    Ok(())
}

impl Store {
    /// Every plugin with its versions (or the one whose UUID or name is `filter`).
    pub async fn plugins(&self, filter: Option<&str>) -> Result<Vec<Plugin>, StoreError> {
        let rows =
            match filter {
                Some(f) => sqlx::query(
                    "SELECT body, revision FROM plugins WHERE uid = $1 OR name = $1 ORDER BY name",
                )
                .bind(f)
                .fetch_all(&self.pool)
                .await?,
                None => {
                    sqlx::query("SELECT body, revision FROM plugins ORDER BY name")
                        .fetch_all(&self.pool)
                        .await?
                }
            };
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut plugin: Plugin = decode(&row.try_get::<String, _>(0)?, row.try_get(1)?)?;
            let versions = sqlx::query(
                "SELECT body, revision FROM plugin_versions WHERE plugin_uid = $1 ORDER BY revision",
            )
            .bind(&plugin.uid)
            .fetch_all(&self.pool)
            .await?;
            for v in versions {
                plugin
                    .versions
                    .push(decode(&v.try_get::<String, _>(0)?, v.try_get(1)?)?);
            }
            out.push(plugin);
        }
        Ok(out)
    }

    /// The version whose image digest is `digest`, with its plugin.
    pub async fn version_by_digest(
        &self,
        digest: &str,
    ) -> Result<Option<(Plugin, PluginVersion)>, StoreError> {
        let Some(row) = sqlx::query("SELECT plugin_uid FROM plugin_versions WHERE digest = $1")
            .bind(digest)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let uid: String = row.try_get(0)?;
        let mut plugins = self.plugins(Some(&uid)).await?;
        let Some(mut plugin) = plugins.pop() else {
            return Ok(None);
        };
        let version = plugin
            .versions
            .iter()
            .find(|v| v.image_digest == digest)
            .cloned();
        plugin.versions.clear();
        Ok(version.map(|v| (plugin, v)))
    }

    /// Certified versions whose SPIFFE ID is `spiffe_id`.
    pub async fn certified_for(&self, spiffe_id: &str) -> Result<Vec<PluginVersion>, StoreError> {
        let rows = sqlx::query(
            "SELECT body, revision FROM plugin_versions WHERE spiffe_id = $1 AND state = $2 ORDER BY revision",
        )
        .bind(spiffe_id)
        .bind(CERTIFIED)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| decode(&r.try_get::<String, _>(0)?, r.try_get(1)?))
            .collect()
    }
}

/// One version in an export bundle: everything needed to re-verify it elsewhere.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BundleVersion {
    /// Semantic version.
    pub version: String,
    /// `REPO@sha256:…`.
    pub image: String,
    /// The SPIFFE ID it runs as.
    pub spiffe_id: String,
    /// Bound clauses.
    pub clauses: Vec<String>,
    /// Budgets JSON object ("" for none).
    #[serde(default)]
    pub budgets_json: String,
    /// The signed cosign payload.
    pub payload: String,
    /// Its signature (base64 DER).
    pub signature: String,
    /// Its state where it was exported (a claim).
    pub state: String,
    /// Who certified it there (a claim).
    #[serde(default)]
    pub certified_by: String,
}

/// One plugin in an export bundle.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BundlePlugin {
    /// Its UUID (kept across gateways).
    pub uid: String,
    /// Name.
    pub name: String,
    /// Publisher.
    pub publisher: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// License tier.
    pub license_tier: String,
    /// Its versions (retired ones are not exported).
    pub versions: Vec<BundleVersion>,
}

/// The file `plugin export` writes and `plugin import` reads.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// [`BUNDLE_FORMAT`].
    pub format: String,
    /// The exporting gateway's name.
    pub exported_by: String,
    /// When (unix ms).
    pub exported_unix_ms: u64,
    /// The plugins.
    pub plugins: Vec<BundlePlugin>,
}

/// What a registration carries once checked (before the store sees it).
struct Checked {
    plugin: Plugin,
    version: PluginVersion,
}

impl Changes {
    fn registry_config(&self) -> Result<&RegistryConfig, ChangeError> {
        self.config.registry.as_ref().ok_or_else(|| {
            ChangeError::Invalid(
                "this gateway has no plugin registry: add a `[registry]` table with publisher keys to its config".into(),
            )
        })
    }

    /// The trusted key of `publisher`, read from its file now (a rotated key applies
    /// at once).
    fn publisher_key(&self, publisher: &str) -> Result<PublicKey, ChangeError> {
        let registry = self.registry_config()?;
        let entry = registry
            .publishers
            .iter()
            .find(|p| p.name == publisher)
            .ok_or_else(|| {
                ChangeError::Invalid(format!(
                    "publisher `{publisher}` is not trusted by this gateway (trusted: {}); an operator adds its key under [[registry.publishers]]",
                    registry
                        .publishers
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        read_key(&entry.key).map_err(|e| {
            ChangeError::Store(StoreError::Conflict(format!(
                "publisher `{publisher}`'s key cannot be read: {e}"
            )))
        })
    }

    /// Checks a registration (names, version, digest, SPIFFE ID, clauses, budgets,
    /// payload and signature) without touching the store.
    #[allow(clippy::too_many_arguments)]
    fn check_version(
        &self,
        plugin: Plugin,
        version: &str,
        image: &str,
        spiffe_id: &str,
        clauses: &[String],
        budgets_json: &str,
        payload: &str,
        signature: &str,
        actor: &str,
    ) -> Result<Checked, ChangeError> {
        let registry = self.registry_config()?;
        let invalid = |m: String| ChangeError::Invalid(m);
        if !valid_name(&plugin.name) {
            return Err(invalid(format!(
                "plugin name `{}` must be 1-64 letters, digits, `-`, `_`, `.`",
                plugin.name
            )));
        }
        if !TIERS.contains(&plugin.license_tier.as_str()) {
            return Err(invalid(format!(
                "license tier `{}` must be one of {}",
                plugin.license_tier,
                TIERS.join(", ")
            )));
        }
        if plugin.description.len() > registry.max_description_bytes {
            return Err(invalid(format!(
                "the description is {} bytes; the limit is {} (registry.max_description_bytes)",
                plugin.description.len(),
                registry.max_description_bytes
            )));
        }
        if !valid_semver(version) {
            return Err(invalid(format!(
                "version `{version}` is not a semantic version (MAJOR.MINOR.PATCH, e.g. 1.4.2)"
            )));
        }
        let (repository, digest) = cosign::split_image(image);
        let Some(digest) = digest else {
            return Err(invalid(format!(
                "image `{image}` is not pinned by digest: give REPO@sha256:… (a tag can be moved to other code)"
            )));
        };
        cosign::validate_digest(digest).map_err(|e| invalid(e.to_string()))?;
        if repository.is_empty() {
            return Err(invalid(format!("image `{image}` names no repository")));
        }
        if spiffe_id.contains('*') {
            return Err(invalid(
                "a version runs as one workload: give its exact SPIFFE ID".into(),
            ));
        }
        let spiffe_id =
            nexus_identity::canonical_id(spiffe_id).map_err(|e| invalid(e.to_string()))?;
        if clauses.len() > registry.max_clauses {
            return Err(invalid(format!(
                "{} clauses; the limit is {} (registry.max_clauses)",
                clauses.len(),
                registry.max_clauses
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for clause in clauses {
            crate::changes::validate_clause(clause)?;
            if !seen.insert(clause.as_str()) {
                return Err(invalid(format!("clause {clause} is bound twice")));
            }
        }
        if !budgets_json.is_empty() {
            if budgets_json.len() > registry.max_budgets_bytes {
                return Err(invalid(format!(
                    "budgets are {} bytes; the limit is {} (registry.max_budgets_bytes)",
                    budgets_json.len(),
                    registry.max_budgets_bytes
                )));
            }
            let budgets = match serde_json::from_str::<serde_json::Value>(budgets_json) {
                Ok(budgets @ serde_json::Value::Object(_)) => budgets,
                _ => {
                    return Err(invalid(
                        "budgets must be a JSON object (carried into data.nexus.bindings)".into(),
                    ));
                }
            };
            // Checked as every sidecar's anomaly watch reads it: a budget the sidecars
            // could not load would hold every one of them refusing requests.
            nexus_anomaly::budget::from_bindings(&serde_json::json!({
                spiffe_id.as_str(): {"clauses": clauses, "budgets": budgets}
            }))
            .map_err(|e| invalid(format!("budgets: {e}")))?;
        }
        if signature.trim().is_empty() {
            return Err(invalid(format!(
                "version {version} is unsigned: sign its payload with the publisher's key (`cosign generate {repository}@{digest} > payload.json; cosign sign-blob --key cosign.key payload.json`) and pass --payload and --signature"
            )));
        }
        let payload = if payload.is_empty() {
            cosign::image_payload(repository, digest)
        } else {
            payload.to_string()
        };
        if payload.len() > registry.max_payload_bytes {
            return Err(invalid(format!(
                "the payload is {} bytes; the limit is {} (registry.max_payload_bytes)",
                payload.len(),
                registry.max_payload_bytes
            )));
        }
        let key = self.publisher_key(&plugin.publisher)?;
        let signed = cosign::verify(&key, payload.as_bytes(), signature, digest).map_err(|e| {
            invalid(format!(
                "version {version} of `{}` is refused: {e}",
                plugin.name
            ))
        })?;
        if signed.repository != repository {
            return Err(invalid(format!(
                "the signature names repository `{}`, not `{repository}`",
                signed.repository
            )));
        }
        let version = PluginVersion {
            plugin_uid: plugin.uid.clone(),
            version: version.to_string(),
            image_digest: digest.to_string(),
            image_repository: repository.to_string(),
            spiffe_id,
            clauses: clauses.to_vec(),
            budgets_json: budgets_json.to_string(),
            state: REGISTERED.into(),
            payload,
            signature: signature.trim().to_string(),
            key_fingerprint: key.fingerprint().to_string(),
            registered_by: actor.to_string(),
            registered_unix_ms: unix_ms(),
            ..PluginVersion::default()
        };
        Ok(Checked { plugin, version })
    }

    /// A plugin by UUID or name, with its versions.
    pub async fn find_plugin(&self, plugin: &str) -> Result<Plugin, ChangeError> {
        self.store
            .plugins(Some(plugin))
            .await?
            .pop()
            .ok_or_else(|| {
                ChangeError::Conflict(format!(
                    "no plugin `{plugin}` in the registry (`nexusctl plugin list`)"
                ))
            })
    }

    async fn response(
        &self,
        change: ChangeResponse,
        uid: &str,
    ) -> Result<RegistryResponse, ChangeError> {
        Ok(RegistryResponse {
            revision: change.revision,
            plugin: self.store.plugins(Some(uid)).await?.pop(),
            propagation: Some(change),
            ..RegistryResponse::default()
        })
    }

    /// Commits a registry change; waits up to `wait` for the sidecars to acknowledge it.
    async fn commit_registry(
        &self,
        op: RegistryOp,
        actor: &str,
        started: Instant,
        wait: Duration,
    ) -> Result<ChangeResponse, ChangeError> {
        self.apply(Change::Registry(Box::new(op)), actor, started, wait)
            .await
    }

    /// `plugin register`: a signed version of a new or existing plugin.
    pub async fn register_plugin(
        &self,
        r: RegisterPluginRequest,
        actor: &str,
        started: Instant,
    ) -> Result<RegistryResponse, ChangeError> {
        self.registry_config()?;
        let existing = if r.name.is_empty() {
            None
        } else {
            self.store.plugins(Some(&r.name)).await?.pop()
        };
        let plugin = match existing {
            Some(mut p) => {
                if !r.publisher.is_empty() && r.publisher != p.publisher {
                    return Err(ChangeError::Conflict(format!(
                        "plugin {} is published by `{}`, not `{}`",
                        p.name, p.publisher, r.publisher
                    )));
                }
                p.versions.clear();
                p
            }
            None => {
                if valid_uid(&r.name) {
                    return Err(ChangeError::Conflict(format!(
                        "no plugin {} in the registry",
                        r.name
                    )));
                }
                Plugin {
                    uid: new_uid(),
                    name: r.name.clone(),
                    publisher: r.publisher.clone(),
                    description: r.description.clone(),
                    license_tier: r.license_tier.clone(),
                    registered_by: actor.to_string(),
                    registered_unix_ms: unix_ms(),
                    versions: Vec::new(),
                }
            }
        };
        let checked = self.check_version(
            plugin,
            &r.version,
            &r.image,
            &r.spiffe_id,
            &r.clauses,
            &r.budgets_json,
            &r.payload,
            &r.signature,
            actor,
        )?;
        let uid = checked.plugin.uid.clone();
        let change = self
            .commit_registry(
                RegistryOp::Register {
                    plugin: Box::new(checked.plugin),
                    version: Box::new(checked.version),
                },
                actor,
                started,
                Duration::ZERO,
            )
            .await?;
        self.response(change, &uid).await
    }

    /// `plugin certify`: `actor` must be on `reviewers` (the admin API checks).
    pub async fn certify_plugin(
        &self,
        plugin: &str,
        version: &str,
        actor: &str,
        started: Instant,
        wait: Duration,
    ) -> Result<RegistryResponse, ChangeError> {
        let p = self.find_plugin(plugin).await?;
        // The signature is checked again with the publisher's key as it is now: a
        // version signed by a key since removed from the trust list is not certified.
        if let Some(v) = p.versions.iter().find(|v| v.version == version) {
            let key = self.publisher_key(&p.publisher)?;
            cosign::verify(&key, v.payload.as_bytes(), &v.signature, &v.image_digest)
                .map_err(|e| ChangeError::Conflict(format!("cannot certify: {e}")))?;
        }
        let change = self
            .commit_registry(
                RegistryOp::Certify {
                    uid: p.uid.clone(),
                    version: version.to_string(),
                    by: actor.to_string(),
                },
                actor,
                started,
                wait,
            )
            .await?;
        self.response(change, &p.uid).await
    }

    /// `plugin retire`: the version never runs again; its workload is revoked through
    /// the normal revocation path and its open executions are closed.
    pub async fn retire_plugin(
        &self,
        plugin: &str,
        version: &str,
        reason: &str,
        actor: &str,
        started: Instant,
        wait: Duration,
    ) -> Result<RegistryResponse, ChangeError> {
        let p = self.find_plugin(plugin).await?;
        if reason.len() > self.config.limits.max_reason_bytes {
            return Err(ChangeError::Invalid(format!(
                "reason is {} bytes; the limit is {} (limits.max_reason_bytes)",
                reason.len(),
                self.config.limits.max_reason_bytes
            )));
        }
        let reason = if reason.is_empty() {
            "no reason given"
        } else {
            reason
        };
        let change = self
            .commit_registry(
                RegistryOp::Retire {
                    uid: p.uid.clone(),
                    version: version.to_string(),
                    by: actor.to_string(),
                    reason: reason.to_string(),
                },
                actor,
                started,
                Duration::ZERO,
            )
            .await?;
        let retired = self
            .find_plugin(&p.uid)
            .await?
            .versions
            .into_iter()
            .find(|v| v.version == version);
        let mut notes = Vec::new();
        let mut revocation: Option<ChangeResponse> = None;
        if let Some(v) = retired {
            for e in self.hub.executions() {
                if e.plugin_uid == v.plugin_uid && e.plugin_version == v.version {
                    match self
                        .close(
                            &e.id,
                            &format!("plugin version retired by {actor}"),
                            actor,
                            Instant::now(),
                            Duration::ZERO,
                        )
                        .await
                    {
                        Ok(_) => notes.push(format!("closed execution {}", e.id)),
                        Err(ChangeError::Conflict(_)) => {}
                        Err(error) => return Err(error),
                    }
                }
            }
            let r = self
                .revoke(
                    &v.spiffe_id,
                    &format!("plugin {} v{} retired: {reason}", p.name, v.version),
                    Duration::ZERO,
                    actor,
                    started,
                    wait,
                )
                .await?;
            notes.push(format!(
                "revoked {} at revision {}",
                v.spiffe_id, r.revision
            ));
            revocation = Some(r);
        }
        let mut response = self.response(change, &p.uid).await?;
        response.notes = notes;
        response.revocation = revocation;
        Ok(response)
    }

    /// `plugin bind` / `unbind`.
    pub async fn bind_plugin(
        &self,
        request: &nexus_proto::control::BindPluginRequest,
        bind: bool,
        actor: &str,
        started: Instant,
    ) -> Result<RegistryResponse, ChangeError> {
        let (plugin, version, clause) = (&request.plugin, &request.version, &request.clause);
        let wait = Duration::from_millis(request.wait_ms);
        crate::changes::validate_clause(clause)?;
        let p = self.find_plugin(plugin).await?;
        if bind
            && let Some(v) = p.versions.iter().find(|v| &v.version == version)
            && v.clauses.len() >= self.registry_config()?.max_clauses
        {
            return Err(ChangeError::Invalid(format!(
                "version {version} already binds {} clauses (registry.max_clauses)",
                v.clauses.len()
            )));
        }
        let change = self
            .commit_registry(
                RegistryOp::Bind {
                    uid: p.uid.clone(),
                    version: version.to_string(),
                    clause: clause.to_string(),
                    bind,
                },
                actor,
                started,
                wait,
            )
            .await?;
        self.response(change, &p.uid).await
    }

    /// `plugin verify`: re-verifies a stored version's signature with the publisher's
    /// key as configured now.
    pub async fn verify_plugin(
        &self,
        plugin: &str,
        version: &str,
    ) -> Result<RegistryResponse, ChangeError> {
        let p = self.find_plugin(plugin).await?;
        let v = p
            .versions
            .iter()
            .find(|v| v.version == version)
            .ok_or_else(|| {
                ChangeError::Conflict(format!("plugin {} has no version {version}", p.name))
            })?;
        let key = self.publisher_key(&p.publisher)?;
        let signed = cosign::verify(&key, v.payload.as_bytes(), &v.signature, &v.image_digest)
            .map_err(|e| ChangeError::Conflict(format!("verification failed: {e}")))?;
        let notes = vec![format!(
            "signature over {}@{} verifies with publisher `{}`'s key {}",
            signed.repository,
            signed.digest,
            p.publisher,
            key.fingerprint()
        )];
        Ok(RegistryResponse {
            revision: self.hub.revision(),
            plugin: Some(p),
            notes,
            ..RegistryResponse::default()
        })
    }

    /// `plugin export`: the named (or all) plugins' unretired versions as a bundle.
    pub async fn export_plugins(&self, names: &[String]) -> Result<String, ChangeError> {
        let plugins = if names.is_empty() {
            self.store.plugins(None).await?
        } else {
            let mut out = Vec::new();
            for n in names {
                out.push(self.find_plugin(n).await?);
            }
            out
        };
        let bundle = Bundle {
            format: BUNDLE_FORMAT.into(),
            exported_by: self.config.name.clone(),
            exported_unix_ms: unix_ms(),
            plugins: plugins
                .into_iter()
                .map(|p| BundlePlugin {
                    uid: p.uid,
                    name: p.name,
                    publisher: p.publisher,
                    description: p.description,
                    license_tier: p.license_tier,
                    versions: p
                        .versions
                        .into_iter()
                        .filter(|v| v.state != RETIRED)
                        .map(|v| BundleVersion {
                            image: format!("{}@{}", v.image_repository, v.image_digest),
                            version: v.version,
                            spiffe_id: v.spiffe_id,
                            clauses: v.clauses,
                            budgets_json: v.budgets_json,
                            payload: v.payload,
                            signature: v.signature,
                            state: v.state,
                            certified_by: v.certified_by,
                        })
                        .collect(),
                })
                .collect(),
        };
        serde_json::to_string_pretty(&bundle)
            .map_err(|e| ChangeError::Invalid(format!("cannot encode the bundle: {e}")))
    }

    /// `plugin import`: every version of the bundle is checked as a registration is
    /// (trusted publisher key, signature over its digest, names, clauses), then all are
    /// stored in one change, as `registered`: this gateway's reviewers certify them.
    /// The file's states and certifiers are claims, shown, never trusted.
    pub async fn import_plugins(
        &self,
        bundle: &str,
        actor: &str,
        started: Instant,
    ) -> Result<RegistryResponse, ChangeError> {
        let registry = self.registry_config()?;
        if bundle.len() > registry.max_bundle_bytes {
            return Err(ChangeError::Invalid(format!(
                "the bundle is {} bytes; the limit is {} (registry.max_bundle_bytes)",
                bundle.len(),
                registry.max_bundle_bytes
            )));
        }
        let bundle: Bundle = serde_json::from_str(bundle).map_err(|e| {
            ChangeError::Invalid(format!(
                "not a plugin bundle (`plugin export` writes one): {e}"
            ))
        })?;
        if bundle.format != BUNDLE_FORMAT {
            return Err(ChangeError::Invalid(format!(
                "bundle format `{}` is not `{BUNDLE_FORMAT}`",
                bundle.format
            )));
        }
        let total: usize = bundle.plugins.iter().map(|p| p.versions.len()).sum();
        if total > registry.max_bundle_versions {
            return Err(ChangeError::Invalid(format!(
                "the bundle holds {total} versions; the limit is {} (registry.max_bundle_versions)",
                registry.max_bundle_versions
            )));
        }
        let stored = self.store.plugins(None).await?;
        let mut plugins = Vec::new();
        let mut versions = Vec::new();
        let mut notes = Vec::new();
        for bp in &bundle.plugins {
            if !valid_uid(&bp.uid) {
                return Err(ChangeError::Invalid(format!(
                    "plugin `{}`: uid `{}` is not a UUID",
                    bp.name, bp.uid
                )));
            }
            if let Some(s) = stored.iter().find(|s| s.name == bp.name && s.uid != bp.uid) {
                return Err(ChangeError::Conflict(format!(
                    "plugin `{}` exists here under UUID {}, the bundle says {}",
                    bp.name, s.uid, bp.uid
                )));
            }
            let plugin = Plugin {
                uid: bp.uid.clone(),
                name: bp.name.clone(),
                publisher: bp.publisher.clone(),
                description: bp.description.clone(),
                license_tier: bp.license_tier.clone(),
                registered_by: actor.to_string(),
                registered_unix_ms: unix_ms(),
                versions: Vec::new(),
            };
            let here = stored.iter().find(|s| s.uid == bp.uid);
            for bv in &bp.versions {
                let checked = self
                    .check_version(
                        plugin.clone(),
                        &bv.version,
                        &bv.image,
                        &bv.spiffe_id,
                        &bv.clauses,
                        &bv.budgets_json,
                        &bv.payload,
                        &bv.signature,
                        actor,
                    )
                    .map_err(|e| match e {
                        ChangeError::Invalid(m) => ChangeError::Invalid(format!(
                            "bundle plugin `{}` version {}: {m}; nothing was imported",
                            bp.name, bv.version
                        )),
                        other => other,
                    })?;
                if here.is_some_and(|h| h.versions.iter().any(|v| v.version == bv.version)) {
                    notes.push(format!("{} {}: already here, skipped", bp.name, bv.version));
                    continue;
                }
                let mut v = checked.version;
                v.imported_certified_by = if bv.state == CERTIFIED {
                    format!("{} (at {})", bv.certified_by, bundle.exported_by)
                } else {
                    String::new()
                };
                notes.push(format!(
                    "{} {} ({}): signature verified; registered, to be certified here",
                    bp.name, bv.version, v.image_digest
                ));
                versions.push(v);
            }
            plugins.push(plugin);
        }
        if versions.is_empty() {
            return Ok(RegistryResponse {
                revision: self.hub.revision(),
                notes,
                ..RegistryResponse::default()
            });
        }
        let change = self
            .commit_registry(
                RegistryOp::Import { plugins, versions },
                actor,
                started,
                Duration::ZERO,
            )
            .await?;
        Ok(RegistryResponse {
            revision: change.revision,
            propagation: Some(change),
            notes,
            ..RegistryResponse::default()
        })
    }

    /// For `exec open` with a registry: the certified version the execution runs,
    /// from the plugin (SPIFFE ID, UUID or name) and the optional version.
    pub async fn resolve_version(
        &self,
        plugin: &str,
        version: &str,
    ) -> Result<PluginVersion, ChangeError> {
        let candidates: Vec<PluginVersion> = if plugin.starts_with("spiffe://") {
            let id = nexus_identity::canonical_id(plugin)
                .map_err(|e| ChangeError::Invalid(e.to_string()))?;
            let mut all = Vec::new();
            for p in self.store.plugins(None).await? {
                all.extend(p.versions.into_iter().filter(|v| v.spiffe_id == id));
            }
            all
        } else {
            self.find_plugin(plugin).await?.versions
        };
        if candidates.is_empty() {
            return Err(ChangeError::Conflict(format!(
                "`{plugin}` is not a registered plugin: register and certify a version first (`nexusctl plugin register ...`)"
            )));
        }
        let chosen: Vec<&PluginVersion> = if version.is_empty() {
            candidates.iter().filter(|v| v.state == CERTIFIED).collect()
        } else {
            candidates.iter().filter(|v| v.version == version).collect()
        };
        match chosen.as_slice() {
            [one] if one.state == CERTIFIED => Ok((*one).clone()),
            [one] => Err(ChangeError::Conflict(format!(
                "version {} of `{plugin}` is {}, not certified: executions run only certified versions",
                one.version, one.state
            ))),
            [] if version.is_empty() => Err(ChangeError::Conflict(format!(
                "`{plugin}` has no certified version: a reviewer certifies one with `nexusctl plugin certify`"
            ))),
            [] => Err(ChangeError::Conflict(format!(
                "`{plugin}` has no version {version}"
            ))),
            many => Err(ChangeError::Invalid(format!(
                "`{plugin}` has several certified versions ({}): name one with --version",
                many.iter()
                    .map(|v| v.version.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semver_and_uids() {
        for ok in [
            "1.4.2",
            "0.0.1",
            "10.20.30",
            "1.0.0-rc.1",
            "1.0.0+build.5",
            "1.0.0-alpha-1+x",
        ] {
            assert!(valid_semver(ok), "{ok}");
        }
        for bad in [
            "1.4",
            "01.2.3",
            "1.2.3-",
            "1.2.3-a..b",
            "v1.2.3",
            "1.2.3.4",
            "",
            "1.2.x",
        ] {
            assert!(!valid_semver(bad), "{bad}");
        }
        let uid = new_uid();
        assert!(valid_uid(&uid), "{uid}");
        assert!(!valid_uid("not-a-uuid"));
    }
}
