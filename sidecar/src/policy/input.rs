//! The policy input document of DESIGN.md, built once per request from what the
//! sidecar has verified: the peer's SPIFFE ID from the handshake, the normalized path
//! (exactly what will be forwarded), the clause, and the execution the request is under.

use http::HeaderMap;
use nexus_policy::Value;
use time::OffsetDateTime;

use super::runtime::{Execution, Loaded};
use crate::config::PolicyConfig;
use crate::proxy::normalize::Normalized;

/// The header a plugin may use to name the execution it works under.
pub const EXECUTION_HEADER: &str = "x-nexus-execution";

/// What the proxy knows about a request.
#[derive(Debug)]
pub struct RequestFacts<'a> {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Who sends the request (inbound: the authenticated peer; outbound: this workload).
    pub source: &'a str,
    /// Who receives it (inbound: this workload; outbound: the expected upstream).
    pub destination: &'a str,
    /// HTTP method.
    pub method: &'a str,
    /// The normalized target.
    pub target: &'a Normalized,
    /// Request headers (only the configured ones are copied).
    pub headers: &'a HeaderMap,
    /// Declared body size, or -1 when the body streams without a declared length.
    pub body_size: i64,
}

/// The clause named by the path: the segment after `after` (default `clauses`).
pub fn clause_of<'a>(segments: &'a [String], after: &str) -> Option<&'a str> {
    let at = segments.iter().position(|s| s == after)?;
    segments.get(at + 1).map(String::as_str)
}

/// RFC 3339 UTC with milliseconds, as OPA's `time.now_ns` users expect to parse.
pub fn rfc3339_millis(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

fn execution_json(ex: &Execution) -> serde_json::Value {
    serde_json::json!({"id": ex.id, "plugin": ex.plugin, "clause": ex.clause, "not_after": ex.not_after})
}

/// Builds the input document; also returns the clause and execution id for records.
pub fn build(
    facts: &RequestFacts<'_>,
    config: &PolicyConfig,
    loaded: &Loaded,
    now: OffsetDateTime,
) -> (Value, Option<String>, Option<String>) {
    let segments = &facts.target.segments;
    let clause = clause_of(segments, &config.clause_after_segment);
    let named = facts
        .headers
        .get(EXECUTION_HEADER)
        .and_then(|v| v.to_str().ok());
    let execution = loaded.execution_for(named, facts.source, clause, now.unix_timestamp_nanos());
    let execution_value = match (execution, named) {
        (Some(ex), _) => execution_json(ex),
        // Named but unknown: the policy sees the id it cannot find.
        (None, Some(id)) => serde_json::json!({"id": id}),
        (None, None) => serde_json::Value::Null,
    };
    let mut headers = serde_json::Map::new();
    for name in &config.input_headers {
        if let Some(value) = facts
            .headers
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
        {
            headers.insert(name.clone(), serde_json::Value::from(value));
        }
    }
    let input = serde_json::json!({
        "direction": facts.direction,
        "source": {"spiffe_id": facts.source},
        "destination": {"spiffe_id": facts.destination},
        "request": {
            "method": facts.method,
            "path": facts.target.path,
            "segments": segments,
            "query": facts.target.query,
            "headers": headers,
            "body_size": facts.body_size,
        },
        "clause": clause,
        "execution": execution_value,
        "time": rfc3339_millis(now),
    });
    let execution_id = execution.map(|e| e.id.clone()).or(named.map(String::from));
    (Value::from(input), clause.map(String::from), execution_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clause_is_the_segment_after() {
        let segs: Vec<String> = ["api", "clauses", "c-1", "rain"].map(String::from).to_vec();
        assert_eq!(clause_of(&segs, "clauses"), Some("c-1"));
        let segs: Vec<String> = ["clauses"].map(String::from).to_vec();
        assert_eq!(clause_of(&segs, "clauses"), None);
    }

    #[test]
    fn time_format() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_795_683_921_123_456_789).unwrap();
        assert_eq!(rfc3339_millis(t), "2026-11-26T09:05:21.123Z");
    }
}
