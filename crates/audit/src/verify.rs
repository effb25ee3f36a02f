//! Checking a chain: every line is a record whose hash matches its bytes, `seq` goes up
//! by one, and each `prev_hash` is the hash of the record before. The first violation is
//! reported with its file, line and `seq`, and what it means (edited, deleted,
//! reordered).
//!
//! A line that ends in the middle of a record is a crash during a write. It is a
//! warning, not a break, when the record after it chains to the record before it (the
//! writer resumes that way) or when it is the last line: nothing around it was changed,
//! though the request it described has no record. Anything else is a break.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::LineError;
use crate::files::chain_files;
use crate::record::{GENESIS_HASH, check_line};

/// Lines longer than this are not records (records are a few hundred bytes).
const MAX_LINE: usize = 16 << 20;

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyReport {
    /// The files read, in chain order.
    pub files: Vec<PathBuf>,
    /// Whether the chain is intact (no `broken`).
    pub intact: bool,
    /// Records that verified (up to the break, if any).
    pub records: u64,
    /// `seq` of the first record; above 0 when the start of the chain is not in these
    /// files (older files rotated away).
    pub first_seq: Option<u64>,
    /// `seq` of the last record that verified.
    pub last_seq: Option<u64>,
    /// `hash` of the last record that verified (compare it with the gateway's copy).
    pub last_hash: Option<String>,
    /// Problems that do not break the chain: records truncated by a crash.
    pub warnings: Vec<Finding>,
    /// The first record that breaks the chain.
    pub broken: Option<Finding>,
}

/// One problem, located.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The file.
    pub file: PathBuf,
    /// The line, from 1 (0 when the file could not be read at all).
    pub line: u64,
    /// The record's `seq`, when it could be read.
    pub seq: Option<u64>,
    /// What is wrong.
    pub kind: FindingKind,
    /// The whole story, location included.
    pub message: String,
}

/// What is wrong with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// The line ends in the middle of a record (a crash during the write).
    Truncated,
    /// The record's hash does not match its content: it was edited.
    Edited,
    /// The line is not a record as the sidecar writes it.
    Malformed,
    /// `seq` skips ahead and the missing records are nowhere later: they were deleted.
    Deleted,
    /// `seq` is out of order: records were moved or duplicated.
    Reordered,
    /// `prev_hash` is not the previous record's hash: the previous record was replaced
    /// (edited with its hash recomputed), or records were cut out and renumbered.
    PrevHashMismatch,
    /// The first record (`seq` 0) does not start from the genesis hash.
    BadGenesis,
    /// A file could not be read.
    Unreadable,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for warning in &self.warnings {
            writeln!(f, "warning: {warning}")?;
        }
        let range = match (self.first_seq, self.last_seq) {
            (Some(first), Some(last)) => format!("seq {first}..{last}"),
            _ => "no records".to_owned(),
        };
        let files = match self.files.len() {
            1 => String::new(),
            n => format!(" in {n} files"),
        };
        match &self.broken {
            Some(broken) if self.records == 0 => write!(f, "chain BROKEN: {broken}"),
            Some(broken) => write!(
                f,
                "chain BROKEN: {broken}\n{} records verified before it{files} ({range})",
                self.records
            ),
            None if self.records == 0 => write!(f, "0 records{files}: nothing to verify"),
            None => {
                write!(f, "{} records{files}, chain intact, {range}", self.records)?;
                match self.first_seq {
                    Some(first) if first > 0 => write!(
                        f,
                        " (the chain starts at seq {first}: earlier records are not in these files, e.g. rotated away)"
                    ),
                    _ => Ok(()),
                }
            }
        }
    }
}

/// Verifies the chain in `files`, given oldest first. One path may also be a folder or
/// the file being written, to find the rotated files too (see [`chain_files`]).
pub fn verify(files: &[PathBuf]) -> VerifyReport {
    let files = match chain_files(files) {
        Ok(files) => files,
        Err(e) => {
            let file = files.first().cloned().unwrap_or_default();
            let message = format!("cannot read {}: {e}", file.display());
            return VerifyReport {
                files: files.to_vec(),
                intact: false,
                records: 0,
                first_seq: None,
                last_seq: None,
                last_hash: None,
                warnings: Vec::new(),
                broken: Some(Finding {
                    file,
                    line: 0,
                    seq: None,
                    kind: FindingKind::Unreadable,
                    message,
                }),
            };
        }
    };
    Verifier::new(files).run()
}

/// The last record that verified.
struct Prev {
    seq: u64,
    hash: String,
    file: usize,
    line: u64,
}

struct Verifier {
    cursor: Cursor,
    report: VerifyReport,
    prev: Option<Prev>,
    /// Truncated lines since the last record that verified.
    truncated: Vec<(usize, u64)>,
}

impl Verifier {
    fn new(files: Vec<PathBuf>) -> Self {
        Self {
            cursor: Cursor::new(files.clone()),
            report: VerifyReport {
                files,
                intact: true,
                records: 0,
                first_seq: None,
                last_seq: None,
                last_hash: None,
                warnings: Vec::new(),
                broken: None,
            },
            prev: None,
            truncated: Vec::new(),
        }
    }

    fn run(mut self) -> VerifyReport {
        loop {
            match self.step() {
                Step::Continue => {}
                Step::Broken(finding) => {
                    self.report.intact = false;
                    self.report.broken = Some(finding);
                    break;
                }
                Step::End => {
                    for (file, line) in std::mem::take(&mut self.truncated) {
                        let message = format!(
                            "truncated record (a crash or a failed write during write) at {}; it is the last line",
                            self.location(file, line)
                        );
                        self.warn_truncated(file, line, message);
                    }
                    break;
                }
            }
        }
        self.report
    }

    fn step(&mut self) -> Step {
        let line = match self.cursor.next() {
            Next::End => return Step::End,
            Next::Unreadable(file, error) => {
                let message = format!("cannot read {}: {error}", self.file(file).display());
                return Step::Broken(self.finding(file, 0, None, FindingKind::Unreadable, message));
            }
            Next::Line(line) => line,
        };
        let at = self.location(line.file, line.number);
        if line.oversize {
            let message = format!("not a record at {at}: the line is longer than {MAX_LINE} bytes");
            return Step::Broken(self.finding(
                line.file,
                line.number,
                None,
                FindingKind::Malformed,
                message,
            ));
        }
        if line.bytes.is_empty() {
            let message =
                format!("not a record at {at}: an empty line (the sidecar never writes one)");
            return Step::Broken(self.finding(
                line.file,
                line.number,
                None,
                FindingKind::Malformed,
                message,
            ));
        }
        let fields = match check_line(&line.bytes) {
            Ok(fields) => fields,
            Err(LineError::Truncated) => {
                self.truncated.push((line.file, line.number));
                return Step::Continue;
            }
            Err(LineError::Malformed(why)) => {
                let seq = seq_of(&line.bytes);
                let message = format!("not a record at {at}: {why}");
                return Step::Broken(self.finding(
                    line.file,
                    line.number,
                    seq,
                    FindingKind::Malformed,
                    message,
                ));
            }
            Err(LineError::HashMismatch { .. }) => {
                let seq = seq_of(&line.bytes);
                let message = format!(
                    "record edited at {at}{}: its hash does not match its content",
                    seq.map(|s| format!(" (seq {s})")).unwrap_or_default()
                );
                return Step::Broken(self.finding(
                    line.file,
                    line.number,
                    seq,
                    FindingKind::Edited,
                    message,
                ));
            }
        };
        let seq = fields.seq;
        let broken = match &self.prev {
            None if seq == 0 && fields.prev_hash != GENESIS_HASH => Some((
                FindingKind::BadGenesis,
                format!(
                    "chain broken at {at}: seq 0 must have prev_hash {GENESIS_HASH} (the start of a chain), it has {}",
                    fields.prev_hash
                ),
            )),
            None => None,
            Some(prev) if seq == prev.seq + 1 && fields.prev_hash != prev.hash => Some((
                FindingKind::PrevHashMismatch,
                format!(
                    "chain broken at {at} (seq {seq}): its prev_hash is not the hash of seq {} at {}; that record was replaced, or records were cut out and renumbered",
                    prev.seq,
                    self.location(prev.file, prev.line)
                ),
            )),
            Some(prev) if seq == prev.seq + 1 => None,
            Some(prev) if seq > prev.seq + 1 => {
                let expected = prev.seq + 1;
                match self.find_seq(expected) {
                    Some((file, number)) => Some((
                        FindingKind::Reordered,
                        format!(
                            "records out of order at {at}: expected seq {expected}, found seq {seq}; seq {expected} is at {}",
                            self.location(file, number)
                        ),
                    )),
                    None => Some((
                        FindingKind::Deleted,
                        format!(
                            "records deleted before {at}: expected seq {expected}, found seq {seq}; {} record(s) missing (seq {expected}..={})",
                            seq - expected,
                            seq - 1
                        ),
                    )),
                }
            }
            Some(prev) => Some((
                FindingKind::Reordered,
                format!(
                    "records out of order at {at}: seq {seq} follows seq {} (moved or duplicated)",
                    prev.seq
                ),
            )),
        };
        if let Some((kind, mut message)) = broken {
            if let Some((file, line)) = self.truncated.last() {
                message.push_str(&format!(
                    " (after a truncated record at {})",
                    self.location(*file, *line)
                ));
            }
            return Step::Broken(self.finding(line.file, line.number, Some(seq), kind, message));
        }
        for (file, number) in std::mem::take(&mut self.truncated) {
            let message = format!(
                "truncated record (a crash or a failed write during write) at {}; the chain continues",
                self.location(file, number)
            );
            self.warn_truncated(file, number, message);
        }
        self.report.records += 1;
        self.report.first_seq.get_or_insert(seq);
        self.report.last_seq = Some(seq);
        self.report.last_hash = Some(fields.hash.clone());
        self.prev = Some(Prev {
            seq,
            hash: fields.hash,
            file: line.file,
            line: line.number,
        });
        Step::Continue
    }

    /// Looks through the rest of the files for a record numbered `seq`.
    fn find_seq(&mut self, seq: u64) -> Option<(usize, u64)> {
        loop {
            match self.cursor.next() {
                Next::End => return None,
                Next::Unreadable(..) => {}
                Next::Line(line) => {
                    if seq_of(&line.bytes) == Some(seq) {
                        return Some((line.file, line.number));
                    }
                }
            }
        }
    }

    fn warn_truncated(&mut self, file: usize, line: u64, message: String) {
        let finding = self.finding(file, line, None, FindingKind::Truncated, message);
        self.report.warnings.push(finding);
    }

    fn finding(
        &self,
        file: usize,
        line: u64,
        seq: Option<u64>,
        kind: FindingKind,
        message: String,
    ) -> Finding {
        Finding {
            file: self.file(file).to_path_buf(),
            line,
            seq,
            kind,
            message,
        }
    }

    fn file(&self, index: usize) -> &Path {
        self.report
            .files
            .get(index)
            .map_or(Path::new(""), PathBuf::as_path)
    }

    fn location(&self, file: usize, line: u64) -> String {
        format!("{}:{line}", self.file(file).display())
    }
}

enum Step {
    Continue,
    Broken(Finding),
    End,
}

/// A record's `seq`, if the line is whole enough to have one.
fn seq_of(line: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Seq {
        seq: u64,
    }
    serde_json::from_slice::<Seq>(line).ok().map(|s| s.seq)
}

/// Lines across files, in order.
struct Cursor {
    files: Vec<PathBuf>,
    next_file: usize,
    open: Option<(usize, BufReader<File>, u64)>,
}

struct Line {
    file: usize,
    /// From 1.
    number: u64,
    /// Without the `\n`.
    bytes: Vec<u8>,
    oversize: bool,
}

enum Next {
    Line(Line),
    Unreadable(usize, io::Error),
    End,
}

impl Cursor {
    fn new(files: Vec<PathBuf>) -> Self {
        Self {
            files,
            next_file: 0,
            open: None,
        }
    }

    fn next(&mut self) -> Next {
        loop {
            let Some((file, reader, number)) = &mut self.open else {
                let Some(path) = self.files.get(self.next_file) else {
                    return Next::End;
                };
                let index = self.next_file;
                self.next_file += 1;
                match File::open(path) {
                    Ok(f) => self.open = Some((index, BufReader::with_capacity(256 << 10, f), 0)),
                    Err(e) => return Next::Unreadable(index, e),
                }
                continue;
            };
            let file = *file;
            let mut bytes = Vec::new();
            match reader
                .by_ref()
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut bytes)
            {
                Ok(0) => self.open = None,
                Ok(_) => {
                    *number += 1;
                    let number = *number;
                    let terminated = bytes.last() == Some(&b'\n');
                    if terminated {
                        bytes.pop();
                    }
                    let oversize = bytes.len() > MAX_LINE;
                    if oversize
                        && !terminated
                        && let Err(e) = skip_line(reader)
                    {
                        self.open = None;
                        return Next::Unreadable(file, e);
                    }
                    return Next::Line(Line {
                        file,
                        number,
                        bytes,
                        oversize,
                    });
                }
                Err(e) => {
                    self.open = None;
                    return Next::Unreadable(file, e);
                }
            }
        }
    }
}

/// Skips to just after the next `\n` (or the end of the file).
fn skip_line(reader: &mut BufReader<File>) -> io::Result<()> {
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        match buf.iter().position(|b| *b == b'\n') {
            Some(p) => {
                reader.consume(p + 1);
                return Ok(());
            }
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    }
}

#[cfg(test)]
mod tests;
