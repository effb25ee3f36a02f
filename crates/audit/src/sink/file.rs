//! The file sink: appends JSON lines, rotates by size, and on open resumes the chain
//! after the last complete record on disk, ending a line cut short by a crash so the
//! next record starts on a line of its own.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{ChainHead, RecordWriter};
use crate::error::{AuditError, LineError};
use crate::files::numbered_files;
use crate::record::{ChainFields, check_line};

/// A batch buffer above this is written out before the batch ends.
const FLUSH_AT: usize = 256 << 10;
/// The first read-back window at the end of a file (grown until a complete line fits).
const TAIL_WINDOW: u64 = 64 << 10;
/// The smallest `max_bytes` accepted: a few records per file.
const MIN_MAX_BYTES: u64 = 4096;

/// JSON lines in a rotated set of files.
#[derive(Debug)]
pub(crate) struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    max_files: usize,
    file: Option<File>,
    /// Size of the file being written, counting what is buffered.
    len: u64,
    buf: Vec<u8>,
    /// The last write failed part-way (e.g. a full disk): a fragment at the end of the
    /// file is its leftover, not a crash's.
    failed_write: bool,
    /// Held (and locked) for as long as the sink lives.
    _lock: File,
}

impl FileSink {
    /// Checks the settings, creates the folder and takes the set's lock (`path.lock`).
    pub(crate) fn new(path: &Path, max_bytes: u64, max_files: usize) -> Result<Self, AuditError> {
        if max_files == 0 {
            return Err(AuditError::Config(
                "max_files must be at least 1 (the file being written)".into(),
            ));
        }
        if max_bytes < MIN_MAX_BYTES {
            return Err(AuditError::Config(format!(
                "max_bytes is {max_bytes}: use at least {MIN_MAX_BYTES} (records are a few hundred bytes each)"
            )));
        }
        if path.file_name().is_none() {
            return Err(AuditError::Config(format!(
                "the record file path {} names no file",
                path.display()
            )));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| AuditError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let mut lock_name = path.as_os_str().to_owned();
        lock_name.push(".lock");
        let lock_path = PathBuf::from(lock_name);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| AuditError::Io {
                path: lock_path.clone(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(AuditError::Locked {
                    path: path.to_path_buf(),
                });
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(AuditError::Io {
                    path: lock_path,
                    source,
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            max_bytes,
            max_files,
            file: None,
            len: 0,
            buf: Vec::new(),
            failed_write: false,
            _lock: lock,
        })
    }

    /// Finds where the chain continues and opens the file being written.
    fn resume(&mut self) -> io::Result<Option<ChainHead>> {
        self.file = None;
        self.buf.clear();
        let mut head = None;
        let mut active_fragment = None;
        // Newest first: the chain continues after the newest complete record.
        for (index, file) in numbered_files(&self.path)?.into_iter().rev() {
            let tail = match scan_tail(&file) {
                Ok(tail) => tail,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", file.display()))),
            };
            if index == 0 {
                active_fragment = tail.fragment_at;
            }
            if let Some(last) = tail.last {
                tracing::info!(
                    file = %file.display(),
                    seq = last.seq,
                    "audit chain resumes after the last record on disk"
                );
                head = Some(ChainHead {
                    seq: last.seq + 1,
                    prev_hash: last.hash,
                });
                break;
            }
        }
        let head = head.unwrap_or_else(ChainHead::genesis);
        let mut file = self.open_active()?;
        let mut len = file.metadata()?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                // End the cut line so the fragment stays visible to `verify` on its own
                // line and the next record starts clean.
                if let Some(at) = active_fragment {
                    if self.failed_write {
                        tracing::warn!(
                            file = %self.path.display(),
                            byte = at,
                            next_seq = head.seq,
                            "audit record file ends with part of a record whose write failed \
                             (disk full?); the chain continues from the last complete record on a new line"
                        );
                    } else {
                        tracing::warn!(
                            file = %self.path.display(),
                            byte = at,
                            next_seq = head.seq,
                            "audit record file ends with a truncated record (crash during write); \
                             the chain continues from the last complete record on a new line"
                        );
                    }
                }
                file.write_all(b"\n")?;
                len += 1;
            }
        }
        self.failed_write = false;
        self.file = Some(file);
        self.len = len;
        Ok(Some(head))
    }

    fn open_active(&self) -> io::Result<File> {
        let mut options = OpenOptions::new();
        options.read(true).append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o640);
        options.open(&self.path)
    }

    /// Shifts `path.N` to `path.N+1` (dropping those past `max_files`), `path` to
    /// `path.1`, and starts a new `path`. The old file is synced first, the folder after.
    fn rotate(&mut self) -> io::Result<()> {
        self.flush()?;
        if let Some(file) = self.file.take() {
            file.sync_data()?;
        }
        let keep = self.max_files as u64 - 1;
        for (index, file) in numbered_files(&self.path)? {
            if index >= keep && index > 0 {
                remove_if_exists(&file)?;
            }
        }
        if keep == 0 {
            remove_if_exists(&self.path)?;
        } else {
            for n in (1..keep).rev() {
                rename_if_exists(&numbered(&self.path, n), &numbered(&self.path, n + 1))?;
            }
            rename_if_exists(&self.path, &numbered(&self.path, 1))?;
        }
        sync_dir(&self.path)?;
        self.file = Some(self.open_active()?);
        self.len = 0;
        tracing::debug!(file = %self.path.display(), "audit record file rotated");
        Ok(())
    }
}

impl RecordWriter for FileSink {
    fn open(&mut self) -> io::Result<Option<ChainHead>> {
        self.resume().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("record file {}: {e}", self.path.display()),
            )
        })
    }

    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let needed = line.len() as u64 + 1;
        if self.len > 0 && self.len + needed > self.max_bytes {
            self.rotate()?;
        }
        self.buf.extend_from_slice(line);
        self.buf.push(b'\n');
        self.len += needed;
        if self.buf.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let written = match self.file.as_mut() {
            Some(file) => file.write_all(&self.buf),
            None => Err(io::Error::other("the record file is not open")),
        };
        self.buf.clear();
        if written.is_err() {
            self.failed_write = true;
        }
        written
    }

    fn sync(&mut self) -> io::Result<()> {
        match &self.file {
            Some(file) => file.sync_data(),
            None => Ok(()),
        }
    }
}

/// The end of a record file.
#[derive(Debug, Default)]
struct Tail {
    /// The last line that parses as a record.
    last: Option<ChainFields>,
    /// Where an unterminated last line that is not a whole record starts.
    fragment_at: Option<u64>,
}

/// Reads a file backwards from its end to its last complete record.
fn scan_tail(path: &Path) -> io::Result<Tail> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut window = TAIL_WINDOW;
    loop {
        let start = len.saturating_sub(window);
        let mut buf = Vec::new();
        file.seek(SeekFrom::Start(start))?;
        (&mut file).take(len - start).read_to_end(&mut buf)?;
        let mut tail = Tail::default();
        let last_newline = buf.iter().rposition(|b| *b == b'\n');
        // Lines are complete only once their start is inside the window.
        let complete = |line_start: Option<usize>| line_start.is_some() || start == 0;
        let unterminated_from = last_newline.map(|p| p + 1);
        if unterminated_from.unwrap_or(0) < buf.len() {
            if !complete(unterminated_from) {
                window = window.saturating_mul(4);
                continue;
            }
            let from = unterminated_from.unwrap_or(0);
            match parse(path, start + from as u64, &buf[from..]) {
                Some(last) => {
                    tail.last = Some(last);
                    return Ok(tail);
                }
                None => tail.fragment_at = Some(start + from as u64),
            }
        }
        let mut line_end = last_newline;
        while let Some(end) = line_end {
            let previous_newline = buf[..end].iter().rposition(|b| *b == b'\n');
            let from = previous_newline.map(|p| p + 1);
            if !complete(from) {
                break;
            }
            let from = from.unwrap_or(0);
            if from < end
                && let Some(last) = parse(path, start + from as u64, &buf[from..end])
            {
                tail.last = Some(last);
                return Ok(tail);
            }
            line_end = previous_newline;
        }
        if start == 0 {
            return Ok(tail);
        }
        window = window.saturating_mul(4);
    }
}

/// A line's chain fields if it is a whole record; warns when its hash does not check
/// (the chain still continues from it: `verify` reports the record itself).
fn parse(path: &Path, at: u64, line: &[u8]) -> Option<ChainFields> {
    match check_line(line) {
        Ok(fields) => Some(fields),
        Err(LineError::Truncated) => None,
        Err(e) => {
            let fields = serde_json::from_slice::<ChainFields>(line).ok();
            tracing::warn!(
                file = %path.display(),
                byte = at,
                error = %e,
                "audit record file: a record near the end does not check; `nexusctl audit verify` will report it"
            );
            fields
        }
    }
}

fn numbered(path: &Path, n: u64) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn rename_if_exists(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)?.sync_all(),
        None => File::open(".")?.sync_all(),
    }
}
