//! A development SPIFFE Workload API server: stands in for a SPIRE agent on one machine.
//!
//! It serves one identity, minted by a [`DevCa`], on a unix socket, and behaves as the
//! public Workload API specification says a SPIRE agent does: a request without the
//! `workload.spiffe.io: true` metadata header is refused with `InvalidArgument`;
//! `FetchX509SVID` and `FetchX509Bundles` are server streams that send the current state at
//! once and again on every change; the SVID is re-minted at half of its lifetime (or on
//! [`DevWorkloadApi::rotate_now`]). The state is published through a `watch` channel of
//! fully built responses, so every open stream sees a rotation, and sees it whole. JWT-SVIDs
//! are not served. Never for production: anyone who can reach the socket gets the SVID.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use nexus_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use nexus_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};
use rustls_pki_types::CertificateDer;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::ca::{DevCa, DevCaError, MintedSvid};
use super::uds_authority::AuthorityFix;

/// The metadata header every Workload API request must carry (with the value `true`); it
/// keeps a browser or a confused proxy from reaching the API by accident.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// How long connections get to close after shutdown before the server stops anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The shortest SVID lifetime the development server accepts: it rotates at half of it.
pub const MIN_TTL: Duration = Duration::from_secs(1);

/// What the development Workload API serves.
#[derive(Debug)]
pub struct DevWorkloadApiConfig {
    /// The SPIFFE ID of the one identity it hands out.
    pub spiffe_id: String,
    /// DNS SANs to add to each SVID besides the SPIFFE ID (usually none).
    pub dns_names: Vec<String>,
    /// The CA that mints the SVIDs; its trust anchor is the bundle of the SVID's trust domain.
    pub ca: DevCa,
    /// The lifetime of each SVID; it is rotated at half of it.
    pub ttl: Duration,
    /// Bundles of federated trust domains: trust domain name -> its CA certificates.
    pub federated_bundles: BTreeMap<String, Vec<CertificateDer<'static>>>,
}

/// Why the development Workload API could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadApiError {
    /// The CA could not mint the SVID.
    #[error(transparent)]
    Ca(#[from] DevCaError),
    /// The configuration is inconsistent.
    #[error("invalid development Workload API configuration: {0}")]
    Config(String),
    /// The unix socket could not be prepared or bound.
    #[error("Workload API socket {}: {reason}", path.display())]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What went wrong and what to do about it.
        reason: String,
    },
    /// The gRPC server failed.
    #[error("serving the Workload API failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A handle on a development Workload API: cheap to clone, rotates on demand, serves.
#[derive(Clone)]
pub struct DevWorkloadApi {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DevWorkloadApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let minter = &self.inner.minter;
        f.debug_struct("DevWorkloadApi")
            .field("spiffe_id", &minter.spiffe_id)
            .field("ca", &minter.ca)
            .field("ttl", &minter.ttl)
            .field("svid", &"...")
            .finish_non_exhaustive()
    }
}

struct Inner {
    minter: Minter,
    current: watch::Sender<Arc<Current>>,
}

/// Everything needed to mint the next SVID and the responses that carry it.
struct Minter {
    ca: DevCa,
    spiffe_id: String,
    dns_names: Vec<String>,
    ttl: Duration,
    own_bundle: Vec<u8>,
    federated: HashMap<String, Vec<u8>>,
    bundles: Arc<X509BundlesResponse>,
}

/// The state served right now, responses fully built before it is published.
struct Current {
    svid: MintedSvid,
    svid_response: X509svidResponse,
    bundles: Arc<X509BundlesResponse>,
    rotate_at: tokio::time::Instant,
}

impl DevWorkloadApi {
    /// Validates the configuration and mints the first SVID.
    pub fn new(config: DevWorkloadApiConfig) -> Result<Self, WorkloadApiError> {
        if config.ttl < MIN_TTL {
            return Err(WorkloadApiError::Config(format!(
                "ttl {:?} is shorter than the minimum {MIN_TTL:?}",
                config.ttl
            )));
        }
        let own_td = spiffe::SpiffeId::new(&config.spiffe_id)
            .map_err(|e| DevCaError::InvalidSpiffeId {
                id: config.spiffe_id.clone(),
                reason: e.to_string(),
            })?
            .trust_domain_name()
            .to_owned();
        let own_bundle = concat_der(config.ca.bundle());

        let mut federated = HashMap::new();
        for (name, certs) in &config.federated_bundles {
            let td = spiffe::TrustDomain::new(name).map_err(|e| {
                WorkloadApiError::Config(format!("federated trust domain {name:?}: {e}"))
            })?;
            let td = td.as_str().to_owned();
            if td == own_td {
                return Err(WorkloadApiError::Config(format!(
                    "{td} is the SVID's own trust domain, its bundle comes from the CA: \
                     federate other trust domains only"
                )));
            }
            if certs.is_empty() {
                return Err(WorkloadApiError::Config(format!(
                    "the federated bundle for {td} holds no certificate"
                )));
            }
            federated.insert(td, concat_der(certs));
        }

        let mut all = federated.clone();
        all.insert(own_td, own_bundle.clone());
        let bundles = Arc::new(X509BundlesResponse {
            crl: Vec::new(),
            bundles: all,
        });

        let minter = Minter {
            ca: config.ca,
            spiffe_id: config.spiffe_id,
            dns_names: config.dns_names,
            ttl: config.ttl,
            own_bundle,
            federated,
            bundles,
        };
        let (current, _) = watch::channel(Arc::new(minter.mint()?));
        Ok(Self {
            inner: Arc::new(Inner { minter, current }),
        })
    }

    /// Mints a new SVID now and pushes it to every open `FetchX509SVID` stream.
    pub fn rotate_now(&self) -> Result<(), WorkloadApiError> {
        let next = self.inner.minter.mint()?;
        self.inner.current.send_replace(Arc::new(next));
        Ok(())
    }

    /// The SVID served right now.
    pub fn current_svid(&self) -> MintedSvid {
        self.inner.current.borrow().svid.clone()
    }

    /// The SPIFFE ID served.
    pub fn spiffe_id(&self) -> &str {
        &self.inner.minter.spiffe_id
    }

    /// Serves on `socket_path` until `shutdown` completes: removes a stale socket file,
    /// binds, rotates at half-life, and removes the socket when done.
    pub async fn serve(
        &self,
        socket_path: &Path,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), WorkloadApiError> {
        let listener = bind_socket(socket_path)?;
        let result = self.serve_with_listener(listener, shutdown).await;
        match std::fs::remove_file(socket_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(socket = %socket_path.display(), error = %e, "could not remove the Workload API socket")
            }
        }
        result
    }

    /// Serves on an already bound listener until `shutdown` completes. Open streams end
    /// when `shutdown` completes, so the server stops promptly.
    pub async fn serve_with_listener(
        &self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), WorkloadApiError> {
        let (closing_tx, closing) = watch::channel(false);
        let mut grace_started = closing.clone();
        let _rotator = AbortOnDrop(tokio::spawn(rotate_at_half_life(self.clone())));
        let service = Service {
            inner: Arc::clone(&self.inner),
            closing,
        };
        let server = tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(service))
            .serve_with_incoming_shutdown(
                tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    |conn| conn.map(AuthorityFix::new),
                ),
                async move {
                    shutdown.await;
                    closing_tx.send_replace(true);
                },
            );
        // Open streams end at shutdown, but a client that keeps its connection open must
        // not hold the server up: after a grace period, stop regardless.
        tokio::select! {
            served = server => served?,
            () = async {
                if grace_started.wait_for(|closing| *closing).await.is_ok() {
                    tokio::time::sleep(SHUTDOWN_GRACE).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => {
                tracing::debug!("Workload API clients still connected after the shutdown grace period");
            }
        }
        Ok(())
    }
}

impl Minter {
    /// Mints a new SVID and builds the responses that carry it.
    fn mint(&self) -> Result<Current, WorkloadApiError> {
        let svid = self
            .ca
            .mint_svid_with_dns_names(&self.spiffe_id, &self.dns_names, self.ttl)?;
        let mut chain = svid.cert_der.clone();
        for intermediate in self.ca.intermediates() {
            chain.extend_from_slice(intermediate);
        }
        let svid_response = X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: self.spiffe_id.clone(),
                x509_svid: chain,
                x509_svid_key: svid.key_pkcs8_der.clone(),
                bundle: self.own_bundle.clone(),
                hint: String::new(),
            }],
            crl: Vec::new(),
            federated_bundles: self.federated.clone(),
        };
        Ok(Current {
            svid,
            svid_response,
            bundles: Arc::clone(&self.bundles),
            rotate_at: tokio::time::Instant::now() + self.ttl / 2,
        })
    }
}

/// Builds the development Workload API from `config` and serves it on `socket_path` until
/// `shutdown` completes. Use [`DevWorkloadApi`] to also rotate on demand.
pub async fn serve(
    socket_path: &Path,
    config: DevWorkloadApiConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WorkloadApiError> {
    DevWorkloadApi::new(config)?
        .serve(socket_path, shutdown)
        .await
}

/// Binds a unix listener at `path`, replacing a stale socket file left by a previous run.
/// Refuses to replace anything that is not a socket, or a socket a server still answers on.
/// The socket is made connectable by every local user, as a SPIRE agent's is.
pub fn bind_socket(path: &Path) -> Result<UnixListener, WorkloadApiError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let socket_error = |reason: String| WorkloadApiError::Socket {
        path: path.to_path_buf(),
        reason,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(socket_error(
                    "a server is still listening on it: stop it or choose another --socket".into(),
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| socket_error(format!("could not remove the stale socket: {e}")))?;
        }
        Ok(_) => {
            return Err(socket_error(
                "exists and is not a socket; refusing to replace it".into(),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_error(e.to_string())),
    }
    let listener = UnixListener::bind(path).map_err(|e| {
        let hint = if path
            .parent()
            .is_some_and(|p| !p.as_os_str().is_empty() && !p.exists())
        {
            " (its directory does not exist)"
        } else {
            ""
        };
        socket_error(format!("could not bind: {e}{hint}"))
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))
        .map_err(|e| socket_error(format!("could not make it connectable: {e}")))?;
    Ok(listener)
}

async fn rotate_at_half_life(api: DevWorkloadApi) {
    let mut current = api.inner.current.subscribe();
    loop {
        let rotate_at = current.borrow_and_update().rotate_at;
        tokio::select! {
            () = tokio::time::sleep_until(rotate_at) => match api.rotate_now() {
                Ok(()) => {
                    let svid = api.current_svid();
                    tracing::info!(spiffe_id = %api.spiffe_id(), not_after = %svid.not_after, "rotated the SVID at half-life");
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not rotate the SVID; retrying in 1s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            changed = current.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Service {
    inner: Arc<Inner>,
    closing: watch::Receiver<bool>,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Refuses a request without `workload.spiffe.io: true`, with SPIRE's status and message.
fn check_security_header<T>(request: &Request<T>) -> Result<(), Status> {
    match request.metadata().get(SECURITY_HEADER) {
        Some(value) if value.as_bytes() == b"true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

fn jwt_unimplemented() -> Status {
    Status::unimplemented(
        "the development Workload API serves X.509-SVIDs only; JWT-SVIDs are not supported",
    )
}

/// A stream of `project(current)` now and after every change, skipping `None`, ending when
/// the server closes.
fn updates<T, F>(
    current: watch::Receiver<Arc<Current>>,
    closing: watch::Receiver<bool>,
    project: F,
) -> ResponseStream<T>
where
    T: Send + 'static,
    F: FnMut(&Current) -> Option<T> + Send + 'static,
{
    let state = (current, closing, project, true);
    Box::pin(futures::stream::unfold(
        state,
        |(mut current, mut closing, mut project, mut first)| async move {
            loop {
                if *closing.borrow() {
                    return None;
                }
                if !first {
                    tokio::select! {
                        changed = current.changed() => if changed.is_err() { return None },
                        _ = closing.changed() => return None,
                    }
                }
                first = false;
                let now = Arc::clone(&current.borrow_and_update());
                if let Some(item) = project(&now) {
                    return Some((Ok(item), (current, closing, project, first)));
                }
            }
        },
    ))
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Service {
    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_security_header(&request)?;
        Ok(Response::new(updates(
            self.inner.current.subscribe(),
            self.closing.clone(),
            |current| Some(current.svid_response.clone()),
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_security_header(&request)?;
        let mut last_sent: Option<Arc<X509BundlesResponse>> = None;
        Ok(Response::new(updates(
            self.inner.current.subscribe(),
            self.closing.clone(),
            move |current| {
                if last_sent
                    .as_ref()
                    .is_some_and(|last| Arc::ptr_eq(last, &current.bundles))
                {
                    return None;
                }
                last_sent = Some(Arc::clone(&current.bundles));
                Some((*current.bundles).clone())
            },
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_security_header(&request)?;
        Err(jwt_unimplemented())
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_security_header(&request)?;
        Err(jwt_unimplemented())
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_security_header(&request)?;
        Err(jwt_unimplemented())
    }
}

fn concat_der(certs: &[CertificateDer<'_>]) -> Vec<u8> {
    certs.iter().flat_map(|c| c.iter().copied()).collect()
}

#[cfg(test)]
mod tests;
