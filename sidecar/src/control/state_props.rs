//! Property tests of control-stream message handling (a bounded number of cases;
//! `PROPTEST_CASES` raises it): over random sequences of snapshots and deltas, including
//! duplicates, replays and gaps, the sidecar's state is exactly a model's:
//!
//! - a delta applies only as the next revision; a duplicate or older one changes nothing
//!   (`Ok(false)`), a gap changes nothing and is an error (the stream then resyncs);
//! - the revision never goes back except by a snapshot, which replaces everything;
//! - what is kept on disk restores, verified, to the same state.

use std::collections::{BTreeMap, BTreeSet};

use nexus_proto::control::{
    Delta, Execution, ExecutionClosed, Reinstatement, Revocation, Snapshot, delta::Change,
};
use proptest::prelude::*;

use super::state::{Restored, Synced};

#[derive(Clone, Debug)]
enum Msg {
    Snapshot(u64, Vec<String>, Vec<(String, String)>),
    /// A delta at `current + offset` (0 or less: a replay, 1: the next, more: a gap).
    Delta(i64, Change),
}

fn subject() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["spiffe://td/a", "spiffe://td/b", "spiffe://td/c/*"])
        .prop_map(str::to_string)
}

fn execution_id() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["ex-1", "ex-2", "ex-3"]).prop_map(str::to_string)
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        subject().prop_map(|subject| Change::Revoke(Revocation {
            subject,
            ..Revocation::default()
        })),
        subject().prop_map(|subject| Change::Reinstate(Reinstatement {
            subject,
            ..Reinstatement::default()
        })),
        (execution_id(), subject()).prop_map(|(id, plugin)| Change::Open(Execution {
            id,
            plugin,
            clause: "c-1".into(),
            not_after_unix_ms: 1_900_000_000_000,
            ..Execution::default()
        })),
        execution_id().prop_map(|id| Change::Close(ExecutionClosed {
            id,
            ..ExecutionClosed::default()
        })),
    ]
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        1 => (0u64..40, prop::collection::vec(subject(), 0..3), prop::collection::vec((execution_id(), subject()), 0..3))
            .prop_map(|(r, revoked, executions)| Msg::Snapshot(r, revoked, executions)),
        8 => (prop_oneof![6 => Just(1i64), 1 => -2i64..=0, 1 => 2i64..5], change())
            .prop_map(|(offset, change)| Msg::Delta(offset, change)),
    ]
}

/// The model: revision, revoked subjects, executions (id -> plugin).
#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    revision: u64,
    revoked: BTreeSet<String>,
    executions: BTreeMap<String, String>,
}

fn observed(s: &Synced) -> Model {
    Model {
        revision: s.revision(),
        revoked: s.data().revoked.keys().cloned().collect(),
        executions: s
            .data()
            .executions
            .iter()
            .map(|(id, e)| (id.clone(), e.plugin.clone()))
            .collect(),
    }
}

fn cases() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn deltas_apply_once_in_order_and_the_kept_state_restores(msgs in prop::collection::vec(msg(), 1..40)) {
        let mut synced = Synced::default();
        let mut model = Model::default();
        for m in msgs {
            match m {
                Msg::Snapshot(revision, revoked, executions) => {
                    synced.replace(Snapshot {
                        revision,
                        revoked: revoked.iter().map(|s| Revocation { subject: s.clone(), ..Revocation::default() }).collect(),
                        executions: executions.iter().map(|(id, plugin)| Execution {
                            id: id.clone(), plugin: plugin.clone(), clause: "c-1".into(),
                            not_after_unix_ms: 1_900_000_000_000, ..Execution::default()
                        }).collect(),
                        ..Snapshot::default()
                    });
                    model = Model {
                        revision,
                        revoked: revoked.into_iter().collect(),
                        executions: executions.into_iter().collect(),
                    };
                }
                Msg::Delta(offset, change) => {
                    let revision = i64::try_from(model.revision).unwrap_or(i64::MAX).saturating_add(offset).max(0);
                    let revision = u64::try_from(revision).unwrap_or(0);
                    let before = observed(&synced);
                    let result = synced.apply(&Delta { revision, change: Some(change.clone()) });
                    if revision == model.revision + 1 {
                        prop_assert_eq!(result, Ok(true));
                        model.revision = revision;
                        match change {
                            Change::Revoke(r) => { model.revoked.insert(r.subject); }
                            Change::Reinstate(r) => { model.revoked.remove(&r.subject); }
                            Change::Open(e) => { model.executions.insert(e.id, e.plugin); }
                            Change::Close(c) => { model.executions.remove(&c.id); }
                            // The generator makes none; a sidecar keeps no registry state.
                            Change::Registry(_) => {}
                        }
                    } else if revision <= model.revision {
                        prop_assert_eq!(result, Ok(false));
                        prop_assert_eq!(observed(&synced), before, "a replay changed the state");
                    } else {
                        prop_assert!(result.is_err(), "a gap was applied");
                        prop_assert_eq!(observed(&synced), before, "a gap changed the state");
                    }
                }
            }
            prop_assert_eq!(observed(&synced), model.clone());
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("snapshot.json");
        synced.persist(&path).expect("persist");
        match Synced::restore(&path) {
            Restored::Verified { synced: restored, .. } => prop_assert_eq!(observed(&restored), model),
            Restored::Unverified { reason, .. } => prop_assert!(false, "kept state not verified: {}", reason),
        }
    }
}
