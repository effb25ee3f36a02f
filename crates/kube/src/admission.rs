//! The mutating admission webhook's one function: an `admission.k8s.io/v1` AdmissionReview
//! in, the HTTP status and JSON body to answer with out. The gateway serves it over HTTPS
//! at `/inject`; this module does no I/O.
//!
//! Every answer the API server can act on is a 200 AdmissionReview: a JSONPatch, allowed
//! without a patch (other kinds, opted out, already injected; with a warning where the
//! webhook's rules look wrong), or denied with the fix in the message. Only a body that is
//! not an AdmissionReview gets a 4xx (400 malformed, 413 too large) with `{"error": ...}`.
//! Nothing here returns a 5xx.

use kube::core::admission::{
    AdmissionRequest, AdmissionResponse, AdmissionReview, META_API_VERSION_V1, META_KIND, Operation,
};
use kube::core::{DynamicObject, Status};
use serde_json::Value;

use crate::config::InjectConfig;
use crate::inject::{self, Outcome};

/// `(HTTP status, JSON body)`.
pub type Answer = (u16, Vec<u8>);

/// Answers one AdmissionReview (the request body of a webhook call).
pub fn review(body: &[u8], cfg: &InjectConfig) -> Answer {
    review_plugin(body, cfg, None)
}

/// [`review`] for a plugin pod the registry admitted as `plugin`: the injected pod also
/// carries that version ([`inject::mark_plugin`]).
pub fn review_plugin(
    body: &[u8],
    cfg: &InjectConfig,
    plugin: Option<&inject::PluginRun>,
) -> Answer {
    if body.len() > cfg.max_review_bytes {
        return error(
            413,
            &format!(
                "AdmissionReview of {} bytes is larger than max_review_bytes ({})",
                body.len(),
                cfg.max_review_bytes
            ),
        );
    }
    let (request, object) = match parse(body) {
        Ok(parsed) => parsed,
        Err(message) => return error(400, &message),
    };
    let response = respond(&request, object, cfg, plugin);
    encode(response)
}

/// Parses the review; the pod stays raw JSON so fields this crate does not model survive.
fn parse(body: &[u8]) -> Result<(AdmissionRequest<DynamicObject>, Option<Value>), String> {
    let mut doc: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let api_version = doc.get("apiVersion").and_then(Value::as_str);
    let kind = doc.get("kind").and_then(Value::as_str);
    if kind != Some(META_KIND) || api_version != Some(META_API_VERSION_V1) {
        return Err(format!(
            "expected kind {META_KIND} apiVersion {META_API_VERSION_V1}, got kind {} apiVersion {} \
             (set admissionReviewVersions: [v1] in the webhook configuration)",
            kind.unwrap_or("(none)"),
            api_version.unwrap_or("(none)")
        ));
    }
    let object = doc
        .get_mut("request")
        .and_then(|r| r.get_mut("object"))
        .map(Value::take)
        .filter(|o| !o.is_null());
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_value(doc).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    let request: AdmissionRequest<DynamicObject> = review
        .try_into()
        .map_err(|_| "the AdmissionReview has no `request`".to_string())?;
    Ok((request, object))
}

fn respond(
    request: &AdmissionRequest<DynamicObject>,
    object: Option<Value>,
    cfg: &InjectConfig,
    plugin: Option<&inject::PluginRun>,
) -> AdmissionResponse {
    let allowed = AdmissionResponse::from(request);
    let kind = &request.kind;
    let resource = &request.resource;
    let is_pod = kind.group.is_empty()
        && kind.version == "v1"
        && kind.kind == "Pod"
        && resource.resource == "pods"
        && request.sub_resource.as_deref().unwrap_or("").is_empty();
    if !is_pod {
        let what = if kind.group.is_empty() {
            format!("{}/{}", kind.version, kind.kind)
        } else {
            format!("{}/{}/{}", kind.group, kind.version, kind.kind)
        };
        let sub = request
            .sub_resource
            .as_deref()
            .map(|s| format!(" (subresource {s})"))
            .unwrap_or_default();
        return warn(
            allowed,
            format!(
                "nexus injection handles v1 Pods only; {what}{sub} was allowed unchanged: \
                 check the webhook's rules"
            ),
        );
    }
    if request.operation != Operation::Create {
        return warn(
            allowed,
            "nexus injection applies when a pod is created; allowed unchanged".into(),
        );
    }
    let Some(original) = object else {
        return warn(
            allowed,
            "the review carries no pod; allowed unchanged".into(),
        );
    };
    let mut pod = original.clone();
    let injected = inject::inject_pod(&mut pod, cfg).and_then(|outcome| {
        if let Some(plugin) = plugin {
            inject::mark_plugin(&mut pod, plugin)?;
        }
        Ok(outcome)
    });
    match injected {
        Ok(Outcome::AlreadyInjected) if pod != original => {
            let patch = json_patch::diff(&original, &pod);
            match allowed.clone().with_patch(patch) {
                Ok(patched) => patched,
                Err(e) => deny(allowed, format!("nexus injection failed: {e}")),
            }
        }
        Ok(Outcome::Injected { .. }) => {
            let patch = json_patch::diff(&original, &pod);
            match allowed.clone().with_patch(patch) {
                Ok(patched) => patched,
                // Unreachable in practice (a patch of JSON values always serializes); deny
                // rather than admit an uninjected pod into a Nexus namespace.
                Err(e) => deny(allowed, format!("nexus injection failed: {e}")),
            }
        }
        Ok(Outcome::AlreadyInjected | Outcome::OptedOut) => allowed,
        Err(e) => deny(
            allowed,
            format!("nexus sidecar injection refused the pod: {e}"),
        ),
    }
}

fn warn(mut response: AdmissionResponse, warning: String) -> AdmissionResponse {
    response.warnings.get_or_insert_with(Vec::new).push(warning);
    response
}

fn deny(response: AdmissionResponse, message: String) -> AdmissionResponse {
    let mut response = response.deny(&message);
    response.result = Status::failure(&message, "Invalid").with_code(400);
    response
}

/// Serializes the answer. kube's `AdmissionResponse` would write `patch` as an array of
/// numbers (kube-rs issue #1781); the API's JSON form of Go's `[]byte` is a base64
/// string, so the patch is taken out and written here.
fn encode(mut response: AdmissionResponse) -> Answer {
    let patch = response.patch.take();
    let mut doc = match serde_json::to_value(response.into_review()) {
        Ok(doc) => doc,
        Err(e) => return error(400, &format!("cannot encode the answer: {e}")),
    };
    if let Some(patch) = patch
        && let Some(Value::Object(r)) = doc.get_mut("response")
    {
        r.insert(
            "patch".into(),
            Value::String(data_encoding::BASE64.encode(&patch)),
        );
    }
    match serde_json::to_vec(&doc) {
        Ok(body) => (200, body),
        Err(e) => error(400, &format!("cannot encode the answer: {e}")),
    }
}

fn error(status: u16, message: &str) -> Answer {
    let body = serde_json::to_vec(&serde_json::json!({ "error": message }))
        .unwrap_or_else(|_| b"{\"error\":\"unencodable error\"}".to_vec());
    (status, body)
}

/// Decodes an answer's JSONPatch (base64 in `response.patch`); `None` when there is none.
/// For tests and tooling.
pub fn answer_patch(answer_body: &[u8]) -> Option<json_patch::Patch> {
    let doc: Value = serde_json::from_slice(answer_body).ok()?;
    let encoded = doc.pointer("/response/patch")?.as_str()?;
    let raw = data_encoding::BASE64.decode(encoded.as_bytes()).ok()?;
    serde_json::from_slice(&raw).ok()
}

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
