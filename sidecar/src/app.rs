//! Wiring: identity source, listeners, metrics. `start` binds everything and returns the
//! bound addresses, so tests and `nexusctl up` can use port 0.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use nexus_identity::IdentityStore;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::admin::Admin;
use crate::config::{Config, RuntimeKind};
use crate::control::{Control, Enforcement, SignalQueue};
use crate::metrics::Metrics;
use crate::policy::PolicyRuntime;
use crate::proxy::Steps;
use crate::proxy::audit::Audit;
use crate::proxy::inbound::{self, Inbound};
use crate::proxy::outbound::{self, Outbound};
use crate::proxy::stack::{self, Proxy};
use crate::proxy::watch::AnomalyWatch;
use crate::signals::Signals;
use crate::telemetry::Telemetry;

/// Where a started sidecar listens.
#[derive(Clone, Debug, Serialize)]
pub struct Addresses {
    /// Admin listener.
    pub admin: SocketAddr,
    /// Inbound mTLS listener, if configured.
    pub inbound: Option<SocketAddr>,
    /// Outbound listeners by name.
    pub outbound: BTreeMap<String, SocketAddr>,
}

/// A started sidecar.
#[derive(Debug)]
pub struct Running {
    /// Bound addresses.
    pub addresses: Addresses,
    /// Its identity store.
    pub store: Arc<IdentityStore>,
    /// What the gateway link enforces.
    pub enforcement: Arc<Enforcement>,
    /// Signals waiting for the gateway.
    pub signals: Arc<SignalQueue>,
    /// OpenTelemetry export, when `[telemetry] otlp_endpoint` is set: flush it on exit.
    pub telemetry: Option<Telemetry>,
    /// Execution records, when `[audit]` is set: flush them on exit.
    pub audit: Option<Arc<Audit>>,
    /// Every listener's drain (see [`nexus_serve`]).
    pub drain: nexus_serve::Drain,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for {what}: {e}"))
}

/// Binds every listener, starts the identity source and serves in the background.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let store = IdentityStore::new(provider);
    let metrics = Metrics::new();
    let telemetry = Telemetry::init(&config.telemetry, metrics.clone())?;

    nexus_identity::source::spawn(&config.identity, store.clone()).map_err(anyhow::Error::msg)?;
    {
        let store = store.clone();
        let metrics = metrics.clone();
        let mut updates = store.subscribe();
        tokio::spawn(async move {
            while updates.changed().await.is_ok() {
                if let Some(identity) = store.current() {
                    metrics.svid_published(identity.not_after(), store.rotations());
                }
            }
        });
    }

    if let Some(plugin) = &config.plugin {
        tracing::info!(%plugin, "this pod runs a registry plugin version (admitted as)");
    }

    // The gateway link: revocations and executions pushed over the control stream,
    // the last snapshot kept on disk and restored before the first policy load.
    let enforcement = match &config.gateway {
        Some(gateway) => Enforcement::new(gateway.on_gateway_loss, gateway.fail_closed_after, true),
        None => Enforcement::standalone(),
    };
    metrics.gateway_link(enforcement.link().as_str());
    let policy_runtime = config
        .policy
        .as_ref()
        .map(|policy_config| PolicyRuntime::new(policy_config.clone(), metrics.clone()));
    if let Some(runtime) = &policy_runtime {
        let weak = Arc::downgrade(runtime);
        metrics.watch_policy(Box::new(move || {
            let runtime = weak.upgrade()?;
            let loaded = runtime.current()?;
            let mode = |p: &nexus_policy::Policy| match p.mode() {
                nexus_policy::EvalMode::Compiled => "compiled",
                nexus_policy::EvalMode::Interpreted => "interpreted",
                nexus_policy::EvalMode::Native => "native",
            };
            let cache_on = runtime.config().cache_max_entries > 0;
            let mut rules = vec![(
                loaded.policy.rule().to_string(),
                mode(&loaded.policy),
                cache_on && loaded.policy.cache_plan().is_ok(),
            )];
            if let Some(shadow) = &loaded.shadow {
                // The shadow rule is evaluated uncached (it is never enforced).
                rules.push((shadow.rule().to_string(), mode(shadow), false));
            }
            Some(crate::metrics::PolicyStats {
                rules,
                cache: runtime.cache().stats(),
            })
        }));
    }
    let signal_queue = Arc::new(SignalQueue::new(
        config
            .gateway
            .as_ref()
            .map(|g| g.signal_buffer)
            .unwrap_or(1),
    ));
    // The anomaly watch: on whenever there is a gateway to report to.
    let watch = config
        .gateway
        .as_ref()
        .filter(|g| g.detect_anomalies)
        .map(|_| {
            AnomalyWatch::new(
                config.anomaly.clone().unwrap_or_default(),
                signal_queue.clone(),
                metrics.clone(),
                policy_runtime.clone(),
            )
        });
    let control = config.gateway.as_ref().map(|gateway| {
        let snapshot_file = gateway
            .snapshot_file
            .clone()
            .or_else(|| config.policy.as_ref().and_then(|p| p.state_file.clone()))
            .unwrap_or_else(|| "nexus-gateway-snapshot.json".into());
        let records = match config.audit.as_ref().map(|a| &a.sink) {
            Some(nexus_audit::Sink::File { path, .. }) if gateway.ship_records => {
                Some(path.clone())
            }
            _ => None,
        };
        let control = Arc::new(Control {
            config: gateway.clone(),
            snapshot_file,
            store: store.clone(),
            enforcement: enforcement.clone(),
            policy: policy_runtime.clone(),
            metrics: metrics.clone(),
            signals: signal_queue.clone(),
            watch: watch.clone(),
            records,
            applied: std::sync::atomic::AtomicU64::new(0),
        });
        let synced = control.restore();
        (control, synced)
    });
    if let Some((control, synced)) = control {
        tokio::spawn(control.run(synced));
    }
    // Sandbox violations (POST /v1/signals from nexus-launch) feed the watch, always
    // attributed to this sidecar's own workload.
    let sandbox = Signals::new(metrics.clone(), crate::signals::DEFAULT_CAPACITY);
    if let Some(watch) = &watch {
        let watch = watch.clone();
        let sandbox = sandbox.clone();
        let store = store.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            loop {
                for received in sandbox.since(seen) {
                    seen = received.seq;
                    let me = store
                        .current()
                        .map(|i| i.spiffe_id().to_string())
                        .unwrap_or_default();
                    watch.sandbox_violation(
                        &me,
                        &received.violation.syscall,
                        &received.violation.action,
                    );
                }
                sandbox.changed().await;
            }
        });
    }

    let policy = match &config.policy {
        Some(_) => {
            let runtime = policy_runtime
                .clone()
                .ok_or_else(|| anyhow::anyhow!("policy runtime"))?;
            // The first load happens before listening, so a good policy serves from the
            // first request; a broken one leaves the sidecar not ready (denying).
            let first = runtime.clone();
            let start = tokio::task::spawn_blocking(move || first.load_initial())
                .await
                .unwrap_or_default();
            tokio::spawn(runtime.clone().watch(start));
            Some(runtime)
        }
        None => {
            tracing::warn!(
                "no [policy] configured: requests are authenticated (SPIFFE ID allow lists) but not authorized per request"
            );
            None
        }
    };

    // The records carry the sidecar's SPIFFE ID, known with the first SVID: the
    // recorder starts then (see `proxy::audit`).
    let audit = config.audit.as_ref().map(|audit_config| {
        let audit = Audit::new(audit_config.mode, metrics.clone());
        tokio::spawn(audit.clone().run(store.clone(), audit_config.clone()));
        audit
    });

    let steps = Steps {
        store: store.clone(),
        metrics: metrics.clone(),
        policy: policy.clone(),
        audit: audit.clone(),
        enforcement: enforcement.clone(),
        watch: watch.clone(),
        telemetry: telemetry.clone(),
    };
    let drain = nexus_serve::Drain::new();
    let admin_listener = bind(config.admin.listen, "admin").await?;
    let mut addresses = Addresses {
        admin: admin_listener.local_addr()?,
        inbound: None,
        outbound: BTreeMap::new(),
    };
    // Each listener has its own in-flight limit; all share the connection workers.
    let proxy = |direction| Proxy::new(&config, direction, steps.clone());
    let workers = match config.limits.runtime {
        RuntimeKind::Workers => Some(Arc::new(
            nexus_serve::Workers::start(config.limits.request_threads(), "nexus-worker")
                .map_err(|e| anyhow::anyhow!("cannot start the connection workers: {e}"))?,
        )),
        RuntimeKind::Shared => None,
    };
    if let Some(workers) = &workers {
        steps.metrics.watch_workers(workers.clone());
        if let Some(policy) = &steps.policy {
            policy.offload_slow_decisions(policy.config().max_slow_decisions);
        }
        tracing::info!(
            workers = workers.len(),
            "connections are served on connection workers (limits.runtime = \"workers\")"
        );
    }
    if let Some(inbound) = &config.inbound {
        let listener = bind(inbound.listen, "inbound").await?;
        addresses.inbound = Some(listener.local_addr()?);
        let side = Arc::new(Inbound::new(&config, proxy(inbound::DIRECTION))?);
        tokio::spawn(stack::serve(side, listener, drain.watch(), workers.clone()));
    }
    for out in &config.outbound {
        let listener = bind(out.listen, &format!("outbound {}", out.name)).await?;
        addresses
            .outbound
            .insert(out.name.clone(), listener.local_addr()?);
        let side = Arc::new(Outbound::new(&config, out, proxy(outbound::DIRECTION))?);
        tokio::spawn(stack::serve(side, listener, drain.watch(), workers.clone()));
    }
    if let Some(reports) = &config.reports {
        let token = match &reports.token_file {
            Some(path) => Some(crate::signals::write_token(path).map_err(|e| {
                anyhow::anyhow!(
                    "cannot write the report token {} (reports.token_file): {e}",
                    path.display()
                )
            })?),
            None => None,
        };
        let listener = crate::signals::bind_socket(&reports.socket).map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on the report socket {} (reports.socket): {e}",
                reports.socket.display()
            )
        })?;
        tracing::info!(socket = %reports.socket.display(), peer_uids = ?reports.peer_uids, token_file = ?reports.token_file, "violation reports accepted on the in-pod socket");
        tokio::spawn(crate::signals::serve_socket(
            listener,
            crate::signals::ReportAuth {
                peer_uids: reports.peer_uids.clone(),
                token,
            },
            sandbox.clone(),
            config.limits.conn(),
            config.limits.max_connections,
        ));
    }
    tokio::spawn(
        Admin {
            store: store.clone(),
            metrics,
            policy,
            enforcement: enforcement.clone(),
            draining: drain.readiness(),
            plugin: config.plugin.clone(),
        }
        .serve_with_signals(
            admin_listener,
            config.limits.conn(),
            config.limits.max_connections,
            // Open until exit: /ready answers 503 through the whole drain.
            nexus_serve::Watch::never(),
            sandbox,
        ),
    );
    if let Some(path) = &config.admin.address_file {
        let json = serde_json::to_vec_pretty(&addresses)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, path)?;
    }
    tracing::info!(?addresses, "nexus-sidecar listening");
    Ok(Running {
        addresses,
        store,
        enforcement,
        signals: signal_queue,
        telemetry,
        audit,
        drain,
    })
}

/// How a stopped sidecar ended, for its exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Exit {
    /// Every in-flight request finished and records and telemetry were flushed.
    Drained,
    /// `limits.shutdown_grace` ran out with requests still in flight (they were cut);
    /// records and telemetry were flushed.
    GraceExpired,
    /// A second SIGTERM/SIGINT: stopped at once, nothing more flushed.
    Forced,
}

/// Starts and runs until SIGTERM or SIGINT, then drains (see [`nexus_serve::shutdown`]).
pub async fn run(config: Config) -> anyhow::Result<Exit> {
    // Installed before anything listens: a SIGTERM during start-up is not lost.
    let mut signals = nexus_serve::Signals::install()?;
    let timing = config.limits.shutdown();
    let running = start(config).await?;
    signals.recv().await;
    tracing::info!("shutting down");
    let exit = match nexus_serve::shutdown(&running.drain, timing, &mut signals).await {
        nexus_serve::Stopped::Forced => return Ok(Exit::Forced),
        nexus_serve::Stopped::Drained => Exit::Drained,
        _ => Exit::GraceExpired,
    };
    if let Some(audit) = &running.audit {
        audit.shutdown().await;
    }
    if let Some(telemetry) = &running.telemetry {
        telemetry.shutdown().await;
    }
    tracing::info!(?exit, "stopped");
    Ok(exit)
}
