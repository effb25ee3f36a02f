//! Wiring: identity source, listeners, metrics. `start` binds everything and returns the
//! bound addresses, so tests and `nexusctl up` can use port 0.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use nexus_identity::IdentityStore;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::admin::Admin;
use crate::config::{Config, IdentitySource};
use crate::metrics::Metrics;
use crate::policy::PolicyRuntime;
use crate::proxy::audit::Audit;
use crate::proxy::inbound::Inbound;
use crate::proxy::outbound::Outbound;
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
    /// OpenTelemetry export, when `[telemetry] otlp_endpoint` is set: flush it on exit.
    pub telemetry: Option<Telemetry>,
    /// Execution records, when `[audit]` is set: flush them on exit.
    pub audit: Option<Arc<Audit>>,
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

    match config.identity.source {
        IdentitySource::WorkloadApi => {
            tokio::spawn(nexus_identity::source::workload_api::run(
                config.identity.workload_api_socket.clone(),
                store.clone(),
            ));
        }
        IdentitySource::Files => {
            let files = config.identity.files.clone().ok_or_else(|| {
                anyhow::anyhow!("identity.files is required with source = \"files\"")
            })?;
            tokio::spawn(nexus_identity::source::files::run(
                files,
                store.clone(),
                config.identity.file_reload_interval,
            ));
        }
    }
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

    let policy = match &config.policy {
        Some(policy_config) => {
            let runtime = PolicyRuntime::new(policy_config.clone(), metrics.clone());
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

    let admin_listener = bind(config.admin.listen, "admin").await?;
    let mut addresses = Addresses {
        admin: admin_listener.local_addr()?,
        inbound: None,
        outbound: BTreeMap::new(),
    };
    if let Some(inbound) = &config.inbound {
        let listener = bind(inbound.listen, "inbound").await?;
        addresses.inbound = Some(listener.local_addr()?);
        let proxy = Arc::new(
            Inbound::new(&config, store.clone(), metrics.clone(), policy.clone())?
                .with_telemetry(telemetry.as_ref())
                .with_audit(audit.as_ref()),
        );
        tokio::spawn(proxy.serve(listener));
    }
    for out in &config.outbound {
        let listener = bind(out.listen, &format!("outbound {}", out.name)).await?;
        addresses
            .outbound
            .insert(out.name.clone(), listener.local_addr()?);
        let proxy = Arc::new(
            Outbound::new(&config, out, store.clone(), metrics.clone(), policy.clone())?
                .with_telemetry(telemetry.as_ref(), out)
                .with_audit(audit.as_ref()),
        );
        tokio::spawn(proxy.serve(listener));
    }
    tokio::spawn(
        Admin {
            store: store.clone(),
            metrics,
            policy,
        }
        .serve(admin_listener),
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
        telemetry,
        audit,
    })
}

/// Starts and runs until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let running = start(config).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    if let Some(audit) = &running.audit {
        audit.shutdown().await;
    }
    if let Some(telemetry) = &running.telemetry {
        telemetry.shutdown().await;
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
