//! Status across gateway replicas. Each replica holds its own sidecars' streams; with
//! PostgreSQL it writes what it sees (sidecars, their acknowledged revisions, its newest
//! revocation's propagation) to the shared store every `database.status_report_interval`,
//! and `status` through any replica merges its live view with the other replicas' fresh
//! rows. SQLite is one replica by definition: status is the live view alone.

use std::sync::Arc;

use nexus_proto::control::{Propagation, ReplicaStatus, SidecarInfo};

use crate::changes::{Changes, unix_ms};
use crate::hub;

/// The wire form of a propagation this replica measured.
pub fn to_proto(p: &hub::Propagation) -> Propagation {
    Propagation {
        revision: p.revision,
        subject: p.subject.clone(),
        started_unix_ms: p.started_unix_ms,
        sidecars: p.sidecars,
        acknowledged: p.acknowledged,
        all_acknowledged_after_us: p
            .done_after
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1))
            .unwrap_or(0),
        replicas: 1,
        revocation: p.revocation,
    }
}

/// This replica's live view.
pub fn local(changes: &Changes) -> ReplicaStatus {
    let hub = &changes.hub;
    let name = &changes.config.name;
    let sidecars: Vec<SidecarInfo> = hub
        .sidecars()
        .into_iter()
        .map(|mut s| {
            s.gateway.clone_from(name);
            s
        })
        .collect();
    ReplicaStatus {
        gateway: name.clone(),
        revision: hub.revision(),
        sidecar_count: u32::try_from(sidecars.len()).unwrap_or(u32::MAX),
        sidecars,
        last_revocation: hub.newest_revocation().as_ref().map(to_proto),
        reported_unix_ms: unix_ms(),
    }
}

/// Every replica's sidecars, the newest revocation's propagation across replicas, and
/// the replicas themselves (without their sidecar lists).
#[derive(Debug, Default)]
pub struct Merged {
    /// Sorted by SPIFFE ID, then replica.
    pub sidecars: Vec<SidecarInfo>,
    /// See [`merge_propagation`].
    pub last_revocation: Option<Propagation>,
    /// This replica first, then the others by name.
    pub replicas: Vec<ReplicaStatus>,
}

/// Merges this replica's view with the other replicas' rows.
pub fn merge(local: ReplicaStatus, others: Vec<ReplicaStatus>) -> Merged {
    let mut all = Vec::with_capacity(others.len() + 1);
    all.push(local);
    all.extend(others);
    let last_revocation = merge_propagation(&all);
    let mut sidecars = Vec::new();
    for replica in &mut all {
        replica.sidecar_count = u32::try_from(replica.sidecars.len()).unwrap_or(u32::MAX);
        sidecars.append(&mut replica.sidecars);
    }
    sidecars.sort_by(|a, b| {
        (a.spiffe_id.as_str(), a.gateway.as_str()).cmp(&(b.spiffe_id.as_str(), b.gateway.as_str()))
    });
    Merged {
        sidecars,
        last_revocation,
        replicas: all,
    }
}

/// The newest revocation any replica measured, across replicas: the sidecars and
/// acknowledgements of every replica that measured it, summed; done once each of those
/// replicas is done and no replica is still short of that revision; the time runs from
/// the earliest start (the replica where the call arrived) to the latest finish, on the
/// replicas' clocks. With one replica measuring, its own figure is used as is.
pub fn merge_propagation(replicas: &[ReplicaStatus]) -> Option<Propagation> {
    let newest = replicas
        .iter()
        .filter_map(|r| r.last_revocation.as_ref())
        .max_by_key(|p| p.revision)?;
    let revision = newest.revision;
    let mut merged = Propagation {
        revision,
        subject: newest.subject.clone(),
        started_unix_ms: u64::MAX,
        sidecars: 0,
        acknowledged: 0,
        all_acknowledged_after_us: 0,
        replicas: 0,
        revocation: true,
    };
    let mut unfinished = false;
    let mut finished_at_us = 0u64;
    let mut single = 0u64;
    for replica in replicas {
        match &replica.last_revocation {
            Some(p) if p.revision == revision => {
                merged.replicas += 1;
                merged.sidecars = merged.sidecars.saturating_add(p.sidecars);
                merged.acknowledged = merged.acknowledged.saturating_add(p.acknowledged);
                merged.started_unix_ms = merged.started_unix_ms.min(p.started_unix_ms);
                if p.all_acknowledged_after_us == 0 {
                    unfinished = true;
                } else {
                    single = p.all_acknowledged_after_us;
                    finished_at_us = finished_at_us.max(
                        p.started_unix_ms
                            .saturating_mul(1000)
                            .saturating_add(p.all_acknowledged_after_us),
                    );
                }
            }
            // Not there yet (its row predates the revision): its sidecars may still
            // be waiting. A replica that started after the revocation was made gave it
            // to its sidecars in their snapshot and measured nothing.
            _ if replica.revision < revision => unfinished = true,
            _ => {}
        }
    }
    if !unfinished {
        merged.all_acknowledged_after_us = if merged.replicas == 1 {
            single
        } else {
            finished_at_us
                .saturating_sub(merged.started_unix_ms.saturating_mul(1000))
                .max(1)
        };
    }
    Some(merged)
}

/// This process's key in the replicas table: the configured name is shared by the
/// replicas of one Deployment, so a random suffix tells them apart.
pub fn instance_id(name: &str) -> String {
    format!("{name}-{}", crate::changes::random_hex(8))
}

/// Writes this replica's status row every `database.status_report_interval` (PostgreSQL
/// only), pruning the rows of replicas silent for `database.status_stale_after`.
pub fn spawn_reporter(changes: Arc<Changes>, instance: String) {
    tokio::spawn(async move {
        let interval = changes.config.database.status_report_interval;
        let stale_ms =
            u64::try_from(changes.config.database.status_stale_after.as_millis()).unwrap_or(0);
        loop {
            let status = local(&changes);
            let prune_before = unix_ms().saturating_sub(stale_ms);
            if let Err(error) = changes
                .store
                .report_replica(&instance, &status, prune_before)
                .await
            {
                tracing::warn!(%error, "cannot report this replica's status to the store");
            }
            tokio::time::sleep(interval).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(name: &str, revision: u64, p: Option<(u64, u64, u32, u32, u64)>) -> ReplicaStatus {
        ReplicaStatus {
            gateway: name.into(),
            revision,
            last_revocation: p.map(|(rev, started, sidecars, acknowledged, after_us)| {
                Propagation {
                    revision: rev,
                    subject: "spiffe://td/x".into(),
                    started_unix_ms: started,
                    sidecars,
                    acknowledged,
                    all_acknowledged_after_us: after_us,
                    replicas: 1,
                    revocation: true,
                }
            }),
            ..Default::default()
        }
    }

    #[test]
    fn one_replica_keeps_its_own_figure() {
        let p = merge_propagation(&[replica("a", 5, Some((5, 1000, 3, 3, 1234)))]).unwrap();
        assert_eq!(
            (p.replicas, p.sidecars, p.all_acknowledged_after_us),
            (1, 3, 1234)
        );
    }

    #[test]
    fn replicas_are_summed_and_timed_from_first_start_to_last_finish() {
        // A took the call at t=1000 ms (done 2 ms later); B saw it at 1003 ms, done 4 ms
        // later: all acknowledged 7 ms after the call.
        let p = merge_propagation(&[
            replica("a", 7, Some((7, 1000, 2, 2, 2000))),
            replica("b", 7, Some((7, 1003, 3, 3, 4000))),
            // Started after the revocation: it measured an older one; not counted.
            replica("c", 7, Some((4, 900, 1, 1, 10))),
        ])
        .unwrap();
        assert_eq!(
            (p.revision, p.replicas, p.sidecars, p.acknowledged),
            (7, 2, 5, 5)
        );
        assert_eq!(p.started_unix_ms, 1000);
        assert_eq!(p.all_acknowledged_after_us, 7000);
    }

    #[test]
    fn a_replica_still_waiting_or_behind_keeps_it_unfinished() {
        let waiting = merge_propagation(&[
            replica("a", 7, Some((7, 1000, 2, 2, 2000))),
            replica("b", 7, Some((7, 1003, 3, 1, 0))),
        ])
        .unwrap();
        assert_eq!(
            (waiting.acknowledged, waiting.all_acknowledged_after_us),
            (3, 0)
        );
        let behind = merge_propagation(&[
            replica("a", 7, Some((7, 1000, 2, 2, 2000))),
            replica("b", 6, Some((4, 900, 1, 1, 10))),
        ])
        .unwrap();
        assert_eq!(behind.all_acknowledged_after_us, 0);
        assert!(merge_propagation(&[replica("a", 3, None)]).is_none());
    }

    #[test]
    fn merge_lists_every_replicas_sidecars_once() {
        let sidecar = |id: &str, gw: &str| SidecarInfo {
            spiffe_id: id.into(),
            gateway: gw.into(),
            ..Default::default()
        };
        let mut a = replica("a", 1, None);
        a.sidecars = vec![sidecar("spiffe://td/z", "a")];
        let mut b = replica("b", 1, None);
        b.sidecars = vec![sidecar("spiffe://td/m", "b"), sidecar("spiffe://td/z", "b")];
        let merged = merge(a, vec![b]);
        let ids: Vec<_> = merged
            .sidecars
            .iter()
            .map(|s| format!("{}@{}", s.spiffe_id, s.gateway))
            .collect();
        assert_eq!(
            ids,
            ["spiffe://td/m@b", "spiffe://td/z@a", "spiffe://td/z@b"]
        );
        let counts: Vec<_> = merged
            .replicas
            .iter()
            .map(|r| (r.gateway.as_str(), r.sidecar_count, r.sidecars.len()))
            .collect();
        assert_eq!(counts, [("a", 1, 0), ("b", 2, 0)]);
    }
}
