//! Execution records: one hash-chained JSON line per proxied request.
//!
//! The proxy fills a [`RecordDraft`] (hashing bodies with [`BodyDigest`] as the frames
//! stream by) and hands it to a [`Recorder`]. The recorder never blocks the request: the
//! request's thread writes the record's fields (all but the chain fields) into a bounded
//! queue, and one writer thread assigns each record its sequence number and chain hash,
//! writes it to the [`Sink`] and flushes. A full queue drops the
//! record, counts it and logs it (rate-limited); in `strict` mode the proxy asks
//! [`Recorder::is_healthy`] before forwarding and awaits [`Recorder::record_strict`].
//! [`verify()`] (and `nexusctl audit verify`) checks a chain and names its first broken
//! record.
//!
//! # The chain (stable: auditors re-implement it)
//!
//! A record file is UTF-8 JSON lines, one [`ExecutionRecord`] per line, each line ended by
//! `\n`. Records are numbered `seq` = 0, 1, 2, ... per sidecar; record 0 has `prev_hash`
//! = 64 × `"0"` ([`GENESIS_HASH`]) and every later record has `prev_hash` = the `hash` of
//! the record before it. The writer emits compact JSON (no whitespace) with the fields in
//! the order of [`ExecutionRecord`], so every line begins with
//!
//! ```text
//! {"seq":<N>,"prev_hash":"<P>","hash":"<H>",
//! ```
//!
//! where `P` and `H` are 64 lowercase hex digits. Let `U` be the line's bytes (without the
//! `\n`) with the member `"hash":"<H>",` (exactly those 75 bytes, the first occurrence)
//! removed. Then
//!
//! ```text
//! H = lowercase_hex(SHA-256(P || U))      (P as its 64 ASCII bytes)
//! ```
//!
//! `U` is also the compact serialization of the record without its `hash` field, so the
//! hash covers every field, `seq` and `prev_hash` included. Verification needs only the
//! bytes and `seq`/`prev_hash`/`hash`: fields added in later versions (appended at the
//! end) do not change the definition. In Python:
//!
//! ```text
//! prev, seq = "0" * 64, None
//! for n, line in enumerate(open("records.jsonl", "rb"), 1):
//!     line = line.rstrip(b"\n"); rec = json.loads(line)
//!     u = line.replace(b'"hash":"' + rec["hash"].encode() + b'",', b"", 1)
//!     assert hashlib.sha256(rec["prev_hash"].encode() + u).hexdigest() == rec["hash"], n
//!     assert seq is None or (rec["seq"] == seq + 1 and rec["prev_hash"] == prev), n
//!     prev, seq = rec["hash"], rec["seq"]
//! ```
//!
//! What the chain detects: an edited record (its hash no longer matches), a deleted or
//! inserted record (a `seq` gap or a `prev_hash` mismatch at the next record), reordered
//! records. What it cannot detect alone: records cut from the end of the newest file,
//! whole oldest files removed (the chain then starts at a later `seq`; verify says so),
//! or a file rewritten from an edit onwards with every later hash recomputed (the hash
//! has no key). The copy shipped to the gateway closes those gaps: compare its last
//! `hash` with the `last_hash` of [`VerifyReport`].
//!
//! # Files, rotation and durability
//!
//! See [`Sink`]: `records.jsonl` is the file being written; rotation renames it to
//! `records.jsonl.1` (shifting `.1` to `.2` and so on, logrotate style) and the chain
//! continues in the new file. Each batch of records is written with one `write(2)` before
//! the recorder acknowledges it (so a record acknowledged by [`Recorder::record_strict`]
//! survives a crash of the sidecar), and the file is `fsync`ed at most
//! [`SYNC_INTERVAL`] after a write, before every rotation, on [`Recorder::flush`] and on
//! shutdown: a machine crash loses at most the last second of records. A crash in the
//! middle of a write leaves a truncated last line; on restart the writer continues the
//! chain from the last complete record on a new line, leaving the fragment visible, and
//! [`verify()`] reports it as a warning ("truncated record (a crash or a failed write
//! during write) ...; the chain continues"), not a break: the records on both sides still
//! chain. A full disk
//! (ENOSPC, a quota) is no crash: the records it costs are counted as dropped
//! ([`Recorder::dropped`]) with a "disk full" log line, and the writer resumes once there
//! is room.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod digest;
pub mod error;
pub mod files;
pub mod record;
pub mod recorder;
pub mod sink;
pub mod verify;

pub use digest::{BodyDigest, EMPTY_SHA256};
pub use error::{AuditError, LineError, RecordError};
pub use files::{chain_files, rotated_files};
pub use record::{ExecutionRecord, GENESIS_HASH, RecordDraft, rfc3339_ms, rfc3339_unix_ms};
pub use recorder::{
    AuditConfig, AuditMode, AuditStats, DEFAULT_LINGER, DEFAULT_QUEUE_CAPACITY, MAX_LINGER,
    Recorder, SYNC_INTERVAL,
};
pub use sink::{ChainHead, DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES, RecordWriter, Sink};
pub use verify::{Finding, FindingKind, VerifyReport, verify};
