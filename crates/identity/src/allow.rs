//! Which peer SPIFFE IDs are accepted: exact IDs and `spiffe://td/path/*` prefixes.
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

impl AllowList {
    /// Parses entries such as `spiffe://nexus.local/ns/plugins/sa/flood-model` or
    /// `spiffe://nexus.local/ns/plugins/*`.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, AllowListError> {
        let mut matchers = Vec::with_capacity(entries.len());
        for entry in entries {
            let entry = entry.as_ref();
            let err = |reason: String| AllowListError {
                entry: entry.to_string(),
                reason,
            };
            if let Some(base) = entry.strip_suffix("/*") {
                // `spiffe://td/*` is the whole trust domain; validate the base as an ID or a TD.
                let valid = SpiffeId::new(base).is_ok()
                    || base
                        .strip_prefix("spiffe://")
                        .is_some_and(|td| spiffe::TrustDomain::new(td).is_ok());
                if !valid {
                    return Err(err(
                        "the part before `/*` must be a SPIFFE ID or spiffe://trust-domain".into(),
                    ));
                }
                matchers.push(Matcher::Prefix(format!("{base}/")));
            } else if entry.contains('*') {
                return Err(err(
                    "a wildcard is only allowed as a final `/*` segment".into()
                ));
            } else {
                SpiffeId::new(entry).map_err(|e| err(e.to_string()))?;
                matchers.push(Matcher::Exact(entry.to_string()));
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
    fn rejects_bad_entries() {
        assert!(AllowList::parse(&["http://x/y"]).is_err());
        assert!(AllowList::parse(&["spiffe://nexus.local/a*"]).is_err());
        assert!(AllowList::parse(&["spiffe://Bad Domain/*"]).is_err());
    }
}
