//! The gateway state as this sidecar holds it: the policy's runtime data
//! (`data.nexus.executions`, `data.nexus.revoked`, and with a plugin registry the
//! certified versions `data.nexus.bindings` is built from) at a revision, built from a
//! snapshot and deltas, and kept on disk so a sidecar restarted while the gateway is
//! away still enforces it.
//!
//! # The snapshot file
//!
//! One JSON object, written as `{"format":"nexus-gateway-snapshot/2","revision":N,
//! "sha256":"<hex>","state":{...}}`, where `sha256` is the SHA-256 of the exact bytes of
//! the `state` value as they stand in the file (`{"revision", "executions", "revoked"}`
//! and `"registry"` when the gateway runs one: the `policy.state_file` shape). It is written to `FILE.tmp`, flushed to disk, the
//! previous generation renamed to `FILE.prev`, the new one renamed to `FILE`, and the
//! folder flushed: a crash at any point leaves a complete generation behind.
//!
//! At start the sidecar enforces the newest generation (`FILE`, `FILE.tmp`, `FILE.prev`)
//! whose checksum verifies, unless a generation that does not verify may be newer (its
//! header names a later revision, or nothing of it is readable): enforcing an older
//! state could forget a revocation, so the sidecar then enforces nothing and refuses
//! every request until the gateway answers ([`Restored::Unverified`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use nexus_proto::control::{
    Delta, Execution as WireExecution, PluginVersion, Snapshot, delta::Change,
};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::enforce::Revoked;
use crate::policy::runtime::{Execution, RegistryBinding, RuntimeData};

/// The format tag of the snapshot file.
pub const FORMAT: &str = "nexus-gateway-snapshot/2";

/// The synced state.
#[derive(Clone, Debug, Default)]
pub struct Synced {
    data: RuntimeData,
}

/// What start-up found on disk.
#[derive(Debug)]
pub enum Restored {
    /// A generation whose checksum verifies, and none that could be newer.
    Verified {
        /// Its state.
        synced: Synced,
        /// The file it came from.
        file: PathBuf,
        /// Generations refused on the way, with why.
        rejected: Vec<(PathBuf, String)>,
    },
    /// Nothing this sidecar may enforce: none at all (a first start) or none that can be
    /// shown to be the newest.
    Unverified {
        /// Why, naming the files.
        reason: String,
        /// Generations refused, with why.
        rejected: Vec<(PathBuf, String)>,
    },
}

/// A snapshot file that cannot be kept (written) or used (read).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Writing a generation failed.
    #[error("cannot write the gateway snapshot {file}: {source}")]
    Write {
        /// The file being written.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn execution(e: &WireExecution) -> Execution {
    Execution {
        id: e.id.clone(),
        plugin: e.plugin.clone(),
        clause: e.clause.clone(),
        not_after: nexus_audit::rfc3339_unix_ms(e.not_after_unix_ms),
        ends_unix_nanos: i128::from(e.not_after_unix_ms) * 1_000_000,
        plugin_uid: e.plugin_uid.clone(),
        plugin_version: e.plugin_version.clone(),
        image_digest: e.image_digest.clone(),
    }
}

/// Where a plugin version's binding is kept: `UID/VERSION`.
fn version_key(v: &PluginVersion) -> String {
    format!("{}/{}", v.plugin_uid, v.version)
}

/// A certified version's binding; `None` for a version in any other state, or whose
/// budgets the gateway sent are not a JSON object (it checks them at registration).
fn binding(v: &PluginVersion) -> Option<RegistryBinding> {
    if v.state != "certified" {
        return None;
    }
    let budgets = match v.budgets_json.as_str() {
        "" => None,
        json => Some(
            serde_json::from_str::<serde_json::Value>(json)
                .ok()
                .filter(serde_json::Value::is_object)?,
        ),
    };
    Some(RegistryBinding {
        spiffe_id: v.spiffe_id.clone(),
        clauses: v.clauses.clone(),
        budgets,
        certified_unix_ms: v.certified_unix_ms,
    })
}

fn revocation(r: &nexus_proto::control::Revocation) -> serde_json::Value {
    serde_json::json!({
        "reason": r.reason,
        "by": r.by,
        "at": nexus_audit::rfc3339_unix_ms(r.at_unix_ms),
        "expires_at": if r.expires_unix_ms == 0 { serde_json::Value::Null } else { nexus_audit::rfc3339_unix_ms(r.expires_unix_ms).into() },
    })
}

/// The generations of `path`, newest-first by role: the file, the one being written,
/// the previous one.
fn generations(path: &Path) -> [PathBuf; 3] {
    [
        path.to_path_buf(),
        sibling(path, "tmp"),
        sibling(path, "prev"),
    ]
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{suffix}"));
    path.with_file_name(name)
}

#[derive(Deserialize)]
struct Envelope<'a> {
    format: String,
    revision: u64,
    sha256: String,
    #[serde(borrow)]
    state: &'a RawValue,
}

#[derive(Deserialize)]
struct Header {
    #[serde(default)]
    revision: Option<u64>,
}

/// One generation as read: its state, or why not and the revision it claims if any.
enum Generation {
    Missing,
    Valid(RuntimeData),
    Invalid { why: String, claims: Option<u64> },
}

fn read_generation(path: &Path) -> Generation {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Generation::Missing,
        Err(e) => {
            return Generation::Invalid {
                why: format!("cannot read: {e}"),
                claims: None,
            };
        }
    };
    let envelope: Envelope<'_> = match serde_json::from_slice(&bytes) {
        Ok(envelope) => envelope,
        Err(e) => {
            // A damaged file may still name its revision in the header.
            let claims = serde_json::from_slice::<Header>(&bytes)
                .ok()
                .and_then(|h| h.revision)
                .or_else(|| claimed_revision(&bytes));
            return Generation::Invalid {
                why: format!("not a complete snapshot ({e})"),
                claims,
            };
        }
    };
    if envelope.format != FORMAT {
        return Generation::Invalid {
            why: format!("format {:?} is not {FORMAT:?}", envelope.format),
            claims: Some(envelope.revision),
        };
    }
    let computed = sha256_hex(envelope.state.get().as_bytes());
    if computed != envelope.sha256 {
        return Generation::Invalid {
            why: format!(
                "checksum mismatch (recorded {}, computed {computed})",
                envelope.sha256
            ),
            claims: Some(envelope.revision),
        };
    }
    match serde_json::from_str::<RuntimeData>(envelope.state.get()) {
        Ok(data) if data.revision == envelope.revision => Generation::Valid(data),
        Ok(data) => Generation::Invalid {
            why: format!(
                "the header says revision {} but the state is at {}",
                envelope.revision, data.revision
            ),
            claims: Some(envelope.revision.max(data.revision)),
        },
        Err(e) => Generation::Invalid {
            why: format!("the state does not parse: {e}"),
            claims: Some(envelope.revision),
        },
    }
}

/// The revision a truncated file's header names (`{"format":…,"revision":N,…`).
fn claimed_revision(bytes: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(bytes.get(..bytes.len().min(256))?).ok()?;
    let at = text.find("\"revision\":")? + "\"revision\":".len();
    let digits: String = text[at..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn sha256_hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

impl Synced {
    /// Reads the kept generations of `path` (see the module documentation).
    pub fn restore(path: &Path) -> Restored {
        let mut best: Option<(RuntimeData, PathBuf)> = None;
        let mut rejected = Vec::new();
        // The newest revision a damaged generation could hold: `None` in the inner
        // option when it names none (then it could be any).
        let mut damaged: Option<Option<u64>> = None;
        let mut seen = false;
        for file in generations(path) {
            match read_generation(&file) {
                Generation::Missing => {}
                Generation::Valid(data) => {
                    seen = true;
                    if best
                        .as_ref()
                        .is_none_or(|(b, _)| data.revision > b.revision)
                    {
                        best = Some((data, file));
                    }
                }
                Generation::Invalid { why, claims } => {
                    seen = true;
                    damaged = Some(match (damaged, claims) {
                        (Some(None), _) | (_, None) => None,
                        (Some(Some(a)), Some(b)) => Some(a.max(b)),
                        (None, Some(b)) => Some(b),
                    });
                    rejected.push((file, why));
                }
            }
        }
        let describe = |rejected: &[(PathBuf, String)]| {
            rejected
                .iter()
                .map(|(f, why)| format!("{}: {why}", f.display()))
                .collect::<Vec<_>>()
                .join("; ")
        };
        match (best, damaged) {
            (None, _) if !seen => Restored::Unverified {
                reason: format!(
                    "no gateway snapshot kept at {} (first start, or it was removed)",
                    path.display()
                ),
                rejected,
            },
            (None, _) => Restored::Unverified {
                reason: format!("no kept gateway snapshot verifies: {}", describe(&rejected)),
                rejected,
            },
            (Some((data, file)), Some(claims)) if claims.is_none_or(|c| c > data.revision) => {
                Restored::Unverified {
                    reason: format!(
                        "{} (revision {}) verifies, but a damaged generation may be newer ({}): enforcing it could forget a later change",
                        file.display(),
                        data.revision,
                        describe(&rejected)
                    ),
                    rejected,
                }
            }
            (Some((data, file)), _) => Restored::Verified {
                synced: Self { data },
                file,
                rejected,
            },
        }
    }

    /// The revision applied.
    pub fn revision(&self) -> u64 {
        self.data.revision
    }

    /// The runtime data.
    pub fn data(&self) -> &RuntimeData {
        &self.data
    }

    /// The revoked set for enforcement.
    pub fn revoked_set(&self) -> Revoked {
        Revoked::from_subjects(self.data.revoked.keys().map(String::as_str))
    }

    /// Replaces everything with a snapshot.
    pub fn replace(&mut self, snapshot: Snapshot) {
        let mut data = RuntimeData {
            revision: snapshot.revision,
            ..RuntimeData::default()
        };
        for e in &snapshot.executions {
            data.executions.insert(e.id.clone(), execution(e));
        }
        for r in &snapshot.revoked {
            data.revoked.insert(r.subject.clone(), revocation(r));
        }
        if snapshot.registry {
            data.registry = Some(
                snapshot
                    .certified
                    .iter()
                    .filter_map(|v| Some((version_key(v), binding(v)?)))
                    .collect(),
            );
        }
        self.data = data;
    }

    /// Whether the bindings in force come from the gateway's registry.
    pub fn registry(&self) -> bool {
        self.data.registry.is_some()
    }

    /// Applies the next delta; `Ok(false)` for one already applied, `Err` for a gap.
    pub fn apply(&mut self, delta: &Delta) -> Result<bool, String> {
        if delta.revision <= self.data.revision {
            return Ok(false);
        }
        if delta.revision != self.data.revision + 1 {
            return Err(format!(
                "the gateway skipped from revision {} to {}",
                self.data.revision, delta.revision
            ));
        }
        match &delta.change {
            Some(Change::Revoke(r)) => {
                self.data.revoked.insert(r.subject.clone(), revocation(r));
            }
            Some(Change::Reinstate(r)) => {
                self.data.revoked.remove(&r.subject);
            }
            Some(Change::Open(e)) => {
                self.data.executions.insert(e.id.clone(), execution(e));
            }
            Some(Change::Close(c)) => {
                self.data.executions.remove(&c.id);
            }
            // With a registry, each version as it stands after the change: certified
            // ones bind their clauses, any other state binds nothing. Without one (the
            // folder's bindings are in force), nothing to apply.
            Some(Change::Registry(r)) => {
                if let Some(registry) = &mut self.data.registry {
                    for v in &r.versions {
                        match binding(v) {
                            Some(b) => {
                                registry.insert(version_key(v), b);
                            }
                            None => {
                                registry.remove(&version_key(v));
                            }
                        }
                    }
                }
            }
            None => {}
        }
        self.data.revision = delta.revision;
        Ok(true)
    }

    /// The `state` bytes of the file.
    fn state_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        let executions: serde_json::Map<String, serde_json::Value> = self
            .data
            .executions
            .iter()
            .map(|(id, e)| {
                let mut ex = serde_json::json!({"plugin": e.plugin, "clause": e.clause, "not_after": e.not_after});
                for (key, value) in [
                    ("plugin_uid", &e.plugin_uid),
                    ("plugin_version", &e.plugin_version),
                    ("image_digest", &e.image_digest),
                ] {
                    if !value.is_empty() {
                        ex[key] = value.as_str().into();
                    }
                }
                (id.clone(), ex)
            })
            .collect();
        let mut state = serde_json::json!({
            "revision": self.data.revision,
            "executions": executions,
            "revoked": self.data.revoked,
        });
        if let Some(registry) = &self.data.registry {
            state["registry"] = serde_json::to_value(registry)?;
        }
        serde_json::to_vec_pretty(&state)
    }

    /// Writes a new generation to `path` (see the module documentation): on success it
    /// is on disk and the previous one is `FILE.prev`.
    pub fn persist(&self, path: &Path) -> Result<(), SnapshotError> {
        let [file, tmp, prev] = generations(path);
        let error = |file: &Path, source: std::io::Error| SnapshotError::Write {
            file: file.to_path_buf(),
            source,
        };
        let state = self
            .state_bytes()
            .map_err(|e| error(&tmp, std::io::Error::other(e)))?;
        let mut bytes = format!(
            "{{\"format\":\"{FORMAT}\",\"revision\":{},\"sha256\":\"{}\",\"state\":",
            self.data.revision,
            sha256_hex(&state)
        )
        .into_bytes();
        bytes.extend_from_slice(&state);
        bytes.extend_from_slice(b"}\n");
        {
            let mut out = std::fs::File::create(&tmp).map_err(|e| error(&tmp, e))?;
            out.write_all(&bytes).map_err(|e| error(&tmp, e))?;
            out.sync_all().map_err(|e| error(&tmp, e))?;
        }
        match std::fs::rename(&file, &prev) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(error(&prev, e)),
        }
        std::fs::rename(&tmp, &file).map_err(|e| error(&file, e))?;
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| error(dir, e))?;
        }
        Ok(())
    }

    /// Removes every kept generation of `path` (after a failed write: a restart must not
    /// take an older generation for the newest). Returns what could not be removed.
    pub fn invalidate(path: &Path) -> Vec<(PathBuf, std::io::Error)> {
        generations(path)
            .into_iter()
            .filter_map(|file| match std::fs::remove_file(&file) {
                Ok(()) => None,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                // A directory in the way (the fault a test injects) is removed by nobody.
                Err(e) => Some((file, e)),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_proto::control::Revocation;

    fn state(revision: u64, revoked: &[&str]) -> Synced {
        let mut s = Synced::default();
        s.replace(Snapshot {
            revision,
            revoked: revoked
                .iter()
                .map(|r| Revocation {
                    subject: r.to_string(),
                    ..Revocation::default()
                })
                .collect(),
            ..Snapshot::default()
        });
        s
    }

    fn verified(r: Restored) -> (u64, PathBuf) {
        match r {
            Restored::Verified { synced, file, .. } => (synced.revision(), file),
            Restored::Unverified { reason, .. } => panic!("unverified: {reason}"),
        }
    }

    fn unverified(r: Restored) -> String {
        match r {
            Restored::Verified { file, .. } => panic!("verified {}", file.display()),
            Restored::Unverified { reason, .. } => reason,
        }
    }

    #[test]
    fn generations_round_trip_and_the_previous_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        assert!(unverified(Synced::restore(&path)).contains("first start"));
        state(4, &["spiffe://td/a"]).persist(&path).unwrap();
        state(5, &["spiffe://td/a", "spiffe://td/b"])
            .persist(&path)
            .unwrap();
        assert_eq!(verified(Synced::restore(&path)), (5, path.clone()));
        assert!(sibling(&path, "prev").exists());
        // A crash between the two renames: the new generation is only in .tmp.
        std::fs::rename(&path, sibling(&path, "tmp")).unwrap();
        assert_eq!(verified(Synced::restore(&path)), (5, sibling(&path, "tmp")));
    }

    #[test]
    fn damage_that_could_hide_a_newer_revision_refuses_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        state(4, &[]).persist(&path).unwrap();
        state(5, &["spiffe://td/x"]).persist(&path).unwrap();
        let good = std::fs::read(&path).unwrap();
        // Truncated: nothing of it readable past the header.
        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        let reason = unverified(Synced::restore(&path));
        assert!(
            reason.contains("s.json") && reason.contains("may be newer"),
            "{reason}"
        );
        // Emptied: no header at all.
        std::fs::write(&path, b"").unwrap();
        unverified(Synced::restore(&path));
        // One byte of the state changed: the checksum catches it.
        let flipped = String::from_utf8(good.clone())
            .unwrap()
            .replace("spiffe://td/x", "spiffe://td/y");
        std::fs::write(&path, flipped).unwrap();
        let reason = unverified(Synced::restore(&path));
        assert!(reason.contains("checksum mismatch"), "{reason}");
        // A damaged generation that is provably older does not matter.
        std::fs::write(&path, &good).unwrap();
        std::fs::write(sibling(&path, "prev"), b"{\"revision\":3,").unwrap();
        assert_eq!(verified(Synced::restore(&path)).0, 5);
        // And the older format (plain state JSON) is not trusted.
        std::fs::remove_file(sibling(&path, "prev")).unwrap();
        std::fs::write(&path, b"{\"revision\": 9, \"revoked\": {}}").unwrap();
        unverified(Synced::restore(&path));
    }

    fn version(v: &str, state: &str, clauses: &[&str], budgets: &str) -> PluginVersion {
        PluginVersion {
            plugin_uid: "6f1c2d3e-0000-4000-8000-000000000001".into(),
            version: v.into(),
            image_digest: format!("sha256:{}", "a".repeat(64)),
            spiffe_id: "spiffe://td/ns/plugins/sa/p".into(),
            clauses: clauses.iter().map(|c| c.to_string()).collect(),
            budgets_json: budgets.into(),
            state: state.into(),
            ..PluginVersion::default()
        }
    }

    fn registry_delta(revision: u64, v: PluginVersion) -> Delta {
        Delta {
            revision,
            change: Some(Change::Registry(nexus_proto::control::RegistryEvent {
                action: v.state.clone(),
                versions: vec![v],
                ..Default::default()
            })),
        }
    }

    #[test]
    fn registry_bindings_follow_certify_and_retire_and_survive_a_restart() {
        let mut s = Synced::default();
        s.replace(Snapshot {
            revision: 3,
            registry: true,
            certified: vec![version("1.0.0", "certified", &["c-1"], "")],
            ..Snapshot::default()
        });
        let id = "spiffe://td/ns/plugins/sa/p";
        assert_eq!(
            s.data().registry_bindings().unwrap(),
            serde_json::json!({ id: ["c-1"] })
        );
        // A registered version binds nothing; certified, its clauses and budgets join.
        let budgets =
            r#"{"requests_per_s":5,"egress_bytes":10,"distinct_clauses":2,"window":"1s"}"#;
        assert!(
            s.apply(&registry_delta(
                4,
                version("1.1.0", "registered", &["c-2"], budgets)
            ))
            .unwrap()
        );
        assert_eq!(
            s.data().registry_bindings().unwrap(),
            serde_json::json!({ id: ["c-1"] })
        );
        assert!(
            s.apply(&registry_delta(
                5,
                version("1.1.0", "certified", &["c-2"], budgets)
            ))
            .unwrap()
        );
        let both = s.data().registry_bindings().unwrap();
        assert_eq!(both[id]["clauses"], serde_json::json!(["c-1", "c-2"]));
        assert_eq!(both[id]["budgets"]["requests_per_s"], 5);
        // Kept on disk and restored as it was.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        s.persist(&path).unwrap();
        let restored = match Synced::restore(&path) {
            Restored::Verified { synced, .. } => synced,
            Restored::Unverified { reason, .. } => panic!("{reason}"),
        };
        assert!(restored.registry());
        assert_eq!(restored.data().registry_bindings(), Some(both));
        // Retired: gone.
        assert!(
            s.apply(&registry_delta(
                6,
                version("1.0.0", "retired", &["c-1"], "")
            ))
            .unwrap()
        );
        assert_eq!(
            s.data().registry_bindings().unwrap()[id]["clauses"],
            serde_json::json!(["c-2"])
        );
        // Without a registry (a snapshot that does not say so), the folder's bindings
        // stay in force and registry changes apply nothing.
        let mut folder = state(1, &[]);
        assert!(!folder.registry());
        assert!(
            folder
                .apply(&registry_delta(
                    2,
                    version("1.0.0", "certified", &["c-1"], "")
                ))
                .unwrap()
        );
        assert_eq!(folder.data().registry_bindings(), None);
    }

    #[test]
    fn invalidate_removes_every_generation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        state(1, &[]).persist(&path).unwrap();
        state(2, &[]).persist(&path).unwrap();
        assert!(Synced::invalidate(&path).is_empty());
        assert!(unverified(Synced::restore(&path)).contains("first start"));
    }
}
