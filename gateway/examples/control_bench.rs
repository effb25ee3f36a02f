//! Control-stream benchmark (release build, real processes, loopback only):
//!
//! 1. starts `nexus-gateway` (SQLite) with development identities;
//! 2. opens N real control streams from this process (each its own mTLS connection and
//!    gRPC stream, hello, acks every delta) and measures the gateway's RSS before and
//!    after (idle streams);
//! 3. makes R revocations through the admin API, each waiting for every stream's ack:
//!    the call's round trip (revoke call -> last acknowledgement) and the gateway's own
//!    figure (call arrival -> last ack), p50/p99;
//! 4. registers G plugin versions in the gateway's registry (signed with a bench
//!    publisher key) and certifies each as a reviewer, waiting for every stream's ack:
//!    the propagation of a registry change (a binding delta, docs/registry.md) measured
//!    like a revocation's, p50/p99;
//! 5. starts a real `nexus-sidecar` on the same gateway and measures, over C cycles,
//!    the time from the revoke call until that sidecar refuses a request from the
//!    revoked workload (then reinstates it).
//!
//! `cargo run --release -p nexus-gateway --example control_bench -- [N ...]`
//! (default N = 100 1000; env REVOCATIONS=50, CERTIFICATIONS=50, CYCLES=20). Prints
//! Markdown tables.
//!
//! `CONSOLE_HOLD=FILE`: once the streams are open, write the gateway's address, store
//! and an operator's SVID files to FILE (JSON) and wait until `FILE.done` exists, so a
//! console can be measured against a gateway with N real sidecar streams
//! (bench/console_scale.py).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_dev_identity::DevCa;
use nexus_identity::tls::{TlsVersions, client_config, grpc_channel};
use nexus_identity::{AllowList, Bundles, IdentityStore, Svid};
use nexus_proto::control::admin_client::AdminClient;
use nexus_proto::control::control_client::ControlClient;
use nexus_proto::control::{
    Ack, Hello, PluginVersionRequest, RegisterPluginRequest, ReinstateRequest, RevokeRequest,
    SidecarMessage, gateway_message, sidecar_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const GATEWAY_ID: &str = "spiffe://nexus.local/ns/nexus/sa/gateway";
const OPERATOR_ID: &str = "spiffe://nexus.local/ns/nexus/sa/operator";
const SIDECAR_ID: &str = "spiffe://nexus.local/ns/bench/sa/sidecar";
const PLUGIN_ID: &str = "spiffe://nexus.local/ns/plugins/sa/flood-model";
const DATA_ID: &str = "spiffe://nexus.local/ns/data/sa/hazard-api";
const REVIEWER_ID: &str = "spiffe://nexus.local/ns/bench/sa/reviewer";

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn store_for(ca: &DevCa, id: &str) -> Result<Arc<IdentityStore>> {
    let svid = ca.mint_svid(id, Duration::from_secs(3600))?;
    let store = IdentityStore::new(Arc::new(rustls::crypto::ring::default_provider()));
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(svid.key_pkcs8_der.clone().into());
    let mut bundles = Bundles::default();
    bundles.0.insert("nexus.local".into(), ca.bundle().to_vec());
    store.publish(
        Svid {
            chain: vec![svid.cert_der.clone().into()],
            key,
        },
        &bundles,
    )?;
    Ok(store)
}

fn write_svid(ca: &DevCa, id: &str, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
    let svid = ca.mint_svid(id, Duration::from_secs(3600))?;
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &svid.cert_pem)?;
    std::fs::write(&key, svid.key_pem.as_bytes())?;
    Ok((cert, key))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str(&text)
        {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("{} never appeared", path.display()).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One control stream that acknowledges everything; returns when the stream ends.
async fn stream_client(
    store: Arc<IdentityStore>,
    address: String,
    ready: mpsc::Sender<()>,
) -> Result<()> {
    let expected = AllowList::parse(&[GATEWAY_ID])?;
    let channel = grpc_channel(store, expected, &address, Duration::from_secs(30)).await?;
    let (tx, rx) = mpsc::channel::<SidecarMessage>(16);
    tx.send(SidecarMessage {
        msg: Some(sidecar_message::Msg::Hello(Hello {
            spiffe_id: SIDECAR_ID.into(),
            last_revision: 0,
            version: "bench".into(),
            policy: Some(nexus_proto::control::PolicyStatus {
                revision: "sha256:0123456789abcdef".into(),
                ..Default::default()
            }),
            registry: true,
        })),
    })
    .await?;
    let mut inbound = ControlClient::new(channel)
        .stream(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let _ = ready.send(()).await;
    while let Some(msg) = inbound.message().await? {
        let revision = match msg.msg {
            Some(gateway_message::Msg::Delta(d)) => d.revision,
            Some(gateway_message::Msg::Snapshot(s)) => s.revision,
            _ => continue,
        };
        tx.send(SidecarMessage {
            msg: Some(sidecar_message::Msg::Ack(Ack {
                revision,
                ..Ack::default()
            })),
        })
        .await?;
    }
    Ok(())
}

struct Row {
    streams: usize,
    rss_base_kib: u64,
    rss_streams_kib: u64,
    call_ms: Vec<f64>,
    gateway_ms: Vec<f64>,
    certify_call_ms: Vec<f64>,
    certify_gateway_ms: Vec<f64>,
    refuse_ms: Vec<f64>,
}

async fn run(
    streams: usize,
    revocations: usize,
    certifications: usize,
    cycles: usize,
    bins: &Path,
) -> Result<Row> {
    let dir = tempfile::tempdir()?;
    let ca = DevCa::embedded()?;
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(&ca_pem, ca.cert_pem())?;
    let (gcert, gkey) = write_svid(&ca, GATEWAY_ID, dir.path(), "gateway")?;
    let (dcert, dkey) = write_svid(&ca, DATA_ID, dir.path(), "data")?;
    let addrs = dir.path().join("gateway.json");
    let config = dir.path().join("gateway.toml");
    let publisher = nexus_identity::cosign::SigningKey::generate()?;
    let publisher_pub = dir.path().join("publisher.pub");
    std::fs::write(&publisher_pub, publisher.public_key().to_pem())?;
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\noperators = [{OPERATOR_ID:?}]\nreviewers = [{REVIEWER_ID:?}]\nsidecars = [{SIDECAR_ID:?}, {DATA_ID:?}]\ndata_sidecars = [{DATA_ID:?}]\n\n[identity]\nsource = \"files\"\nfiles = {{ cert = {gcert:?}, key = {gkey:?}, bundle = {ca_pem:?} }}\n\n[admin]\nlisten = \"127.0.0.1:0\"\naddress_file = {addrs:?}\n\n[database]\nurl = \"sqlite://{}\"\n\n[registry]\n[[registry.publishers]]\nname = \"bench\"\nkey = {publisher_pub:?}\n",
            dir.path().join("gateway.db").display()
        ),
    )?;
    let gateway = Killed(
        Command::new(bins.join("nexus-gateway"))
            .arg("--config")
            .arg(&config)
            .env("NEXUS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("gateway.log"))?)
            .spawn()?,
    );
    let grpc = read_json(&addrs)?["grpc"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_base_kib = rss_kib(gateway.0.id());

    let sidecar_store = store_for(&ca, SIDECAR_ID)?;
    let (ready_tx, mut ready_rx) = mpsc::channel(streams.max(1));
    for _ in 0..streams {
        tokio::spawn(stream_client(
            sidecar_store.clone(),
            grpc.clone(),
            ready_tx.clone(),
        ));
    }
    for _ in 0..streams {
        ready_rx.recv().await.ok_or("a stream failed to open")?;
    }
    let operator = store_for(&ca, OPERATOR_ID)?;
    let mut admin = AdminClient::new(
        grpc_channel(
            operator,
            AllowList::parse(&[GATEWAY_ID])?,
            &grpc,
            Duration::from_secs(10),
        )
        .await?,
    );
    if let Ok(hold) = std::env::var("CONSOLE_HOLD") {
        let (ocert, okey) = write_svid(&ca, OPERATOR_ID, dir.path(), "operator")?;
        let info = serde_json::json!({
            "grpc": grpc,
            "gateway_id": GATEWAY_ID,
            "cert": ocert,
            "key": okey,
            "ca": ca_pem,
            "db": dir.path().join("gateway.db"),
            "sidecar_id": SIDECAR_ID,
        });
        std::fs::write(&hold, info.to_string())?;
        let done = PathBuf::from(format!("{hold}.done"));
        while !done.exists() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Let the streams settle, then measure idle RSS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_streams_kib = rss_kib(gateway.0.id());

    let mut call_ms = Vec::new();
    let mut gateway_ms = Vec::new();
    for i in 0..revocations {
        let started = Instant::now();
        let r = admin
            .revoke(RevokeRequest {
                subject: format!("spiffe://nexus.local/ns/bench/sa/w{i}"),
                reason: "bench".into(),
                ttl_ms: 0,
                wait_ms: 10_000,
            })
            .await?
            .into_inner();
        let took = started.elapsed();
        if r.all_acknowledged_after_us == 0 || r.acknowledged as usize != streams {
            return Err(format!(
                "revocation {i}: {} of {} acknowledged",
                r.acknowledged, r.sidecars
            )
            .into());
        }
        call_ms.push(took.as_secs_f64() * 1000.0);
        gateway_ms.push(r.all_acknowledged_after_us as f64 / 1000.0);
    }

    // Registry changes: each certification binds a version's clause at every stream
    // (the versions run as the streams' own workload, so each stream is sent the
    // binding, not an empty delta).
    let reviewer = store_for(&ca, REVIEWER_ID)?;
    let mut reviewer = AdminClient::new(
        grpc_channel(
            reviewer,
            AllowList::parse(&[GATEWAY_ID])?,
            &grpc,
            Duration::from_secs(10),
        )
        .await?,
    );
    let mut certify_call_ms = Vec::new();
    let mut certify_gateway_ms = Vec::new();
    for i in 0..certifications {
        let repo = "bench.example/plugins/model";
        let digest = nexus_identity::cosign::sha256_digest(format!("bench image {i}").as_bytes());
        let payload = nexus_identity::cosign::image_payload(repo, &digest);
        let version = format!("1.0.{i}");
        admin
            .register_plugin(RegisterPluginRequest {
                name: "bench-model".into(),
                publisher: "bench".into(),
                license_tier: "public-good".into(),
                version: version.clone(),
                image: format!("{repo}@{digest}"),
                spiffe_id: SIDECAR_ID.into(),
                clauses: vec![format!("c-bench-{i}")],
                signature: publisher.sign(payload.as_bytes())?,
                payload,
                ..RegisterPluginRequest::default()
            })
            .await?;
        let started = Instant::now();
        let r = reviewer
            .certify_plugin(PluginVersionRequest {
                plugin: "bench-model".into(),
                version,
                wait_ms: 10_000,
            })
            .await?
            .into_inner();
        let took = started.elapsed();
        let p = r.propagation.unwrap_or_default();
        if p.all_acknowledged_after_us == 0 || p.acknowledged as usize != streams {
            return Err(format!(
                "certification {i}: {} of {} acknowledged",
                p.acknowledged, p.sidecars
            )
            .into());
        }
        certify_call_ms.push(took.as_secs_f64() * 1000.0);
        certify_gateway_ms.push(p.all_acknowledged_after_us as f64 / 1000.0);
    }

    // A real sidecar on the same gateway, in front of the demo data API.
    let app_addrs = dir.path().join("app.json");
    let _app = Killed(
        Command::new(bins.join("nexusctl"))
            .args([
                "dev",
                "data-api",
                "--listen",
                "127.0.0.1:0",
                "--address-file",
            ])
            .arg(&app_addrs)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let app = read_json(&app_addrs)?["http"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let side_addrs = dir.path().join("sidecar.json");
    let side_config = dir.path().join("sidecar.toml");
    std::fs::write(
        &side_config,
        format!(
            "[identity]\nsource = \"files\"\nfiles = {{ cert = {dcert:?}, key = {dkey:?}, bundle = {ca_pem:?} }}\n\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = {app:?}\nallowed_ids = [\"spiffe://nexus.local/ns/plugins/*\"]\n\n[admin]\nlisten = \"127.0.0.1:0\"\naddress_file = {side_addrs:?}\n\n[gateway]\naddress = {grpc:?}\nidentity = {GATEWAY_ID:?}\nsnapshot_file = {:?}\n",
            dir.path().join("snapshot.json")
        ),
    )?;
    let _sidecar = Killed(
        Command::new(bins.join("nexus-sidecar"))
            .arg("--config")
            .arg(&side_config)
            .env("NEXUS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("sidecar.log"))?)
            .spawn()?,
    );
    let inbound = read_json(&side_addrs)?["inbound"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let plugin = store_for(&ca, PLUGIN_ID)?;
    let tls = client_config(
        plugin,
        AllowList::parse(&[DATA_ID])?,
        TlsVersions::Tls13Only,
        Vec::new(),
    )?;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let url: http::Uri = format!("https://{inbound}/healthz").parse()?;
    let ok = |client: &hyper_util::client::legacy::Client<_, _>| {
        let fut = client.get(url.clone());
        async move {
            matches!(tokio::time::timeout(Duration::from_secs(2), fut).await, Ok(Ok(r)) if r.status() == 200)
        }
    };
    // Wait for the sidecar to be up and in sync (it is stream N+1).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok(&client).await {
        if Instant::now() > deadline {
            return Err("the sidecar never answered".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut refuse_ms = Vec::new();
    for _ in 0..cycles {
        let started = Instant::now();
        let mut caller = admin.clone();
        let call = tokio::spawn(async move {
            caller
                .revoke(RevokeRequest {
                    subject: PLUGIN_ID.into(),
                    reason: "bench".into(),
                    ttl_ms: 0,
                    wait_ms: 0,
                })
                .await
                .map(|_| ())
        });
        let refused = loop {
            if !ok(&client).await {
                break started.elapsed();
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err("the sidecar never refused the revoked workload".into());
            }
        };
        call.await??;
        refuse_ms.push(refused.as_secs_f64() * 1000.0);
        admin
            .reinstate(ReinstateRequest {
                subject: PLUGIN_ID.into(),
                wait_ms: 10_000,
                ..Default::default()
            })
            .await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok(&client).await {
            if Instant::now() > deadline {
                return Err("never allowed again after reinstatement".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    drop(gateway);
    Ok(Row {
        streams,
        rss_base_kib,
        rss_streams_kib,
        call_ms,
        gateway_ms,
        certify_call_ms,
        certify_gateway_ms,
        refuse_ms,
    })
}

fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut counts: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    if counts.is_empty() {
        counts = vec![100, 1000];
    }
    let revocations: usize = std::env::var("REVOCATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let certifications: usize = std::env::var("CERTIFICATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let cycles: usize = std::env::var("CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let bins = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .map(Path::to_path_buf)
        .ok_or("no target dir")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for n in counts {
        eprintln!(
            "control_bench: {n} streams, {revocations} revocations, {certifications} certifications, {cycles} sidecar cycles ..."
        );
        rows.push(runtime.block_on(run(n, revocations, certifications, cycles, &bins))?);
    }
    println!(
        "| streams | revoke -> all acked, call p50 / p99 ms | gateway-measured p50 / p99 ms | revoke -> real sidecar refuses p50 / p99 ms | gateway RSS idle / with streams MiB | RSS per stream KiB |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &mut rows {
        for v in [
            &mut r.call_ms,
            &mut r.gateway_ms,
            &mut r.certify_call_ms,
            &mut r.certify_gateway_ms,
            &mut r.refuse_ms,
        ] {
            v.sort_by(|a, b| a.total_cmp(b));
        }
    }
    for r in &rows {
        let per =
            (r.rss_streams_kib.saturating_sub(r.rss_base_kib)) as f64 / r.streams.max(1) as f64;
        println!(
            "| {} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {:.1} / {:.1} | {:.1} |",
            r.streams,
            percentile(&r.call_ms, 0.5),
            percentile(&r.call_ms, 0.99),
            percentile(&r.gateway_ms, 0.5),
            percentile(&r.gateway_ms, 0.99),
            percentile(&r.refuse_ms, 0.5),
            percentile(&r.refuse_ms, 0.99),
            r.rss_base_kib as f64 / 1024.0,
            r.rss_streams_kib as f64 / 1024.0,
            per
        );
    }
    println!();
    println!(
        "| streams | change | call → all acked p50 / p99 ms | gateway-measured p50 / p99 ms |"
    );
    println!("|---|---|---|---|");
    for r in &rows {
        for (what, call, gateway) in [
            ("revocation", &r.call_ms, &r.gateway_ms),
            (
                "registry: certify (binding delta)",
                &r.certify_call_ms,
                &r.certify_gateway_ms,
            ),
        ] {
            println!(
                "| {} | {what} | {:.2} / {:.2} | {:.2} / {:.2} |",
                r.streams,
                percentile(call, 0.5),
                percentile(call, 0.99),
                percentile(gateway, 0.5),
                percentile(gateway, 0.99),
            );
        }
    }
    Ok(())
}
