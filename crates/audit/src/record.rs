//! The execution record (the wire type the sidecar writes and the gateway stores), the
//! draft the proxy fills in, and the chain hash (defined in the crate docs).

use std::ops::Range;

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::digest::hex;
use crate::error::LineError;

/// The `prev_hash` of the first record of a chain (`seq` 0): 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One proxied request, as written: chain fields first, then what happened.
///
/// The field order is the serialization order and part of the hash definition: never
/// reorder fields; new fields go at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionRecord {
    /// Position in the recording sidecar's chain: 0, 1, 2, ...
    pub seq: u64,
    /// The `hash` of the record before (`seq - 1`); [`GENESIS_HASH`] for `seq` 0.
    pub prev_hash: String,
    /// SHA-256 over `prev_hash` and this record without `hash` (see the crate docs).
    pub hash: String,
    /// The recording sidecar's SPIFFE ID.
    pub sidecar: String,
    /// The policy decision's id (as in the sidecar's decision log and traces).
    pub decision_id: String,
    /// When the request arrived: RFC 3339, milliseconds, UTC (`2026-11-26T09:41:07.123Z`).
    pub time: String,
    /// `inbound` or `outbound`.
    pub direction: String,
    /// The client's SPIFFE ID.
    pub source: String,
    /// The server's SPIFFE ID.
    pub destination: String,
    /// The clause the path names, if any.
    pub clause: Option<String>,
    /// The open execution the request ran under, if any.
    pub execution_id: Option<String>,
    /// HTTP method.
    pub method: String,
    /// The normalized path: what the policy saw and what was forwarded.
    pub path: String,
    /// The HTTP status returned to the client.
    pub status: u16,
    /// `allow`, `deny`, `dry_run_deny`, `error`, `no_policy` or `none`.
    pub decision: String,
    /// The policy's reasons.
    pub reasons: Vec<String>,
    /// The policy revision that decided.
    pub policy_revision: Option<String>,
    /// SHA-256 (hex) of the request body as forwarded.
    pub request_sha256: String,
    /// Request body size in bytes.
    pub request_bytes: u64,
    /// SHA-256 (hex) of the response body as returned.
    pub response_sha256: String,
    /// Response body size in bytes.
    pub response_bytes: u64,
    /// From request head to the end of the response, in milliseconds (rounded to µs).
    pub latency_ms: f64,
    /// The W3C trace id, when the request was traced.
    pub trace_id: Option<String>,
    /// The decision was answered by the decision cache (docs/policy-cache.md), not by
    /// an evaluation; absent (false) otherwise, so records without it hash as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cached: bool,
    /// With a plugin registry: the UUID of the plugin whose execution the request ran
    /// under (docs/registry.md); absent otherwise, so older records hash as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_uid: Option<String>,
    /// The certified version (semver) that execution runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_version: Option<String>,
    /// That version's image digest (`sha256:` + 64 hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
}

/// What the proxy knows about a request: an [`ExecutionRecord`] without its chain
/// fields (`seq`, `prev_hash`, `hash`) and `sidecar`, which the recorder adds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecordDraft {
    /// See [`ExecutionRecord::decision_id`].
    pub decision_id: String,
    /// See [`ExecutionRecord::time`]; [`rfc3339_ms`] formats it.
    pub time: String,
    /// See [`ExecutionRecord::direction`].
    pub direction: String,
    /// See [`ExecutionRecord::source`].
    pub source: String,
    /// See [`ExecutionRecord::destination`].
    pub destination: String,
    /// See [`ExecutionRecord::clause`].
    pub clause: Option<String>,
    /// See [`ExecutionRecord::execution_id`].
    pub execution_id: Option<String>,
    /// See [`ExecutionRecord::method`].
    pub method: String,
    /// See [`ExecutionRecord::path`].
    pub path: String,
    /// See [`ExecutionRecord::status`].
    pub status: u16,
    /// See [`ExecutionRecord::decision`].
    pub decision: String,
    /// See [`ExecutionRecord::reasons`]. Shared with the policy's decision (a proxied
    /// request's record holds the decision's reasons, not a copy).
    pub reasons: std::sync::Arc<[String]>,
    /// See [`ExecutionRecord::policy_revision`].
    pub policy_revision: Option<String>,
    /// See [`ExecutionRecord::request_sha256`]; [`crate::BodyDigest`] computes it.
    pub request_sha256: String,
    /// See [`ExecutionRecord::request_bytes`].
    pub request_bytes: u64,
    /// See [`ExecutionRecord::response_sha256`].
    pub response_sha256: String,
    /// See [`ExecutionRecord::response_bytes`].
    pub response_bytes: u64,
    /// See [`ExecutionRecord::latency_ms`]; non-finite or negative values become 0.
    pub latency_ms: f64,
    /// See [`ExecutionRecord::trace_id`].
    pub trace_id: Option<String>,
    /// See [`ExecutionRecord::cached`].
    pub cached: bool,
    /// See [`ExecutionRecord::plugin_uid`].
    pub plugin_uid: Option<String>,
    /// See [`ExecutionRecord::plugin_version`].
    pub plugin_version: Option<String>,
    /// See [`ExecutionRecord::image_digest`].
    pub image_digest: Option<String>,
}

/// How records (and every time Nexus prints) carry a time: RFC 3339, milliseconds, UTC.
const RFC3339_MS: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
);

/// Formats a time as records carry it: RFC 3339, milliseconds, UTC. The one formatter
/// for the times Nexus writes (records, policy input, runtime data, `nexusctl`).
pub fn rfc3339_ms(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let year = t.year();
    if !(0..=9999).contains(&year) {
        return t.format(RFC3339_MS).unwrap_or_default();
    }
    // Written digit by digit: every request's record and policy input carry a time, and
    // `time`'s format descriptions cost about twenty times as much (callgrind). The same
    // text as RFC3339_MS (`rfc3339_ms_is_the_format_description` checks it).
    let (_, month, day) = t.to_calendar_date();
    let (hour, minute, second, milli) = t.to_hms_milli();
    let mut out = [0u8; 24];
    let mut at = 0;
    let mut put = |value: u32, digits: u32, then: u8| {
        for i in (0..digits).rev() {
            out[at] = b'0' + (value / 10u32.pow(i) % 10) as u8;
            at += 1;
        }
        if then != 0 {
            out[at] = then;
            at += 1;
        }
    };
    put(year.unsigned_abs(), 4, b'-');
    put(u32::from(u8::from(month)), 2, b'-');
    put(u32::from(day), 2, b'T');
    put(u32::from(hour), 2, b':');
    put(u32::from(minute), 2, b':');
    put(u32::from(second), 2, b'.');
    put(u32::from(milli), 3, b'Z');
    String::from_utf8_lossy(&out).into_owned()
}

/// [`rfc3339_ms`] of a time in unix milliseconds (the control protocol's unit); empty
/// when out of range.
pub fn rfc3339_unix_ms(ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map(rfc3339_ms)
        .unwrap_or_default()
}

/// Rounded to whole microseconds so the number prints and parses back to the same text
/// in any JSON library (a short decimal, never an exponent); non-finite or negative: 0.
pub(crate) fn rounded_latency(ms: f64) -> f64 {
    if !(ms.is_finite() && ms > 0.0) {
        return 0.0;
    }
    let rounded = (ms * 1000.0).round() / 1000.0;
    // Beyond f64::MAX / 1000 the product overflows; such a value has no fraction anyway.
    if rounded.is_finite() { rounded } else { ms }
}

impl RecordDraft {
    /// The record's line after its chain fields, `"sidecar":...}`, as `sidecar`
    /// records it: the bytes serde_json writes for those fields of the
    /// [`ExecutionRecord`] (`a_sealed_line_is_serde_jsons` checks it on generated
    /// records), written field by field at a fraction of the cost (a string with nothing
    /// to escape, nearly all of them, is one check and one copy). The request's own thread
    /// writes it, so the draft's strings never cross threads; the writer only puts the
    /// chain fields before it ([`seal_body`]).
    pub(crate) fn write_body(
        &self,
        sidecar: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), serde_json::Error> {
        let mut itoa = itoa::Buffer::new();
        let mut first = true;
        let mut key = |out: &mut Vec<u8>, name: &str| {
            out.extend_from_slice(if first { b"\"" } else { b",\"" });
            first = false;
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
        };
        let text = |out: &mut Vec<u8>, value: &str| -> Result<(), serde_json::Error> {
            let escape = value.bytes().fold(false, |any, b| {
                any | (b < 0x20) | (b == b'"') | (b == b'\\')
            });
            if escape {
                serde_json::to_writer(&mut *out, value)
            } else {
                out.push(b'"');
                out.extend_from_slice(value.as_bytes());
                out.push(b'"');
                Ok(())
            }
        };
        let optional = |out: &mut Vec<u8>, value: &Option<String>| match value {
            Some(value) => text(out, value),
            None => {
                out.extend_from_slice(b"null");
                Ok(())
            }
        };
        key(out, "sidecar");
        text(out, sidecar)?;
        key(out, "decision_id");
        text(out, &self.decision_id)?;
        key(out, "time");
        text(out, &self.time)?;
        key(out, "direction");
        text(out, &self.direction)?;
        key(out, "source");
        text(out, &self.source)?;
        key(out, "destination");
        text(out, &self.destination)?;
        key(out, "clause");
        optional(out, &self.clause)?;
        key(out, "execution_id");
        optional(out, &self.execution_id)?;
        key(out, "method");
        text(out, &self.method)?;
        key(out, "path");
        text(out, &self.path)?;
        key(out, "status");
        out.extend_from_slice(itoa.format(self.status).as_bytes());
        key(out, "decision");
        text(out, &self.decision)?;
        key(out, "reasons");
        out.push(b'[');
        for (i, reason) in self.reasons.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            text(out, reason)?;
        }
        out.push(b']');
        key(out, "policy_revision");
        optional(out, &self.policy_revision)?;
        key(out, "request_sha256");
        text(out, &self.request_sha256)?;
        key(out, "request_bytes");
        out.extend_from_slice(itoa.format(self.request_bytes).as_bytes());
        key(out, "response_sha256");
        text(out, &self.response_sha256)?;
        key(out, "response_bytes");
        out.extend_from_slice(itoa.format(self.response_bytes).as_bytes());
        key(out, "latency_ms");
        // Floats as serde_json writes them (ryu; a non-finite one as null: the recorder
        // rounds first, which rules that out).
        serde_json::to_writer(&mut *out, &self.latency_ms)?;
        key(out, "trace_id");
        optional(out, &self.trace_id)?;
        if self.cached {
            key(out, "cached");
            out.extend_from_slice(b"true");
        }
        for (name, value) in [
            ("plugin_uid", &self.plugin_uid),
            ("plugin_version", &self.plugin_version),
            ("image_digest", &self.image_digest),
        ] {
            if value.is_some() {
                key(out, name);
                optional(out, value)?;
            }
        }
        out.push(b'}');
        Ok(())
    }
}

impl ExecutionRecord {
    /// The record as the writer writes it: one line of compact JSON, without the `\n`.
    pub fn to_line(&self) -> String {
        // Serializing strings, integers and finite floats cannot fail; a non-finite float
        // would become `null`, which the writer's rounding rules out.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The chain hash of this record as it stands (whatever its `hash` field says).
    pub fn compute_hash(&self) -> String {
        let mut unsealed = self.clone();
        unsealed.hash = GENESIS_HASH.to_owned();
        let line = unsealed.to_line();
        match hash_member(line.as_bytes()) {
            Some(member) => chain_hash(&self.prev_hash, line.as_bytes(), member),
            // Only when prev_hash is not 64 lowercase hex digits: no valid hash exists.
            None => String::new(),
        }
    }

    /// Whether `hash` matches the record's content.
    pub fn hash_is_valid(&self) -> bool {
        self.compute_hash() == self.hash
    }

    /// Parses one line (without its `\n`) and checks its hash against its bytes: how the
    /// gateway should ingest a shipped record.
    pub fn from_line(line: &[u8]) -> Result<Self, LineError> {
        check_line(line)?;
        serde_json::from_slice(line).map_err(|e| LineError::Malformed(e.to_string()))
    }
}

/// The chain fields of a line, all `verify` needs besides the bytes.
#[derive(Debug, PartialEq, Eq, Deserialize)]
pub(crate) struct ChainFields {
    pub(crate) seq: u64,
    pub(crate) prev_hash: String,
    pub(crate) hash: String,
}

/// Seals a record's body ([`RecordDraft::write_body`]) into its line (without `\n`)
/// at `seq` after `prev_hash`: writes the line into `line` (cleared first) and returns
/// the record's hash. The chain fields are written here and hashed together with the
/// body, which is hashed as it is: no copy of it is parsed.
pub(crate) fn seal_body(
    seq: u64,
    prev_hash: &str,
    body: &[u8],
    line: &mut Vec<u8>,
) -> Result<String, serde_json::Error> {
    if !is_hex64(prev_hash.as_bytes()) {
        return Err(serde::ser::Error::custom(
            "prev_hash is not 64 lowercase hex digits",
        ));
    }
    line.clear();
    line.extend_from_slice(b"{\"seq\":");
    line.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    line.extend_from_slice(b",\"prev_hash\":\"");
    line.extend_from_slice(prev_hash.as_bytes());
    line.extend_from_slice(HASH_END);
    let mut context = Context::new(&SHA256);
    context.update(prev_hash.as_bytes());
    context.update(line);
    context.update(body);
    let hash = hex(context.finish().as_ref());
    line.extend_from_slice(HASH_KEY);
    line.extend_from_slice(hash.as_bytes());
    line.extend_from_slice(HASH_END);
    line.extend_from_slice(body);
    Ok(hash)
}

/// Seals a draft into its line (without `\n`): returns the record's hash and the line.
#[cfg(test)]
pub(crate) fn seal(
    seq: u64,
    prev_hash: &str,
    sidecar: &str,
    draft: RecordDraft,
) -> Result<(String, Vec<u8>), serde_json::Error> {
    let mut draft = draft;
    draft.latency_ms = rounded_latency(draft.latency_ms);
    let mut body = Vec::new();
    draft.write_body(sidecar, &mut body)?;
    let mut line = Vec::new();
    let hash = seal_body(seq, prev_hash, &body, &mut line)?;
    Ok((hash, line))
}

/// Parses a line's chain fields and checks its hash.
pub(crate) fn check_line(line: &[u8]) -> Result<ChainFields, LineError> {
    let fields: ChainFields = serde_json::from_slice(line).map_err(|e| {
        if e.is_eof() {
            LineError::Truncated
        } else {
            LineError::Malformed(e.to_string())
        }
    })?;
    let member = hash_member(line).ok_or_else(|| {
        LineError::Malformed(
            "the line does not begin {\"seq\":N,\"prev_hash\":\"<64 hex>\",\"hash\":\"<64 hex>\", as the sidecar writes it"
                .to_owned(),
        )
    })?;
    let computed = chain_hash(&fields.prev_hash, line, member);
    if computed != fields.hash {
        return Err(LineError::HashMismatch {
            recorded: fields.hash,
            computed,
        });
    }
    Ok(fields)
}

const HASH_KEY: &[u8] = b"\"hash\":\"";
const HASH_END: &[u8] = b"\",";

/// The byte range of the `"hash":"<64 hex>",` member, if the line begins as the writer
/// writes it: `{"seq":N,"prev_hash":"<64 hex>","hash":"<64 hex>",`.
fn hash_member(line: &[u8]) -> Option<Range<usize>> {
    let mut pos = expect(line, 0, b"{\"seq\":")?;
    let digits = line
        .get(pos..)?
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == 0 {
        return None;
    }
    pos = expect(line, pos + digits, b",\"prev_hash\":\"")?;
    pos = hex64(line, pos)?;
    pos = expect(line, pos, HASH_END)?;
    let start = pos;
    pos = expect(line, pos, HASH_KEY)?;
    pos = hex64(line, pos)?;
    pos = expect(line, pos, HASH_END)?;
    Some(start..pos)
}

fn expect(line: &[u8], pos: usize, literal: &[u8]) -> Option<usize> {
    line.get(pos..)?
        .starts_with(literal)
        .then_some(pos + literal.len())
}

fn hex64(line: &[u8], pos: usize) -> Option<usize> {
    is_hex64(line.get(pos..pos + 64)?).then_some(pos + 64)
}

fn is_hex64(digits: &[u8]) -> bool {
    digits.len() == 64
        && digits
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `hex(SHA-256(prev_hash || line without the hash member))`.
fn chain_hash(prev_hash: &str, line: &[u8], member: Range<usize>) -> String {
    let mut context = Context::new(&SHA256);
    context.update(prev_hash.as_bytes());
    context.update(&line[..member.start]);
    context.update(&line[member.end..]);
    hex(context.finish().as_ref())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    proptest::proptest! {
        /// The hand-written formatter writes what the format description does, for any
        /// time `time` can hold, a day inside its range so that any offset stays in it
        /// (years outside 0..=9999 go to the description).
        #[test]
        fn rfc3339_ms_is_the_format_description(
            nanos in -377_705_030_400_000_000_000_i128..253_402_214_399_999_999_999_i128,
            offset in -86_399_i32..86_399,
        ) {
            let t = OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap();
            let t = t.to_offset(time::UtcOffset::from_whole_seconds(offset).unwrap());
            let expected = t
                .to_offset(time::UtcOffset::UTC)
                .format(RFC3339_MS)
                .unwrap_or_default();
            proptest::prop_assert_eq!(rfc3339_ms(t), expected);
        }
    }

    fn any_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            "[a-z0-9:/._-]{0,40}",
            any::<String>(),
            "[\"\\\\\u{0}-\u{1f}\u{7f}é😀a]{0,8}",
        ]
    }

    fn any_record() -> impl proptest::strategy::Strategy<Value = ExecutionRecord> {
        use proptest::prelude::*;
        let option = || proptest::option::of(any_text());
        (
            (
                any::<u64>(),
                any_text(),
                any_text(),
                any_text(),
                any_text(),
                any_text(),
            ),
            (
                any_text(),
                any_text(),
                any_text(),
                option(),
                option(),
                any_text(),
            ),
            (
                any_text(),
                any::<u16>(),
                any_text(),
                proptest::collection::vec(any_text(), 0..4),
                option(),
            ),
            (
                any_text(),
                any::<u64>(),
                any_text(),
                any::<u64>(),
                any::<f64>(),
                option(),
            ),
            (any::<bool>(), option(), option(), option()),
        )
            .prop_map(|(a, b, c, d, e)| ExecutionRecord {
                seq: a.0,
                prev_hash: a.1,
                hash: a.2,
                sidecar: a.3,
                decision_id: a.4,
                time: a.5,
                direction: b.0,
                source: b.1,
                destination: b.2,
                clause: b.3,
                execution_id: b.4,
                method: b.5,
                path: c.0,
                status: c.1,
                decision: c.2,
                reasons: c.3,
                policy_revision: c.4,
                request_sha256: d.0,
                request_bytes: d.1,
                response_sha256: d.2,
                response_bytes: d.3,
                latency_ms: d.4,
                trace_id: d.5,
                cached: e.0,
                plugin_uid: e.1,
                plugin_version: e.2,
                image_digest: e.3,
            })
    }

    proptest::proptest! {
        /// A sealed line is serde_json's bytes of the record (which `to_line`, `verify`
        /// and the gateway read), for any record: escapes, unicode, absent fields, any
        /// float; and its hash is the one `check_line` computes from those bytes.
        #[test]
        fn a_sealed_line_is_serde_jsons(mut record in any_record(), prev in "[0-9a-f]{64}") {
            record.prev_hash = prev;
            let draft = RecordDraft {
                decision_id: record.decision_id.clone(),
                time: record.time.clone(),
                direction: record.direction.clone(),
                source: record.source.clone(),
                destination: record.destination.clone(),
                clause: record.clause.clone(),
                execution_id: record.execution_id.clone(),
                method: record.method.clone(),
                path: record.path.clone(),
                status: record.status,
                decision: record.decision.clone(),
                reasons: record.reasons.as_slice().into(),
                policy_revision: record.policy_revision.clone(),
                request_sha256: record.request_sha256.clone(),
                request_bytes: record.request_bytes,
                response_sha256: record.response_sha256.clone(),
                response_bytes: record.response_bytes,
                latency_ms: record.latency_ms,
                trace_id: record.trace_id.clone(),
                cached: record.cached,
                plugin_uid: record.plugin_uid.clone(),
                plugin_version: record.plugin_version.clone(),
                image_digest: record.image_digest.clone(),
            };
            let mut body = Vec::new();
            draft.write_body(&record.sidecar, &mut body).unwrap();
            let mut line = Vec::new();
            record.hash = seal_body(record.seq, &record.prev_hash, &body, &mut line).unwrap();
            proptest::prop_assert_eq!(
                String::from_utf8(line.clone()).unwrap(),
                serde_json::to_string(&record).unwrap()
            );
            proptest::prop_assert_eq!(check_line(&line).unwrap().hash, record.hash);
        }
    }

    #[test]
    fn latency_is_rounded_to_microseconds_and_never_made_infinite() {
        assert_eq!(rounded_latency(1.234_567_8), 1.235);
        assert_eq!(rounded_latency(f64::NAN), 0.0);
        assert_eq!(rounded_latency(-1.0), 0.0);
        assert_eq!(rounded_latency(f64::INFINITY), 0.0);
        // The product would overflow: the value is kept (it has no fraction to round).
        assert_eq!(rounded_latency(1e307), 1e307);
    }

    #[test]
    fn rfc3339_ms_edges() {
        for (nanos, text) in [
            (0_i128, "1970-01-01T00:00:00.000Z"),
            (1_795_683_921_123_456_789, "2026-11-26T09:05:21.123Z"),
            (-1, "1969-12-31T23:59:59.999Z"),
            (253_402_300_799_999_999_999, "9999-12-31T23:59:59.999Z"),
            (-62_167_219_200_000_000_000, "0000-01-01T00:00:00.000Z"),
        ] {
            let t = OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap();
            assert_eq!(rfc3339_ms(t), text);
        }
    }

    /// A typical draft; `n` varies it.
    pub(crate) fn draft(n: u64) -> RecordDraft {
        RecordDraft {
            decision_id: format!("d-{n}"),
            time: "2026-11-26T09:41:07.123Z".into(),
            direction: "inbound".into(),
            source: "spiffe://nexus.local/ns/plugins/sa/flood-model".into(),
            destination: "spiffe://nexus.local/ns/data/sa/hazard-api".into(),
            clause: Some("c-flood-17".into()),
            execution_id: None,
            method: "GET".into(),
            path: "/clauses/c-flood-17/rainfall".into(),
            status: 200,
            decision: "allow".into(),
            reasons: std::sync::Arc::from(["bound \"clause\"\n".to_string()]),
            policy_revision: Some("r1".into()),
            request_sha256: crate::EMPTY_SHA256.into(),
            request_bytes: 0,
            response_sha256: crate::EMPTY_SHA256.into(),
            response_bytes: 10,
            latency_ms: 1.234_567_8 * n as f64,
            trace_id: None,
            cached: false,
            plugin_uid: None,
            plugin_version: None,
            image_digest: None,
        }
    }

    #[test]
    fn sealed_line_checks_and_parses_back_to_the_same_bytes() {
        let (hash, line) = seal(7, GENESIS_HASH, "spiffe://x/s", draft(3)).unwrap();
        let fields = check_line(&line).unwrap();
        assert_eq!((fields.seq, fields.hash.as_str()), (7, hash.as_str()));
        let record = ExecutionRecord::from_line(&line).unwrap();
        assert_eq!(record.latency_ms, 3.704);
        assert!(record.hash_is_valid());
        assert_eq!(record.to_line().as_bytes(), &line[..]);
    }

    #[test]
    fn the_documented_definition_holds() {
        let (hash, line) = seal(0, GENESIS_HASH, "spiffe://x/s", draft(1)).unwrap();
        let text = String::from_utf8(line).unwrap();
        let unhashed = text.replacen(&format!("\"hash\":\"{hash}\","), "", 1);
        let mut context = Context::new(&SHA256);
        context.update(GENESIS_HASH.as_bytes());
        context.update(unhashed.as_bytes());
        assert_eq!(hex(context.finish().as_ref()), hash);
        let mut unsealed = ExecutionRecord::from_line(text.as_bytes()).unwrap();
        unsealed.hash = String::new();
        let without: serde_json::Value = serde_json::from_str(&unhashed).unwrap();
        assert!(without.get("hash").is_none());
        assert_eq!(without["seq"], 0);
    }

    #[test]
    fn edits_and_cuts_are_told_apart() {
        let (_, line) = seal(1, GENESIS_HASH, "spiffe://x/s", draft(1)).unwrap();
        let text = String::from_utf8(line.clone()).unwrap();
        let edited = text.replace("\"status\":200", "\"status\":201");
        assert!(matches!(
            check_line(edited.as_bytes()),
            Err(LineError::HashMismatch { .. })
        ));
        assert_eq!(
            check_line(&line[..line.len() / 2]),
            Err(LineError::Truncated)
        );
        let spaced = text.replacen(",", ", ", 1);
        assert!(matches!(
            check_line(spaced.as_bytes()),
            Err(LineError::Malformed(_))
        ));
    }

    #[test]
    fn plugin_fields_are_hashed_and_older_records_still_verify() {
        // A record written before the fields existed keeps its bytes and hash.
        let (old_hash, old_line) = seal(0, GENESIS_HASH, "spiffe://x/s", draft(1)).unwrap();
        let old_text = String::from_utf8(old_line.clone()).unwrap();
        assert!(!old_text.contains("plugin_uid"), "{old_text}");
        let parsed = ExecutionRecord::from_line(&old_line).unwrap();
        assert_eq!(parsed.plugin_uid, None);
        assert_eq!(parsed.to_line().as_bytes(), &old_line[..]);
        // A record under a registry execution carries them, inside the hash.
        let mut d = draft(2);
        d.plugin_uid = Some("6f1c2d3e-0000-4000-8000-000000000001".into());
        d.plugin_version = Some("1.4.2".into());
        d.image_digest = Some(format!("sha256:{}", "ab".repeat(32)));
        let (_, line) = seal(1, &old_hash, "spiffe://x/s", d).unwrap();
        let text = String::from_utf8(line.clone()).unwrap();
        assert!(
            text.ends_with(&format!(
                ",\"plugin_uid\":\"6f1c2d3e-0000-4000-8000-000000000001\",\"plugin_version\":\"1.4.2\",\"image_digest\":\"sha256:{}\"}}",
                "ab".repeat(32)
            )),
            "{text}"
        );
        let record = ExecutionRecord::from_line(&line).unwrap();
        assert_eq!(record.plugin_version.as_deref(), Some("1.4.2"));
        assert_eq!(record.to_line().as_bytes(), &line[..]);
        // Changing the version a record claims breaks its hash.
        let forged = text.replace("\"1.4.2\"", "\"1.4.3\"");
        assert!(matches!(
            check_line(forged.as_bytes()),
            Err(LineError::HashMismatch { .. })
        ));
    }

    #[test]
    fn time_format() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_795_685_267_123_456_789).unwrap();
        assert_eq!(rfc3339_ms(t), "2026-11-26T09:27:47.123Z");
    }
}
