use std::time::Duration;

use nexus_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::Channel;

use super::*;

const ID: &str = "spiffe://nexus.local/ns/plugins/sa/flood-model";

struct Running {
    api: DevWorkloadApi,
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), WorkloadApiError>>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn stop(mut self) -> Result<(), WorkloadApiError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("the server stops within 10s")
            .expect("the server task does not panic")
    }
}

fn config(ttl: Duration) -> DevWorkloadApiConfig {
    let partner = pem_certs(super::super::EMBEDDED_PARTNER_CA_CERT_PEM);
    DevWorkloadApiConfig {
        spiffe_id: ID.into(),
        dns_names: Vec::new(),
        ca: DevCa::embedded().unwrap(),
        ttl,
        federated_bundles: BTreeMap::from([("partner.example".to_owned(), partner)]),
    }
}

fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

async fn start(ttl: Duration) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let api = DevWorkloadApi::new(config(ttl)).unwrap();
    // Bound before the task starts, so clients can connect at once.
    let listener = bind_socket(&socket).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = {
        let api = api.clone();
        let socket = socket.clone();
        tokio::spawn(async move {
            let result = api
                .serve_with_listener(listener, async {
                    let _ = stopped.await;
                })
                .await;
            let _ = std::fs::remove_file(&socket);
            result
        })
    };
    Running {
        api,
        socket,
        stop: Some(stop),
        task,
        _dir: dir,
    }
}

async fn raw_client(socket: &Path) -> SpiffeWorkloadApiClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("unix:{}", socket.display()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    SpiffeWorkloadApiClient::new(channel)
}

fn with_header<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(SECURITY_HEADER, "true".parse().unwrap());
    request
}

fn serial(der: &[u8]) -> Vec<u8> {
    x509_parser::parse_x509_certificate(der)
        .unwrap()
        .1
        .raw_serial()
        .to_vec()
}

#[tokio::test]
async fn the_spiffe_crate_client_gets_the_svid_and_bundles() {
    let running = start(Duration::from_secs(3600)).await;
    let client =
        spiffe::WorkloadApiClient::connect_to(format!("unix:{}", running.socket.display()))
            .await
            .unwrap();
    let context = client.fetch_x509_context().await.unwrap();
    let svid = context.default_svid().unwrap();
    assert_eq!(svid.spiffe_id().to_string(), ID);
    assert_eq!(
        svid.leaf().as_bytes(),
        running.api.current_svid().cert_der.as_slice()
    );
    let bundles = context.bundle_set();
    let nexus = bundles
        .get(&spiffe::TrustDomain::new("nexus.local").unwrap())
        .unwrap();
    assert_eq!(
        nexus.authorities()[0].as_bytes(),
        DevCa::embedded().unwrap().cert_der().as_ref()
    );
    assert!(
        bundles
            .get(&spiffe::TrustDomain::new("partner.example").unwrap())
            .is_some()
    );
    let only_bundles = client.fetch_x509_bundles().await.unwrap();
    assert_eq!(only_bundles.len(), 2);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn requests_without_the_security_header_are_refused() {
    let running = start(Duration::from_secs(3600)).await;
    let mut client = raw_client(&running.socket).await;

    let status = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "security header missing from request");
    let status = client
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut wrong = Request::new(X509svidRequest {});
    wrong
        .metadata_mut()
        .insert(SECURITY_HEADER, "yes".parse().unwrap());
    let status = client.fetch_x509svid(wrong).await.err().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);

    // JWT: the header is checked first, then the RPC is unimplemented.
    let status = client
        .fetch_jwtsvid(JwtsvidRequest::default())
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = client
        .fetch_jwtsvid(with_header(JwtsvidRequest::default()))
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::Unimplemented);
    let status = client
        .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::Unimplemented);
    let status = client
        .validate_jwtsvid(with_header(ValidateJwtsvidRequest::default()))
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::Unimplemented);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn open_streams_see_a_rotation_and_bundles_are_not_resent_for_it() {
    let running = start(Duration::from_secs(3600)).await;
    let mut client = raw_client(&running.socket).await;
    let mut svids = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let mut bundles = client
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();

    let first = svids.message().await.unwrap().unwrap();
    let svid = &first.svids[0];
    assert_eq!(svid.spiffe_id, ID);
    let ca = DevCa::embedded().unwrap();
    assert_eq!(svid.bundle, ca.cert_der().as_ref());
    assert_eq!(
        first.federated_bundles.keys().collect::<Vec<_>>(),
        ["partner.example"]
    );
    // The key is the leaf's PKCS#8 key.
    let key = rcgen::KeyPair::try_from(svid.x509_svid_key.as_slice()).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&svid.x509_svid).unwrap();
    assert_eq!(
        leaf.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
    );
    let first_bundles = bundles.message().await.unwrap().unwrap();
    let mut names: Vec<_> = first_bundles.bundles.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["nexus.local", "partner.example"]);

    running.api.rotate_now().unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), svids.message())
        .await
        .expect("a rotation is pushed")
        .unwrap()
        .unwrap();
    assert_ne!(
        serial(&first.svids[0].x509_svid),
        serial(&second.svids[0].x509_svid)
    );
    assert_eq!(
        serial(&second.svids[0].x509_svid),
        serial(&running.api.current_svid().cert_der)
    );
    // The bundles did not change, so the bundle stream stays quiet.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), bundles.message())
            .await
            .is_err()
    );
    running.stop().await.unwrap();
}

#[tokio::test]
async fn rotates_at_half_life() {
    let running = start(Duration::from_secs(2)).await;
    let mut client = raw_client(&running.socket).await;
    let mut svids = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = svids.message().await.unwrap().unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), svids.message())
        .await
        .expect("rotated at half-life (1s)")
        .unwrap()
        .unwrap();
    assert_ne!(
        serial(&first.svids[0].x509_svid),
        serial(&second.svids[0].x509_svid)
    );
    running.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_serve_removes_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    // A stale socket file from an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = {
        let socket = socket.clone();
        tokio::spawn(async move {
            serve(&socket, config(Duration::from_secs(3600)), async {
                let _ = stopped.await;
            })
            .await
        })
    };
    let mut client = None;
    for _ in 0..200 {
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("unix:{}", socket.display())).unwrap();
        if let Ok(channel) = endpoint.connect().await {
            client = Some(SpiffeWorkloadApiClient::new(channel));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = client.expect("the server is up within 10s");
    let mut svids = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    svids.message().await.unwrap().unwrap();

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("serve returns promptly")
        .unwrap()
        .unwrap();
    // The stream ended (cleanly or with the connection), it did not hang.
    let end = tokio::time::timeout(Duration::from_secs(5), svids.message())
        .await
        .expect("the stream ends");
    assert!(!matches!(end, Ok(Some(_))));
    assert!(!socket.exists());
}

#[tokio::test]
async fn bind_refuses_what_it_must_not_replace() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "data").unwrap();
    assert!(matches!(
        bind_socket(&file),
        Err(WorkloadApiError::Socket { .. })
    ));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");

    let live = dir.path().join("live.sock");
    let _listener = bind_socket(&live).unwrap();
    assert!(matches!(
        bind_socket(&live),
        Err(WorkloadApiError::Socket { .. })
    ));
    let missing_dir = dir.path().join("nope/agent.sock");
    let err = bind_socket(&missing_dir).err().unwrap().to_string();
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn configuration_errors_are_explained() {
    let mut own = config(Duration::from_secs(60));
    own.federated_bundles.insert(
        "nexus.local".into(),
        pem_certs(super::super::EMBEDDED_CA_CERT_PEM),
    );
    assert!(matches!(
        DevWorkloadApi::new(own),
        Err(WorkloadApiError::Config(_))
    ));
    assert!(matches!(
        DevWorkloadApi::new(config(Duration::from_millis(500))),
        Err(WorkloadApiError::Config(_))
    ));
    let mut bad_td = config(Duration::from_secs(60));
    bad_td
        .federated_bundles
        .insert("Not A Domain".into(), Vec::new());
    assert!(matches!(
        DevWorkloadApi::new(bad_td),
        Err(WorkloadApiError::Config(_))
    ));
    let mut bad_id = config(Duration::from_secs(60));
    bad_id.spiffe_id = "spiffe://nexus.local".into();
    assert!(matches!(
        DevWorkloadApi::new(bad_id),
        Err(WorkloadApiError::Ca(DevCaError::InvalidSpiffeId { .. }))
    ));
}
