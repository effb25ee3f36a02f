//! Shipping execution records to the gateway: the audit file set is tailed from a
//! cursor (the file's inode and the byte offset after the last line the gateway
//! acknowledged as stored), kept in a small JSON file beside the snapshot. A batch is
//! re-sent until acknowledged, so a lost ack or a restart of either side re-sends
//! rather than loses; the gateway stores each record once (by its hash).

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where shipping stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The inode of the file the offset is in (0: start from the oldest file).
    pub inode: u64,
    /// The byte offset after the last acknowledged line.
    pub offset: u64,
}

/// A batch read from the files, with the cursor to store once it is acknowledged.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// Complete lines (without the newline).
    pub lines: Vec<String>,
    /// The cursor after the last line.
    pub next: Cursor,
}

/// The tailer.
#[derive(Debug)]
pub struct Tailer {
    records: PathBuf,
    cursor_file: PathBuf,
    /// The acknowledged position.
    pub cursor: Cursor,
}

impl Tailer {
    /// Tails the file set whose current file is `records`; the cursor lives in
    /// `cursor_file` (read now if present).
    pub fn new(records: PathBuf, cursor_file: PathBuf) -> Self {
        let cursor = std::fs::read(&cursor_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            records,
            cursor_file,
            cursor,
        }
    }

    /// Reads up to `max` complete lines after the cursor.
    pub fn read(&self, max: usize) -> std::io::Result<Batch> {
        let files = nexus_audit::rotated_files(&self.records)?;
        let mut with_inodes = Vec::new();
        for f in files {
            if let Ok(meta) = std::fs::metadata(&f) {
                with_inodes.push((f, meta.ino()));
            }
        }
        // Start in the file holding the cursor; if it is gone (rotated out), at the
        // oldest file.
        let start = with_inodes
            .iter()
            .position(|(_, ino)| *ino == self.cursor.inode)
            .map(|i| (i, self.cursor.offset))
            .unwrap_or((0, 0));
        let mut batch = Batch {
            lines: Vec::new(),
            next: self.cursor,
        };
        for (index, (path, inode)) in with_inodes.iter().enumerate().skip(start.0) {
            let offset = if index == start.0 { start.1 } else { 0 };
            let read = read_lines(path, offset, max - batch.lines.len(), &mut batch.lines)?;
            batch.next = Cursor {
                inode: *inode,
                offset: read,
            };
            if batch.lines.len() >= max {
                break;
            }
        }
        Ok(batch)
    }

    /// Stores `cursor` as acknowledged.
    pub fn acknowledge(&mut self, cursor: Cursor) -> std::io::Result<()> {
        self.cursor = cursor;
        write_atomically(&self.cursor_file, &serde_json::to_vec(&cursor)?)
    }
}

/// Appends complete lines of `path` from `offset` to `out` (at most `max`); returns the
/// offset after the last complete line read.
fn read_lines(path: &Path, offset: u64, max: usize, out: &mut Vec<String>) -> std::io::Result<u64> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let offset = if offset > len { 0 } else { offset };
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = BufReader::new(file);
    let mut position = offset;
    let mut line = Vec::new();
    while out.len() < max {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            // End of file, or a line still being written.
            break;
        }
        position += n as u64;
        line.pop();
        if !line.is_empty() {
            out.push(String::from_utf8_lossy(&line).into_owned());
        }
    }
    Ok(position)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_complete_lines_and_resumes_after_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        std::fs::write(&path, "a\nb\nc").unwrap();
        let mut t = Tailer::new(path.clone(), dir.path().join("cursor"));
        let b = t.read(10).unwrap();
        assert_eq!(b.lines, ["a", "b"]);
        t.acknowledge(b.next).unwrap();
        std::fs::write(&path, "a\nb\nc\n").unwrap();
        std::fs::rename(&path, dir.path().join("r.jsonl.1")).unwrap();
        std::fs::write(&path, "d\n").unwrap();
        let t = Tailer::new(path.clone(), dir.path().join("cursor"));
        assert_eq!(t.read(10).unwrap().lines, ["c", "d"]);
        assert_eq!(t.read(1).unwrap().lines, ["c"]);
    }
}
