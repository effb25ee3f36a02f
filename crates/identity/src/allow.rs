//! Which peer SPIFFE IDs are accepted: exact IDs and `spiffe://td/path/*` prefixes.
//!
//! Entries are normalized as the SPIFFE ID specification asks: the scheme and the trust
//! domain are case-insensitive and kept in lower case (`spiffe://NEXUS.local/x` is
//! `spiffe://nexus.local/x`), the path is case-sensitive and kept as written; anything
//! the specification does not allow (other characters, empty or dot segments, a
//! trailing `/`, more than 2048 bytes) is refused. [`canonical_id`] and
//! [`canonical_pattern`] give the normalized spelling to every place that stores or
//! compares IDs, so one workload has one spelling everywhere.
//!
//! Every entry names its trust domain, so with federation each trust domain has its own
//! allowed IDs: a bundle for `partner.example` lets its workloads authenticate, but only
//! entries under `spiffe://partner.example/` let them in.

use spiffe::SpiffeId;

/// An entry of an allow list that is not a valid SPIFFE ID or prefix.
#[derive(Debug, thiserror::Error)]
#[error("`{entry}` is not a SPIFFE ID or `spiffe://trust-domain/path/*` prefix: {reason}")]
pub struct AllowListError {
    entry: String,
    reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Matcher {
    Exact(String),
    /// Matches IDs that start with this string, which always ends in `/`.
    Prefix(String),
}

/// An ordered list of allowed SPIFFE IDs; empty allows nobody.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    matchers: Vec<Matcher>,
}

/// Longest SPIFFE ID accepted (the specification's limit for the URI).
pub const MAX_ID_BYTES: usize = 2048;

/// The normalized spelling of one exact SPIFFE ID (no wildcard): lower-case scheme and
/// trust domain, the path as written. Refuses what the specification does not allow.
pub fn canonical_id(id: &str) -> Result<String, AllowListError> {
    let err = |reason: String| AllowListError {
        entry: id.to_string(),
        reason,
    };
    if id.len() > MAX_ID_BYTES {
        return Err(err(format!("longer than {MAX_ID_BYTES} bytes")));
    }
    if id.contains('*') {
        return Err(err(
            "a wildcard is not allowed here: give one workload's exact SPIFFE ID".into(),
        ));
    }
    let parsed = SpiffeId::new(id).map_err(|e| err(e.to_string()))?;
    if parsed.path().is_empty() {
        return Err(err(
            "names a trust domain, not a workload: add the workload's path".into(),
        ));
    }
    Ok(parsed.to_string())
}

/// The normalized spelling of an exact SPIFFE ID or a `spiffe://td/path/*` prefix
/// pattern (see [`canonical_id`]).
pub fn canonical_pattern(entry: &str) -> Result<String, AllowListError> {
    let err = |reason: String| AllowListError {
        entry: entry.to_string(),
        reason,
    };
    if entry.len() > MAX_ID_BYTES {
        return Err(err(format!("longer than {MAX_ID_BYTES} bytes")));
    }
    if let Some(base) = entry.strip_suffix("/*") {
        if base.contains('*') {
            return Err(err(
                "a wildcard is only allowed as a final `/*` segment".into()
            ));
        }
        // `spiffe://td/*` is the whole trust domain: the base is an ID or a bare TD.
        let canonical = SpiffeId::new(base).map(|id| id.to_string()).map_err(|e| {
            err(format!(
                "the part before `/*` must be a SPIFFE ID or spiffe://trust-domain: {e}"
            ))
        })?;
        Ok(format!("{canonical}/*"))
    } else if entry.contains('*') {
        Err(err(
            "a wildcard is only allowed as a final `/*` segment".into()
        ))
    } else {
        SpiffeId::new(entry)
            .map(|id| id.to_string())
            .map_err(|e| err(e.to_string()))
    }
}

impl AllowList {
    /// Parses entries such as `spiffe://nexus.local/ns/plugins/sa/flood-model` or
    /// `spiffe://nexus.local/ns/plugins/*`, normalized ([`canonical_pattern`]).
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, AllowListError> {
        let mut matchers = Vec::with_capacity(entries.len());
        for entry in entries {
            let canonical = canonical_pattern(entry.as_ref())?;
            match canonical.strip_suffix("/*") {
                Some(base) => matchers.push(Matcher::Prefix(format!("{base}/"))),
                None => matchers.push(Matcher::Exact(canonical)),
            }
        }
        Ok(Self { matchers })
    }

    /// True when `id` matches an entry.
    pub fn allows(&self, id: &str) -> bool {
        self.matchers.iter().any(|m| match m {
            Matcher::Exact(e) => e == id,
            Matcher::Prefix(p) => id.starts_with(p.as_str()) && id.len() > p.len(),
        })
    }

    /// The entries, comma-separated, for error messages.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .matchers
            .iter()
            .map(|m| match m {
                Matcher::Exact(e) => e.clone(),
                Matcher::Prefix(p) => format!("{p}*"),
            })
            .collect();
        parts.join(", ")
    }

    /// True when nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.matchers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_prefix() {
        let list = AllowList::parse(&[
            "spiffe://nexus.local/ns/plugins/*",
            "spiffe://partner.example/ns/x/sa/y",
        ])
        .unwrap();
        assert!(list.allows("spiffe://nexus.local/ns/plugins/sa/flood-model"));
        assert!(!list.allows("spiffe://nexus.local/ns/plugins"));
        assert!(!list.allows("spiffe://nexus.local/ns/plugins-evil/sa/x"));
        assert!(list.allows("spiffe://partner.example/ns/x/sa/y"));
        assert!(!list.allows("spiffe://partner.example/ns/x/sa/y2"));
        assert!(!list.allows("spiffe://other.td/ns/plugins/sa/flood-model"));
    }

    #[test]
    fn whole_trust_domain() {
        let list = AllowList::parse(&["spiffe://nexus.local/*"]).unwrap();
        assert!(list.allows("spiffe://nexus.local/a"));
        assert!(!list.allows("spiffe://nexus.localx/a"));
    }

    #[test]
    fn trust_domains_are_normalized_and_bad_characters_refused() {
        let list = AllowList::parse(&["spiffe://NEXUS.Local/ns/Plugins/*"]).unwrap();
        assert!(list.allows("spiffe://nexus.local/ns/Plugins/sa/x"));
        assert!(!list.allows("spiffe://nexus.local/ns/plugins/sa/x"));
        assert_eq!(
            canonical_id("SPIFFE://NEXUS.local/ns/a/sa/B").unwrap(),
            "spiffe://nexus.local/ns/a/sa/B"
        );
        assert_eq!(
            canonical_pattern("spiffe://Nexus.Local/*").unwrap(),
            "spiffe://nexus.local/*"
        );
        for bad in [
            "spiffe://nexus.local/ns/a\u{1b}[31m",
            "spiffe://nexus.local/ns/a\u{202e}b",
            "spiffe://nexus.local/ns/a/",
            "spiffe://nexus.local/ns/../x",
            "spiffe://nexus.local/ns//x",
            "spiffe://nexus.local/ns/a%2fb",
            "spiffe://nexus.local:443/a",
            "spiffe://nexus.local",
            "spiffe://nexus.local/a*",
        ] {
            assert!(canonical_id(bad).is_err(), "{bad:?}");
        }
        assert!(canonical_id(&format!("spiffe://td/{}", "a".repeat(3000))).is_err());
    }

    #[test]
    fn rejects_bad_entries() {
        assert!(AllowList::parse(&["http://x/y"]).is_err());
        assert!(AllowList::parse(&["spiffe://nexus.local/a*"]).is_err());
        assert!(AllowList::parse(&["spiffe://Bad Domain/*"]).is_err());
    }
}
