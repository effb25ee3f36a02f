//! Errors of the audit crate: starting a recorder, recording, reading a record line.

use std::path::PathBuf;

/// Why a record was not written. Every one of these is also counted (`dropped` or
/// `write_errors`) and logged, so a caller may ignore it outside strict mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The queue was full (the sink is slower than the traffic); the record was dropped.
    #[error(
        "audit queue full ({capacity} records): the execution record was dropped; the sink is too slow or stalled"
    )]
    QueueFull {
        /// The queue's capacity (`queue_capacity` in the config).
        capacity: usize,
    },
    /// The writer has stopped (shut down); the record was dropped.
    #[error("audit writer stopped: the execution record was dropped")]
    Closed,
    /// The sink failed to write the record (disk full, file removed, closed stdout).
    #[error("audit sink failed, the execution record was not written: {0}")]
    Sink(String),
}

/// Why a recorder could not start.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A setting is out of range; the message names it and the fix.
    #[error("audit config: {0}")]
    Config(String),
    /// The record file (or its folder) could not be opened or read.
    #[error("audit record file {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The sink could not be opened, or what it holds could not be read back.
    #[error("audit sink could not be opened: {0}")]
    Open(#[source] std::io::Error),
    /// Another process holds the record file's lock.
    #[error(
        "audit record file {path} is locked by another process: two writers would break its chain; give each sidecar its own file"
    )]
    Locked {
        /// The record file.
        path: PathBuf,
    },
    /// The writer thread or its timer could not be started.
    #[error("audit writer thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Why a line is not a valid record (see [`crate::ExecutionRecord::from_line`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// The line ends in the middle of a record: a crash during the write.
    #[error("truncated record (the line ends in the middle of a record)")]
    Truncated,
    /// The line is not a record as the writer writes it.
    #[error("not a record: {0}")]
    Malformed(String),
    /// The record's `hash` does not match its content: it was edited.
    #[error("hash mismatch: the record says {recorded}, its content hashes to {computed}")]
    HashMismatch {
        /// The `hash` field.
        recorded: String,
        /// The hash recomputed from the line.
        computed: String,
    },
}
