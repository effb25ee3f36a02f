//! Finding a record set's files in chain order: `records.jsonl.N` (oldest) ...
//! `records.jsonl.1`, then `records.jsonl` (being written).

use std::io;
use std::path::{Path, PathBuf};

/// The files of the record set whose file being written is `path`, oldest first:
/// `path.N`, ..., `path.1`, `path` (those that exist). A gap in the numbering (a file
/// removed by hand) is skipped here and shows up in the chain as a `seq` gap. When none
/// exists, returns `[path]` so that opening it names the missing file.
pub fn rotated_files(path: &Path) -> io::Result<Vec<PathBuf>> {
    let found = numbered_files(path)?;
    if found.is_empty() {
        return Ok(vec![path.to_path_buf()]);
    }
    Ok(found.into_iter().map(|(_, path)| path).collect())
}

/// The existing files of the set `path`, with their rotation index (0 for `path`
/// itself), oldest (highest index) first.
pub(crate) fn numbered_files(path: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(entry_name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let index = if entry_name == name {
            0
        } else if let Some(n) = entry_name
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(rotation_index)
        {
            n
        } else {
            continue;
        };
        found.push((index, path.with_file_name(entry_name)));
    }
    found.sort_by_key(|(index, _)| std::cmp::Reverse(*index));
    Ok(found)
}

/// What `nexusctl audit verify` was given, as files in chain order:
/// - several paths: taken as given (oldest first);
/// - one folder: the one record set in it whose file name ends in `.jsonl` (with its
///   rotated files), or an error naming the sets when there are several;
/// - one file: it and its rotated files ([`rotated_files`]).
pub fn chain_files(paths: &[PathBuf]) -> io::Result<Vec<PathBuf>> {
    match paths {
        [path] if path.is_dir() => {
            let mut bases: Vec<String> = Vec::new();
            for entry in std::fs::read_dir(path)? {
                let entry = entry?;
                if !entry.file_type()?.is_file() {
                    continue;
                }
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let base = match name.rsplit_once('.') {
                    Some((base, n)) if rotation_index(n).is_some() => base.to_owned(),
                    _ => name,
                };
                if base.ends_with(".jsonl") && !bases.contains(&base) {
                    bases.push(base);
                }
            }
            bases.sort();
            match bases.as_slice() {
                [base] => rotated_files(&path.join(base)),
                [] => Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no record files (*.jsonl) in {}", path.display()),
                )),
                several => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} holds several record sets ({}): name one",
                        path.display(),
                        several.join(", ")
                    ),
                )),
            }
        }
        [path] => rotated_files(path),
        paths => Ok(paths.to_vec()),
    }
}

fn rotation_index(suffix: &str) -> Option<u64> {
    if suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    suffix.parse().ok().filter(|n| *n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_files_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "r.jsonl",
            "r.jsonl.1",
            "r.jsonl.10",
            "r.jsonl.2",
            "r.jsonl.x",
            "other",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let names = |files: Vec<PathBuf>| -> Vec<String> {
            files
                .iter()
                .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        let expected = ["r.jsonl.10", "r.jsonl.2", "r.jsonl.1", "r.jsonl"];
        assert_eq!(
            names(rotated_files(&dir.path().join("r.jsonl")).unwrap()),
            expected
        );
        assert_eq!(
            names(chain_files(&[dir.path().to_path_buf()]).unwrap()),
            expected
        );
        std::fs::write(dir.path().join("s.jsonl"), "").unwrap();
        let err = chain_files(&[dir.path().to_path_buf()]).unwrap_err();
        assert!(err.to_string().contains("r.jsonl, s.jsonl"), "{err}");
        let given = vec![dir.path().join("a"), dir.path().join("b")];
        assert_eq!(chain_files(&given).unwrap(), given);
    }
}
