//! Seccomp filters from a profile's syscall rules, compiled with seccompiler.
//!
//! seccompiler gives a filter one match action, so the rules become a stack of filters,
//! one per action; the kernel runs every filter and takes the strictest answer
//! (kill > errno > user notification > log > allow).
//!
//! How kills and logs are reported decides the stack ([`Reporting`]):
//! - [`Reporting::Notify`] (the default where the kernel has it, Linux 5.5+): `kill` and
//!   `log` rules return `SECCOMP_RET_USER_NOTIF` to a listener the launcher holds. The
//!   launcher learns the exact syscall and the caller's pid before the call runs, then
//!   SIGKILLs the caller (kill) or lets the call continue (log). A parent cannot learn the
//!   syscall from a `SECCOMP_RET_KILL_PROCESS` death (the siginfo goes to the dying
//!   process and the audit log is not readable in a pod), hence this design. seccompiler
//!   has no notify action: the filter is compiled with a unique `Trace` marker and the
//!   marker's return instructions are rewritten.
//! - [`Reporting::Kernel`]: `SECCOMP_RET_KILL_PROCESS` and `SECCOMP_RET_LOG`; a kill is
//!   reported as "seccomp kill (syscall unknown)" and logs go to the audit log only.
//!
//! `eperm`/`enosys` rules are answered by the kernel and not reported: a plugin probing
//! for io_uring at start-up is not an incident.
//!
//! The rules a profile's shape implies ([`crate::baseline`]) join the `eperm` filter,
//! except on syscalls a `kill` or `log` rule names: errno outranks user notification, so
//! there they join the notification filter and the launcher answers EPERM. The calls the
//! launcher performs itself (`listen`, `connect`) join the notification filter. The
//! baseline's lock (no `seccomp()` for the plugin) is a filter of its own, installed last.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch, sock_filter,
};

use crate::baseline;
use crate::profile::{Action, Condition, Op, Profile, SyscallRule};

/// How `kill` and `log` rules reach the launcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporting {
    /// Seccomp user notification: exact syscall names (Linux 5.5+).
    Notify,
    /// Kernel actions only: kills reported without the syscall name.
    Kernel,
}

/// One BPF program of the stack.
#[derive(Clone, Debug)]
pub struct Program {
    /// What it enforces, for messages.
    pub what: &'static str,
    /// The instructions.
    pub bpf: Vec<sock_filter>,
    /// Install it with `SECCOMP_FILTER_FLAG_NEW_LISTENER`.
    pub listener: bool,
}

/// Why filters could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused a rule.
    #[error("cannot compile the {what} filter: {source}")]
    Compile {
        /// Which filter.
        what: &'static str,
        /// seccompiler's error.
        source: seccompiler::BackendError,
    },
    /// The kernel refused a filter.
    #[error("cannot install the {what} filter: {source}")]
    Install {
        /// Which filter.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The marker `Trace` data whose returns become `SECCOMP_RET_USER_NOTIF`.
const NOTIFY_MARKER: u32 = 0x4e58;

/// The filters for a profile, in installation order: the x32 guard, the kernel-answered
/// errno rules (the profile's `eperm` and the [`baseline`](crate::baseline)), `enosys`,
/// the notification filter (`kill`, `log` and the calls the launcher answers), and last
/// the lock, which refuses installing further filters (the launcher installs until then).
///
/// `supervise`: the launcher can answer calls itself (user notification and pidfd_getfd);
/// without it the calls it would answer are left to the kernel (and `inspect` says so).
pub fn compile(
    profile: &Profile,
    reporting: Reporting,
    supervise: bool,
) -> Result<Vec<Program>, SeccompError> {
    let baseline = baseline::of(profile);
    let user = |actions: &'static [Action]| {
        profile
            .syscalls
            .iter()
            .filter(move |r| actions.contains(&r.action))
    };
    let mut programs = Vec::new();
    if let Some(guard) = abi_guard() {
        programs.push(guard);
    }
    let supervised: Vec<i64> = match reporting {
        Reporting::Notify if supervise => baseline.supervised.iter().map(|s| s.nr()).collect(),
        _ => Vec::new(),
    };
    // The kernel ranks ERRNO above USER_NOTIF: a baseline EPERM on a call that a `kill` or
    // `log` rule names would hide the kill and its report. Those syscalls' baseline rules
    // go into the notification filter instead; the launcher answers EPERM for them
    // (`baseline::Baseline::denies`) when no kill rule matches.
    let notified: Vec<i64> = match reporting {
        Reporting::Notify => user(&[Action::Kill, Action::Log])
            .flat_map(|r| r.syscalls.iter().map(|(_, nr)| *nr))
            .collect(),
        Reporting::Kernel => Vec::new(),
    };
    let (to_listener, to_kernel): (Vec<SyscallRule>, Vec<SyscallRule>) = baseline
        .rules
        .iter()
        .flat_map(SyscallRule::per_syscall)
        .partition(|r| r.syscalls.iter().any(|(_, nr)| notified.contains(nr)));
    push(
        &mut programs,
        "eperm",
        by_syscall(user(&[Action::Eperm]).chain(&to_kernel), &[])?,
        SeccompAction::Errno(libc::EPERM as u32),
        false,
    )?;
    push(
        &mut programs,
        "enosys",
        by_syscall(user(&[Action::Enosys]), &[])?,
        SeccompAction::Errno(libc::ENOSYS as u32),
        false,
    )?;
    match reporting {
        Reporting::Notify => push(
            &mut programs,
            "kill/log/supervised (user notification)",
            by_syscall(
                user(&[Action::Kill, Action::Log]).chain(&to_listener),
                &supervised,
            )?,
            SeccompAction::Trace(NOTIFY_MARKER),
            true,
        )?,
        Reporting::Kernel => {
            push(
                &mut programs,
                "kill",
                by_syscall(user(&[Action::Kill]), &[])?,
                SeccompAction::KillProcess,
                false,
            )?;
            push(
                &mut programs,
                "log",
                by_syscall(user(&[Action::Log]), &[])?,
                SeccompAction::Log,
                false,
            )?;
        }
    }
    push(
        &mut programs,
        "lock",
        by_syscall(baseline.lock.iter(), &[])?,
        SeccompAction::Errno(libc::EPERM as u32),
        false,
    )?;
    Ok(programs)
}

/// seccompiler's map for `rules`, plus `always` matched unconditionally.
fn by_syscall<'a>(
    rules: impl Iterator<Item = &'a SyscallRule>,
    always: &[i64],
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let compile_error = |source| SeccompError::Compile {
        what: "syscall",
        source,
    };
    // None: unconditional (matches whatever else is listed for the syscall).
    let mut map: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for nr in always {
        map.insert(*nr, None);
    }
    for rule in rules {
        for (_, nr) in &rule.syscalls {
            let entry = map.entry(*nr).or_insert_with(|| Some(Vec::new()));
            if rule.when.is_empty() {
                *entry = None;
                continue;
            }
            if let Some(rules) = entry {
                for group in &rule.when {
                    let conditions = group
                        .iter()
                        .map(condition)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(compile_error)?;
                    rules.push(SeccompRule::new(conditions).map_err(compile_error)?);
                }
            }
        }
    }
    Ok(map
        .into_iter()
        .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
        .collect())
}

/// Appends the filter matching `rules` with `action` (nothing when `rules` is empty).
fn push(
    programs: &mut Vec<Program>,
    what: &'static str,
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    action: SeccompAction,
    listener: bool,
) -> Result<(), SeccompError> {
    if rules.is_empty() {
        return Ok(());
    }
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, action, target_arch())
        .map_err(|source| SeccompError::Compile { what, source })?;
    let mut bpf: Vec<sock_filter> = filter
        .try_into()
        .map_err(|source| SeccompError::Compile { what, source })?;
    if listener {
        let marker = libc::SECCOMP_RET_TRACE | NOTIFY_MARKER;
        for insn in &mut bpf {
            if insn.code == RET_K && insn.k == marker {
                insn.k = libc::SECCOMP_RET_USER_NOTIF;
            }
        }
    }
    programs.push(Program {
        what,
        bpf,
        listener,
    });
    Ok(())
}

const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

fn condition(c: &Condition) -> Result<SeccompCondition, seccompiler::BackendError> {
    let op = match c.op {
        Op::Eq => SeccompCmpOp::Eq,
        Op::Ne => SeccompCmpOp::Ne,
        Op::Lt => SeccompCmpOp::Lt,
        Op::Le => SeccompCmpOp::Le,
        Op::Gt => SeccompCmpOp::Gt,
        Op::Ge => SeccompCmpOp::Ge,
        Op::MaskedEq(mask) => SeccompCmpOp::MaskedEq(mask),
    };
    SeccompCondition::new(c.arg, SeccompCmpArgLen::Dword, op, c.value)
}

/// The seccompiler architecture of this build.
pub fn target_arch() -> TargetArch {
    #[cfg(target_arch = "x86_64")]
    {
        TargetArch::x86_64
    }
    #[cfg(target_arch = "aarch64")]
    {
        TargetArch::aarch64
    }
}

/// On x86_64 the x32 ABI reaches the same kernel entry points with the arch field still
/// `AUDIT_ARCH_X86_64` and bit 30 set in the number, so a rule on `ptrace` (101) would
/// not see x32 `ptrace` (0x40000209). This filter kills any x32 call; seccompiler's arch
/// check already kills i386 (`int 0x80`) calls.
fn abi_guard() -> Option<Program> {
    #[cfg(target_arch = "x86_64")]
    {
        const X32_SYSCALL_BIT: u32 = 0x4000_0000;
        let stmt = |code: u32, k: u32| sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        };
        let jump = |code: u32, k: u32, jt: u8, jf: u8| sock_filter {
            code: code as u16,
            jt,
            jf,
            k,
        };
        Some(Program {
            what: "x32 guard",
            bpf: vec![
                // A = seccomp_data.nr
                stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
                // if A >= X32_SYSCALL_BIT goto kill
                jump(
                    libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
                    X32_SYSCALL_BIT,
                    1,
                    0,
                ),
                stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
                stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_KILL_PROCESS),
            ],
            listener: false,
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Whether this kernel has seccomp filters at all.
#[allow(unsafe_code)]
pub fn available() -> bool {
    // SAFETY: PR_GET_SECCOMP takes no pointer arguments and only reads the caller's mode.
    unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) >= 0 }
}

/// Whether this kernel can return `SECCOMP_RET_USER_NOTIF`.
#[allow(unsafe_code)]
pub fn notify_available() -> bool {
    let action: u32 = libc::SECCOMP_RET_USER_NOTIF;
    // SAFETY: SECCOMP_GET_ACTION_AVAIL reads one u32 through the pointer, which points to
    // a live local for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0,
            &action as *const u32,
        )
    };
    rc == 0
}

/// Installs one program on the calling thread (which must have no_new_privs set);
/// returns the notification listener when the program asks for one.
///
/// Async-signal-safe: no allocation, so it may run between fork and exec.
#[allow(unsafe_code)]
pub fn install(program: &Program) -> Result<Option<OwnedFd>, SeccompError> {
    let Ok(len) = u16::try_from(program.bpf.len()) else {
        return Err(SeccompError::Install {
            what: program.what,
            source: std::io::Error::from_raw_os_error(libc::E2BIG),
        });
    };
    let prog = libc::sock_fprog {
        len,
        // seccompiler's sock_filter is #[repr(C)] with libc's layout.
        filter: program.bpf.as_ptr() as *mut libc::sock_filter,
    };
    let flags = if program.listener {
        libc::SECCOMP_FILTER_FLAG_NEW_LISTENER
    } else {
        0
    };
    // SAFETY: the kernel copies `len` instructions from `prog.filter`, which points into
    // `program.bpf`, alive for the whole call; `prog` itself is a live local.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc < 0 {
        return Err(SeccompError::Install {
            what: program.what,
            source: std::io::Error::last_os_error(),
        });
    }
    if program.listener {
        let Ok(fd) = i32::try_from(rc) else {
            return Err(SeccompError::Install {
                what: program.what,
                source: std::io::Error::from_raw_os_error(libc::EBADF),
            });
        };
        // SAFETY: with NEW_LISTENER the kernel returns a fresh fd that nothing else owns.
        return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Profile;
    use std::path::Path;

    fn default_profile() -> Profile {
        let text = include_str!("../../../profiles/default.toml");
        Profile::parse(Path::new("default.toml"), text, &|_| None).expect("default profile")
    }

    #[test]
    fn notify_stack_has_a_listener_and_no_marker_left() {
        let programs = compile(&default_profile(), Reporting::Notify, true).expect("compile");
        let listeners: Vec<_> = programs.iter().filter(|p| p.listener).collect();
        assert_eq!(listeners.len(), 1);
        let marker = libc::SECCOMP_RET_TRACE | NOTIFY_MARKER;
        for p in &programs {
            assert!(p.bpf.iter().all(|i| !(i.code == RET_K && i.k == marker)));
        }
        assert!(
            listeners[0]
                .bpf
                .iter()
                .any(|i| i.code == RET_K && i.k == libc::SECCOMP_RET_USER_NOTIF)
        );
    }

    /// Runs one classic-BPF seccomp program (the instructions seccompiler and the x32
    /// guard emit) on `seccomp_data { nr, arch, ip, args }`.
    fn run(bpf: &[sock_filter], nr: i64, args: &[u64; 6]) -> u32 {
        let mut data = [0u32; 16];
        data[0] = nr as u32;
        data[1] = if cfg!(target_arch = "x86_64") {
            0xc000_003e
        } else {
            0xc000_00b7
        };
        for (i, a) in args.iter().enumerate() {
            data[4 + 2 * i] = *a as u32;
            data[5 + 2 * i] = (*a >> 32) as u32;
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let insn = &bpf[pc];
            let code = u32::from(insn.code);
            pc += 1;
            match code {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    acc = data[insn.k as usize / 4]
                }
                c if c == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K => acc &= insn.k,
                c if c == libc::BPF_RET | libc::BPF_K => return insn.k,
                c if c == libc::BPF_JMP | libc::BPF_JA => pc += insn.k as usize,
                c if c & 0x07 == libc::BPF_JMP => {
                    let taken = match c & 0xf0 {
                        x if x == libc::BPF_JEQ => acc == insn.k,
                        x if x == libc::BPF_JGT => acc > insn.k,
                        x if x == libc::BPF_JGE => acc >= insn.k,
                        x if x == libc::BPF_JSET => acc & insn.k != 0,
                        other => panic!("jump {other:#x}"),
                    };
                    pc += usize::from(if taken { insn.jt } else { insn.jf });
                }
                other => panic!("instruction {other:#x}"),
            }
        }
    }

    /// What the kernel answers for the stack: the most restrictive action (ties: the
    /// filter installed last).
    fn answer(programs: &[Program], nr: i64, args: &[u64; 6]) -> u32 {
        let action = |r: u32| (r & libc::SECCOMP_RET_ACTION_FULL) as i32;
        programs.iter().rev().map(|p| run(&p.bpf, nr, args)).fold(
            libc::SECCOMP_RET_ALLOW,
            |best, r| {
                if action(r) < action(best) { r } else { best }
            },
        )
    }

    #[test]
    fn the_stack_answers_what_the_rules_and_the_baseline_say() {
        let profile = default_profile();
        let implied = baseline::of(&profile);
        let programs = compile(&profile, Reporting::Notify, true).expect("compile");
        assert_eq!(programs.last().map(|p| p.what), Some("lock"));
        let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let socket = libc::SYS_socket;
        for d in [0u64, 1, 2, 3, 10, 16, 17, 40, 1 << 32 | 2] {
            for t in [1u64, 2, 3, 5, 1 | 0x80800] {
                for p in [0u64, 6, 17, 262] {
                    let args = [d, t, p, 0, 0, 0];
                    let got = answer(&programs, socket, &args);
                    let expected = if profile.rule_for(Action::Kill, socket, &args).is_some()
                        || implied.denies(socket, &args)
                    {
                        // Kill rules and the allow-list meet in the listener: the
                        // launcher kills, or answers EPERM itself.
                        libc::SECCOMP_RET_USER_NOTIF
                    } else {
                        libc::SECCOMP_RET_ALLOW
                    };
                    assert_eq!(got, expected, "socket{args:x?}");
                }
            }
        }
        let call = |name: &str, args: [u64; 6]| {
            answer(&programs, crate::syscalls::number(name).expect(name), &args)
        };
        assert_eq!(call("listen", [3, 16, 0, 0, 0, 0]), eperm);
        assert_eq!(call("ioctl", [0, 0x5412, 0, 0, 0, 0]), eperm);
        assert_eq!(
            call("ioctl", [0, 0x5401, 0, 0, 0, 0]),
            libc::SECCOMP_RET_ALLOW
        );
        assert_eq!(call("shmget", [0; 6]), eperm);
        assert_eq!(call("seccomp", [1, 0, 0, 0, 0, 0]), eperm);
        assert_eq!(call("seccomp", [2, 0, 0, 0, 0, 0]), libc::SECCOMP_RET_ALLOW);
        assert_eq!(call("memfd_create", [0, 1, 0, 0, 0, 0]), eperm);
        assert_eq!(
            call("memfd_create", [0, 9, 0, 0, 0, 0]),
            libc::SECCOMP_RET_ALLOW
        );
        assert_eq!(call("ptrace", [0; 6]), libc::SECCOMP_RET_USER_NOTIF);
        assert_eq!(
            call("clone3", [0; 6]),
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
        assert_eq!(call("read", [0; 6]), libc::SECCOMP_RET_ALLOW);
        // The x32 ABI is killed by the guard.
        if cfg!(target_arch = "x86_64") {
            assert_eq!(
                answer(&programs, 0x4000_0000 | 101, &[0; 6]),
                libc::SECCOMP_RET_KILL_PROCESS
            );
        }
        // Without user notification the allow-list stays in the kernel, kills too.
        let kernel = compile(&profile, Reporting::Kernel, false).expect("compile");
        assert_eq!(answer(&kernel, socket, &[2, 1, 262, 0, 0, 0]), eperm);
        assert_eq!(
            answer(&kernel, socket, &[17, 3, 0, 0, 0, 0]),
            libc::SECCOMP_RET_KILL_PROCESS
        );
    }

    #[test]
    fn supervised_calls_go_to_the_listener() {
        let dir = std::env::temp_dir();
        let text = format!(
            "version = 1\nmode = \"required\"\n[network]\nbind_tcp = [8081]\nunix_connect = [{:?}]\n",
            dir.join("x.sock").display().to_string()
        );
        let profile = Profile::parse(Path::new("p.toml"), &text, &|_| None).expect("parse");
        let programs = compile(&profile, Reporting::Notify, true).expect("compile");
        for name in ["listen", "connect"] {
            let nr = crate::syscalls::number(name).expect(name);
            assert_eq!(
                answer(&programs, nr, &[3, 0, 0, 0, 0, 0]),
                libc::SECCOMP_RET_USER_NOTIF
            );
        }
        // When the launcher cannot answer them, the kernel lets them through (and
        // `inspect` lists them as not enforced).
        let programs = compile(&profile, Reporting::Notify, false).expect("compile");
        let nr = crate::syscalls::number("listen").expect("listen");
        assert_eq!(
            answer(&programs, nr, &[3, 0, 0, 0, 0, 0]),
            libc::SECCOMP_RET_ALLOW
        );
    }

    #[test]
    fn kernel_stack_kills_and_logs_in_the_kernel() {
        let programs = compile(&default_profile(), Reporting::Kernel, false).expect("compile");
        assert!(programs.iter().all(|p| !p.listener));
        assert!(programs.iter().any(|p| {
            p.what == "kill"
                && p.bpf
                    .iter()
                    .any(|i| i.code == RET_K && i.k == libc::SECCOMP_RET_KILL_PROCESS)
        }));
    }
}
