//! SHA-256 of a body computed frame by frame as it streams through the proxy, so a
//! record's body hashes never require buffering a body.

use ring::digest::{Context, SHA256};

/// The SHA-256 of zero bytes: the `request_sha256`/`response_sha256` of an empty body.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// A running SHA-256 and byte count over a body's frames.
#[derive(Clone)]
pub struct BodyDigest {
    context: Context,
    bytes: u64,
}

impl BodyDigest {
    /// A digest of nothing yet.
    pub fn new() -> Self {
        Self {
            context: Context::new(&SHA256),
            bytes: 0,
        }
    }

    /// Adds one frame.
    pub fn update(&mut self, data: &[u8]) {
        self.context.update(data);
        self.bytes += data.len() as u64;
    }

    /// Bytes seen so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The lowercase hex SHA-256 and the byte count.
    pub fn finish(self) -> (String, u64) {
        (hex(self.context.finish().as_ref()), self.bytes)
    }
}

impl Default for BodyDigest {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for BodyDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyDigest")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_body_hashes_to_the_empty_constant() {
        assert_eq!(BodyDigest::new().finish(), (EMPTY_SHA256.to_owned(), 0));
    }

    #[test]
    fn frames_hash_like_the_whole_body() {
        let mut digest = BodyDigest::new();
        digest.update(b"hello ");
        digest.update(b"");
        digest.update(b"world");
        let (hash, bytes) = digest.finish();
        assert_eq!(bytes, 11);
        // sha256("hello world")
        assert_eq!(
            hash,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
    }
}
