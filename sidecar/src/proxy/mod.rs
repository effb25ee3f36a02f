//! What happens to a request: `inbound` (mTLS from a peer to the local app) and
//! `outbound` (plain HTTP from the local app to an upstream over mTLS). Both are a stack
//! of tower layers over [`forward::Forward`], composed in one function each.

pub mod audit;
pub mod authorize;
pub mod forward;
pub mod headers;
pub mod inbound;
pub mod layers;
pub mod normalize;
pub mod outbound;
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
