//! The rules every profile gets from its shape, not from its `[[syscall]]` list: which
//! sockets may exist at all, who answers `listen` and `connect`, the terminal, SysV IPC,
//! nested seccomp filters and anonymous executables.
//!
//! A profile's `[[syscall]]` rules are a deny-list; these are allow-lists where one is
//! needed to be sound (sockets: anything the kernel adds later is refused too), written as
//! the same [`SyscallRule`]s so that the launcher's BPF and the exported OCI profile are
//! built from one source. Each condition group names each argument at most once (runc ORs
//! two conditions on one argument), so an allow-list is written as its complement: the
//! values outside the allowed set, cut into ranges a single comparison can express
//! ([`outside`]). Every rule here answers EPERM from the kernel and is not reported, like
//! the profile's `eperm` rules: a runtime probing for MPTCP or netlink at start-up is not
//! an incident.
//!
//! Two calls cannot be decided by a filter, because the decision depends on the socket
//! behind a descriptor or on an address in the plugin's memory: `listen` (only on a socket
//! bound to an allowed port) and `connect` (when UNIX paths are granted). They go to the
//! launcher by seccomp user notification and the launcher performs them itself
//! ([`crate::emulate`]).

use crate::access::Feature;
use crate::profile::{Action, Condition, Op, Profile, SyscallRule};
use crate::syscalls;

/// `socket(2)`/`socketpair(2)` argument values.
pub mod net {
    /// AF_UNIX.
    pub const AF_UNIX: u32 = 1;
    /// AF_INET.
    pub const AF_INET: u32 = 2;
    /// AF_INET6.
    pub const AF_INET6: u32 = 10;
    /// SOCK_STREAM.
    pub const SOCK_STREAM: u32 = 1;
    /// SOCK_DGRAM.
    pub const SOCK_DGRAM: u32 = 2;
    /// SOCK_SEQPACKET.
    pub const SOCK_SEQPACKET: u32 = 5;
    /// The type bits of the type argument. The kernel refuses any other bit but
    /// SOCK_NONBLOCK and SOCK_CLOEXEC with EINVAL, so masking with this is masking those
    /// two flags out.
    pub const SOCK_TYPE_MASK: u32 = 0xf;
    /// IPPROTO_TCP.
    pub const IPPROTO_TCP: u32 = 6;
    /// IPPROTO_UDP.
    pub const IPPROTO_UDP: u32 = 17;
}

/// Terminal ioctls no plugin needs: injecting input (TIOCSTI, TIOCLINUX's paste), taking a
/// controlling terminal back after the launcher's setsid (TIOCSCTTY), redirecting the
/// console (TIOCCONS) and changing the line discipline (TIOCSETD).
pub const TTY_IOCTLS: &[(&str, u32)] = &[
    ("TIOCSTI", 0x5412),
    ("TIOCLINUX", 0x541c),
    ("TIOCSCTTY", 0x540e),
    ("TIOCCONS", 0x541d),
    ("TIOCSETD", 0x5423),
];

/// SysV IPC and POSIX message queues: objects of the IPC namespace that no path grant
/// covers. (`ipc(2)`, the multiplexer, exists on neither x86_64 nor aarch64; the i386 ABI
/// that has it is killed by the architecture check.)
pub const IPC: &[&str] = &[
    "shmget",
    "shmat",
    "shmdt",
    "shmctl",
    "msgget",
    "msgsnd",
    "msgrcv",
    "msgctl",
    "semget",
    "semop",
    "semtimedop",
    "semctl",
    "mq_open",
    "mq_unlink",
    "mq_timedsend",
    "mq_timedreceive",
    "mq_notify",
    "mq_getsetattr",
];

/// io_uring runs socket, file and network operations that seccomp never sees, so every
/// seccomp rule here would be moot with it.
pub const IO_URING: &[&str] = &["io_uring_setup", "io_uring_enter", "io_uring_register"];

/// `seccomp(2)` operations that only query (`SECCOMP_GET_ACTION_AVAIL`,
/// `SECCOMP_GET_NOTIF_SIZES`); installing a filter or strict mode is refused.
const SECCOMP_QUERIES: &[u32] = &[2, 3];
/// `prctl(PR_SET_SECCOMP, ...)`.
const PR_SET_SECCOMP: u32 = 22;
/// `memfd_create` flag: the memfd can never be made executable.
const MFD_NOEXEC_SEAL: u32 = 0x8;
/// `execveat` flag: execute the descriptor itself.
const AT_EMPTY_PATH: u32 = 0x1000;

/// A syscall the launcher answers itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Supervised {
    /// `listen`: only a socket already bound to an allowed port (or a UNIX path).
    Listen,
    /// `connect`: TCP to an allowed port, UNIX only to a granted path.
    Connect,
}

impl Supervised {
    /// The syscall's name.
    pub fn name(self) -> &'static str {
        match self {
            Supervised::Listen => "listen",
            Supervised::Connect => "connect",
        }
    }

    /// The syscall's number here.
    pub fn nr(self) -> i64 {
        syscalls::number(self.name()).unwrap_or(-1)
    }
}

/// The rules a profile implies.
#[derive(Clone, Debug, Default)]
pub struct Baseline {
    /// Answered by the kernel with EPERM.
    pub rules: Vec<SyscallRule>,
    /// Also EPERM, but in the last filter installed: they refuse installing filters, which
    /// the launcher itself does until then.
    pub lock: Vec<SyscallRule>,
    /// Answered by the launcher (seccomp user notification).
    pub supervised: Vec<Supervised>,
}

impl Baseline {
    /// Whether the baseline refuses this call (for calls that reach the launcher).
    pub fn denies(&self, nr: i64, args: &[u64; 6]) -> bool {
        self.kernel_rules()
            .any(|r| r.syscalls.iter().any(|(_, n)| *n == nr) && r.matches_args(args))
    }

    /// Every kernel-answered rule (`rules` then `lock`).
    pub fn kernel_rules(&self) -> impl Iterator<Item = &SyscallRule> {
        self.rules.iter().chain(&self.lock)
    }
}

/// The rules `profile` implies.
pub fn of(profile: &Profile) -> Baseline {
    of_with(profile, &[])
}

/// Sockets the launcher opens itself: its report to the sidecar goes over the pod's UNIX
/// report socket (`report.rs`). A filter that confines the launcher too (the runtime's,
/// [`crate::oci::export`]) must leave them open; the plugin's own filter does not.
pub const LAUNCHER_SOCKETS: &[(u32, u32, u32)] = &[(net::AF_UNIX, net::SOCK_STREAM, 0)];

/// The rules `profile` implies for a filter that also confines the launcher: the socket
/// allow-list also holds [`LAUNCHER_SOCKETS`].
pub fn of_container(profile: &Profile) -> Baseline {
    of_with(profile, LAUNCHER_SOCKETS)
}

fn of_with(profile: &Profile, extra_sockets: &[(u32, u32, u32)]) -> Baseline {
    let mut b = Baseline::default();
    let rule = |names: &[&str], when: Vec<Vec<Condition>>| {
        let syscalls: Vec<(String, i64)> = names
            .iter()
            .filter_map(|n| syscalls::number(n).map(|nr| ((*n).to_string(), nr)))
            .collect();
        (!syscalls.is_empty()).then_some(SyscallRule {
            syscalls,
            action: Action::Eperm,
            when,
            line: 0,
        })
    };
    b.rules.extend(rule(IO_URING, Vec::new()));
    if let Some(net) = &profile.network {
        let mut allowed = socket_allowed(profile);
        for extra in extra_sockets {
            if !allowed.contains(extra) {
                allowed.push(*extra);
            }
        }
        b.rules.extend(rule(&["socket"], socket_deny(&allowed)));
        let pairs = [
            (net::AF_UNIX, net::SOCK_STREAM, 0),
            (net::AF_UNIX, net::SOCK_SEQPACKET, 0),
        ];
        b.rules.extend(rule(&["socketpair"], socket_deny(&pairs)));
        if net.may_listen() {
            b.supervised.push(Supervised::Listen);
        } else {
            b.rules.extend(rule(&["listen"], Vec::new()));
        }
        if !net.unix_connect.is_empty() {
            b.supervised.push(Supervised::Connect);
        }
    }
    b.rules.extend(rule(
        &["ioctl"],
        TTY_IOCTLS
            .iter()
            .map(|(_, cmd)| vec![cond(1, Op::Eq, *cmd)])
            .collect(),
    ));
    if !profile.process.sysv_ipc {
        b.rules.extend(rule(IPC, Vec::new()));
    }
    if !profile.process.danger_anonymous_exec {
        b.rules.extend(rule(
            &["memfd_create"],
            vec![vec![cond(1, Op::MaskedEq(u64::from(MFD_NOEXEC_SEAL)), 0)]],
        ));
        b.rules.extend(rule(&["memfd_secret"], Vec::new()));
        b.rules.extend(rule(
            &["execveat"],
            vec![vec![cond(
                4,
                Op::MaskedEq(u64::from(AT_EMPTY_PATH)),
                AT_EMPTY_PATH,
            )]],
        ));
    }
    if !profile.process.danger_nested_seccomp {
        b.lock.extend(rule(
            &["seccomp"],
            outside(0, SECCOMP_QUERIES)
                .into_iter()
                .map(|c| vec![c])
                .collect(),
        ));
        b.lock.extend(rule(
            &["prctl"],
            vec![vec![cond(0, Op::Eq, PR_SET_SECCOMP)]],
        ));
    }
    b
}

/// What the baseline enforces for `profile`, given whether this kernel has seccomp filters
/// and whether the launcher can answer calls itself (user notification + pidfd_getfd).
pub fn features(profile: &Profile, seccomp: bool, supervise: bool) -> Vec<Feature> {
    let mut out = Vec::new();
    let no_seccomp = "no seccomp filters on this kernel";
    let why = |enforced: bool, yes: String, no: String| (enforced, if enforced { yes } else { no });
    match &profile.network {
        None => out.push(Feature::unconfined(
            "network",
            "no [network] table: any socket family, address and port".into(),
        )),
        Some(net) => {
            let mut kinds = vec!["TCP over AF_INET/AF_INET6"];
            if net.unrestricted_udp {
                kinds.push("UDP to any address (unrestricted_udp)");
            }
            if !net.unix_connect.is_empty() {
                kinds.push("AF_UNIX stream/seqpacket");
            }
            let (on, detail) = why(
                seccomp,
                format!(
                    "socket() only {}; socketpair() only AF_UNIX stream/seqpacket pairs; every other family, type and protocol (MPTCP, netlink, vsock, packet, UNIX datagram, ...) EPERM",
                    kinds.join(", ")
                ),
                format!(
                    "{no_seccomp}: any socket family and protocol (MPTCP bypasses the TCP rules)"
                ),
            );
            out.push(Feature::new("sockets", on, detail));
            let (on, detail) = if net.may_listen() {
                why(
                    seccomp && supervise,
                    "listen() only on a socket bound to an allowed port or a UNIX path (performed by the launcher)".into(),
                    "needs seccomp user notification and pidfd_getfd (Linux 5.6): listen() is unchecked, an unbound socket listens on an ephemeral port".into(),
                )
            } else {
                why(
                    seccomp,
                    "listen() EPERM (bind_tcp is empty)".into(),
                    format!("{no_seccomp}: an unbound socket listens on an ephemeral port"),
                )
            };
            out.push(Feature::new("listen", on, detail));
            if !net.unix_connect.is_empty() {
                let paths: Vec<String> = net
                    .unix_connect
                    .iter()
                    .map(|g| g.path.display().to_string())
                    .collect();
                let (on, detail) = why(
                    seccomp && supervise,
                    format!(
                        "connect() to UNIX sockets only {} (performed by the launcher; TCP connects too, to connect_tcp ports)",
                        paths.join(", ")
                    ),
                    "needs seccomp user notification and pidfd_getfd (Linux 5.6): AF_UNIX connect reaches any socket the plugin can name".into(),
                );
                out.push(Feature::new("unix", on, detail));
            }
        }
    }
    let ioctls: Vec<&str> = TTY_IOCTLS.iter().map(|(n, _)| *n).collect();
    let (on, detail) = why(
        seccomp,
        format!(
            "new session without a controlling terminal; ioctl {} EPERM",
            ioctls.join(", ")
        ),
        format!("{no_seccomp}: new session only, terminal ioctls not filtered"),
    );
    out.push(Feature::new("terminal", on, detail));
    out.push(Feature::new(
        "fds",
        true,
        if profile.process.keep_fds.is_empty() {
            "descriptors above 2 closed at exec".into()
        } else {
            format!(
                "descriptors above 2 closed at exec, but {:?} (keep_fds)",
                profile.process.keep_fds
            )
        },
    ));
    if profile.process.sysv_ipc {
        out.push(Feature::unconfined(
            "ipc",
            "SysV IPC and POSIX message queues allowed (sysv_ipc)".into(),
        ));
    } else {
        let (on, detail) = why(
            seccomp,
            "SysV shared memory, message queues, semaphores and POSIX message queues EPERM".into(),
            format!("{no_seccomp}: SysV IPC made outside is reachable"),
        );
        out.push(Feature::new("ipc", on, detail));
    }
    if profile.process.danger_anonymous_exec {
        out.push(Feature::unconfined(
            "exec",
            "executable memfds and execveat(AT_EMPTY_PATH) allowed (danger_anonymous_exec)".into(),
        ));
    } else {
        let (on, detail) = why(
            seccomp,
            "executes only what Landlock grants: memfd_create only with MFD_NOEXEC_SEAL, no memfd_secret, no execveat(AT_EMPTY_PATH)".into(),
            format!("{no_seccomp}: a memfd can be executed, outside Landlock's execute rules"),
        );
        out.push(Feature::new("exec", on, detail));
    }
    if profile.process.danger_nested_seccomp {
        out.push(Feature::unconfined(
            "nesting",
            "the plugin may install seccomp filters, which can silence kill rules (danger_nested_seccomp)".into(),
        ));
    } else {
        let (on, detail) = why(
            seccomp,
            "seccomp() and prctl(PR_SET_SECCOMP) EPERM: the plugin cannot answer a kill rule with a filter of its own".into(),
            no_seccomp.into(),
        );
        out.push(Feature::new("nesting", on, detail));
    }
    let (on, detail) = why(
        seccomp,
        "io_uring EPERM (its operations bypass seccomp)".into(),
        no_seccomp.into(),
    );
    out.push(Feature::new("io_uring", on, detail));
    out
}

/// The (domain, type, protocol) triples `socket(2)` may create under `profile`.
pub fn socket_allowed(profile: &Profile) -> Vec<(u32, u32, u32)> {
    let Some(net) = &profile.network else {
        return Vec::new();
    };
    let mut allowed = Vec::new();
    for domain in [net::AF_INET, net::AF_INET6] {
        allowed.push((domain, net::SOCK_STREAM, 0));
        allowed.push((domain, net::SOCK_STREAM, net::IPPROTO_TCP));
        if net.unrestricted_udp {
            allowed.push((domain, net::SOCK_DGRAM, 0));
            allowed.push((domain, net::SOCK_DGRAM, net::IPPROTO_UDP));
        }
    }
    if !net.unix_connect.is_empty() {
        // Connection-oriented only: a datagram socket names its destination in every
        // sendto/sendmsg, which the launcher does not see.
        allowed.push((net::AF_UNIX, net::SOCK_STREAM, 0));
        allowed.push((net::AF_UNIX, net::SOCK_SEQPACKET, 0));
    }
    allowed
}

/// Whether a socket of these arguments is allowed by `allowed`, as the kernel reads them
/// (32-bit int arguments, the type's flag bits masked off).
pub fn socket_permits(allowed: &[(u32, u32, u32)], args: &[u64; 6]) -> bool {
    let (d, t, p) = (args[0] as u32, args[1] as u32, args[2] as u32);
    allowed
        .iter()
        .any(|(ad, at, ap)| *ad == d && *at == t & net::SOCK_TYPE_MASK && *ap == p)
}

/// Condition groups (OR of ANDs) matching every socket call *not* in `allowed`.
fn socket_deny(allowed: &[(u32, u32, u32)]) -> Vec<Vec<Condition>> {
    let mut groups = Vec::new();
    let mut domains: Vec<u32> = allowed.iter().map(|a| a.0).collect();
    domains.sort_unstable();
    domains.dedup();
    groups.extend(outside(0, &domains).into_iter().map(|c| vec![c]));
    for domain in &domains {
        let mut types: Vec<u32> = allowed
            .iter()
            .filter(|a| a.0 == *domain)
            .map(|a| a.1)
            .collect();
        types.sort_unstable();
        types.dedup();
        let is_domain = cond(0, Op::Eq, *domain);
        for c in outside_masked(1, &types, net::SOCK_TYPE_MASK) {
            groups.push(vec![is_domain, c]);
        }
        for ty in &types {
            let protocols: Vec<u32> = allowed
                .iter()
                .filter(|a| a.0 == *domain && a.1 == *ty)
                .map(|a| a.2)
                .collect();
            let is_type = cond(1, Op::MaskedEq(u64::from(net::SOCK_TYPE_MASK)), *ty);
            for c in outside(2, &protocols) {
                groups.push(vec![is_domain, is_type, c]);
            }
        }
    }
    groups
}

fn cond(arg: u8, op: Op, value: u32) -> Condition {
    Condition {
        arg,
        op,
        value: u64::from(value),
    }
}

/// Single conditions on argument `arg` (its low 32 bits) whose union is every value not
/// in `allowed`: below the least, above the greatest, and each gap cut into aligned
/// power-of-two blocks (`arg & !(2^k - 1) == start`).
pub fn outside(arg: u8, allowed: &[u32]) -> Vec<Condition> {
    let mut set = allowed.to_vec();
    set.sort_unstable();
    set.dedup();
    let (Some(&min), Some(&max)) = (set.first(), set.last()) else {
        // Nothing allowed: everything is outside.
        return vec![cond(arg, Op::MaskedEq(0), 0)];
    };
    let mut out = Vec::new();
    if min > 0 {
        out.push(cond(arg, Op::Lt, min));
    }
    for pair in set.windows(2) {
        if pair[1] > pair[0] + 1 {
            out.extend(blocks(arg, pair[0] + 1, pair[1] - 1, u32::MAX));
        }
    }
    if max < u32::MAX {
        out.push(cond(arg, Op::Gt, max));
    }
    out
}

/// As [`outside`], for the value `arg & mask` (`mask` a run of low bits): every value of
/// those bits not in `allowed`, as masked comparisons only.
pub fn outside_masked(arg: u8, allowed: &[u32], mask: u32) -> Vec<Condition> {
    let mut set: Vec<u32> = allowed.iter().map(|v| v & mask).collect();
    set.sort_unstable();
    set.dedup();
    let mut out = Vec::new();
    let mut next = 0u32;
    for v in set.iter().copied().chain(std::iter::once(mask + 1)) {
        if v > next {
            out.extend(blocks(arg, next, v - 1, mask));
        }
        next = v + 1;
    }
    out
}

/// `[lo, hi]` as aligned blocks, each `arg & (mask & !(size - 1)) == start`.
fn blocks(arg: u8, lo: u32, hi: u32, mask: u32) -> Vec<Condition> {
    let mut out = Vec::new();
    let mut start = u64::from(lo);
    let end = u64::from(hi);
    while start <= end {
        let mut size = 1u64;
        while start % (size * 2) == 0 && start + size * 2 - 1 <= end && size * 2 <= 1 << 32 {
            size *= 2;
        }
        let block_mask = u64::from(mask) & !(size - 1);
        out.push(if size == 1 && mask == u32::MAX {
            cond(arg, Op::Eq, start as u32)
        } else {
            cond(arg, Op::MaskedEq(block_mask), start as u32)
        });
        start += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn matches(groups: &[Vec<Condition>], args: &[u64; 6]) -> bool {
        groups.iter().any(|g| g.iter().all(|c| c.matches(args)))
    }

    /// Values around every boundary that matters, and far from them.
    fn samples() -> Vec<u64> {
        let mut v: Vec<u64> = (0..300).collect();
        v.extend([
            0x80,
            0x800,
            0x80801,
            0x80802,
            0x80805,
            0x80000 | 1,
            0x800 | 1,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_fffe,
            0xffff_ffff,
            1 << 32 | 2,
            1 << 32 | 6,
            1 << 33 | 1,
        ]);
        v
    }

    #[test]
    fn outside_is_exactly_the_complement() {
        for allowed in [
            vec![2, 10],
            vec![0, 6],
            vec![0, 17],
            vec![0],
            vec![1, 2, 10],
            vec![2, 3],
            vec![0, u32::MAX],
        ] {
            let groups: Vec<Vec<Condition>> =
                outside(0, &allowed).into_iter().map(|c| vec![c]).collect();
            for v in samples() {
                let low = v as u32;
                assert_eq!(
                    matches(&groups, &[v, 0, 0, 0, 0, 0]),
                    !allowed.contains(&low),
                    "{allowed:?} {v:#x}"
                );
            }
        }
    }

    #[test]
    fn outside_masked_is_the_complement_under_the_mask() {
        for allowed in [vec![1], vec![1, 2], vec![1, 5], vec![0, 15]] {
            let groups: Vec<Vec<Condition>> = outside_masked(1, &allowed, 0xf)
                .into_iter()
                .map(|c| vec![c])
                .collect();
            for v in samples() {
                let ty = (v as u32) & 0xf;
                assert_eq!(
                    matches(&groups, &[0, v, 0, 0, 0, 0]),
                    !allowed.contains(&ty),
                    "{allowed:?} {v:#x}"
                );
            }
        }
    }

    fn profile(network: &str) -> Profile {
        let text = format!("version = 1\nmode = \"best_effort\"\n{network}");
        Profile::parse(Path::new("p.toml"), &text, &|_| None).expect("profile")
    }

    #[test]
    fn the_socket_rule_denies_exactly_what_is_not_allowed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let unix = format!(
            "[network]\nunrestricted_udp = true\nunix_connect = [{:?}]\n",
            dir.path().join("x.sock").display().to_string()
        );
        for text in ["[network]\n", "[network]\nunrestricted_udp = true\n", &unix] {
            let p = profile(text);
            let allowed = socket_allowed(&p);
            let groups = socket_deny(&allowed);
            for d in [0u64, 1, 2, 3, 9, 10, 11, 16, 17, 40, 44, 1 << 32 | 2] {
                for t in [
                    0u64, 1, 2, 3, 5, 6, 10, 0x80001, 0x801, 0x80802, 0x80805, 0x81,
                ] {
                    for p in [0u64, 1, 6, 17, 132, 256, 262, 1 << 32 | 6, 1 << 32] {
                        let args = [d, t, p, 0, 0, 0];
                        // The kernel would refuse a flag bit other than NONBLOCK/CLOEXEC
                        // (EINVAL) before looking at the type; only the rest matters.
                        if t as u32 & !(0xf | 0x800 | 0x80000) != 0 {
                            continue;
                        }
                        assert_eq!(
                            matches(&groups, &args),
                            !socket_permits(&allowed, &args),
                            "{text} {args:x?}"
                        );
                    }
                }
            }
            // The named cases of the issue.
            let denied = |args: [u64; 6]| matches(&groups, &args);
            assert!(denied([2, 1, 262, 0, 0, 0]), "MPTCP");
            assert!(
                denied([10, 0x80801, 262, 0, 0, 0]),
                "MPTCP over IPv6, with flags"
            );
            assert!(denied([16, 3, 0, 0, 0, 0]), "netlink");
            assert!(denied([40, 1, 0, 0, 0, 0]), "vsock");
            assert!(denied([17, 3, 0, 0, 0, 0]), "packet");
            assert!(denied([38, 5, 0, 0, 0, 0]), "AF_ALG");
            assert!(!denied([2, 0x80801, 0, 0, 0, 0]), "TCP with flags");
            assert!(!denied([10, 1, 6, 0, 0, 0]), "TCP over IPv6");
            assert!(denied([2, 2, 1, 0, 0, 0]), "ICMP ping sockets");
            assert_eq!(denied([2, 2, 17, 0, 0, 0]), !text.contains("udp"), "UDP");
            assert_eq!(
                denied([1, 1, 0, 0, 0, 0]),
                !text.contains("unix"),
                "UNIX stream"
            );
            assert!(denied([1, 2, 0, 0, 0, 0]), "UNIX datagram, always");
        }
    }

    #[test]
    fn socketpair_allows_stream_pairs_only() {
        let groups = socket_deny(&[
            (net::AF_UNIX, net::SOCK_STREAM, 0),
            (net::AF_UNIX, net::SOCK_SEQPACKET, 0),
        ]);
        let denied = |args: [u64; 6]| matches(&groups, &args);
        assert!(!denied([1, 1 | 0x80000, 0, 0, 0, 0]));
        assert!(!denied([1, 5, 0, 0, 0, 0]));
        assert!(
            denied([1, 2, 0, 0, 0, 0]),
            "datagram pairs can sendto any path"
        );
        assert!(denied([2, 1, 0, 0, 0, 0]));
    }

    #[test]
    fn what_each_profile_shape_implies() {
        let none = profile("[filesystem]\n");
        let b = of(&none);
        let names = |rules: &[SyscallRule]| -> Vec<String> {
            rules
                .iter()
                .flat_map(|r| r.syscalls.iter().map(|(n, _)| n.clone()))
                .collect()
        };
        let rules = names(&b.rules);
        assert!(
            !rules.contains(&"socket".to_string()),
            "no [network]: no socket rule"
        );
        for n in [
            "io_uring_setup",
            "ioctl",
            "shmget",
            "msgget",
            "semget",
            "memfd_create",
        ] {
            assert!(rules.contains(&n.to_string()), "{n}");
        }
        assert_eq!(names(&b.lock), ["seccomp", "prctl"]);
        assert!(b.supervised.is_empty());

        let closed = of(&profile("[network]\nconnect_tcp = [15001]\n"));
        assert!(names(&closed.rules).contains(&"listen".to_string()));
        assert!(closed.supervised.is_empty());

        let serving = of(&profile("[network]\nbind_tcp = [8081]\n"));
        assert!(!names(&serving.rules).contains(&"listen".to_string()));
        assert_eq!(serving.supervised, [Supervised::Listen]);

        let opted = of(&profile(
            "[network]\n[process]\nsysv_ipc = true\ndanger_nested_seccomp = true\ndanger_anonymous_exec = true\n",
        ));
        let rules = names(&opted.rules);
        assert!(!rules.contains(&"shmget".to_string()));
        assert!(!rules.contains(&"memfd_create".to_string()));
        assert!(opted.lock.is_empty());
    }

    #[test]
    fn terminal_and_exec_rules_match_what_they_should() {
        let b = of(&profile("[filesystem]\n"));
        let find = |name: &str| {
            b.kernel_rules()
                .find(|r| r.syscalls.iter().any(|(n, _)| n == name))
                .expect(name)
                .clone()
        };
        let ioctl = find("ioctl");
        assert!(ioctl.matches_args(&[0, 0x5412, 0, 0, 0, 0]));
        assert!(
            ioctl.matches_args(&[0, 1 << 32 | 0x5412, 0, 0, 0, 0]),
            "high bits"
        );
        assert!(!ioctl.matches_args(&[0, 0x5401, 0, 0, 0, 0]), "TCGETS");
        let memfd = find("memfd_create");
        assert!(memfd.matches_args(&[0, 1, 0, 0, 0, 0]), "MFD_CLOEXEC only");
        assert!(
            !memfd.matches_args(&[0, 1 | 8, 0, 0, 0, 0]),
            "MFD_NOEXEC_SEAL"
        );
        let execveat = find("execveat");
        assert!(execveat.matches_args(&[3, 0, 0, 0, 0x1000, 0]));
        assert!(!execveat.matches_args(&[3, 0, 0, 0, 0x100, 0]));
        let seccomp = find("seccomp");
        assert!(seccomp.matches_args(&[1, 0, 0, 0, 0, 0]), "SET_MODE_FILTER");
        assert!(seccomp.matches_args(&[0, 0, 0, 0, 0, 0]), "SET_MODE_STRICT");
        assert!(
            !seccomp.matches_args(&[2, 0, 0, 0, 0, 0]),
            "GET_ACTION_AVAIL"
        );
        assert!(find("prctl").matches_args(&[22, 2, 0, 0, 0, 0]));
        assert!(
            !find("prctl").matches_args(&[21, 0, 0, 0, 0, 0]),
            "PR_GET_SECCOMP"
        );
    }
}
