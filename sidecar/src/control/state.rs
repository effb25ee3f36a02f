//! The gateway state as this sidecar holds it: the policy's runtime data
//! (`data.nexus.executions`, `data.nexus.revoked`) at a revision, built from a snapshot
//! and deltas, and kept on disk in the `policy.state_file` format.

use std::path::Path;

use nexus_proto::control::{Delta, Execution as WireExecution, Snapshot, delta::Change};

use super::enforce::Revoked;
use super::records::write_atomically;
use crate::policy::runtime::{Execution, RuntimeData};

/// The synced state.
#[derive(Clone, Debug, Default)]
pub struct Synced {
    data: RuntimeData,
}

fn rfc3339_ms(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    nexus_audit::rfc3339_ms(t)
}

fn execution(e: &WireExecution) -> Execution {
    Execution {
        id: e.id.clone(),
        plugin: e.plugin.clone(),
        clause: e.clause.clone(),
        not_after: rfc3339_ms(e.not_after_unix_ms),
        ends_unix_nanos: i128::from(e.not_after_unix_ms) * 1_000_000,
    }
}

fn revocation(r: &nexus_proto::control::Revocation) -> serde_json::Value {
    serde_json::json!({
        "reason": r.reason,
        "by": r.by,
        "at": rfc3339_ms(r.at_unix_ms),
        "expires_at": if r.expires_unix_ms == 0 { serde_json::Value::Null } else { rfc3339_ms(r.expires_unix_ms).into() },
    })
}

impl Synced {
    /// The state kept at `path`, or empty (revision 0) if there is none or it is
    /// unreadable (logged: a damaged file must not stop the sidecar, and the gateway
    /// sends a snapshot on connect).
    pub fn load(path: &Path) -> Self {
        match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<RuntimeData>(&bytes) {
                Ok(data) => Self { data },
                Err(error) => {
                    tracing::error!(%error, file = %path.display(), "the kept gateway snapshot is unreadable; starting empty until the gateway answers");
                    Self::default()
                }
            },
            Err(_) => Self::default(),
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
        self.data = data;
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
            None => {}
        }
        self.data.revision = delta.revision;
        Ok(true)
    }

    /// Writes the state to `path` (temporary file and rename: never half-written).
    pub fn persist(&self, path: &Path) -> std::io::Result<()> {
        let executions: serde_json::Map<String, serde_json::Value> = self
            .data
            .executions
            .iter()
            .map(|(id, e)| {
                (
                    id.clone(),
                    serde_json::json!({"plugin": e.plugin, "clause": e.clause, "not_after": e.not_after}),
                )
            })
            .collect();
        let json = serde_json::json!({
            "revision": self.data.revision,
            "executions": executions,
            "revoked": self.data.revoked,
        });
        write_atomically(path, &serde_json::to_vec_pretty(&json)?)
    }
}
