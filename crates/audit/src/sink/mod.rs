//! Where records go: the sink configuration, and the [`RecordWriter`] interface the
//! writer thread drives (the file and stdout sinks implement it; tests and other
//! transports can bring their own).

mod file;
mod stdout;

use std::io;
use std::path::PathBuf;

use serde::Deserialize;

pub(crate) use file::FileSink;
pub(crate) use stdout::StdoutSink;

use crate::record::GENESIS_HASH;

/// Default size at which the record file is rotated: 64 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;
/// Default number of record files kept, the one being written included.
pub const DEFAULT_MAX_FILES: usize = 10;

/// Where execution records are written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Sink {
    /// JSON lines on standard output (for a log collector). Nothing is read back: each
    /// start begins a new chain at `seq` 0, so a collector must split chains at restarts.
    Stdout,
    /// JSON lines appended to `path`, rotated by size, logrotate style: when the next
    /// record would take `path` past `max_bytes`, `path.N` ... `path.1` shift to
    /// `path.N+1` ... `path.2`, `path` becomes `path.1`, and a new `path` is started; at
    /// most `max_files` files are kept (the oldest is deleted). The chain continues
    /// across files, and across restarts: the writer resumes after the last complete
    /// record it finds. A lock on `path.lock` keeps a second process from writing the
    /// same set.
    File {
        /// The file being written, e.g. `/var/log/nexus/records.jsonl`.
        path: PathBuf,
        /// Rotate before this size is exceeded (a single larger record still gets a file
        /// of its own).
        #[serde(default = "default_max_bytes")]
        max_bytes: u64,
        /// Files kept, including the one being written (at least 1).
        #[serde(default = "default_max_files")]
        max_files: usize,
    },
}

impl Sink {
    /// A file sink with the default rotation.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Sink::File {
            path: path.into(),
            max_bytes: DEFAULT_MAX_BYTES,
            max_files: DEFAULT_MAX_FILES,
        }
    }
}

fn default_max_bytes() -> u64 {
    DEFAULT_MAX_BYTES
}

fn default_max_files() -> usize {
    DEFAULT_MAX_FILES
}

/// Where a chain continues: the next record's `seq` and `prev_hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    /// The `seq` of the next record.
    pub seq: u64,
    /// The `hash` of the last record written ([`GENESIS_HASH`] for a new chain).
    pub prev_hash: String,
}

impl ChainHead {
    /// The start of a new chain.
    pub fn genesis() -> Self {
        Self {
            seq: 0,
            prev_hash: GENESIS_HASH.to_owned(),
        }
    }
}

/// A destination the writer thread drives. All calls come from that one thread; they
/// may block (the thread exists so that they do not block requests).
pub trait RecordWriter: Send + 'static {
    /// Opens (or reopens, after a failure) the destination and says where the chain
    /// continues, reading back what is already there; `None` when nothing can be read
    /// back (the recorder then starts a new chain, or after a failure continues after
    /// the last record it knows was written). Discards anything buffered.
    fn open(&mut self) -> io::Result<Option<ChainHead>>;
    /// Queues one record line (without `\n`); may buffer until [`RecordWriter::flush`].
    fn write_line(&mut self, line: &[u8]) -> io::Result<()>;
    /// Hands everything queued to the destination (a record is "written" after this).
    fn flush(&mut self) -> io::Result<()>;
    /// Makes what was flushed durable (`fsync`).
    fn sync(&mut self) -> io::Result<()>;
}
