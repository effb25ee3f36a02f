//! The console's HTTP server (hyper, HTTP/1.1, loopback). Every request passes the
//! same gate first: a `Host` the console answers to (so a DNS-rebinding page cannot
//! reach it under its own name), no cross-site `Origin` or `Sec-Fetch-Site`, and —
//! except for the login URL and the static assets — the session cookie the printed URL
//! sets. Actions additionally carry the per-session CSRF token, need the operator role
//! and a reason. Responses forbid framing, inline script and caching.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use nexus_proto::control::{
    ChangeResponse, CloseExecutionRequest, OpenExecutionRequest, ReinstateRequest, RevokeRequest,
};

use super::html::{self, View, e};
use super::{Shared, unix_ms};
use crate::gateway_cmd::client;

type Body = BoxBody<Bytes, Infallible>;

/// Largest action form accepted.
const MAX_FORM_BYTES: usize = 16 * 1024;
/// Largest reason accepted (the gateway has its own limit, `limits.max_reason_bytes`).
const MAX_REASON_BYTES: usize = 1024;
/// Changes arriving this close together are rendered once.
const COALESCE: Duration = Duration::from_millis(100);
/// A comment line on idle event streams, so a dead connection is noticed.
const KEEPALIVE: Duration = Duration::from_secs(25);
/// How long an action waits for the sidecars' acknowledgements.
const ACTION_WAIT_MS: u64 = 3000;
const COOKIE: &str = "nexus_console";

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Serves HTTP/1.1 until the process exits: at most `max_connections` at once, with the
/// head limits of `limits` (see `nexus_serve`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    limits: nexus_serve::ConnLimits,
    max_connections: usize,
) {
    let server = nexus_serve::http_server(&limits).http1_only();
    let open = nexus_serve::Watch::never();
    nexus_serve::accept(
        listener,
        max_connections,
        open,
        "console",
        |tcp, _, drain| {
            let (shared, server) = (shared.clone(), server.clone());
            async move {
                let service = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(handle(&shared, req).await) }
                });
                if let Err(error) =
                    nexus_serve::serve_connection(&server, tcp, service, drain).await
                {
                    tracing::debug!(%error, "console connection ended with an error");
                }
            }
        },
    )
    .await;
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    secure(&mut r, content_type);
    r
}

fn secure(r: &mut Response<Body>, content_type: &str) {
    let h = r.headers_mut();
    for (k, v) in [
        (header::CONTENT_TYPE.as_str(), content_type),
        ("content-security-policy", CSP),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "same-origin"),
        ("cache-control", "no-store"),
    ] {
        if let Ok(v) = http::HeaderValue::from_str(v) {
            h.insert(k, v);
        }
    }
}

fn page(status: StatusCode, title: &str, body: &str) -> Response<Body> {
    full(status, "text/html; charset=utf-8", html::plain(title, body))
}

fn header_str<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The request gate; `Some` is the refusal.
fn gate(shared: &Shared, req: &Request<Incoming>) -> Option<Response<Body>> {
    let host = header_str(req, "host").unwrap_or("");
    if !shared.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
        return Some(full(
            StatusCode::MISDIRECTED_REQUEST,
            "text/plain; charset=utf-8",
            "this console answers only to its own address (Host header refused)\n",
        ));
    }
    if let Some(origin) = header_str(req, "origin")
        && !shared
            .hosts
            .iter()
            .any(|h| origin.eq_ignore_ascii_case(&format!("http://{h}")))
    {
        return Some(full(
            StatusCode::FORBIDDEN,
            "text/plain; charset=utf-8",
            "cross-origin request refused\n",
        ));
    }
    if header_str(req, "sec-fetch-site").is_some_and(|s| s == "cross-site") {
        return Some(full(
            StatusCode::FORBIDDEN,
            "text/plain; charset=utf-8",
            "cross-site request refused\n",
        ));
    }
    None
}

/// Constant-time comparison of two secrets.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn has_session(shared: &Shared, req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .any(|(k, v)| k == COOKIE && same(v, &shared.token))
}

fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    form_pairs(req.uri().query().unwrap_or("").as_bytes())
}

fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    body.split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let mut it = pair.splitn(2, |b| *b == b'=');
            let k = decode(it.next().unwrap_or(b""));
            let v = decode(it.next().unwrap_or(b""));
            (k, v)
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space; bad escapes kept).
fn decode(s: &[u8]) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < s.len() => {
                let mut byte = [0u8; 1];
                let hex = data_encoding::HEXLOWER_PERMISSIVE
                    .decode_mut(&s[i + 1..i + 3], &mut byte)
                    .map(|_| byte[0]);
                match hex.ok() {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn param<'a>(pairs: &'a [(String, String)], name: &str) -> &'a str {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    if let Some(refusal) = gate(shared, &req) {
        return refusal;
    }
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/assets/console.js") => {
            return full(
                StatusCode::OK,
                "text/javascript; charset=utf-8",
                include_str!("assets/console.js"),
            );
        }
        (&Method::GET, "/assets/console.css") => {
            return full(
                StatusCode::OK,
                "text/css; charset=utf-8",
                include_str!("assets/console.css"),
            );
        }
        (&Method::GET, "/login") => {
            let q = query(&req);
            if !same(param(&q, "token"), &shared.token) {
                return page(
                    StatusCode::UNAUTHORIZED,
                    "Wrong or missing token",
                    "<p>Open the URL that <code>nexusctl console</code> printed: it holds this session's token.</p>",
                );
            }
            let mut r = full(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
            if let (Ok(cookie), Ok(home)) = (
                http::HeaderValue::from_str(&format!(
                    "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
                    shared.token
                )),
                http::HeaderValue::from_str("/"),
            ) {
                r.headers_mut().insert(header::SET_COOKIE, cookie);
                r.headers_mut().insert(header::LOCATION, home);
            }
            return r;
        }
        _ => {}
    }
    if !has_session(shared, &req) {
        return page(
            StatusCode::UNAUTHORIZED,
            "Not signed in",
            "<p>Open the URL that <code>nexusctl console</code> printed: it holds this session's token.</p>",
        );
    }
    match (req.method(), path.as_str()) {
        (&Method::GET, "/events") => events(shared.clone(), &req),
        (&Method::GET, "/confirm") => confirm(shared, &req),
        (&Method::GET, "/records") => records(shared, &req).await,
        (&Method::GET, "/signal") => signal(shared, &req).await,
        (&Method::POST, "/action") => action(shared, req).await,
        (&Method::GET, p) if html::PAGES.iter().any(|(known, _)| *known == p) => {
            let q = query(&req);
            let body = {
                let model = shared.model();
                html::page(
                    &model,
                    &View {
                        path: p,
                        query: &q,
                        now: unix_ms(),
                        csrf: &shared.csrf,
                    },
                )
            };
            full(StatusCode::OK, "text/html; charset=utf-8", body)
        }
        (&Method::GET, _) => page(StatusCode::NOT_FOUND, "Not found", "<p>No such page.</p>"),
        _ => full(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "method not allowed\n",
        ),
    }
}

fn sse(html: &str) -> Bytes {
    let mut out = String::with_capacity(html.len() + 64);
    out.push_str("event: update\n");
    for line in html.split('\n') {
        out.push_str("data: ");
        out.push_str(line.trim_end_matches('\r'));
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

/// `GET /events?page=/path?query`: the page's live region now and after every change.
fn events(shared: Arc<Shared>, req: &Request<Incoming>) -> Response<Body> {
    let q = query(req);
    let target = param(&q, "page").to_string();
    let (path, page_query) = match target.split_once('?') {
        Some((p, rest)) => (p.to_string(), form_pairs(rest.as_bytes())),
        None => (target.clone(), Vec::new()),
    };
    let Some((path, _)) = html::PAGES.iter().find(|(p, _)| *p == path) else {
        return page(StatusCode::NOT_FOUND, "Not found", "<p>No such page.</p>");
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let mut version = shared.version.subscribe();
    tokio::spawn(async move {
        let render = |shared: &Shared| {
            let model = shared.model();
            sse(&html::live(
                &model,
                &View {
                    path,
                    query: &page_query,
                    now: unix_ms(),
                    csrf: &shared.csrf,
                },
            ))
        };
        version.borrow_and_update();
        if tx.send(render(&shared)).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                changed = version.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    tokio::time::sleep(COALESCE).await;
                    version.borrow_and_update();
                    if tx.send(render(&shared)).await.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep(KEEPALIVE) => {
                    if tx.send(Bytes::from_static(b": keepalive\n\n")).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    secure(&mut r, "text/event-stream");
    r
}

/// `GET /records?execution=ID`: the execution's records as the gateway stored them,
/// with the hash-chain check (asked of the gateway when the page is opened).
async fn records(shared: &Shared, req: &Request<Incoming>) -> Response<Body> {
    let q = query(req);
    let id = param(&q, "execution").to_string();
    let result = async {
        let mut c = client(&shared.target).await.map_err(|e| format!("{e:#}"))?;
        c.list_records(nexus_proto::control::ListRecordsRequest {
            execution_id: id.clone(),
            limit: 0,
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|status| format!("{}", crate::gateway_cmd::status_error(status)))
    }
    .await;
    match result {
        Ok(r) => page(
            StatusCode::OK,
            "Records",
            &html::records(&id, &r.lines, r.truncated),
        ),
        Err(why) => page(
            StatusCode::BAD_GATEWAY,
            "Records",
            &format!(
                "<p role=\"alert\" id=\"refused\">The gateway refused: {}</p>",
                e(&why)
            ),
        ),
    }
}

/// `GET /signal?id=ID`: one signal and the execution records it cites (Admin
/// `SignalEvidence`, asked of the gateway when the page is opened).
async fn signal(shared: &Shared, req: &Request<Incoming>) -> Response<Body> {
    let q = query(req);
    let id = param(&q, "id").to_string();
    let result = async {
        let mut c = client(&shared.target).await.map_err(|e| format!("{e:#}"))?;
        c.signal_evidence(nexus_proto::control::SignalEvidenceRequest { id: id.clone() })
            .await
            .map(|r| r.into_inner())
            .map_err(|status| format!("{}", crate::gateway_cmd::status_error(status)))
    }
    .await;
    match result {
        Ok(r) => page(StatusCode::OK, "Signal", &html::signal(&r)),
        Err(why) => page(
            StatusCode::BAD_GATEWAY,
            "Signal",
            &format!(
                "<p role=\"alert\" id=\"refused\">The gateway refused: {}</p><p><a href=\"/signals\">Signals</a></p>",
                e(&why)
            ),
        ),
    }
}

/// What an action names, from a query or a form.
struct Action {
    kind: String,
    subject: String,
    plugin: String,
    clause: String,
    id: String,
    ttl: String,
    reason: String,
}

impl Action {
    fn from(pairs: &[(String, String)]) -> Self {
        let p = |n| param(pairs, n).trim().to_string();
        Self {
            kind: p("action"),
            subject: p("subject"),
            plugin: p("plugin"),
            clause: p("clause"),
            id: p("id"),
            ttl: p("ttl"),
            reason: p("reason"),
        }
    }

    /// The sentence asking for confirmation, and the page to return to.
    fn describe(&self) -> Option<(String, &'static str)> {
        Some(match self.kind.as_str() {
            "revoke" => (
                format!(
                    "Revoke <code>{}</code>{}? Every sidecar will refuse it.",
                    e(&self.subject),
                    if self.ttl.is_empty() {
                        " until reinstated".to_string()
                    } else {
                        format!(" for {}", e(&self.ttl))
                    }
                ),
                "/revocations",
            ),
            "reinstate" => (
                format!("Reinstate <code>{}</code>?", e(&self.subject)),
                "/revocations",
            ),
            "open" => (
                format!(
                    "Open an execution of clause <code>{}</code> for <code>{}</code> for {}?",
                    e(&self.clause),
                    e(&self.plugin),
                    e(&self.ttl)
                ),
                "/executions",
            ),
            "close" => (
                format!("Close execution <code>{}</code>?", e(&self.id)),
                "/executions",
            ),
            _ => return None,
        })
    }
}

fn read_only(shared: &Shared) -> Option<Response<Body>> {
    let model = shared.model();
    if model.operator {
        return None;
    }
    Some(page(
        StatusCode::FORBIDDEN,
        "Read-only console",
        &format!(
            "<p role=\"alert\" id=\"refused\">This console's identity <code>{}</code> is not one of the gateway's operators: it can look, not act. Nothing was sent to the gateway.</p>",
            e(if model.caller.is_empty() {
                "(unknown: not connected)"
            } else {
                &model.caller
            })
        ),
    ))
}

/// `GET /confirm?action=...`: the confirmation page with the required reason.
fn confirm(shared: &Shared, req: &Request<Incoming>) -> Response<Body> {
    if let Some(refusal) = read_only(shared) {
        return refusal;
    }
    let a = Action::from(&query(req));
    let Some((question, back)) = a.describe() else {
        return page(
            StatusCode::BAD_REQUEST,
            "Unknown action",
            "<p>Unknown action.</p>",
        );
    };
    let hidden: String = [
        ("action", &a.kind),
        ("subject", &a.subject),
        ("plugin", &a.plugin),
        ("clause", &a.clause),
        ("id", &a.id),
        ("ttl", &a.ttl),
        ("csrf", &shared.csrf),
    ]
    .iter()
    .map(|(k, v)| format!("<input type=\"hidden\" name=\"{k}\" value=\"{}\">", e(v)))
    .collect();
    let body = format!(
        "<p id=\"question\">{question}</p><form method=\"post\" action=\"/action\">{hidden}\
         <label for=\"reason\">Reason (required; stored and logged with your identity)</label>\
         <textarea id=\"reason\" name=\"reason\" required rows=\"3\" cols=\"60\" maxlength=\"{MAX_REASON_BYTES}\">{}</textarea>\
         <div><button type=\"submit\" id=\"confirm\" class=\"danger\">Confirm</button> <a href=\"{back}\">Cancel</a></div></form>",
        e(&a.reason)
    );
    page(StatusCode::OK, "Confirm", &body)
}

/// `POST /action`: checks the CSRF token, the role and the reason, then calls the gateway.
async fn action(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let content_type = header_str(&req, "content-type").unwrap_or("").to_string();
    if !content_type.starts_with("application/x-www-form-urlencoded") {
        return page(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Refused",
            "<p role=\"alert\" id=\"refused\">Actions are posted by the console's own forms.</p>",
        );
    }
    let body = match Limited::new(req.into_body(), MAX_FORM_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return page(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Refused",
                "<p role=\"alert\" id=\"refused\">The form is too large.</p>",
            );
        }
    };
    let pairs = form_pairs(&body);
    if !same(param(&pairs, "csrf"), &shared.csrf) {
        return page(
            StatusCode::FORBIDDEN,
            "Refused",
            "<p role=\"alert\" id=\"refused\">Missing or wrong form token: actions are accepted only from this console's own confirmation page.</p>",
        );
    }
    if let Some(refusal) = read_only(shared) {
        return refusal;
    }
    let a = Action::from(&pairs);
    let Some((_, back)) = a.describe() else {
        return page(
            StatusCode::BAD_REQUEST,
            "Unknown action",
            "<p>Unknown action.</p>",
        );
    };
    if a.reason.is_empty() || a.reason.len() > MAX_REASON_BYTES {
        return page(
            StatusCode::BAD_REQUEST,
            "Reason required",
            &format!(
                "<p role=\"alert\" id=\"refused\">Every action needs a reason (1 to {MAX_REASON_BYTES} bytes). <a href=\"{back}\">Back</a></p>"
            ),
        );
    }
    let ttl_ms = if a.ttl.is_empty() {
        Ok(0)
    } else {
        humantime::parse_duration(&a.ttl)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .map_err(|err| format!("ttl {:?}: {err} (e.g. 10m, 1h)", a.ttl))
    };
    let ttl_ms = match ttl_ms {
        Ok(t) => t,
        Err(why) => {
            return page(
                StatusCode::BAD_REQUEST,
                "Bad duration",
                &format!("<p role=\"alert\" id=\"refused\">{}</p>", e(&why)),
            );
        }
    };
    let result = call(shared, &a, ttl_ms).await;
    match result {
        Ok((done, r)) => {
            tracing::info!(action = %a.kind, reason = %a.reason, revision = r.revision, "console action");
            let acks = if r.sidecars == 0 {
                "no sidecar was connected".to_string()
            } else if r.all_acknowledged_after_us > 0 {
                format!(
                    "all {} sidecars acknowledged within {:.2} ms",
                    r.sidecars,
                    r.all_acknowledged_after_us as f64 / 1000.0
                )
            } else {
                format!(
                    "{} of {} sidecars acknowledged so far",
                    r.acknowledged, r.sidecars
                )
            };
            page(
                StatusCode::OK,
                "Done",
                &format!(
                    "<p role=\"status\" id=\"result\">{}: revision {}; {acks}.</p><p><a href=\"{back}\" id=\"back\">Back</a></p>",
                    e(&done),
                    r.revision
                ),
            )
        }
        Err(why) => page(
            StatusCode::BAD_GATEWAY,
            "The gateway refused",
            &format!(
                "<p role=\"alert\" id=\"refused\">The gateway refused: {}</p><p><a href=\"{back}\">Back</a></p>",
                e(&why)
            ),
        ),
    }
}

async fn call(
    shared: &Shared,
    a: &Action,
    ttl_ms: u64,
) -> Result<(String, ChangeResponse), String> {
    let mut c = client(&shared.target).await.map_err(|e| format!("{e:#}"))?;
    let reason = a.reason.clone();
    let r = match a.kind.as_str() {
        "revoke" => c
            .revoke(RevokeRequest {
                subject: a.subject.clone(),
                reason,
                ttl_ms,
                wait_ms: ACTION_WAIT_MS,
            })
            .await
            .map(|r| (format!("revoked {}", a.subject), r.into_inner())),
        "reinstate" => c
            .reinstate(ReinstateRequest {
                subject: a.subject.clone(),
                wait_ms: ACTION_WAIT_MS,
                reason,
            })
            .await
            .map(|r| (format!("reinstated {}", a.subject), r.into_inner())),
        "open" => c
            .open_execution(OpenExecutionRequest {
                plugin: a.plugin.clone(),
                clause: a.clause.clone(),
                ttl_ms,
                wait_ms: ACTION_WAIT_MS,
                reason,
                // With a registry: the plugin's one certified version (the gateway
                // refuses when there are several; the CLI's --version names one).
                plugin_version: String::new(),
            })
            .await
            .map(|r| {
                let r = r.into_inner();
                (format!("opened execution {}", r.id), r)
            }),
        "close" => c
            .close_execution(CloseExecutionRequest {
                id: a.id.clone(),
                wait_ms: ACTION_WAIT_MS,
                reason,
            })
            .await
            .map(|r| (format!("closed execution {}", a.id), r.into_inner())),
        _ => return Err("unknown action".into()),
    };
    r.map_err(|status| format!("{}", crate::gateway_cmd::status_error(status)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding() {
        assert_eq!(
            form_pairs(b"a=b+c&d=%3Cx%3E&e=%zz&f"),
            vec![
                ("a".into(), "b c".into()),
                ("d".into(), "<x>".into()),
                ("e".into(), "%zz".into()),
                ("f".into(), "".into())
            ]
        );
        assert_eq!(decode(b"%4"), "%4");
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("ab", "abc"));
    }
}
