//! The demo data API of `nexusctl up`: a small HTTP service that serves clause data as
//! JSON under `/clauses/{clause}/...`, as a real data API behind a Nexus sidecar would.
//! It also has what the tests need to observe the proxy from the far side: it echoes
//! the caller identity header, hashes uploaded bodies while streaming them, streams
//! slow responses, and (on a second port) serves gRPC health and reflection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::net::TcpListener;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// `nexusctl dev data-api`
#[derive(clap::Args, Debug)]
pub struct DataApiArgs {
    /// HTTP listen address (HTTP/1.1 and h2c).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Also serve gRPC (grpc.health.v1 with reflection) on this address.
    #[arg(long)]
    pub grpc_listen: Option<SocketAddr>,
    /// Write the bound addresses here as JSON (useful with port 0).
    #[arg(long)]
    pub address_file: Option<PathBuf>,
}

/// Runs the demo data API until the process is stopped.
pub async fn run(args: DataApiArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    let http_addr = listener.local_addr()?;
    let mut grpc_addr = None;
    if let Some(addr) = args.grpc_listen {
        let grpc = TcpListener::bind(addr).await?;
        grpc_addr = Some(grpc.local_addr()?);
        tokio::spawn(serve_grpc(grpc));
    }
    if let Some(path) = &args.address_file {
        let json = serde_json::json!({"http": http_addr, "grpc": grpc_addr});
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json.to_string())?;
        std::fs::rename(&tmp, path)?;
    }
    tracing::info!(%http_addr, ?grpc_addr, "demo data API listening");
    // A roomier head than the sidecar's own limit: what the sidecar lets through, plus
    // the headers it adds (XFCC, traceparent), always fits.
    let limits = nexus_serve::ConnLimits {
        max_header_bytes: 64 * 1024,
        ..nexus_serve::ConnLimits::default()
    };
    let server = nexus_serve::http_server(&limits);
    nexus_serve::accept(
        listener,
        nexus_serve::DEFAULT_MAX_CONNECTIONS,
        nexus_serve::Watch::never(),
        "data-api",
        |stream, _, drain| {
            let server = server.clone();
            async move {
                let service = hyper::service::service_fn(|req| async move {
                    Ok::<_, Infallible>(handle(req).await)
                });
                if let Err(error) =
                    nexus_serve::serve_connection(&server, stream, service, drain).await
                {
                    tracing::debug!(%error, "data API connection ended with an error");
                }
            }
        },
    )
    .await;
    Ok(())
}

async fn serve_grpc(listener: TcpListener) {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("nexus.demo", tonic_health::ServingStatus::Serving)
        .await;
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Both reflection versions: grpcurl 1.8 speaks only v1alpha.
    let (reflection, reflection_alpha) = match (builder().build_v1(), builder().build_v1alpha()) {
        (Ok(v1), Ok(alpha)) => (v1, alpha),
        (Err(error), _) | (_, Err(error)) => {
            tracing::error!(%error, "gRPC reflection unavailable");
            return;
        }
    };
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    if let Err(error) = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .serve_with_incoming(incoming)
        .await
    {
        tracing::error!(%error, "gRPC server stopped");
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn query_param(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

async fn handle(req: Request<Incoming>) -> Response<Body> {
    let caller = req
        .headers()
        .get_all("x-forwarded-client-cert")
        .iter()
        .filter_map(|v| v.to_str().ok().map(String::from))
        .collect::<Vec<_>>();
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["healthz"]) => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        (&Method::GET, ["headers"]) => {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        serde_json::Value::from(v.to_str().unwrap_or("<binary>")),
                    )
                })
                .collect();
            json(
                StatusCode::OK,
                serde_json::json!({"headers": headers, "xfcc": caller, "version": format!("{:?}", req.version())}),
            )
        }
        (&Method::GET, ["clauses", clause, rest @ ..]) => {
            let item = rest.join("/");
            // Deterministic, clause-specific demo data.
            let seed = clause
                .bytes()
                .chain(item.bytes())
                .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
            // `?n=` asks for more values (a bulk read; at most 1,000,000).
            let n = query_param(&req, "n").unwrap_or(5).min(1_000_000);
            let values: Vec<u64> = (0..n)
                .map(|i| (seed.wrapping_add(i * 7919)) % 100)
                .collect();
            json(
                StatusCode::OK,
                serde_json::json!({"clause": clause, "item": item, "values": values, "caller": caller.first(), "path": path}),
            )
        }
        (&Method::POST | &Method::PUT, ["upload", ..]) => upload(req).await,
        (&Method::GET, ["stream"]) => {
            let chunks = query_param(&req, "chunks").unwrap_or(10).min(10_000);
            let interval =
                Duration::from_millis(query_param(&req, "interval_ms").unwrap_or(100).min(10_000));
            let stream = futures::stream::iter(0..chunks).then(move |i| async move {
                if i > 0 {
                    tokio::time::sleep(interval).await;
                }
                Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{{\"chunk\":{i}}}\n"))))
            });
            let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/x-ndjson"),
            );
            response
        }
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found", "path": path}),
        ),
    }
}

/// Consumes the body frame by frame (never holding it whole) and reports its size and hash.
async fn upload(req: Request<Incoming>) -> Response<Body> {
    let mut body = req.into_body();
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    bytes += data.len() as u64;
                    context.update(data);
                }
            }
            Err(error) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": error.to_string()}),
                );
            }
        }
    }
    let sha256 = data_encoding::HEXLOWER.encode(context.finish().as_ref());
    json(
        StatusCode::OK,
        serde_json::json!({"bytes": bytes, "sha256": sha256}),
    )
}
