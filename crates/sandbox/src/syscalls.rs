//! Syscall names and numbers for the architecture the launcher runs on.

#[path = "syscalls/aarch64.rs"]
mod aarch64;
#[path = "syscalls/x86_64.rs"]
mod x86_64;

mod table {
    #[cfg(target_arch = "aarch64")]
    pub(super) use super::aarch64::TABLE;
    #[cfg(target_arch = "x86_64")]
    pub(super) use super::aarch64::TABLE as OTHER;
    #[cfg(target_arch = "x86_64")]
    pub(super) use super::x86_64::TABLE;
    #[cfg(target_arch = "aarch64")]
    pub(super) use super::x86_64::TABLE as OTHER;
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("nexus-sandbox supports x86_64 and aarch64");

/// The number of a syscall on this architecture.
pub fn number(name: &str) -> Option<i64> {
    table::TABLE
        .binary_search_by(|(n, _)| (*n).cmp(name))
        .ok()
        .map(|i| table::TABLE[i].1)
}

/// Whether `name` is a syscall of the other supported architecture (x86_64 or aarch64)
/// only: a portable profile may name it; it is skipped here.
pub fn elsewhere_only(name: &str) -> bool {
    number(name).is_none()
        && table::OTHER
            .binary_search_by(|(n, _)| (*n).cmp(name))
            .is_ok()
}

/// The name of a syscall number on this architecture.
pub fn name(nr: i64) -> Option<&'static str> {
    table::TABLE.iter().find(|(_, n)| *n == nr).map(|(n, _)| *n)
}

/// The known name closest to a misspelt one (edit distance at most 2).
pub fn closest(name: &str) -> Option<&'static str> {
    table::TABLE
        .iter()
        .map(|(n, _)| (distance(n, name), *n))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, n)| n)
}

fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_matches_libc() {
        assert!(table::TABLE.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(number("ptrace"), Some(libc::SYS_ptrace));
        assert_eq!(number("io_uring_setup"), Some(libc::SYS_io_uring_setup));
        assert_eq!(number("clone3"), Some(libc::SYS_clone3));
        assert_eq!(name(libc::SYS_mount), Some("mount"));
        assert_eq!(number("no_such_call"), None);
        assert_eq!(closest("ptrac"), Some("ptrace"));
        assert!(aarch64::TABLE.windows(2).all(|w| w[0].0 < w[1].0));
        if cfg!(target_arch = "x86_64") {
            assert!(!elsewhere_only("chmod"));
            assert!(!elsewhere_only("no_such_call"));
        } else {
            assert!(elsewhere_only("chmod"));
        }
    }
}
