//! Wiring: identity, store, hub, the mTLS gRPC listener (Control + Admin), the HTTP
//! admin listener, the expiry and cross-replica catch-up loops.

use std::net::SocketAddr;
use std::sync::Arc;

use nexus_identity::tls::{TlsVersions, server_config};
use nexus_identity::{AllowList, IdentityStore};
use nexus_proto::control::admin_server::AdminServer;
use nexus_proto::control::control_server::ControlServer;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

use crate::admin::AdminService;
use crate::changes::Changes;
use crate::config::Config;
use crate::control::ControlService;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::signals::Signals;
use crate::store::Store;

/// Where a started gateway listens.
#[derive(Clone, Debug, Serialize)]
pub struct Addresses {
    /// mTLS gRPC (control streams, admin API).
    pub grpc: SocketAddr,
    /// HTTP admin (`/live`, `/ready`, `/metrics`).
    pub admin: SocketAddr,
    /// The admission webhook (HTTPS), if configured.
    pub webhook: Option<SocketAddr>,
}

/// A started gateway.
pub struct Running {
    /// Bound addresses.
    pub addresses: Addresses,
    /// The core, for in-process tests.
    pub changes: Arc<Changes>,
    /// Every listener's drain (see [`nexus_serve`]).
    pub drain: nexus_serve::Drain,
}

/// Who may complete a TLS handshake: the listed sidecars and operators, nobody else
/// (each service then checks its own list).
fn tls_allow(config: &Config) -> anyhow::Result<AllowList> {
    let mut entries: Vec<String> = config.sidecars.clone();
    entries.extend(config.operators.iter().cloned());
    entries.extend(config.reviewers.iter().cloned());
    Ok(AllowList::parse(&entries)?)
}

/// Starts everything in the background and returns the addresses.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let identity = IdentityStore::new(provider);
    nexus_identity::source::spawn(&config.identity, identity.clone())
        .map_err(anyhow::Error::msg)?;
    let metrics = Metrics::new();
    let store = Arc::new(
        Store::open(&config.database.url, config.database.max_connections)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot open the store {}: {e}",
                    crate::config::redact_url(&config.database.url)
                )
            })?,
    );
    let hub = Hub::load(
        &store,
        config.stream.delta_log,
        config.baselines.max_workloads as usize,
        metrics.clone(),
        config.registry.is_some(),
    )
    .await?;
    let evictor = match &config.eviction {
        Some(eviction) => Some(Arc::new(
            nexus_kube::PodEvictor::new(eviction).map_err(|e| anyhow::anyhow!("eviction: {e}"))?,
        )),
        None => None,
    };
    let changes = Arc::new(Changes {
        store: store.clone(),
        hub: hub.clone(),
        metrics: metrics.clone(),
        config: config.clone(),
        evictor,
        instance: crate::replicas::instance_id(&config.name),
    });
    let signals = Signals::new(changes.clone()).map_err(anyhow::Error::msg)?;
    signals.spawn();

    // The listener needs the SVID.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut updates = identity.subscribe();
    while !identity.is_ready() {
        if tokio::time::timeout_at(deadline, updates.changed())
            .await
            .is_err()
        {
            anyhow::bail!("no SVID within 60s from the identity source");
        }
    }
    if config.sidecars.is_empty() {
        tracing::warn!(
            "`sidecars` is empty: no sidecar may open a control stream; list their SPIFFE IDs (or spiffe://td/path/* prefixes)"
        );
    }
    let allow = tls_allow(&config)?;
    let mut tls = server_config(
        identity.clone(),
        allow,
        TlsVersions::Tls13Only,
        vec![b"h2".to_vec()],
    )?;
    tls.max_early_data_size = 0;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let drain = nexus_serve::Drain::new();
    let grpc_listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (listen): {e}", config.listen))?;
    let admin_listener = TcpListener::bind(config.admin.listen).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {} (admin.listen): {e}",
            config.admin.listen
        )
    })?;
    let mut addresses = Addresses {
        grpc: grpc_listener.local_addr()?,
        admin: admin_listener.local_addr()?,
        webhook: None,
    };
    if let Some(webhook) = &config.webhook {
        let listener = TcpListener::bind(webhook.listen).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on {} (webhook.listen): {e}", webhook.listen)
        })?;
        addresses.webhook = Some(listener.local_addr()?);
        crate::webhook::serve(
            listener,
            webhook.clone(),
            changes.clone(),
            config.admin.conn(),
            drain.watch(),
        )
        .await?;
    }

    let incoming = crate::server::incoming(
        grpc_listener,
        acceptor,
        config.stream.max_streams,
        config.stream.handshake_timeout,
        metrics.clone(),
        drain.watch(),
    );
    let max = config.stream.max_message_bytes;
    let control = ControlServer::new(
        ControlService::new(changes.clone(), signals)
            .map_err(anyhow::Error::msg)?
            .with_drain(drain.watch()),
    )
    .max_decoding_message_size(max);
    let admin = AdminServer::new(AdminService::new(changes.clone()).map_err(anyhow::Error::msg)?)
        .max_decoding_message_size(
            64 * 1024
                + config
                    .registry
                    .as_ref()
                    .map_or(0, |r| r.max_bundle_bytes.saturating_mul(2)),
        );
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.stream.heartbeat_interval))
        .http2_keepalive_timeout(Some(config.stream.idle_timeout))
        // The same head limit as every other listener.
        .http2_max_header_list_size(
            u32::try_from(config.admin.max_header_bytes).unwrap_or(u32::MAX),
        )
        .add_service(control)
        .add_service(admin);
    // Held until tonic has finished its graceful shutdown (GOAWAY, then the calls in
    // flight), so the drain waits for it.
    let held = drain.watch();
    let mut stop = drain.watch();
    tokio::spawn(async move {
        if let Err(error) = router
            .serve_with_incoming_shutdown(ReceiverStream::new(incoming), async move {
                stop.signaled().await
            })
            .await
        {
            tracing::error!(%error, "gRPC server stopped");
        }
        drop(held);
    });
    tokio::spawn(crate::admin::serve_http(
        admin_listener,
        changes.clone(),
        identity.clone(),
        crate::admin::HttpAdmin {
            limits: config.admin.conn(),
            max_connections: config.admin.max_connections,
            draining: drain.readiness(),
        },
        // Open until exit: /ready answers 503 through the whole drain.
        nexus_serve::Watch::never(),
    ));

    // Changes made through other replicas (PostgreSQL): at once through LISTEN/NOTIFY,
    // and within poll_interval whatever happens to the listening connection.
    if store.backend() == crate::store::Backend::Postgres {
        // Status across replicas: this replica's view, in the store for the others.
        crate::replicas::spawn_reporter(changes.clone(), changes.instance.clone());
        let changes = changes.clone();
        let url = config.database.url.clone();
        tokio::spawn(async move {
            loop {
                match listen(&url, &changes).await {
                    Ok(()) => {}
                    Err(error) => {
                        tracing::warn!(%error, "LISTEN on the store failed; polling until it is back")
                    }
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
    }
    {
        let changes = changes.clone();
        let interval = config.database.poll_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                if let Err(error) = changes.hub.catch_up(&changes.store).await {
                    tracing::warn!(%error, "cannot read changes from the store");
                }
            }
        });
    }
    {
        let changes = changes.clone();
        let interval = config.limits.expiry_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                changes.expire().await;
            }
        });
    }
    if let Some(path) = &config.admin.address_file {
        let json = serde_json::to_vec(&addresses)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, path)?;
    }
    tracing::info!(grpc = %addresses.grpc, admin = %addresses.admin, store = %crate::config::redact_url(&config.database.url), revision = hub.revision(), "gateway listening");
    Ok(Running {
        addresses,
        changes,
        drain,
    })
}

/// Catches up on every notification from another replica's commit.
async fn listen(url: &str, changes: &Changes) -> Result<(), sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect(url).await?;
    listener.listen(crate::store::NOTIFY_CHANNEL).await?;
    // Whatever was committed while not listening.
    let _ = changes.hub.catch_up(&changes.store).await;
    loop {
        listener.recv().await?;
        if let Err(error) = changes.hub.catch_up(&changes.store).await {
            tracing::warn!(%error, "cannot read changes from the store");
        }
    }
}

/// Runs until SIGTERM or Ctrl-C, then drains (see [`nexus_serve::shutdown`]); the
/// result says whether everything in flight finished.
pub async fn run(config: Config) -> anyhow::Result<nexus_serve::Stopped> {
    // Installed before anything listens: a SIGTERM during start-up is not lost.
    let mut signals = nexus_serve::Signals::install()?;
    let timing = config.limits.shutdown();
    let running = start(config).await?;
    signals.recv().await;
    tracing::info!("gateway stopping");
    // Other replicas' status stops listing this one at once (a killed replica drops out
    // after database.status_stale_after).
    let changes = &running.changes;
    if changes.store.backend() == crate::store::Backend::Postgres
        && let Err(error) = changes.store.remove_replica(&changes.instance).await
    {
        tracing::warn!(%error, "cannot remove this replica's status row");
    }
    let stopped = nexus_serve::shutdown(&running.drain, timing, &mut signals).await;
    tracing::info!(?stopped, "gateway stopped");
    Ok(stopped)
}
