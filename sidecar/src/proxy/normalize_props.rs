//! Property tests of the request-target normalizer, over targets built from the pieces
//! attackers use (dot segments, encoded dots and slashes, `//`, `;`, backslashes,
//! control characters, double encoding, overlong UTF-8), a bounded number of cases
//! (`PROPTEST_CASES` raises it outside CI).
//!
//! - normalize then serialize is idempotent: the normalized target normalizes to itself;
//! - nothing ambiguous passes: an accepted path has no empty, `.` or `..` segment, no
//!   backslash, `;`, `#`, control character or NUL (raw or encoded), no `%2F`, no
//!   double encoding, upper-case hex only, and its decoded segments are what the policy
//!   sees.

use http::{HeaderMap, HeaderValue, Uri, Version};
use proptest::prelude::*;

use super::normalize::{NormalizeLimits, merge_dot_segments, normalize, remove_dot_segments};

/// The pieces targets are made of.
fn piece() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "a",
        "B",
        "c-flood-17",
        "clauses",
        "/",
        "//",
        ".",
        "..",
        "%2e",
        "%2E",
        "%2e%2e",
        ".%2e",
        "%2f",
        "%2F",
        "%5c",
        "\\",
        ";",
        "%3b",
        "%3B",
        "%00",
        "%0d%0a",
        "%09",
        "%25",
        "%252e",
        "%41",
        "%7e",
        "~",
        "%c0%ae",
        "%c3%a9",
        "%zz",
        "%",
        "#",
        "?",
        "&",
        "=",
        "+",
        " ",
        "%20",
        "@",
        ":",
        "%3a",
        "*",
        "!",
        "$",
        "'",
        "(",
        ")",
        ",",
    ])
}

fn target() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(piece(), 0..12),
        prop::option::of(prop::collection::vec(piece(), 0..6)),
    )
        .prop_map(|(path, query)| {
            let mut t = String::from("/");
            t.extend(path);
            if let Some(query) = query {
                t.push('?');
                t.extend(query);
            }
            t
        })
}

fn host() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(http::header::HOST, HeaderValue::from_static("api.local"));
    headers
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn normalizing_is_idempotent_and_nothing_ambiguous_passes(t in target()) {
        // Targets http itself refuses never reach the normalizer.
        let Ok(uri) = t.parse::<Uri>() else { return Ok(()) };
        let limits = NormalizeLimits::default();
        let Ok(first) = normalize(&uri, &host(), Version::HTTP_11, &limits) else {
            return Ok(());
        };
        let path = first.path.as_str();
        prop_assert!(path.starts_with('/'), "{t} -> {path}");
        prop_assert!(!path.contains("//"), "{t} -> {path}");
        for segment in path.split('/').skip(1) {
            prop_assert!(segment != "." && segment != "..", "{t} -> {path}");
        }
        for bad in ['\\', ';', '#', '\0', '\r', '\n', '\t', '?'] {
            prop_assert!(!path.contains(bad), "{t} -> {path} contains {bad:?}");
        }
        let upper = path.to_ascii_uppercase();
        for bad in ["%2F", "%5C", "%3B", "%00", "%0D", "%0A", "%09", "%2E", "%252"] {
            prop_assert!(!upper.contains(bad), "{t} -> {path} contains {bad}");
        }
        // Escapes left in the path use upper-case hex and are not unreserved characters.
        let bytes = path.as_bytes();
        for (i, b) in bytes.iter().enumerate() {
            if *b == b'%' {
                let hex = bytes.get(i + 1..i + 3).unwrap_or_default();
                prop_assert!(hex.len() == 2 && hex.iter().all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h)), "{t} -> {path}");
            }
        }
        for segment in &first.segments {
            prop_assert!(!segment.is_empty() && !segment.contains('/'), "{t} -> {:?}", first.segments);
        }
        // Serialize and normalize again: the same target, segments and query.
        let again_uri: Uri = first.path_and_query().as_str().parse().expect("a normalized target parses");
        let again = normalize(&again_uri, &host(), Version::HTTP_11, &limits);
        prop_assert_eq!(again.as_ref().map(|n| n.path.clone()), Ok(first.path.clone()), "{}", t);
        let again = again.expect("checked above");
        prop_assert_eq!(&again.segments, &first.segments);
        prop_assert_eq!(&again.query, &first.query);
        prop_assert_eq!(again.path_and_query(), first.path_and_query());
    }

    /// A path already in merged form is kept as it is rather than built again: the
    /// same string as building it, for paths of every shape (`//`, dot segments, a
    /// trailing `/`, none at all).
    #[test]
    fn a_path_kept_as_it_is_is_the_merged_path(
        segments in prop::collection::vec(prop::sample::select(vec!["", ".", "..", "a", "%2E", "b.c", "..."]), 0..8),
        leading in any::<bool>(),
    ) {
        let path = format!("{}{}", if leading { "/" } else { "" }, segments.join("/"));
        prop_assert_eq!(remove_dot_segments(path.clone()), merge_dot_segments(&path), "{}", path);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let mut t = b"/".to_vec();
        t.extend(bytes);
        if let Ok(uri) = Uri::try_from(t.as_slice()) {
            let _ = normalize(&uri, &host(), Version::HTTP_11, &NormalizeLimits::default());
            let _ = normalize(&uri, &HeaderMap::new(), Version::HTTP_2, &NormalizeLimits::default());
        }
    }
}
