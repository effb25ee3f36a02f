//! Server-side rendering of the console's pages. Every string that comes from the
//! gateway, a sidecar, a signal or the operator (IDs, reasons, evidence, query values)
//! goes through [`e`], which escapes it for HTML text and quoted attributes; markup is
//! only ever written from literals here. The page's script (assets/console.js) never
//! builds markup: it swaps in the fragment the server rendered.

use std::fmt::{self, Display, Write as _};

use nexus_proto::control::{Propagation, SidecarInfo, StoredSignal};

use super::model::{Link, Model};

/// Text escaped for HTML (element content and double- or single-quoted attributes).
pub struct Escaped<'a>(pub &'a str);

impl Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = 0;
        for (i, c) in self.0.char_indices() {
            let rep = match c {
                '&' => "&amp;",
                '<' => "&lt;",
                '>' => "&gt;",
                '"' => "&quot;",
                '\'' => "&#39;",
                // Controls other than tab and newline would show as nothing or garble.
                c if c.is_control() && c != '\n' && c != '\t' => "\u{FFFD}",
                _ => continue,
            };
            f.write_str(&self.0[last..i])?;
            f.write_str(rep)?;
            last = i + c.len_utf8();
        }
        f.write_str(&self.0[last..])
    }
}

/// Escapes `s`.
pub fn e(s: &str) -> Escaped<'_> {
    Escaped(s)
}

/// Percent-encodes `s` for a query value.
pub fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The pages, in navigation order: (path, title).
pub const PAGES: &[(&str, &str)] = &[
    ("/", "Overview"),
    ("/revocations", "Revocations"),
    ("/workloads", "Workloads"),
    ("/executions", "Executions"),
    ("/signals", "Signals"),
    ("/policies", "Policies"),
    ("/registry", "Registry"),
];

/// What a page render needs besides the model.
pub struct View<'a> {
    /// The page path.
    pub path: &'a str,
    /// Query parameters.
    pub query: &'a [(String, String)],
    /// Now (unix ms).
    pub now: u64,
    /// The session's CSRF token (in a meta tag: scripts and crafted forms alike must
    /// send it, and only a page of this console's origin can read it).
    pub csrf: &'a str,
}

impl View<'_> {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How many table rows a page renders (the newest); the rest is counted, not shown.
pub const MAX_ROWS: usize = 500;

fn time(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn ago(now: u64, ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

fn us(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.0} ms", v as f64 / 1000.0)
    } else {
        format!("{:.2} ms", v as f64 / 1000.0)
    }
}

/// A whole page: layout, the live region (re-rendered on every change) and the static
/// forms below it.
pub fn page(model: &Model, view: &View<'_>) -> String {
    let title = PAGES
        .iter()
        .find(|(p, _)| *p == view.path)
        .map(|(_, t)| *t)
        .unwrap_or("Nexus");
    let mut h = String::with_capacity(64 * 1024);
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"nexus-csrf\" content=\"{}\">\
         <title>{} · Nexus console</title>\
         <link rel=\"stylesheet\" href=\"/assets/console.css\">\
         <script src=\"/assets/console.js\" defer></script></head><body>\
         <a class=\"skip\" href=\"#live\">Skip to content</a>\
         <header><strong>Nexus console</strong> <nav aria-label=\"Pages\"><ul>",
        e(view.csrf),
        e(title)
    );
    for (path, name) in PAGES {
        let current = if *path == view.path {
            " aria-current=\"page\""
        } else {
            ""
        };
        let _ = write!(h, "<li><a href=\"{path}\"{current}>{name}</a></li>");
    }
    h.push_str("</ul></nav><span id=\"conn\" role=\"status\" aria-live=\"polite\">connecting to the console…</span></header><main>");
    let _ = write!(h, "<h1>{}</h1>", e(title));
    h.push_str("<div id=\"live\" tabindex=\"-1\">");
    h.push_str(&live(model, view));
    h.push_str("</div>");
    h.push_str(&forms(model, view));
    h.push_str("</main></body></html>\n");
    h
}

/// The live region of a page.
pub fn live(model: &Model, view: &View<'_>) -> String {
    let mut h = String::with_capacity(32 * 1024);
    banner(&mut h, model, view);
    if model.loaded {
        match view.path {
            "/" => overview(&mut h, model, view),
            "/revocations" => revocations(&mut h, model, view),
            "/workloads" => workloads(&mut h, model, view),
            "/executions" => executions(&mut h, model, view),
            "/signals" => signals(&mut h, model, view),
            "/policies" => policies(&mut h, model, view),
            "/registry" => registry(&mut h, model, view),
            _ => h.push_str("<p>No such page.</p>"),
        }
    }
    h
}

fn banner(h: &mut String, model: &Model, view: &View<'_>) {
    match &model.link {
        Link::Live => {
            let _ = write!(
                h,
                "<p class=\"meta\">Gateway <b>{}</b> · revision <b id=\"revision\">{}</b> · store {} · as <code>{}</code> ({}) · updated {}</p>",
                e(&model.gateway),
                model.revision,
                e(&model.store),
                e(&model.caller),
                if model.operator {
                    "operator"
                } else {
                    "viewer: read-only"
                },
                time(view.now)
            );
        }
        Link::Connecting => h.push_str(
            "<p class=\"alert\" role=\"alert\" id=\"gateway-down\">Connecting to the gateway…</p>",
        ),
        Link::Down(why) => {
            let _ = write!(
                h,
                "<p class=\"alert\" role=\"alert\" id=\"gateway-down\">The gateway is unreachable: {}. Retrying; {}</p>",
                e(why),
                if model.loaded {
                    "what follows is the last state seen, not live."
                } else {
                    "nothing to show yet."
                }
            );
        }
    }
}

fn act_link(model: &Model, action: &str, params: &[(&str, &str)], label: &str) -> String {
    if !model.operator {
        return String::new();
    }
    let mut href = format!("/confirm?action={action}");
    for (k, v) in params {
        let _ = write!(href, "&{k}={}", q(v));
    }
    format!("<a class=\"act\" href=\"{}\">{}</a>", e(&href), e(label))
}

fn overview(h: &mut String, model: &Model, view: &View<'_>) {
    let behind = model
        .sidecars
        .values()
        .filter(|s| s.acknowledged_revision < model.revision)
        .count();
    let last = model.revocation_propagations().next();
    let _ = write!(
        h,
        "<ul class=\"cards\"><li><span>Sidecars</span><b id=\"sidecar-count\">{}</b></li>\
         <li><span>Behind revision {}</span><b>{}</b></li>\
         <li><span>Revoked</span><b id=\"revoked-count\">{}</b></li>\
         <li><span>Open executions</span><b>{}</b></li>\
         <li><span>Signals (kept)</span><b>{}</b></li>\
         <li><span>Last revocation reached all in</span><b>{}</b></li></ul>",
        model.sidecars.len(),
        model.revision,
        behind,
        model.revoked.len(),
        model.executions.len(),
        model.signals.len(),
        last.map(|p| {
            if p.all_acknowledged_after_us > 0 {
                us(p.all_acknowledged_after_us)
            } else {
                format!("pending ({}/{})", p.acknowledged, p.sidecars)
            }
        })
        .unwrap_or_else(|| "-".into())
    );
    h.push_str("<h2>Sidecars</h2>");
    sidecar_table(h, model, view, model.sidecars.values());
}

fn sidecar_table<'a>(
    h: &mut String,
    model: &Model,
    view: &View<'_>,
    list: impl Iterator<Item = &'a SidecarInfo>,
) {
    h.push_str(
        "<table id=\"sidecars\"><caption class=\"sr\">Connected sidecars</caption><thead><tr><th scope=\"col\">SPIFFE ID</th><th scope=\"col\">Acknowledged revision</th>\
         <th scope=\"col\">Link</th><th scope=\"col\">Address</th><th scope=\"col\">Replica</th><th scope=\"col\">Version</th><th scope=\"col\">Policy</th><th scope=\"col\">Connected</th></tr></thead><tbody>",
    );
    let mut n = 0;
    let mut more = 0;
    for s in list {
        if n >= MAX_ROWS {
            more += 1;
            continue;
        }
        n += 1;
        let link = if !s.apply_error.is_empty() {
            format!(
                "<span class=\"bad\">apply error: {}</span>",
                e(&s.apply_error)
            )
        } else if s.acknowledged_revision >= model.revision {
            "<span class=\"ok\">in sync</span>".into()
        } else {
            format!(
                "<span class=\"warn\">behind by {}</span>",
                model.revision - s.acknowledged_revision
            )
        };
        let policy = match &s.policy {
            Some(p) if p.revision.is_empty() => "<span class=\"bad\">none loaded</span>".into(),
            Some(p) => format!(
                "<code>{}</code>{}",
                e(&p.revision),
                if p.reload_error.is_empty() {
                    ""
                } else {
                    " <a class=\"bad\" href=\"/policies\">reload failed</a>"
                }
            ),
            None => "-".into(),
        };
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td>{}</td><td>{link}</td><td>{}</td><td>{}</td><td>{}</td><td>{policy}</td><td>{}</td></tr>",
            e(&s.spiffe_id),
            s.acknowledged_revision,
            e(&s.remote_addr),
            e(&s.gateway),
            e(&s.version),
            ago(view.now, s.connected_unix_ms)
        );
    }
    h.push_str("</tbody></table>");
    if more > 0 {
        let _ = write!(h, "<p>and {more} more not shown.</p>");
    }
    if n == 0 {
        h.push_str("<p>No sidecar is connected.</p>");
    }
}

/// Buckets of the histogram (upper bounds in µs).
const BUCKETS: &[(u64, &str)] = &[
    (1_000, "<1ms"),
    (2_000, "1-2ms"),
    (5_000, "2-5ms"),
    (10_000, "5-10ms"),
    (20_000, "10-20ms"),
    (50_000, "20-50ms"),
    (100_000, "50-100ms"),
    (250_000, "100-250ms"),
    (1_000_000, "0.25-1s"),
    (u64::MAX, ">1s"),
];

/// How many recent revocations the histogram covers.
pub const HISTOGRAM_N: usize = 100;

fn histogram(h: &mut String, list: &[&Propagation]) {
    let mut counts = vec![0u32; BUCKETS.len()];
    for p in list {
        let i = BUCKETS
            .iter()
            .position(|(max, _)| p.all_acknowledged_after_us < *max)
            .unwrap_or(BUCKETS.len() - 1);
        counts[i] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(0).max(1);
    let (w, bar, height) = (BUCKETS.len() as u32 * 64, 64u32, 120u32);
    let _ = write!(
        h,
        "<figure><svg id=\"histogram\" role=\"img\" aria-labelledby=\"hist-title\" viewBox=\"0 0 {w} {}\" width=\"{w}\" height=\"{}\">\
         <title id=\"hist-title\">Time for a revocation to reach every sidecar, last {} revocations</title>",
        height + 30,
        height + 30,
        list.len()
    );
    for (i, (count, (_, label))) in counts.iter().zip(BUCKETS).enumerate() {
        let bh = count * height / top;
        let x = i as u32 * bar;
        let _ = write!(
            h,
            "<g><title>{label}: {count}</title><rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{bh}\" class=\"bar\"></rect>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{label}</text>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text></g>",
            x + 4,
            height - bh,
            bar - 8,
            x + bar / 2,
            height + 16,
            x + bar / 2,
            (height - bh).saturating_sub(4).max(10),
            if *count > 0 {
                count.to_string()
            } else {
                String::new()
            }
        );
    }
    h.push_str("</svg><figcaption>Each bar counts revocations whose last acknowledgement came within its range (from the call to the last sidecar's ack).</figcaption></figure>");
}

fn revocations(h: &mut String, model: &Model, view: &View<'_>) {
    h.push_str("<h2>Revoked now</h2>");
    if model.revoked.is_empty() {
        h.push_str("<p id=\"no-revocations\">Nothing is revoked.</p>");
    } else {
        h.push_str("<table id=\"revoked\"><thead><tr><th scope=\"col\">Subject</th><th scope=\"col\">Reason</th><th scope=\"col\">By</th><th scope=\"col\">At</th><th scope=\"col\">Expires</th><th scope=\"col\"><span class=\"sr\">Action</span></th></tr></thead><tbody>");
        for r in model.revoked.values() {
            let _ = write!(
                h,
                "<tr><td><code>{}</code></td><td class=\"reason\">{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                e(&r.subject),
                e(&r.reason),
                e(&r.by),
                time(r.at_unix_ms),
                if r.expires_unix_ms == 0 {
                    "until reinstated".into()
                } else {
                    time(r.expires_unix_ms)
                },
                act_link(model, "reinstate", &[("subject", &r.subject)], "Reinstate…")
            );
        }
        h.push_str("</tbody></table>");
    }
    let recent: Vec<&Propagation> = model
        .revocation_propagations()
        .filter(|p| p.all_acknowledged_after_us > 0)
        .take(HISTOGRAM_N)
        .collect();
    h.push_str("<h2>Propagation</h2>");
    if recent.is_empty() {
        h.push_str("<p>No revocation has finished propagating since the gateway started.</p>");
    } else {
        histogram(h, &recent);
    }
    h.push_str("<table id=\"propagations\"><caption>Recent revocations: time from the call to each sidecar's acknowledgement</caption><thead><tr><th scope=\"col\">Revision</th><th scope=\"col\">Subject</th><th scope=\"col\">Started</th><th scope=\"col\">Acknowledged</th><th scope=\"col\">All within</th><th scope=\"col\">Per sidecar</th></tr></thead><tbody>");
    for p in model.revocation_propagations().take(50) {
        let per = model
            .acks
            .get(&p.revision)
            .map(|list| {
                let mut s = String::new();
                for (id, ms) in list.iter().take(20) {
                    let _ = write!(s, "<li><code>{}</code> {ms} ms</li>", e(id));
                }
                if list.len() > 20 {
                    let _ = write!(s, "<li>and {} more</li>", list.len() - 20);
                }
                format!("<ul class=\"acks\">{s}</ul>")
            })
            .unwrap_or_else(|| "<small>before this console</small>".into());
        let _ = write!(
            h,
            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}/{}</td><td>{}</td><td>{per}</td></tr>",
            p.revision,
            e(&p.subject),
            ago(view.now, p.started_unix_ms),
            p.acknowledged,
            p.sidecars,
            if p.all_acknowledged_after_us > 0 {
                us(p.all_acknowledged_after_us)
            } else {
                "pending".into()
            }
        );
    }
    h.push_str("</tbody></table>");
}

/// Every workload the console knows of: connected, revoked, with executions, signals,
/// a registry version, a fleet baseline or request counts.
fn workload_ids(model: &Model) -> std::collections::BTreeSet<&str> {
    let mut ids = std::collections::BTreeSet::new();
    ids.extend(model.sidecars.values().map(|s| s.spiffe_id.as_str()));
    ids.extend(model.revoked.keys().map(String::as_str));
    ids.extend(model.executions.values().map(|e| e.plugin.as_str()));
    ids.extend(
        model
            .signals
            .iter()
            .filter_map(|s| s.signal.as_ref())
            .map(|s| s.workload.as_str()),
    );
    ids.extend(model.versions.values().map(|v| v.spiffe_id.as_str()));
    ids.extend(model.baselines.keys().map(String::as_str));
    ids.extend(model.rates.keys().map(String::as_str));
    ids.retain(|id| !id.is_empty());
    ids
}

/// Minutes in a sparkline (the newest last).
const SPARK_MINUTES: usize = super::model::RATE_MINUTES as usize;

/// A per-minute series as an SVG sparkline, with its title (what a screen reader says)
/// built from `what` ("requests", "signals").
fn sparkline(h: &mut String, per_minute: &[u64; SPARK_MINUTES], what: &str, class: &str) {
    let top = per_minute.iter().copied().max().unwrap_or(0).max(1);
    let total: u64 = per_minute.iter().sum();
    let points: Vec<String> = per_minute
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{},{}", i * 4, 20 - c * 18 / top))
        .collect();
    let _ = write!(
        h,
        "<svg class=\"spark {class}\" role=\"img\" viewBox=\"0 0 120 22\" width=\"120\" height=\"22\"><title>{total} {what} in the last 30 minutes, at most {} in a minute</title><polyline points=\"{}\"></polyline></svg>",
        per_minute.iter().copied().max().unwrap_or(0),
        points.join(" ")
    );
}

/// Signals about `workload` per minute over the last 30 minutes (by arrival).
fn signals_per_minute(model: &Model, workload: &str, now: u64) -> [u64; SPARK_MINUTES] {
    let mut per_minute = [0u64; SPARK_MINUTES];
    for s in &model.signals {
        let Some(sig) = &s.signal else { continue };
        if sig.workload != workload {
            continue;
        }
        let age = now.saturating_sub(s.received_unix_ms) / 60_000;
        if let Some(slot) = (SPARK_MINUTES - 1)
            .checked_sub(age as usize)
            .and_then(|i| per_minute.get_mut(i))
        {
            *slot += 1;
        }
    }
    per_minute
}

/// Requests `workload`'s sidecars recorded per minute over the last 30 minutes.
fn requests_per_minute(model: &Model, workload: &str, now: u64) -> [u64; SPARK_MINUTES] {
    let mut per_minute = [0u64; SPARK_MINUTES];
    let this_minute = now / 60_000;
    for (minute, n) in model.rates.get(workload).into_iter().flatten() {
        let age = this_minute.saturating_sub(minute / 60_000);
        if let Some(slot) = (SPARK_MINUTES - 1)
            .checked_sub(age as usize)
            .and_then(|i| per_minute.get_mut(i))
        {
            *slot += n;
        }
    }
    per_minute
}

/// A budgets object (`budgets_json` of a registry version) as a list, escaped.
fn budgets_list(json: &str) -> String {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(json) else {
        return format!("<code>{}</code>", e(json));
    };
    let items: String = map
        .iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            format!("<li><span class=\"k\">{}</span> {}</li>", e(k), e(&v))
        })
        .collect();
    format!("<ul class=\"budgets\">{items}</ul>")
}

fn rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn bytes(v: f64) -> String {
    match v {
        v if v >= 1_048_576.0 => format!("{:.1} MiB", v / 1_048_576.0),
        v if v >= 1024.0 => format!("{:.1} KiB", v / 1024.0),
        v => format!("{v:.0} B"),
    }
}

fn workloads(h: &mut String, model: &Model, view: &View<'_>) {
    h.push_str("<table id=\"workloads\"><thead><tr><th scope=\"col\">Workload</th><th scope=\"col\">Status</th><th scope=\"col\">Sidecars</th><th scope=\"col\">Open executions</th>\
        <th scope=\"col\">Budgets (registry)</th><th scope=\"col\">Baseline (fleet, per pod)</th><th scope=\"col\">Requests / min, 30 min</th>\
        <th scope=\"col\">Signals</th><th scope=\"col\"><span class=\"sr\">Action</span></th></tr></thead><tbody>");
    for (n, id) in workload_ids(model).into_iter().enumerate() {
        if n >= MAX_ROWS {
            h.push_str("<tr><td colspan=\"9\">more not shown</td></tr>");
            break;
        }
        let revoked = model.revoked.get(id);
        let status = match revoked {
            Some(r) => format!(
                "<span class=\"bad\">revoked</span>: <span class=\"reason\">{}</span>",
                e(&r.reason)
            ),
            None => "<span class=\"ok\">active</span>".into(),
        };
        let sidecars = model
            .sidecars
            .values()
            .filter(|s| s.spiffe_id == id)
            .count();
        let execs = model.executions.values().filter(|x| x.plugin == id).count();
        let signals = model
            .signals
            .iter()
            .filter(|s| s.signal.as_ref().is_some_and(|s| s.workload == id))
            .count();
        let mut budgets = String::new();
        for v in model.versions_of(id).filter(|v| v.state == "certified") {
            let _ = write!(
                budgets,
                "<div class=\"budget\"><b>v{}</b> {}</div>",
                e(&v.version),
                if v.budgets_json.is_empty() {
                    "<small>none declared</small>".to_string()
                } else {
                    budgets_list(&v.budgets_json)
                }
            );
        }
        if budgets.is_empty() {
            budgets.push_str("<small>no certified version</small>");
        }
        let baseline = match model.baselines.get(id) {
            Some(b) => format!(
                "<span class=\"baseline\">{} req/s · {}/s</span><br><small>long-term {} req/s · {}/s; {} reports, updated {}</small>",
                rate(b.rate_per_s),
                bytes(b.bytes_per_s),
                rate(b.long_rate_per_s),
                bytes(b.long_bytes_per_s),
                b.ticks,
                ago(view.now, b.updated_unix_ms)
            ),
            None => "<small>none learned yet</small>".into(),
        };
        let requests = requests_per_minute(model, id, view.now);
        let _ = write!(
            h,
            "<tr data-workload=\"{}\"><td><code>{}</code></td><td>{status}</td><td>{sidecars}</td><td>{execs}</td><td>{budgets}</td><td>{baseline}</td><td class=\"rate\">",
            e(id),
            e(id),
        );
        sparkline(h, &requests, "requests", "requests");
        let _ = write!(
            h,
            " <span class=\"total\">{} in 30 min</span></td><td><a href=\"/signals?workload={}\">{signals}</a> ",
            requests.iter().sum::<u64>(),
            e(&q(id))
        );
        sparkline(
            h,
            &signals_per_minute(model, id, view.now),
            "signals",
            "signals",
        );
        let action = match revoked {
            Some(_) => act_link(model, "reinstate", &[("subject", id)], "Reinstate…"),
            None => act_link(model, "revoke", &[("subject", id)], "Revoke…"),
        };
        let _ = write!(h, "</td><td>{action}</td></tr>");
    }
    h.push_str("</tbody></table><p><small>Budgets: the declared ceilings of the workload's certified registry versions. \
        Baseline: what the gateway learned for the workload from its sidecars' reports (per pod, per second while active). \
        Requests: execution records the workload's own sidecars shipped to this gateway replica, per minute of the requests' time \
        (sidecars ship in batches: the current minute fills in as they arrive).</small></p>");
}

fn executions(h: &mut String, model: &Model, view: &View<'_>) {
    h.push_str("<h2>Open</h2>");
    if model.executions.is_empty() {
        h.push_str("<p id=\"no-executions\">No execution is open.</p>");
    } else {
        h.push_str("<table id=\"open-executions\"><thead><tr><th scope=\"col\">Id</th><th scope=\"col\">Plugin</th><th scope=\"col\">Clause</th><th scope=\"col\">Opened by</th><th scope=\"col\">Ends</th><th scope=\"col\"><span class=\"sr\">Action</span></th></tr></thead><tbody>");
        for x in model.executions.values().take(MAX_ROWS) {
            let _ = write!(
                h,
                "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td><code>{}</code></td><td>{}</td><td><a href=\"/records?execution={}\">Records</a> {}</td></tr>",
                e(&x.id),
                e(&x.plugin),
                e(&x.clause),
                e(&x.opened_by),
                time(x.not_after_unix_ms),
                e(&q(&x.id)),
                act_link(model, "close", &[("id", &x.id)], "Close…")
            );
        }
        h.push_str("</tbody></table>");
    }
    timeline(h, model, view.now);
    h.push_str("<h2>Closed (seen by this console)</h2>");
    if model.closed.is_empty() {
        h.push_str("<p>None yet.</p>");
    } else {
        h.push_str("<table id=\"closed-executions\"><thead><tr><th scope=\"col\">Id</th><th scope=\"col\">Plugin</th><th scope=\"col\">Clause</th><th scope=\"col\">Closed</th><th scope=\"col\">Why</th></tr></thead><tbody>");
        for c in model.closed.iter().rev().take(MAX_ROWS) {
            let _ = write!(
                h,
                "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{}</td><td class=\"reason\">{}</td></tr>",
                e(&c.execution.id),
                e(&c.execution.plugin),
                e(&c.execution.clause),
                time(c.at_unix_ms),
                e(&c.reason)
            );
        }
        h.push_str("</tbody></table>");
    }
}

/// Open and recently closed executions per plugin and clause on one hour either side
/// of now.
fn timeline(h: &mut String, model: &Model, now: u64) {
    const SPAN: u64 = 3_600_000;
    let (start, end) = (now.saturating_sub(SPAN), now + SPAN);
    let x = |t: u64| (t.clamp(start, end) - start) * 600 / (end - start) + 200;
    let mut rows: Vec<(String, u64, u64, &str)> = Vec::new();
    for ex in model.executions.values() {
        let opened = model.opened_at.get(&ex.id).copied().unwrap_or(0);
        rows.push((
            format!("{} · {}", ex.plugin, ex.clause),
            if opened == 0 { start } else { opened },
            ex.not_after_unix_ms,
            "open",
        ));
    }
    for c in model.closed.iter().rev() {
        if c.at_unix_ms < start {
            continue;
        }
        rows.push((
            format!("{} · {}", c.execution.plugin, c.execution.clause),
            start,
            c.at_unix_ms,
            "closed",
        ));
    }
    rows.truncate(40);
    if rows.is_empty() {
        return;
    }
    let height = rows.len() as u64 * 18 + 24;
    let _ = write!(
        h,
        "<h2>Timeline</h2><svg id=\"timeline\" role=\"img\" aria-label=\"Executions on a two-hour timeline centred on now\" viewBox=\"0 0 820 {height}\" width=\"820\" height=\"{height}\">\
         <line x1=\"{0}\" x2=\"{0}\" y1=\"0\" y2=\"{height}\" class=\"now\"></line><text x=\"{0}\" y=\"{1}\" text-anchor=\"middle\">now</text>",
        x(now),
        height - 4
    );
    for (i, (label, from, to, class)) in rows.iter().enumerate() {
        let y = i as u64 * 18 + 4;
        let (x1, x2) = (x(*from), x(*to).max(x(*from) + 2));
        let _ = write!(
            h,
            "<g><title>{} ({class}, until {})</title><text x=\"0\" y=\"{}\" class=\"label\">{}</text><rect x=\"{x1}\" y=\"{y}\" width=\"{}\" height=\"12\" class=\"{class}\"></rect></g>",
            e(label),
            time(*to),
            y + 10,
            e(&label.chars().take(32).collect::<String>()),
            x2 - x1
        );
    }
    h.push_str("</svg>");
}

fn verification_status(s: &StoredSignal) -> String {
    serde_json::from_str::<serde_json::Value>(&s.verification_json)
        .ok()
        .and_then(|v| v.get("status")?.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn signals(h: &mut String, model: &Model, view: &View<'_>) {
    let workload = view.param("workload").filter(|w| !w.is_empty());
    if let Some(w) = workload {
        let _ = write!(
            h,
            "<p>Only signals about <code>{}</code>. <a href=\"/signals\">All signals</a></p>",
            e(w)
        );
    }
    let mut list = model
        .signals
        .iter()
        .filter(|s| workload.is_none_or(|w| s.signal.as_ref().is_some_and(|s| s.workload == w)));
    h.push_str("<table id=\"signals\"><thead><tr><th scope=\"col\">Received</th><th scope=\"col\">Workload</th><th scope=\"col\">Kind</th><th scope=\"col\">Reporter</th><th scope=\"col\">Seen as</th><th scope=\"col\">Score</th><th scope=\"col\">Evidence</th><th scope=\"col\">Decision</th><th scope=\"col\">Reasons</th><th scope=\"col\">Details</th></tr></thead><tbody>");
    let mut shown = 0;
    for s in list.by_ref().take(MAX_ROWS) {
        shown += 1;
        let Some(sig) = &s.signal else { continue };
        let action = if s.action.is_empty() {
            "pending"
        } else {
            s.action.as_str()
        };
        let class = match action {
            "revoke" => "bad",
            "alert" => "warn",
            _ => "",
        };
        let mut reasons = String::new();
        for r in &s.reasons {
            let _ = write!(reasons, "<li>{}</li>", e(r));
        }
        let cited = if sig.decision_ids.is_empty() {
            String::new()
        } else {
            format!(
                "<details><summary>{} cited records</summary><ul>{}</ul></details>",
                sig.decision_ids.len(),
                sig.decision_ids
                    .iter()
                    .take(20)
                    .map(|d| format!("<li><code>{}</code></li>", e(d)))
                    .collect::<String>()
            )
        };
        let _ = write!(
            h,
            "<tr id=\"signal-{}\"><td>{}</td><td><a href=\"/signals?workload={}\"><code>{}</code></a></td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{:.2}</td><td>{}{cited}</td><td class=\"{class}\">{}</td><td><ul class=\"reasons\">{reasons}</ul></td><td><a class=\"evidence\" href=\"/signal?id={}\">Evidence<span class=\"sr\"> of signal {}</span></a></td></tr>",
            e(&s.id),
            time(s.received_unix_ms),
            e(&q(&sig.workload)),
            e(&sig.workload),
            e(&sig.kind),
            e(&s.reporter),
            e(&sig.observed_as),
            sig.score,
            e(&verification_status(s)),
            e(action),
            e(&q(&s.id)),
            e(&s.id),
        );
    }
    h.push_str("</tbody></table>");
    let more = list.count();
    if more > 0 {
        let _ = write!(h, "<p>Newest {shown} shown; {more} older not shown.</p>");
    }
    if shown == 0 {
        h.push_str("<p>No signal.</p>");
    }
}

fn policies(h: &mut String, model: &Model, view: &View<'_>) {
    // The Rego policy each sidecar reports it enforces (hello, then on every change).
    let mut by_policy: std::collections::BTreeMap<&str, Vec<&SidecarInfo>> = Default::default();
    for s in model.sidecars.values() {
        let revision = match &s.policy {
            Some(p) if p.revision.is_empty() => "none loaded",
            Some(p) => p.revision.as_str(),
            None => "not reported",
        };
        by_policy.entry(revision).or_default().push(s);
    }
    let failing = model
        .sidecars
        .values()
        .filter(|s| {
            s.policy
                .as_ref()
                .is_some_and(|p| !p.reload_error.is_empty())
        })
        .count();
    h.push_str("<h2>Rego policy</h2>");
    let _ = write!(
        h,
        "<p id=\"policy-summary\">{} policy revision{} across {} sidecar streams{}.</p>",
        by_policy.len(),
        if by_policy.len() == 1 { "" } else { "s" },
        model.sidecars.len(),
        if failing > 0 {
            format!(
                "; <span class=\"bad\">{failing} with a failed last reload</span> (they keep serving their previous revision)"
            )
        } else {
            String::new()
        }
    );
    h.push_str("<table id=\"policy-revisions\"><thead><tr><th scope=\"col\">Policy revision</th><th scope=\"col\">Sidecar</th><th scope=\"col\">Address</th><th scope=\"col\">Loaded</th><th scope=\"col\">Last reload</th></tr></thead><tbody>");
    let mut rows = 0;
    for (revision, list) in by_policy.iter() {
        for s in list {
            rows += 1;
            if rows > MAX_ROWS {
                break;
            }
            let (loaded, reload) = match &s.policy {
                Some(p) => (
                    ago(view.now, p.loaded_unix_ms),
                    if p.reload_error.is_empty() {
                        "<span class=\"ok\">ok</span>".to_string()
                    } else {
                        format!(
                            "<span class=\"bad\">failed {}</span>: <span class=\"reason\">{}</span>",
                            ago(view.now, p.failed_unix_ms),
                            e(&p.reload_error)
                        )
                    },
                ),
                None => ("-".into(), "-".into()),
            };
            let _ = write!(
                h,
                "<tr><td><code class=\"policy-revision\">{}</code></td><td><code>{}</code></td><td>{}</td><td>{loaded}</td><td>{reload}</td></tr>",
                e(revision),
                e(&s.spiffe_id),
                e(&s.remote_addr),
            );
        }
    }
    h.push_str("</tbody></table>");
    if rows > MAX_ROWS {
        let _ = write!(h, "<p>and {} more not shown.</p>", rows - MAX_ROWS);
    }
    h.push_str("<p><small>The revision is the sidecar's own report (a hash of its policy folder), shown as it claims it.</small></p>");

    // The gateway's state (revocations, executions) each sidecar acknowledged.
    let mut by_revision: std::collections::BTreeMap<u64, Vec<&SidecarInfo>> = Default::default();
    for s in model.sidecars.values() {
        by_revision
            .entry(s.acknowledged_revision)
            .or_default()
            .push(s);
    }
    let _ = write!(
        h,
        "<h2>Gateway state</h2><p>The gateway is at revision <b>{}</b>. Each sidecar enforces the revocations and executions of the revision it acknowledged.</p>",
        model.revision
    );
    h.push_str("<table id=\"state-revisions\"><thead><tr><th scope=\"col\">Revision</th><th scope=\"col\">Sidecars</th><th scope=\"col\">Which</th></tr></thead><tbody>");
    for (revision, list) in by_revision.iter().rev() {
        let mut ids: Vec<&str> = list.iter().map(|s| s.spiffe_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let names: String = ids
            .iter()
            .take(20)
            .map(|i| format!("<li><code>{}</code></li>", e(i)))
            .collect();
        let _ = write!(
            h,
            "<tr><td>{revision}{}</td><td>{}</td><td><ul>{names}{}</ul></td></tr>",
            if *revision == model.revision {
                " (current)"
            } else {
                ""
            },
            list.len(),
            if ids.len() > 20 { "<li>…</li>" } else { "" }
        );
    }
    h.push_str("</tbody></table>");
}

fn state_class(state: &str) -> &'static str {
    match state {
        "certified" => "ok",
        "retired" => "bad",
        _ => "warn",
    }
}

/// The plugin registry: plugins, their versions, digests, states and who certified.
fn registry(h: &mut String, model: &Model, view: &View<'_>) {
    if model.plugins.is_empty() && model.versions.is_empty() {
        h.push_str("<p id=\"no-plugins\">The registry holds no plugin (or this gateway runs without one).</p>");
        return;
    }
    let certified = model
        .versions
        .values()
        .filter(|v| v.state == "certified")
        .count();
    let _ = write!(
        h,
        "<p>{} plugins, {} versions, {certified} certified (only certified versions run).</p>",
        model.plugins.len(),
        model.versions.len()
    );
    for (shown, p) in model.plugins.values().enumerate() {
        if shown >= MAX_ROWS {
            h.push_str("<p>more plugins not shown.</p>");
            break;
        }
        let _ = write!(
            h,
            "<section class=\"plugin\" aria-labelledby=\"plugin-{uid}\"><h2 id=\"plugin-{uid}\">{}</h2>\
             <p><code>{}</code> · publisher <b>{}</b> · {} · registered by <code>{}</code> {}</p><p>{}</p>",
            e(&p.name),
            e(&p.uid),
            e(&p.publisher),
            e(&p.license_tier),
            e(&p.registered_by),
            time(p.registered_unix_ms),
            e(&p.description),
            uid = e(&q(&p.uid)),
        );
        versions_table(h, model, view, &p.uid);
        h.push_str("</section>");
    }
    // Versions of plugins the feed did not describe (should not happen; shown anyway).
    let orphans: Vec<&str> = model
        .versions
        .keys()
        .map(|(uid, _)| uid.as_str())
        .filter(|uid| !model.plugins.contains_key(*uid))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    for uid in orphans {
        let _ = write!(
            h,
            "<section class=\"plugin\"><h2>Plugin <code>{}</code></h2>",
            e(uid)
        );
        versions_table(h, model, view, uid);
        h.push_str("</section>");
    }
}

fn versions_table(h: &mut String, model: &Model, view: &View<'_>, uid: &str) {
    h.push_str("<table class=\"versions\"><thead><tr><th scope=\"col\">Version</th><th scope=\"col\">State</th><th scope=\"col\">Image</th><th scope=\"col\">Runs as</th>\
        <th scope=\"col\">Clauses</th><th scope=\"col\">Budgets</th><th scope=\"col\">Signed by key</th><th scope=\"col\">Registered</th><th scope=\"col\">Certified</th><th scope=\"col\">Revision</th></tr></thead><tbody>");
    for v in model
        .versions
        .range((uid.to_string(), String::new())..)
        .take_while(|((u, _), _)| u == uid)
        .map(|(_, v)| v)
    {
        let certified = if v.certified_by.is_empty() {
            "-".to_string()
        } else {
            format!(
                "by <code class=\"certified-by\">{}</code> {}",
                e(&v.certified_by),
                ago(view.now, v.certified_unix_ms)
            )
        };
        let imported = if v.imported_certified_by.is_empty() {
            String::new()
        } else {
            format!(
                "<br><small>imported; the bundle claims certification by <code>{}</code></small>",
                e(&v.imported_certified_by)
            )
        };
        let retired = if v.state == "retired" {
            format!(
                "<br><small>by <code>{}</code> {}: <span class=\"reason\">{}</span></small>",
                e(&v.retired_by),
                ago(view.now, v.retired_unix_ms),
                e(&v.retire_reason)
            )
        } else {
            String::new()
        };
        let clauses: String = v
            .clauses
            .iter()
            .take(50)
            .map(|c| format!("<li>{}</li>", e(c)))
            .collect();
        let _ = write!(
            h,
            "<tr data-version=\"{}\"><td>{}</td><td><span class=\"state {}\">{}</span>{retired}</td><td><code>{}</code><br><code class=\"digest\">{}</code></td><td><code>{}</code></td>\
             <td><ul>{clauses}{}</ul></td><td>{}</td><td><code title=\"{}\">{}</code></td><td><code>{}</code> {}</td><td>{certified}{imported}</td><td>{}</td></tr>",
            e(&v.version),
            e(&v.version),
            state_class(&v.state),
            e(&v.state),
            e(&v.image_repository),
            e(&v.image_digest),
            e(&v.spiffe_id),
            if v.clauses.len() > 50 {
                "<li>…</li>"
            } else {
                ""
            },
            if v.budgets_json.is_empty() {
                "<small>none</small>".to_string()
            } else {
                budgets_list(&v.budgets_json)
            },
            e(&v.key_fingerprint),
            e(&v.key_fingerprint.chars().take(19).collect::<String>()),
            e(&v.registered_by),
            ago(view.now, v.registered_unix_ms),
            v.revision,
        );
    }
    h.push_str("</tbody></table>");
}

/// The static forms under a page's live region (not re-rendered, so typing survives
/// updates). Only for an operator.
fn forms(model: &Model, view: &View<'_>) -> String {
    if !model.operator {
        if model.loaded {
            return "<p class=\"meta\">Read-only: this identity is not one of the gateway's operators.</p>".into();
        }
        return String::new();
    }
    match view.path {
        "/revocations" => "<h2>Revoke a workload</h2><form method=\"get\" action=\"/confirm\"><input type=\"hidden\" name=\"action\" value=\"revoke\">\
            <label for=\"subject\">SPIFFE ID or pattern (<code>spiffe://td/path/*</code>)</label><input id=\"subject\" name=\"subject\" required size=\"60\">\
            <label for=\"reason\">Reason</label><input id=\"reason\" name=\"reason\" required size=\"60\">\
            <label for=\"ttl\">Lift after (e.g. 1h; empty: until reinstated)</label><input id=\"ttl\" name=\"ttl\" size=\"10\">\
            <button type=\"submit\">Revoke…</button></form>".into(),
        "/executions" => "<h2>Open an execution</h2><form method=\"get\" action=\"/confirm\"><input type=\"hidden\" name=\"action\" value=\"open\">\
            <label for=\"plugin\">Plugin SPIFFE ID</label><input id=\"plugin\" name=\"plugin\" required size=\"60\">\
            <label for=\"clause\">Clause</label><input id=\"clause\" name=\"clause\" required>\
            <label for=\"ttl\">For (e.g. 10m)</label><input id=\"ttl\" name=\"ttl\" required value=\"10m\" size=\"10\">\
            <label for=\"reason\">Reason</label><input id=\"reason\" name=\"reason\" required size=\"60\">\
            <button type=\"submit\">Open…</button></form>".into(),
        _ => String::new(),
    }
}

/// The records page body: one execution's records by sidecar and seq, each hash
/// recomputed, and each link checked where two records are consecutive in their
/// sidecar's chain (other executions' records sit between the others).
pub fn records(id: &str, lines: &[String], truncated: bool) -> String {
    let mut list: Vec<Result<nexus_audit::ExecutionRecord, String>> = lines
        .iter()
        .map(|l| nexus_audit::ExecutionRecord::from_line(l.as_bytes()).map_err(|e| e.to_string()))
        .collect();
    list.sort_by(|a, b| match (a, b) {
        (Ok(a), Ok(b)) => (&a.sidecar, a.seq).cmp(&(&b.sidecar, b.seq)),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        _ => std::cmp::Ordering::Equal,
    });
    let (mut bad, mut links, mut gaps) = (0, 0, 0);
    let mut rows = String::new();
    let mut previous: Option<&nexus_audit::ExecutionRecord> = None;
    for r in &list {
        let Ok(r) = r else {
            bad += 1;
            let _ = write!(
                rows,
                "<tr><td colspan=\"11\" class=\"bad\">unreadable record</td></tr>"
            );
            continue;
        };
        let mut check = if r.hash_is_valid() {
            "hash ok".to_string()
        } else {
            bad += 1;
            "<span class=\"bad\">hash mismatch</span>".to_string()
        };
        if let Some(p) = previous.filter(|p| p.sidecar == r.sidecar) {
            if p.seq + 1 == r.seq {
                links += 1;
                if r.prev_hash != p.hash {
                    bad += 1;
                    check.push_str(" · <span class=\"bad\">link broken</span>");
                } else {
                    check.push_str(" · linked");
                }
            } else {
                gaps += 1;
            }
        }
        previous = Some(r);
        let short = |h: &str| h.chars().take(12).collect::<String>();
        let _ = write!(
            rows,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{} <code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td><code title=\"{}\">{}</code></td><td><code title=\"{}\">{}</code></td><td>{check}</td></tr>",
            e(&r.sidecar),
            r.seq,
            e(&r.time),
            e(&r.direction),
            e(&r.method),
            e(&r.path),
            e(r.clause.as_deref().unwrap_or("-")),
            e(&r.decision),
            r.status,
            e(&r.request_sha256),
            e(&short(&r.request_sha256)),
            e(&r.response_sha256),
            e(&short(&r.response_sha256)),
        );
    }
    let verdict = if list.is_empty() {
        "No record of this execution has reached the gateway (sidecars ship them in batches)."
            .to_string()
    } else if bad == 0 {
        format!(
            "{} records: every hash recomputes; {links} consecutive links checked; {gaps} gaps (other requests of the same sidecar between){}.",
            list.len(),
            if truncated { "; more not shown" } else { "" }
        )
    } else {
        format!(
            "<span class=\"bad\">{bad} problems</span> in {} records.",
            list.len()
        )
    };
    format!(
        "<p>Execution <code>{}</code>.</p><p id=\"chain\" role=\"status\">{verdict}</p>\
         <table id=\"records\"><thead><tr><th scope=\"col\">Sidecar</th><th scope=\"col\">Seq</th><th scope=\"col\">Time</th><th scope=\"col\">Direction</th><th scope=\"col\">Request</th><th scope=\"col\">Clause</th><th scope=\"col\">Decision</th><th scope=\"col\">Status</th><th scope=\"col\">Request body SHA-256</th><th scope=\"col\">Response body SHA-256</th><th scope=\"col\">Check</th></tr></thead><tbody>{rows}</tbody></table>\
         <p><a href=\"/executions\">Executions</a></p>",
        e(id)
    )
}

fn pretty_json(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| text.to_string())
}

/// The signal page body: the signal, the revocation policy's decision, what the gateway
/// verified, and the execution records it cites as the reporter shipped them (each
/// hash recomputed), with the cited ids no record was found for.
pub fn signal(r: &nexus_proto::control::SignalEvidenceResponse) -> String {
    let Some(s) = &r.signal else {
        return "<p role=\"alert\" id=\"refused\">The gateway returned no signal.</p>".into();
    };
    let sig = s.signal.clone().unwrap_or_default();
    let mut h = String::with_capacity(8 * 1024);
    let action = if s.action.is_empty() {
        "pending"
    } else {
        s.action.as_str()
    };
    let reasons: String = s
        .reasons
        .iter()
        .map(|r| format!("<li>{}</li>", e(r)))
        .collect();
    let _ = write!(
        h,
        "<p>Signal <code id=\"signal-id\">{}</code>: <b>{}</b> about <a href=\"/signals?workload={}\"><code>{}</code></a> (observed as {}), \
         reported by <code>{}</code>, score {:.2}, received {}.</p>\
         <h2>Decision</h2><p>The revocation policy decided <b id=\"signal-action\" class=\"{}\">{}</b>.</p><ul class=\"reasons\">{reasons}</ul>\
         <h2>Verification</h2><p>The gateway checked the cited records before the policy saw the signal: <b>{}</b>.</p>\
         <details><summary>Verification (as the policy saw it)</summary><pre>{}</pre></details>\
         <details><summary>Evidence (as the reporter sent it)</summary><pre>{}</pre></details>",
        e(&s.id),
        e(&sig.kind),
        e(&q(&sig.workload)),
        e(&sig.workload),
        e(&sig.observed_as),
        e(&s.reporter),
        sig.score,
        time(s.received_unix_ms),
        match action {
            "revoke" => "bad",
            "alert" => "warn",
            _ => "",
        },
        e(action),
        e(&verification_status(s)),
        e(&pretty_json(&s.verification_json)),
        e(&pretty_json(&sig.evidence_json)),
    );
    let _ = write!(
        h,
        "<h2>Evidence records</h2><p id=\"evidence-summary\" role=\"status\">The signal cites {} decision ids; {} records from the reporter found, {} missing.</p>",
        sig.decision_ids.len(),
        r.records.len(),
        r.missing.len()
    );
    if !r.records.is_empty() {
        h.push_str("<table id=\"evidence\"><thead><tr><th scope=\"col\">Decision id</th><th scope=\"col\">Time</th><th scope=\"col\">Direction</th><th scope=\"col\">Request</th>\
            <th scope=\"col\">From → to</th><th scope=\"col\">Clause</th><th scope=\"col\">Execution</th><th scope=\"col\">Decision</th><th scope=\"col\">Status</th><th scope=\"col\">Check</th></tr></thead><tbody>");
        for line in r.records.iter().take(MAX_ROWS) {
            let record = match nexus_audit::ExecutionRecord::from_line(line.as_bytes()) {
                Ok(record) => record,
                Err(err) => {
                    let _ = write!(
                        h,
                        "<tr><td colspan=\"10\" class=\"bad\">unreadable record: {}</td></tr>",
                        e(&err.to_string())
                    );
                    continue;
                }
            };
            let execution = match &record.execution_id {
                Some(id) => format!(
                    "<a href=\"/records?execution={}\"><code>{}</code></a>",
                    e(&q(id)),
                    e(id)
                ),
                None => "-".into(),
            };
            let _ = write!(
                h,
                "<tr><td><code class=\"decision-id\">{}</code></td><td>{}</td><td>{}</td><td>{} <code>{}</code></td><td><code>{}</code> → <code>{}</code></td><td>{}</td><td>{execution}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                e(&record.decision_id),
                e(&record.time),
                e(&record.direction),
                e(&record.method),
                e(&record.path),
                e(&record.source),
                e(&record.destination),
                e(record.clause.as_deref().unwrap_or("-")),
                e(&record.decision),
                record.status,
                if record.hash_is_valid() {
                    "hash ok"
                } else {
                    "<span class=\"bad\">hash mismatch</span>"
                },
            );
        }
        h.push_str("</tbody></table>");
    }
    if !r.missing.is_empty() {
        h.push_str("<h3>Cited, with no record from the reporter</h3><ul id=\"missing\">");
        for id in r.missing.iter().take(MAX_ROWS) {
            let _ = write!(h, "<li><code>{}</code></li>", e(id));
        }
        h.push_str("</ul>");
    }
    h.push_str("<p><a href=\"/signals\">Signals</a></p>");
    h
}

/// A page of its own (confirmation, result, error) in the console's layout.
pub fn plain(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · Nexus console</title>\
         <link rel=\"stylesheet\" href=\"/assets/console.css\"></head><body><header><strong>Nexus console</strong> <nav aria-label=\"Pages\"><ul>{}</ul></nav></header>\
         <main><h1>{}</h1>{body}</main></body></html>\n",
        e(title),
        PAGES
            .iter()
            .map(|(p, n)| format!("<li><a href=\"{p}\">{n}</a></li>"))
            .collect::<String>(),
        e(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            e("<script>alert('x')</script>&\"").to_string(),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
        assert_eq!(e("a\u{0}b").to_string(), "a\u{FFFD}b");
        assert_eq!(q("spiffe://a b/<"), "spiffe%3A%2F%2Fa%20b%2F%3C");
    }
    /// Every value the new pages show from the gateway, a sidecar, the registry or a
    /// signal, holding markup, comes out as text on every page.
    #[test]
    fn hostile_values_are_text_on_every_page() {
        use nexus_proto::control::{
            Baseline, PluginVersion, PolicyStatus, RequestRate, Signal, SignalEvidenceResponse,
            WatchEvent, WatchState, watch_event,
        };
        const X: &str = "<script>x()</script><img src=x onerror=y()>\"'";
        let now = 10 * 60_000;
        let mut model = Model::default();
        let version = PluginVersion {
            plugin_uid: X.into(),
            version: X.into(),
            image_digest: X.into(),
            image_repository: X.into(),
            spiffe_id: X.into(),
            clauses: vec![X.into()],
            budgets_json: format!("{{\"{X}\": \"{}\"}}", X.replace('"', "\\\"")),
            state: "certified".into(),
            certified_by: X.into(),
            imported_certified_by: X.into(),
            key_fingerprint: X.into(),
            registered_by: X.into(),
            ..Default::default()
        };
        model.apply(
            WatchEvent {
                event: Some(watch_event::Event::State(WatchState {
                    operator: true,
                    caller: X.into(),
                    gateway: X.into(),
                    sidecars: vec![nexus_proto::control::SidecarEvent {
                        stream: 1,
                        info: Some(SidecarInfo {
                            spiffe_id: X.into(),
                            remote_addr: X.into(),
                            policy: Some(PolicyStatus {
                                revision: X.into(),
                                reload_error: X.into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        gone: false,
                    }],
                    plugins: vec![nexus_proto::control::Plugin {
                        uid: X.into(),
                        name: X.into(),
                        publisher: X.into(),
                        description: X.into(),
                        license_tier: X.into(),
                        registered_by: X.into(),
                        versions: vec![version],
                        ..Default::default()
                    }],
                    baselines: vec![Baseline {
                        workload: X.into(),
                        rate_per_s: 3.0,
                        ..Default::default()
                    }],
                    rates: vec![RequestRate {
                        workload: X.into(),
                        minute_unix_ms: now - 60_000,
                        requests: 7,
                    }],
                    signals: vec![StoredSignal {
                        id: X.into(),
                        reporter: X.into(),
                        signal: Some(Signal {
                            workload: X.into(),
                            kind: X.into(),
                            decision_ids: vec![X.into()],
                            ..Default::default()
                        }),
                        reasons: vec![X.into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                })),
            },
            now,
        );
        model.link = Link::Live;
        let mut pages: Vec<String> = PAGES
            .iter()
            .map(|(path, _)| {
                page(
                    &model,
                    &View {
                        path,
                        query: &[("workload".into(), X.into())],
                        now,
                        csrf: "t",
                    },
                )
            })
            .collect();
        pages.push(signal(&SignalEvidenceResponse {
            signal: model.signals.front().cloned(),
            records: vec![X.into()],
            missing: vec![X.into()],
        }));
        for html in &pages {
            assert!(
                !html.contains("<script>x()") && !html.contains("<img"),
                "{html}"
            );
        }
        let workloads = &pages[2];
        // The budget, the baseline and the request count show for the workload.
        assert!(workloads.contains("3.00 req/s"), "{workloads}");
        assert!(
            workloads.contains("7 requests in the last 30 minutes"),
            "{workloads}"
        );
        assert!(workloads.contains("&lt;script&gt;x()&lt;/script&gt;"));
    }
}
