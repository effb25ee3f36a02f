//! The operators' API (gRPC `Admin`, on the mTLS listener) and the HTTP admin listener
//! (`/live`, `/ready`, `/metrics`). Every Admin call needs a caller whose certificate's
//! SPIFFE ID is on `operators`; others get PERMISSION_DENIED, counted and logged.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use nexus_identity::{AllowList, IdentityStore};
use nexus_proto::control::admin_server::Admin;
use nexus_proto::control::{
    BindPluginRequest, ExportPluginsRequest, ExportPluginsResponse, ImportPluginsRequest,
    ListPluginsRequest, ListPluginsResponse, PluginVersionRequest, RegisterPluginRequest,
    RegistryResponse, RetirePluginRequest,
};
use nexus_proto::control::{
    ChangeResponse, CloseExecutionRequest, ExecutionInfo, ListExecutionsRequest,
    ListExecutionsResponse, ListRecordsRequest, ListRecordsResponse, ListSignalsRequest,
    ListSignalsResponse, OpenExecutionRequest, ReinstateRequest, RevokeRequest, Signal,
    SignalEvidenceRequest, SignalEvidenceResponse, StatusRequest, StatusResponse, StoredSignal,
    WatchEvent, WatchRequest, WatchState, watch_event,
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
    reviewers: AllowList,
    viewers: AllowList,
}

impl AdminService {
    /// With the configured operators, reviewers and viewers.
    pub fn new(changes: Arc<Changes>) -> Result<Self, String> {
        let operators = AllowList::parse(&changes.config.operators).map_err(|e| e.to_string())?;
        let reviewers = AllowList::parse(&changes.config.reviewers).map_err(|e| e.to_string())?;
        let viewers = AllowList::parse(&changes.config.viewers).map_err(|e| e.to_string())?;
        Ok(Self {
            changes,
            operators,
            reviewers,
            viewers,
        })
    }

    /// The caller, if it is on `reviewers` (certification is theirs, not operators').
    fn reviewer<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        if self.reviewers.allows(&peer.spiffe_id) {
            Ok(peer.spiffe_id.clone())
        } else {
            self.changes.metrics.admin_denied();
            tracing::warn!(caller = %peer.spiffe_id, addr = %peer.addr, "certify refused: not a reviewer");
            Err(Status::permission_denied(format!(
                "{} is not a reviewer of this gateway (config `reviewers`): only reviewers certify plugin versions",
                peer.spiffe_id
            )))
        }
    }

    /// The caller of a read-only call (Watch): an operator or a viewer; `true` for an
    /// operator.
    fn watcher<T>(&self, request: &Request<T>) -> Result<(String, bool), Status> {
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        if self.operators.allows(&peer.spiffe_id) {
            Ok((peer.spiffe_id.clone(), true))
        } else if self.viewers.allows(&peer.spiffe_id) {
            Ok((peer.spiffe_id.clone(), false))
        } else {
            self.changes.metrics.admin_denied();
            tracing::warn!(caller = %peer.spiffe_id, addr = %peer.addr, call = "watch", "admin call refused: neither an operator nor a viewer");
            Err(Status::permission_denied(format!(
                "{} is neither an operator nor a viewer of this gateway (config `operators`, `viewers`)",
                peer.spiffe_id
            )))
        }
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
        tracing::info!(subject = %r.subject, by = %actor, reason = %r.reason, revision = response.revision, "reinstated");
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
                &r.plugin_version,
                &r.clause,
                ms(r.ttl_ms),
                &actor,
                started,
                ms(r.wait_ms),
            )
            .await?;
        tracing::info!(id = %response.id, plugin = %r.plugin, clause = %r.clause, by = %actor, reason = %r.reason, "execution opened");
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
                &if r.reason.is_empty() {
                    format!("closed by {actor}")
                } else {
                    format!("closed by {actor}: {}", r.reason)
                },
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

    async fn register_plugin(
        &self,
        request: Request<RegisterPluginRequest>,
    ) -> Result<Response<RegistryResponse>, Status> {
        let started = Instant::now();
        let actor = self.operator(&request, "register_plugin")?;
        let r = request.into_inner();
        let (name, version) = (r.name.clone(), r.version.clone());
        let response = self.changes.register_plugin(r, &actor, started).await?;
        tracing::info!(plugin = %name, %version, by = %actor, revision = response.revision, "plugin version registered");
        Ok(Response::new(response))
    }

    async fn certify_plugin(
        &self,
        request: Request<PluginVersionRequest>,
    ) -> Result<Response<RegistryResponse>, Status> {
        let started = Instant::now();
        let actor = self.reviewer(&request)?;
        let r = request.into_inner();
        let response = self
            .changes
            .certify_plugin(&r.plugin, &r.version, &actor, started, ms(r.wait_ms))
            .await?;
        tracing::warn!(plugin = %r.plugin, version = %r.version, by = %actor, "plugin version certified");
        Ok(Response::new(response))
    }

    async fn retire_plugin(
        &self,
        request: Request<RetirePluginRequest>,
    ) -> Result<Response<RegistryResponse>, Status> {
        let started = Instant::now();
        let actor = self.operator(&request, "retire_plugin")?;
        let r = request.into_inner();
        let response = self
            .changes
            .retire_plugin(
                &r.plugin,
                &r.version,
                &r.reason,
                &actor,
                started,
                ms(r.wait_ms),
            )
            .await?;
        tracing::warn!(plugin = %r.plugin, version = %r.version, by = %actor, reason = %r.reason, "plugin version retired");
        Ok(Response::new(response))
    }

    async fn bind_plugin(
        &self,
        request: Request<BindPluginRequest>,
    ) -> Result<Response<RegistryResponse>, Status> {
        let started = Instant::now();
        let actor = self.operator(&request, "bind_plugin")?;
        let r = request.into_inner();
        let response = self.changes.bind_plugin(&r, true, &actor, started).await?;
        Ok(Response::new(response))
    }

    async fn unbind_plugin(
        &self,
        request: Request<BindPluginRequest>,
    ) -> Result<Response<RegistryResponse>, Status> {
        let started = Instant::now();
        let actor = self.operator(&request, "unbind_plugin")?;
        let r = request.into_inner();
        let response = self.changes.bind_plugin(&r, false, &actor, started).await?;
        Ok(Response::new(response))
    }

    async fn verify_plugin(
        &self,
        request: Request<PluginVersionRequest>,
    ) -> Result<Response<RegistryResponse>, Status> {
        self.operator(&request, "verify_plugin")?;
        let r = request.into_inner();
        Ok(Response::new(
            self.changes.verify_plugin(&r.plugin, &r.version).await?,
        ))
    }

    async fn list_plugins(
        &self,
        request: Request<ListPluginsRequest>,
    ) -> Result<Response<ListPluginsResponse>, Status> {
        self.operator(&request, "list_plugins")?;
        let r = request.into_inner();
        let plugins = if r.plugin.is_empty() {
            self.changes
                .store
                .plugins(None)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?
        } else {
            vec![self.changes.find_plugin(&r.plugin).await?]
        };
        Ok(Response::new(ListPluginsResponse { plugins }))
    }

    async fn export_plugins(
        &self,
        request: Request<ExportPluginsRequest>,
    ) -> Result<Response<ExportPluginsResponse>, Status> {
        self.operator(&request, "export_plugins")?;
        let bundle = self
            .changes
            .export_plugins(&request.get_ref().plugins)
            .await?;
        Ok(Response::new(ExportPluginsResponse { bundle }))
    }

    async fn import_plugins(
        &self,
        request: Request<ImportPluginsRequest>,
    ) -> Result<Response<RegistryResponse>, Status> {
        let started = Instant::now();
        let actor = self.operator(&request, "import_plugins")?;
        let response = self
            .changes
            .import_plugins(&request.get_ref().bundle, &actor, started)
            .await?;
        tracing::warn!(by = %actor, revision = response.revision, notes = ?response.notes, "plugin bundle imported");
        Ok(Response::new(response))
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
            signals: list.iter().map(signal_to_proto).collect(),
        }))
    }

    async fn list_records(
        &self,
        request: Request<ListRecordsRequest>,
    ) -> Result<Response<ListRecordsResponse>, Status> {
        self.watcher(&request)?;
        let r = request.into_inner();
        let valid = !r.execution_id.is_empty()
            && r.execution_id.len() <= 128
            && r.execution_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
        if !valid {
            return Err(Status::invalid_argument(
                "execution_id: an execution id ([A-Za-z0-9._:-], at most 128 bytes)",
            ));
        }
        let limit = match r.limit {
            0 => 1000,
            n => n.min(10_000),
        };
        let mut lines = self
            .changes
            .store
            .records_of_execution(&r.execution_id, i64::from(limit) + 1)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let truncated = lines.len() > limit as usize;
        lines.truncate(limit as usize);
        Ok(Response::new(ListRecordsResponse { lines, truncated }))
    }

    type WatchStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<WatchEvent, Status>> + Send + 'static>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (caller, operator) = self.watcher(&request)?;
        let limit = match request.get_ref().signals {
            0 => 1000,
            n => n.min(10_000),
        };
        let changes = self.changes.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<WatchEvent, Status>>(64);
        tracing::info!(%caller, operator, "watch started");
        tokio::spawn(async move {
            // Subscribed before the state is read: an event in both is applied twice,
            // which the watcher's model makes harmless (upserts, revision order).
            let mut events = changes.hub.watch();
            loop {
                let state = match watch_state(&changes, &caller, operator, limit).await {
                    Ok(state) => state,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let event = WatchEvent {
                    event: Some(watch_event::Event::State(state)),
                };
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
                loop {
                    match events.recv().await {
                        Ok(event) => {
                            if tx.send(Ok((*event).clone())).await.is_err() {
                                return;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                            tracing::info!(%caller, missed, "watcher fell behind: sending the state again");
                            events = events.resubscribe();
                            break;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn signal_evidence(
        &self,
        request: Request<SignalEvidenceRequest>,
    ) -> Result<Response<SignalEvidenceResponse>, Status> {
        // Read-only, like ListRecords: viewers see what a signal rests on.
        self.watcher(&request)?;
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
            signal: Some(signal_to_proto(&signal)),
            records,
            missing,
        }))
    }
}

async fn watch_state(
    changes: &Arc<Changes>,
    caller: &str,
    operator: bool,
    signals: u32,
) -> Result<WatchState, Status> {
    let hub = &changes.hub;
    // Read in the order that keeps the state no newer than the events that follow.
    let snapshot = hub.snapshot();
    let sidecars = hub.sidecar_streams();
    let propagations = hub
        .propagations()
        .iter()
        .map(crate::replicas::to_proto)
        .collect();
    let stored = changes
        .store
        .signals(None, 0, i64::from(signals))
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let rates = hub.rates();
    let plugins = changes
        .store
        .plugins(None)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let baselines = crate::baselines::Fleet::new(changes.clone())
        .all()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?
        .baselines;
    Ok(WatchState {
        plugins,
        baselines,
        rates,
        gateway: changes.config.name.clone(),
        revision: snapshot.revision,
        sidecars,
        revoked: snapshot.revoked,
        executions: snapshot.executions,
        propagations,
        signals: stored.iter().map(signal_to_proto).collect(),
        operator,
        caller: caller.to_string(),
        store: match changes.store.backend() {
            Backend::Sqlite => "sqlite".into(),
            Backend::Postgres => "postgres".into(),
        },
    })
}

/// The wire form of a stored signal.
pub(crate) fn signal_to_proto(s: &crate::store::StoredSignal) -> StoredSignal {
    StoredSignal {
        id: s.id.clone(),
        reporter: s.reporter.clone(),
        signal: Some(Signal {
            kind: s.kind.clone(),
            workload: s.workload.clone(),
            observed_as: s.observed_as.clone(),
            score: s.score,
            evidence_json: s.evidence.clone(),
            time_unix_ms: u64::try_from(s.time_ms).unwrap_or(0),
            decision_ids: serde_json::from_str(&s.decision_ids).unwrap_or_default(),
        }),
        received_unix_ms: u64::try_from(s.received_ms).unwrap_or(0),
        action: s.action.clone(),
        reasons: serde_json::from_str(&s.reasons).unwrap_or_default(),
        verification_json: s.verification.clone(),
    }
}

/// How long `/ready` waits for the store before answering 503 (a kubelet probe gives
/// up after 1s by default).
const READY_STORE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the HTTP admin listener needs besides the core.
#[derive(Clone, Debug)]
pub struct HttpAdmin {
    /// Connection cap, head limits (`[admin]`).
    pub limits: nexus_serve::ConnLimits,
    /// `admin.max_connections`.
    pub max_connections: usize,
    /// `/ready` answers 503 from the first SIGTERM on.
    pub draining: nexus_serve::Readiness,
}

/// Serves `/live`, `/ready` (identity present, the store answering, not draining) and
/// `/metrics` until the drain starts.
pub async fn serve_http(
    listener: TcpListener,
    changes: Arc<Changes>,
    store: Arc<IdentityStore>,
    http: HttpAdmin,
    drain: nexus_serve::Watch,
) {
    let server = nexus_serve::http_server(&http.limits);
    let draining = http.draining.clone();
    nexus_serve::accept(
        listener,
        http.max_connections,
        drain,
        "admin",
        move |tcp, _addr, drain| {
            let changes = changes.clone();
            let identity = store.clone();
            let server = server.clone();
            let draining = draining.clone();
            async move {
                let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let changes = changes.clone();
                    let identity = identity.clone();
                    let draining = draining.clone();
                    async move {
                        let (status, body) = match req.uri().path() {
                            "/live" => (200, "live\n".to_string()),
                            "/ready" if draining.is_draining() => (
                                503,
                                "not ready: draining (shutting down; limits.drain_delay, then limits.shutdown_grace)\n"
                                    .to_string(),
                            ),
                            "/ready" => {
                                // A store that does not answer is a probe failure now,
                                // not after the pool's own connection wait.
                                let store_ok = tokio::time::timeout(
                                    READY_STORE_TIMEOUT,
                                    changes.store.revision(),
                                )
                                .await
                                .is_ok_and(|r| r.is_ok());
                                match (identity.is_ready(), store_ok) {
                                    (true, true) => (200, "ready\n".to_string()),
                                    (false, _) => (503, "not ready: no SVID yet\n".to_string()),
                                    (_, false) => (
                                        503,
                                        "not ready: the store does not answer (within 1s)\n".to_string(),
                                    ),
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
                if let Err(error) =
                    nexus_serve::serve_connection(&server, tcp, service, drain).await
                {
                    tracing::debug!(%error, "admin connection ended with an error");
                }
            }
        },
    )
    .await;
}
