//! The anomaly watch on the request path: every request, once its response ends, is
//! fed to the detectors (`nexus-anomaly`) with who it was about, whether it was refused,
//! the clause it named and whether that clause is bound to the plugin, and the bytes
//! each way. Signals go to the bounded queue the control stream drains to the gateway.
//!
//! Inbound, the watched workload is the peer (`observed_as: peer`) and its egress is
//! what it takes out of the app behind this sidecar (the response bytes: a plugin
//! pulling far more clause data than usual). Outbound, it is this sidecar's own
//! workload (`self`), and its egress is everything it moves: what it pushes out (the
//! request bodies) and the data it pulls in (the response bodies). So a plugin pulling
//! far more clause data than its budget is seen by its own sidecar too, whose signal
//! corroborates the data API sidecar's (a single peer-observed signal only alerts:
//! docs/threat-model.md), and it is revoked.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::Request;
use nexus_anomaly::{Detectors, Observed, RequestEvent, Signal};
use nexus_proto::control::{Baseline, BaselineReport, FleetBaselines};

use super::observe::{EndObserver, ObservedBody, TappedBody};
use super::outcome::Exchange;
use super::{AnswerFuture, Next, Step};
use crate::control::{SignalQueue, unix_ms};
use crate::metrics::Metrics;
use crate::policy::PolicyRuntime;

/// Decision ids kept per workload, to cite in its signals.
const CITED_PER_WORKLOAD: usize = 32;
/// Workloads whose recent decision ids are kept (the least recently seen go first).
const CITED_WORKLOADS: usize = 4096;

/// Detectors and where their signals go.
pub struct AnomalyWatch {
    detectors: Detectors,
    queue: Arc<SignalQueue>,
    metrics: Arc<Metrics>,
    /// Where the budgets come from: the bindings of the policy revision in force.
    policy: Option<Arc<PolicyRuntime>>,
    /// How often to report this workload's baseline to the gateway.
    report_interval: std::time::Duration,
    /// The decision ids of each workload's latest requests, newest last: a signal about
    /// a workload cites them, so the gateway can check them against this sidecar's
    /// execution records (docs/threat-model.md).
    recent: Mutex<HashMap<String, (u64, VecDeque<String>)>>,
}

impl std::fmt::Debug for AnomalyWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AnomalyWatch")
    }
}

impl AnomalyWatch {
    /// Detectors with `config`, signals into `queue`, budgets from `policy`'s bindings.
    pub fn new(
        config: nexus_anomaly::DetectorConfig,
        queue: Arc<SignalQueue>,
        metrics: Arc<Metrics>,
        policy: Option<Arc<PolicyRuntime>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            report_interval: config.fleet.report_interval,
            detectors: Detectors::new(config),
            queue,
            metrics,
            policy,
            recent: Mutex::new(HashMap::new()),
        })
    }

    /// How often the control stream sends [`AnomalyWatch::fleet_report`].
    pub fn report_interval(&self) -> std::time::Duration {
        self.report_interval
    }

    /// This sidecar's contribution to its workload's fleet baseline (`None`: nothing
    /// new since the last one).
    pub fn fleet_report(&self) -> Option<BaselineReport> {
        let baselines: Vec<Baseline> = self
            .detectors
            .fleet_report()
            .into_iter()
            .map(|s| Baseline {
                workload: s.workload,
                rate_per_s: s.baseline.rate_per_s,
                bytes_per_s: s.baseline.bytes_per_s,
                long_rate_per_s: s.baseline.long_rate_per_s,
                long_bytes_per_s: s.baseline.long_bytes_per_s,
                ticks: u64::from(s.ticks),
                updated_unix_ms: unix_ms(),
            })
            .collect();
        (!baselines.is_empty()).then_some(BaselineReport { baselines })
    }

    /// The fleet's baselines from the gateway: workloads new here start from them.
    pub fn set_fleet(&self, fleet: FleetBaselines) {
        let n = fleet.baselines.len();
        self.detectors
            .set_fleet(fleet.baselines.into_iter().map(|b| {
                (
                    b.workload,
                    nexus_anomaly::Baseline {
                        rate_per_s: b.rate_per_s,
                        bytes_per_s: b.bytes_per_s,
                        long_rate_per_s: b.long_rate_per_s,
                        long_bytes_per_s: b.long_bytes_per_s,
                    },
                )
            }));
        self.metrics.fleet_baselines(n);
        tracing::debug!(workloads = n, "fleet baselines received");
    }

    /// The policy revision in force, whose bindings carry the budgets.
    fn loaded(&self) -> Option<Arc<crate::policy::Loaded>> {
        self.policy.as_ref()?.current()
    }

    /// Notes that `workload`'s request `decision_id` ended at `now_ms`.
    fn note(&self, workload: &str, decision_id: &str, now_ms: u64) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if !recent.contains_key(workload) && recent.len() >= CITED_WORKLOADS {
            let oldest = recent
                .iter()
                .min_by_key(|(_, (seen, _))| *seen)
                .map(|(w, _)| w.clone());
            if let Some(oldest) = oldest {
                recent.remove(&oldest);
            }
        }
        let (seen, ids) = recent.entry(workload.to_string()).or_default();
        *seen = now_ms;
        if ids.len() >= CITED_PER_WORKLOAD {
            ids.pop_front();
        }
        ids.push_back(decision_id.to_string());
    }

    /// The decision ids to cite for `workload`, newest first.
    fn cited(&self, workload: &str) -> Vec<String> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(workload)
            .map(|(_, ids)| ids.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    fn emit(&self, signals: Vec<Signal>) {
        for s in signals {
            let decision_ids = self.cited(&s.workload);
            self.metrics.anomaly_signal(s.kind.as_str());
            tracing::warn!(kind = s.kind.as_str(), workload = %s.workload, observed_as = s.observed_as.as_str(), score = s.score, "anomaly signal");
            let kept = self.queue.push(nexus_proto::control::Signal {
                kind: s.kind.as_str().to_string(),
                workload: s.workload,
                observed_as: s.observed_as.as_str().to_string(),
                score: s.score,
                evidence_json: serde_json::Value::Object(s.evidence).to_string(),
                time_unix_ms: s.time_ms,
                decision_ids,
            });
            if !kept {
                self.metrics.signals_dropped(1);
            }
        }
    }

    /// A TLS/authentication failure from a peer (`None`: it presented no usable ID).
    pub fn auth_failure(&self, peer: Option<&str>, reason: &str) {
        self.emit(self.detectors.on_auth_failure(peer, reason, unix_ms()));
    }

    /// A sandbox violation of this sidecar's own workload.
    pub fn sandbox_violation(&self, workload: &str, syscall: &str, action: &str) {
        self.emit(
            self.detectors
                .on_sandbox_violation(workload, syscall, action, unix_ms()),
        );
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct WatchLayer {
    watch: Arc<AnomalyWatch>,
    workload: Arc<str>,
    observed: Observed,
}

impl WatchLayer {
    /// (egress, ingress) of the watched workload from (request, response) bytes:
    /// inbound, what the peer took out of the app here; outbound, all this workload
    /// moved (see the module's documentation).
    fn directions(&self, request: u64, response: u64) -> (u64, u64) {
        match self.observed {
            Observed::Peer => (response, request),
            Observed::Own => (request.saturating_add(response), response),
        }
    }
}

impl WatchLayer {
    /// Watches `workload` (the peer inbound, this workload outbound).
    pub fn new(watch: Arc<AnomalyWatch>, workload: Arc<str>, observed: Observed) -> Self {
        Self {
            watch,
            workload,
            observed,
        }
    }
}

impl<S: Next<CountedBody<B>>, B> Step<S, B> for WatchLayer {
    type Body = CountedBody<B>;

    fn call(&self, req: Request<B>, next: &mut S) -> AnswerFuture {
        let sent = Arc::new(AtomicU64::new(0));
        let (mut parts, body) = req.into_parts();
        let exchange = Exchange::attach(&mut parts.extensions);
        let req = Request::from_parts(parts, TappedBody::new(body, sent.clone()));
        let future = next.call(req);
        let layer = self.clone();
        Box::pin(async move {
            let answer = future.await;
            let outcome = exchange.settle(&answer);
            let mut report = Report {
                layer,
                exchange,
                sent,
                received: 0,
                allowed: match &answer {
                    // The app's own 403 is a refusal of the workload's request too.
                    Ok(response) => response.status() != http::StatusCode::FORBIDDEN,
                    Err(_) => !outcome.is_denial(),
                },
            };
            match answer {
                Ok(response) => Ok(response.map(|body| ObservedBody::boxed(body, report))),
                // The rescue answers with this body at once: the exchange ends here.
                Err(refusal) => {
                    report.received = refusal.body().len() as u64;
                    Err(refusal)
                }
            }
        })
    }
}

/// A request body whose bytes are counted.
pub type CountedBody<B> = TappedBody<B, Arc<AtomicU64>>;

struct Report {
    layer: WatchLayer,
    exchange: Arc<Exchange>,
    sent: Arc<AtomicU64>,
    received: u64,
    allowed: bool,
}

/// The response body's bytes are the ingress; dropping the report (at the end of the
/// body, or when it is dropped early) feeds the detectors.
impl EndObserver for Report {
    fn data(&mut self, data: &Bytes) {
        self.received += data.len() as u64;
    }

    fn end(self, _complete: bool) {}
}

impl Drop for Report {
    fn drop(&mut self) {
        // What the policy said, when it was evaluated.
        let decision = self
            .exchange
            .decision()
            .filter(|decision| decision.verdict.evaluated());
        let (bytes_out, bytes_in) = self
            .layer
            .directions(self.sent.load(Ordering::Relaxed), self.received);
        let event = RequestEvent {
            workload: &self.layer.workload,
            observed_as: self.layer.observed,
            allowed: self.allowed,
            clause: decision.and_then(|d| d.clause.as_deref()),
            clause_bound: decision.and_then(|d| d.bound),
            bytes_out,
            bytes_in,
        };
        let now = unix_ms();
        if let Some(decision) = decision {
            self.layer
                .watch
                .note(&self.layer.workload, &decision.id, now);
        }
        let loaded = self.layer.watch.loaded();
        let budget = loaded
            .as_ref()
            .and_then(|l| l.budgets.get(&*self.layer.workload));
        let signals = self.layer.watch.detectors.on_request(&event, budget, now);
        if !signals.is_empty() {
            self.layer.watch.emit(signals);
        }
    }
}
