//! What happens to a request: `inbound` (mTLS from a peer to the local app) and
//! `outbound` (plain HTTP from the local app to an upstream over mTLS). Both are a stack
//! of tower layers over [`forward::Forward`], composed in one function each.

/// The `tower::Layer` half of a step of the request path: `step_layer!(XLayer => X)`
/// declares the service `X<S>` (the inner service next to a clone of the layer's
/// state) and makes `XLayer` produce it. Each step then only writes its `Service` impl.
macro_rules! step_layer {
    ($layer:ident => $service:ident) => {
        impl<S> tower::Layer<S> for $layer {
            type Service = $service<S>;
            fn layer(&self, inner: S) -> $service<S> {
                $service {
                    inner,
                    layer: self.clone(),
                }
            }
        }

        #[doc = concat!("The service of [`", stringify!($layer), "`].")]
        #[derive(Clone, Debug)]
        pub struct $service<S> {
            inner: S,
            layer: $layer,
        }
    };
}

pub mod audit;
pub mod authorize;
pub mod forward;
pub mod headers;
pub mod inbound;
pub mod layers;
pub mod normalize;
#[cfg(test)]
mod normalize_props;
pub mod observe;
pub mod outbound;
pub mod overload;
pub mod revocation;
pub mod serve;
pub mod trace;
pub mod watch;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;

/// The body every proxied response carries: streamed from the other side, or a small
/// error document made here.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// A JSON response made by the sidecar itself (errors, denials).
pub fn json_response(
    status: http::StatusCode,
    body: serde_json::Value,
) -> http::Response<ProxyBody> {
    let bytes = Bytes::from(body.to_string());
    let mut response = http::Response::new(
        http_body_util::Full::new(bytes)
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// The optional steps both directions share, set up once in `app` and handed to each
/// listener: execution records, the gateway's revocations, the anomaly watch.
#[derive(Clone, Debug)]
pub struct Steps {
    /// Makes an execution record of every request when on.
    pub audit: Option<std::sync::Arc<audit::Audit>>,
    /// Enforces the gateway's revocations (and gateway loss) on every request and
    /// connection.
    pub enforcement: std::sync::Arc<crate::control::Enforcement>,
    /// Feeds every request to the anomaly detectors when on.
    pub watch: Option<std::sync::Arc<watch::AnomalyWatch>>,
}

impl Default for Steps {
    fn default() -> Self {
        Self {
            audit: None,
            enforcement: crate::control::Enforcement::standalone(),
            watch: None,
        }
    }
}
