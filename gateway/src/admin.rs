//! The operators' API (gRPC `Admin`, on the mTLS listener) and the HTTP admin listener
//! (`/live`, `/ready`, `/metrics`). Every Admin call needs a caller whose certificate's
//! SPIFFE ID is on `operators`; others get PERMISSION_DENIED, counted and logged.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nexus_identity::{AllowList, IdentityStore};
use nexus_proto::control::admin_server::Admin;
use nexus_proto::control::{
    ChangeResponse, CloseExecutionRequest, ExecutionInfo, ListExecutionsRequest,
    ListExecutionsResponse, ListSignalsRequest, ListSignalsResponse, OpenExecutionRequest,
    ReinstateRequest, RevokeRequest, Signal, SignalEvidenceRequest, SignalEvidenceResponse,
    StatusRequest, StatusResponse, StoredSignal,
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::changes::Changes;
use crate::server::PeerInfo;
use crate::store::Backend;

/// The Admin service.
pub struct AdminService {
    changes: Arc<Changes>,
    operators: AllowList,
}

impl AdminService {
    /// With the configured operators.
    pub fn new(changes: Arc<Changes>) -> Result<Self, String> {
        let operators = AllowList::parse(&changes.config.operators).map_err(|e| e.to_string())?;
        Ok(Self { changes, operators })
    }

    fn operator<T>(&self, request: &Request<T>, call: &str) -> Result<String, Status> {
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        if self.operators.allows(&peer.spiffe_id) {
            Ok(peer.spiffe_id.clone())
        } else {
            self.changes.metrics.admin_denied();
            tracing::warn!(caller = %peer.spiffe_id, addr = %peer.addr, call, "admin call refused: not an operator");
            Err(Status::permission_denied(format!(
                "{} is not an operator of this gateway (config `operators`)",
                peer.spiffe_id
            )))
        }
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn revoke(
        &self,
        request: Request<RevokeRequest>,
    ) -> Result<Response<ChangeResponse>, Status> {
        let started = Instant::now();
        let actor = self.operator(&request, "revoke")?;
        let r = request.into_inner();
        let response = self
            .changes
            .revoke(
                &r.subject,
                &r.reason,
                ms(r.ttl_ms),
                &actor,
                started,
                ms(r.wait_ms),
            )
            .await?;
        tracing::warn!(subject = %r.subject, by = %actor, reason = %r.reason, revision = response.revision, "revoked");
        Ok(Response::new(response))
    }

    async fn reinstate(
        &self,
        request: Request<ReinstateRequest>,
    ) -> Result<Response<ChangeResponse>, Status> {
        let started = Instant::now();
        let actor = self.operator(&request, "reinstate")?;
        let r = request.into_inner();
        let response = self
            .changes
            .reinstate(&r.subject, &actor, started, ms(r.wait_ms))
            .await?;
        tracing::info!(subject = %r.subject, by = %actor, revision = response.revision, "reinstated");
        Ok(Response::new(response))
    }

    async fn open_execution(
        &self,
        request: Request<OpenExecutionRequest>,
    ) -> Result<Response<ChangeResponse>, Status> {
        let started = Instant::now();
        let actor = self.operator(&request, "open_execution")?;
        let r = request.into_inner();
        let response = self
            .changes
            .open(
                &r.plugin,
                &r.clause,
                ms(r.ttl_ms),
                &actor,
                started,
                ms(r.wait_ms),
            )
            .await?;
        tracing::info!(id = %response.id, plugin = %r.plugin, clause = %r.clause, by = %actor, "execution opened");
        Ok(Response::new(response))
    }

    async fn close_execution(
        &self,
        request: Request<CloseExecutionRequest>,
    ) -> Result<Response<ChangeResponse>, Status> {
        let started = Instant::now();
        let actor = self.operator(&request, "close_execution")?;
        let r = request.into_inner();
        let response = self
            .changes
            .close(
                &r.id,
                &format!("closed by {actor}"),
                &actor,
                started,
                ms(r.wait_ms),
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn list_executions(
        &self,
        request: Request<ListExecutionsRequest>,
    ) -> Result<Response<ListExecutionsResponse>, Status> {
        self.operator(&request, "list_executions")?;
        let list = self
            .changes
            .store
            .executions(request.get_ref().include_closed)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(ListExecutionsResponse {
            executions: list
                .into_iter()
                .map(|e| ExecutionInfo {
                    execution: Some(e.execution),
                    opened_revision: e.opened_revision,
                    closed_revision: e.closed_revision,
                    close_reason: e.close_reason,
                })
                .collect(),
        }))
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        self.operator(&request, "status")?;
        let changes = &self.changes;
        let hub = &changes.hub;
        // The other replicas' fresh rows (PostgreSQL); this replica's view is live, and
        // is still shown when the store cannot be read (an outage is when it matters).
        let mut warnings = Vec::new();
        let others = match changes.store.backend() {
            Backend::Sqlite => Vec::new(),
            Backend::Postgres => {
                let stale_ms =
                    u64::try_from(changes.config.database.status_stale_after.as_millis())
                        .unwrap_or(0);
                let since = crate::changes::unix_ms().saturating_sub(stale_ms);
                match changes.store.replicas(since, &changes.instance).await {
                    Ok(others) => others,
                    Err(error) => {
                        tracing::warn!(%error, "status: cannot read the other replicas");
                        warnings.push(format!(
                            "only this replica ({}) is shown: cannot read the other replicas from the store: {error}",
                            changes.config.name
                        ));
                        Vec::new()
                    }
                }
            }
        };
        let merged = crate::replicas::merge(crate::replicas::local(changes), others);
        Ok(Response::new(StatusResponse {
            gateway: changes.config.name.clone(),
            revision: hub.revision(),
            sidecars: merged.sidecars,
            revoked: hub.revoked(),
            last_revocation: merged.last_revocation,
            replicas: merged.replicas,
            warnings,
            open_executions: u32::try_from(hub.executions().len()).unwrap_or(u32::MAX),
            store: match self.changes.store.backend() {
                Backend::Sqlite => "sqlite".into(),
                Backend::Postgres => "postgres".into(),
            },
        }))
    }

    async fn list_signals(
        &self,
        request: Request<ListSignalsRequest>,
    ) -> Result<Response<ListSignalsResponse>, Status> {
        self.operator(&request, "list_signals")?;
        let mut r = request.into_inner();
        if !r.workload.is_empty() {
            r.workload = nexus_identity::canonical_id(&r.workload)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let limit = if r.limit == 0 {
            100
        } else {
            r.limit.min(10_000)
        };
        let list = self
            .changes
            .store
            .signals(
                (!r.workload.is_empty()).then_some(r.workload.as_str()),
                i64::try_from(r.since_unix_ms).unwrap_or(0),
                i64::from(limit),
            )
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(ListSignalsResponse {
            signals: list.into_iter().map(stored_signal).collect(),
        }))
    }

    async fn signal_evidence(
        &self,
        request: Request<SignalEvidenceRequest>,
    ) -> Result<Response<SignalEvidenceResponse>, Status> {
        self.operator(&request, "signal_evidence")?;
        let id = request.into_inner().id;
        let store = &self.changes.store;
        let signal = store
            .signal(&id)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| {
                Status::not_found(format!("no signal {id}: list them with `nexusctl signals`"))
            })?;
        let cited: Vec<String> = serde_json::from_str(&signal.decision_ids).unwrap_or_default();
        // The records the reporter shipped: what the signal rests on (a signal is
        // judged by its reporter's own records, docs/threat-model.md).
        let found = store
            .record_lines(&signal.reporter, &cited)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut records = Vec::new();
        let mut missing = Vec::new();
        for id in &cited {
            match found.iter().find(|(d, _)| d == id) {
                Some((_, line)) => records.push(line.clone()),
                None => missing.push(id.clone()),
            }
        }
        Ok(Response::new(SignalEvidenceResponse {
            signal: Some(stored_signal(signal)),
            records,
            missing,
        }))
    }
}

fn stored_signal(s: crate::store::StoredSignal) -> StoredSignal {
    StoredSignal {
        id: s.id,
        reporter: s.reporter,
        signal: Some(Signal {
            kind: s.kind,
            workload: s.workload,
            observed_as: s.observed_as,
            score: s.score,
            evidence_json: s.evidence,
            time_unix_ms: u64::try_from(s.time_ms).unwrap_or(0),
            decision_ids: serde_json::from_str(&s.decision_ids).unwrap_or_default(),
        }),
        received_unix_ms: u64::try_from(s.received_ms).unwrap_or(0),
        action: s.action,
        reasons: serde_json::from_str(&s.reasons).unwrap_or_default(),
        verification_json: s.verification,
    }
}

/// Serves `/live`, `/ready` (identity present and the store answering) and `/metrics`.
pub async fn serve_http(listener: TcpListener, changes: Arc<Changes>, store: Arc<IdentityStore>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let changes = changes.clone();
        let identity = store.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let changes = changes.clone();
                let identity = identity.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/live" => (200, "live\n".to_string()),
                        "/ready" => {
                            let store_ok = changes.store.revision().await.is_ok();
                            match (identity.is_ready(), store_ok) {
                                (true, true) => (200, "ready\n".to_string()),
                                (false, _) => (503, "not ready: no SVID yet\n".to_string()),
                                (_, false) => {
                                    (503, "not ready: the store does not answer\n".to_string())
                                }
                            }
                        }
                        "/metrics" => (200, changes.metrics.encode()),
                        _ => (404, "not found\n".to_string()),
                    };
                    let mut response = http::Response::new(Full::new(Bytes::from(body)));
                    *response.status_mut() =
                        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
