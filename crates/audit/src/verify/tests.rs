use super::*;
use crate::record::seal;
use crate::record::tests::draft;

const SIDECAR: &str = "spiffe://nexus.local/ns/data/sa/hazard-api";

/// `n` chained record lines, from seq 0.
fn chain(n: u64) -> Vec<String> {
    let mut prev = GENESIS_HASH.to_owned();
    (0..n)
        .map(|seq| {
            let (hash, line) = seal(seq, &prev, SIDECAR, draft(seq)).unwrap();
            prev = hash;
            String::from_utf8(line).unwrap()
        })
        .collect()
}

fn write(dir: &tempfile::TempDir, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.path().join(name);
    let mut text = lines.join("\n");
    if !lines.is_empty() {
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn verify_one(path: &Path) -> VerifyReport {
    verify(&[path.to_path_buf()])
}

fn broken(report: &VerifyReport) -> &Finding {
    assert!(!report.intact, "expected a break: {report}");
    report.broken.as_ref().unwrap()
}

#[test]
fn an_untouched_chain_is_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "r.jsonl", &chain(20));
    let report = verify_one(&path);
    assert!(report.intact, "{report}");
    assert_eq!(report.records, 20);
    assert_eq!((report.first_seq, report.last_seq), (Some(0), Some(19)));
    assert!(report.warnings.is_empty());
    assert_eq!(report.to_string(), "20 records, chain intact, seq 0..19");
}

#[test]
fn an_edited_field_is_found_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = chain(20);
    lines[4] = lines[4].replace("\"status\":200", "\"status\":403");
    let path = write(&dir, "r.jsonl", &lines);
    let report = verify_one(&path);
    let finding = broken(&report);
    assert_eq!(
        (finding.line, finding.seq, finding.kind),
        (5, Some(4), FindingKind::Edited)
    );
    assert!(finding.message.contains("r.jsonl:5"), "{finding}");
    assert_eq!(report.records, 4);
}

#[test]
fn an_edit_with_a_recomputed_hash_breaks_the_next_link() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = chain(20);
    let prev = hash_of(&lines[3]);
    let mut forged = draft(4);
    forged.status = 403;
    let (_, line) = seal(4, &prev, SIDECAR, forged).unwrap();
    lines[4] = String::from_utf8(line).unwrap();
    let path = write(&dir, "r.jsonl", &lines);
    let finding = broken(&verify_one(&path)).clone();
    assert_eq!(
        (finding.line, finding.seq, finding.kind),
        (6, Some(5), FindingKind::PrevHashMismatch)
    );
}

#[test]
fn a_deleted_line_is_found_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = chain(20);
    lines.remove(4);
    let path = write(&dir, "r.jsonl", &lines);
    let finding = broken(&verify_one(&path)).clone();
    assert_eq!(
        (finding.line, finding.seq, finding.kind),
        (5, Some(5), FindingKind::Deleted)
    );
    assert!(
        finding.message.contains("expected seq 4, found seq 5"),
        "{finding}"
    );
}

#[test]
fn swapped_lines_are_reported_as_reordered() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = chain(20);
    lines.swap(4, 5);
    let path = write(&dir, "r.jsonl", &lines);
    let finding = broken(&verify_one(&path)).clone();
    assert_eq!(
        (finding.line, finding.seq, finding.kind),
        (5, Some(5), FindingKind::Reordered)
    );
    assert!(finding.message.contains("seq 4 is at"), "{finding}");
    assert!(finding.message.ends_with("r.jsonl:6"), "{finding}");
}

#[test]
fn a_duplicated_line_is_reported_as_reordered() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = chain(20);
    let copy = lines[3].clone();
    lines.insert(4, copy);
    let path = write(&dir, "r.jsonl", &lines);
    let finding = broken(&verify_one(&path)).clone();
    assert_eq!(
        (finding.line, finding.seq, finding.kind),
        (5, Some(3), FindingKind::Reordered)
    );
}

#[test]
fn a_truncated_last_line_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let lines = chain(20);
    let path = write(&dir, "r.jsonl", &lines[..19]);
    let mut text = std::fs::read(&path).unwrap();
    text.extend_from_slice(&lines[19].as_bytes()[..100]);
    std::fs::write(&path, text).unwrap();
    let report = verify_one(&path);
    assert!(report.intact, "{report}");
    assert_eq!((report.records, report.last_seq), (19, Some(18)));
    assert_eq!(report.warnings.len(), 1);
    let warning = &report.warnings[0];
    assert_eq!((warning.line, warning.kind), (20, FindingKind::Truncated));
    assert!(
        warning.message.contains("r.jsonl:20; it is the last line"),
        "{warning}"
    );
    assert!(
        report
            .to_string()
            .starts_with("warning: truncated record (a crash or a failed write during write) at ")
    );
}

#[test]
fn a_truncated_line_followed_by_the_resumed_chain_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let lines = chain(15);
    // What a crash while writing seq 10, then a restart, leave behind.
    let mut with_fragment: Vec<String> = lines[..10].to_vec();
    with_fragment.push(lines[10][..lines[10].len() / 2].to_owned());
    with_fragment.extend_from_slice(&lines[10..]);
    let path = write(&dir, "r.jsonl", &with_fragment);
    let report = verify_one(&path);
    assert!(report.intact, "{report}");
    assert_eq!(report.records, 15);
    assert_eq!(report.warnings.len(), 1);
    assert_eq!(report.warnings[0].line, 11);
    assert!(
        report.warnings[0]
            .message
            .ends_with("r.jsonl:11; the chain continues"),
        "{}",
        report.warnings[0]
    );
}

#[test]
fn a_truncated_line_does_not_excuse_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let lines = chain(15);
    let mut cut: Vec<String> = lines[..10].to_vec();
    cut.push(lines[10][..lines[10].len() / 2].to_owned());
    cut.extend_from_slice(&lines[11..]);
    let path = write(&dir, "r.jsonl", &cut);
    let finding = broken(&verify_one(&path)).clone();
    assert_eq!(
        (finding.line, finding.seq, finding.kind),
        (12, Some(11), FindingKind::Deleted)
    );
    assert!(
        finding.message.contains("after a truncated record at"),
        "{finding}"
    );
}

#[test]
fn garbage_and_empty_lines_are_not_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = chain(5);
    lines.insert(2, "hello".to_owned());
    let path = write(&dir, "r.jsonl", &lines);
    let finding = broken(&verify_one(&path)).clone();
    assert_eq!((finding.line, finding.kind), (3, FindingKind::Malformed));

    let mut lines = chain(5);
    lines.insert(2, String::new());
    let path = write(&dir, "r.jsonl", &lines);
    let finding = broken(&verify_one(&path)).clone();
    assert_eq!((finding.line, finding.kind), (3, FindingKind::Malformed));
}

#[test]
fn a_chain_across_files_needs_every_file_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let lines = chain(30);
    let a = write(&dir, "r.jsonl.2", &lines[..10]);
    let b = write(&dir, "r.jsonl.1", &lines[10..20]);
    let c = write(&dir, "r.jsonl", &lines[20..]);
    let report = verify(&[a.clone(), b.clone(), c.clone()]);
    assert!(report.intact, "{report}");
    assert_eq!(report.records, 30);
    assert_eq!(
        report.to_string(),
        "30 records in 3 files, chain intact, seq 0..29"
    );
    // The base path and the folder find the same files.
    assert_eq!(verify_one(&c), report);
    assert_eq!(verify_one(dir.path()), report);

    let finding = broken(&verify(&[a.clone(), c.clone()])).clone();
    assert_eq!((finding.file, finding.line), (c.clone(), 1));
    assert_eq!(finding.kind, FindingKind::Deleted);

    let finding = broken(&verify(&[b, a.clone(), c])).clone();
    assert_eq!((finding.file, finding.line), (a, 1));
    assert_eq!(finding.kind, FindingKind::Reordered);
}

#[test]
fn a_chain_may_start_after_rotated_files_but_not_forge_its_genesis() {
    let dir = tempfile::tempdir().unwrap();
    let lines = chain(10);
    let path = write(&dir, "r.jsonl", &lines[5..]);
    let report = verify_one(&path);
    assert!(report.intact, "{report}");
    assert_eq!(report.first_seq, Some(5));
    assert!(report.to_string().contains("the chain starts at seq 5"));

    let (_, line) = seal(0, &"a".repeat(64), SIDECAR, draft(0)).unwrap();
    let path = write(&dir, "g.jsonl", &[String::from_utf8(line).unwrap()]);
    let finding = broken(&verify_one(&path)).clone();
    assert_eq!(finding.kind, FindingKind::BadGenesis);
}

#[test]
fn a_missing_file_is_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let report = verify(&[dir.path().join("a.jsonl"), dir.path().join("b.jsonl")]);
    let finding = broken(&report);
    assert_eq!(finding.kind, FindingKind::Unreadable);
    assert!(finding.message.contains("a.jsonl"));
}

#[test]
fn an_empty_file_has_nothing_to_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "r.jsonl", &[]);
    let report = verify_one(&path);
    assert!(report.intact);
    assert_eq!(report.to_string(), "0 records: nothing to verify");
}

/// A line's `hash`.
fn hash_of(line: &str) -> String {
    crate::ExecutionRecord::from_line(line.as_bytes())
        .unwrap()
        .hash
}
