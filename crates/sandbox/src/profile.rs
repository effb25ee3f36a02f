//! Sandbox profiles: the TOML a plugin's operator writes, parsed and checked before
//! anything is launched.
//!
//! A profile is an allow-list for the filesystem and TCP (Landlock) and a deny-list of
//! syscalls (seccomp), each syscall rule naming its action. Every mistake an operator can
//! make (an unknown syscall name, a path that does not exist, an unset variable, two rules
//! that contradict each other) is refused with the file, the line and the fix, so a bad
//! profile never half-applies. `${VAR}` and `${VAR:-default}` expand from the launcher's
//! environment in paths and ports, so one profile serves every pod.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::syscalls;

/// What to do when the kernel cannot enforce everything the profile asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Refuse to start the plugin.
    Required,
    /// Start it and report what is not enforced.
    BestEffort,
}

/// What a syscall rule does when it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// The offending process is killed and the violation reported.
    Kill,
    /// The call fails with EPERM; nothing is reported.
    Eperm,
    /// The call fails with ENOSYS, as if the kernel lacked it (for `clone3`, whose flags
    /// live in memory a filter cannot read: libc then falls back to `clone`).
    Enosys,
    /// The call proceeds and is reported (audit only).
    Log,
}

impl Action {
    /// The spelling in profiles and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Kill => "kill",
            Action::Eperm => "eperm",
            Action::Enosys => "enosys",
            Action::Log => "log",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "kill" => Action::Kill,
            "eperm" => Action::Eperm,
            "enosys" => Action::Enosys,
            "log" => Action::Log,
            _ => return None,
        })
    }
}

/// A comparison of one syscall argument (its low 32 bits, as seccompiler's `dword`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `arg == value`
    Eq,
    /// `arg != value`
    Ne,
    /// `arg < value`
    Lt,
    /// `arg <= value`
    Le,
    /// `arg > value`
    Gt,
    /// `arg >= value`
    Ge,
    /// `arg & mask == value`
    MaskedEq(u64),
}

/// One condition on one argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Condition {
    /// Argument index, 0..=5.
    pub arg: u8,
    /// The comparison.
    pub op: Op,
    /// The value compared with.
    pub value: u64,
}

impl Condition {
    /// Whether the (32-bit) argument satisfies the condition, exactly as the BPF does.
    pub fn matches(&self, args: &[u64; 6]) -> bool {
        let arg = args[usize::from(self.arg).min(5)] & 0xffff_ffff;
        let value = self.value & 0xffff_ffff;
        match self.op {
            Op::Eq => arg == value,
            Op::Ne => arg != value,
            Op::Lt => arg < value,
            Op::Le => arg <= value,
            Op::Gt => arg > value,
            Op::Ge => arg >= value,
            Op::MaskedEq(mask) => arg & mask & 0xffff_ffff == value,
        }
    }
}

/// One syscall rule: these syscalls, when any of the `when` groups holds (all of a
/// group's conditions), get `action`. No `when` means always.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyscallRule {
    /// Syscall names and their numbers on this architecture.
    pub syscalls: Vec<(String, i64)>,
    /// What happens.
    pub action: Action,
    /// OR of AND-groups; empty means unconditional.
    pub when: Vec<Vec<Condition>>,
    /// 1-based line in the profile, for messages.
    pub line: usize,
}

impl SyscallRule {
    /// The same rule once per syscall it names.
    pub fn per_syscall(&self) -> impl Iterator<Item = SyscallRule> + '_ {
        self.syscalls.iter().map(|s| SyscallRule {
            syscalls: vec![s.clone()],
            ..self.clone()
        })
    }

    /// Whether a call with these arguments matches the rule.
    pub fn matches_args(&self, args: &[u64; 6]) -> bool {
        self.when.is_empty() || self.when.iter().any(|g| g.iter().all(|c| c.matches(args)))
    }
}

/// A path the profile grants, after `${VAR}` expansion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathGrant {
    /// The path (absolute).
    pub path: PathBuf,
    /// 1-based line in the profile.
    pub line: usize,
}

/// Filesystem grants (Landlock). Everything else is denied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filesystem {
    /// Read files and list directories beneath these.
    pub read: Vec<PathGrant>,
    /// Read, write, create, remove, truncate beneath these.
    pub write: Vec<PathGrant>,
    /// Read and execute beneath these.
    pub execute: Vec<PathGrant>,
    /// Entries skipped because they were optional and absent (path, line, why).
    pub skipped: Vec<(String, usize, String)>,
}

/// Network grants: TCP ports (Landlock ABI 4+) and which sockets the plugin may create
/// at all (seccomp). `None` (no `[network]` table) leaves the network unrestricted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Network {
    /// Ports the plugin may connect to (any address: Landlock matches ports only).
    pub connect_tcp: Vec<u16>,
    /// Ports the plugin may bind.
    pub bind_tcp: Vec<u16>,
    /// UDP sockets are allowed, to any address and port (Landlock cannot restrict UDP).
    pub unrestricted_udp: bool,
    /// Pathname UNIX sockets the plugin may connect to; the launcher checks each connect.
    /// Empty: no UNIX sockets at all (socketpair stream pairs excepted).
    pub unix_connect: Vec<UnixGrant>,
    /// 1-based line of the `[network]` table.
    pub line: usize,
}

impl Network {
    /// Whether the plugin may listen at all (a bind port, or UNIX sockets).
    pub fn may_listen(&self) -> bool {
        !self.bind_tcp.is_empty() || !self.unix_connect.is_empty()
    }
}

/// A UNIX socket the plugin may connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixGrant {
    /// The path as the plugin names it (after `${VAR}` expansion; absolute).
    pub path: PathBuf,
    /// The same socket with its folder's symlinks resolved at launch: the launcher opens
    /// this one, refusing symlinks, so the plugin cannot redirect it later.
    pub resolved: PathBuf,
    /// 1-based line in the profile.
    pub line: usize,
}

/// What the plugin process inherits and may do beyond files and sockets (seccomp).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Process {
    /// Descriptors above 2 the plugin inherits; every other one is closed at exec.
    pub keep_fds: Vec<i32>,
    /// SysV IPC (shared memory, message queues, semaphores) and POSIX message queues.
    pub sysv_ipc: bool,
    /// The plugin may install seccomp filters of its own. They can turn a `kill` rule of
    /// this profile into a silent failure (the call still does not run, but nothing is
    /// killed or reported).
    pub danger_nested_seccomp: bool,
    /// The plugin may create executable memfds and execute by descriptor
    /// (`execveat(AT_EMPTY_PATH)`), which Landlock's execute rules do not see.
    pub danger_anonymous_exec: bool,
}

/// Landlock scopes (ABI 6+). Both default to on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scopes {
    /// No signals to processes outside the sandbox (the launcher among them).
    pub signal: bool,
    /// No connecting to abstract UNIX sockets created outside the sandbox.
    pub abstract_unix_socket: bool,
}

/// A checked profile, ready to apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    /// The file it came from.
    pub source: PathBuf,
    /// Its name (for reports).
    pub name: String,
    /// Required or best effort.
    pub mode: Mode,
    /// Filesystem grants; `None` (no `[filesystem]` table) leaves the filesystem
    /// unrestricted.
    pub filesystem: Option<Filesystem>,
    /// TCP grants, if TCP is restricted.
    pub network: Option<Network>,
    /// Scopes.
    pub scopes: Scopes,
    /// Descriptors, IPC, nested seccomp, anonymous executables.
    pub process: Process,
    /// Syscall rules in file order.
    pub syscalls: Vec<SyscallRule>,
    /// Names skipped because they exist only on the other architecture (name, line).
    pub skipped_syscalls: Vec<(String, usize)>,
}

/// Why a profile was refused. Each names the file and line to fix.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The file cannot be read.
    #[error("{file}: cannot read the profile: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML does not parse or has unknown or mistyped fields.
    #[error("{file}:{line}: {message}")]
    Syntax {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// What the parser said.
        message: String,
    },
    /// A value is wrong: an unknown syscall, a missing path, contradictory rules.
    #[error("{file}:{line}: {reason}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong and how to fix it.
        reason: String,
    },
}

/// The syscalls the launcher itself makes between installing the filters and `execve`:
/// a rule on one of them could never let the plugin start.
const LAUNCH_PATH: &[&str] = &[
    "execve",
    "seccomp",
    "sendmsg",
    "close",
    "exit_group",
    "write",
    "rt_sigprocmask",
];

/// Named constants accepted as condition values, so profiles read as C does.
const CONSTANTS: &[(&str, u64)] = &[
    ("AF_UNIX", 1),
    ("AF_INET", 2),
    ("AF_INET6", 10),
    ("AF_NETLINK", 16),
    ("AF_PACKET", 17),
    ("SOCK_STREAM", 1),
    ("SOCK_DGRAM", 2),
    ("SOCK_RAW", 3),
    ("SOCK_SEQPACKET", 5),
    ("SOCK_TYPE_MASK", 0xf),
    ("CLONE_NEWTIME", 0x80),
    ("CLONE_NEWNS", 0x0002_0000),
    ("CLONE_NEWCGROUP", 0x0200_0000),
    ("CLONE_NEWUTS", 0x0400_0000),
    ("CLONE_NEWIPC", 0x0800_0000),
    ("CLONE_NEWUSER", 0x1000_0000),
    ("CLONE_NEWPID", 0x2000_0000),
    ("CLONE_NEWNET", 0x4000_0000),
    ("ADDR_NO_RANDOMIZE", 0x0004_0000),
    ("MMAP_PAGE_ZERO", 0x0010_0000),
    ("ADDR_COMPAT_LAYOUT", 0x0020_0000),
    ("READ_IMPLIES_EXEC", 0x0040_0000),
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    version: Spanned<u32>,
    name: Option<String>,
    #[allow(dead_code)]
    description: Option<String>,
    mode: Spanned<String>,
    filesystem: Option<RawFilesystem>,
    network: Option<Spanned<RawNetwork>>,
    #[serde(default)]
    scope: RawScope,
    #[serde(default)]
    process: RawProcess,
    #[serde(default)]
    syscall: Vec<Spanned<RawSyscall>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilesystem {
    #[serde(default)]
    read: Vec<Spanned<RawPath>>,
    #[serde(default)]
    write: Vec<Spanned<RawPath>>,
    #[serde(default)]
    execute: Vec<Spanned<RawPath>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPath {
    Plain(String),
    Table(RawPathTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPathTable {
    path: String,
    #[serde(default)]
    optional: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    #[serde(default)]
    connect_tcp: Vec<Spanned<RawPort>>,
    #[serde(default)]
    bind_tcp: Vec<Spanned<RawPort>>,
    #[serde(default)]
    unrestricted_udp: bool,
    #[serde(default)]
    unix_connect: Vec<Spanned<RawPath>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProcess {
    #[serde(default)]
    keep_fds: Vec<Spanned<i64>>,
    #[serde(default)]
    sysv_ipc: bool,
    #[serde(default)]
    danger_nested_seccomp: bool,
    #[serde(default)]
    danger_anonymous_exec: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPort {
    Number(i64),
    Text(String),
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScope {
    signal: Option<bool>,
    abstract_unix_socket: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSyscall {
    names: Vec<Spanned<String>>,
    action: Spanned<String>,
    #[serde(default)]
    when: Vec<Vec<Spanned<RawCondition>>>,
    #[allow(dead_code)]
    comment: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCondition {
    arg: u8,
    #[serde(default = "default_op")]
    op: String,
    value: RawValue,
    mask: Option<RawValue>,
}

fn default_op() -> String {
    "eq".into()
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawValue {
    Number(u64),
    Name(String),
}

impl Profile {
    /// Reads and checks a profile, expanding `${VAR}` from the process environment.
    pub fn load(path: &Path) -> Result<Profile, ProfileError> {
        let text = Self::read(path)?;
        Profile::parse(path, &text, &|name| std::env::var(name).ok())
    }

    /// Reads and checks a profile for its syscall rules only (exporting them on an
    /// operator's machine): paths are not required to exist and variables need not be set.
    pub fn load_syscalls_only(path: &Path) -> Result<Profile, ProfileError> {
        let text = Self::read(path)?;
        Profile::parse_with(path, &text, &|_| None, true)
    }

    fn read(path: &Path) -> Result<String, ProfileError> {
        std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            file: path.to_path_buf(),
            source,
        })
    }

    /// Parses and checks profile text; `env` resolves `${VAR}`.
    pub fn parse(
        file: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Profile, ProfileError> {
        Profile::parse_with(file, text, env, false)
    }

    fn parse_with(
        file: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
        syscalls_only: bool,
    ) -> Result<Profile, ProfileError> {
        let ctx = Ctx { file, text };
        let raw: RawProfile = toml::from_str(text).map_err(|e| ProfileError::Syntax {
            file: file.to_path_buf(),
            line: e.span().map(|s| ctx.line(s.start)).unwrap_or(1),
            message: e.message().to_string(),
        })?;
        if *raw.version.get_ref() != 1 {
            return Err(ctx.invalid(
                raw.version.span().start,
                format!(
                    "unsupported profile version {} (this launcher reads version = 1)",
                    raw.version.get_ref()
                ),
            ));
        }
        let mode = match raw.mode.get_ref().as_str() {
            "required" => Mode::Required,
            "best_effort" => Mode::BestEffort,
            other => {
                return Err(ctx.invalid(
                    raw.mode.span().start,
                    format!("unknown mode {other:?}: use \"required\" or \"best_effort\""),
                ));
            }
        };
        let mut filesystem = Filesystem::default();
        let raw_fs = raw.filesystem.as_ref();
        let empty = RawFilesystem::default();
        let lists = raw_fs.unwrap_or(&empty);
        for (list, out) in [
            (&lists.read, &mut filesystem.read),
            (&lists.write, &mut filesystem.write),
            (&lists.execute, &mut filesystem.execute),
        ] {
            if syscalls_only {
                break;
            }
            for entry in list {
                let line = ctx.line(entry.span().start);
                let (text, optional) = match entry.get_ref() {
                    RawPath::Plain(p) => (p.as_str(), false),
                    RawPath::Table(t) => (t.path.as_str(), t.optional),
                };
                let expanded = match expand(text, env) {
                    Ok(p) => p,
                    Err(var) if optional => {
                        filesystem.skipped.push((
                            text.to_string(),
                            line,
                            format!("${{{var}}} is not set"),
                        ));
                        continue;
                    }
                    Err(var) => {
                        return Err(ctx.invalid(
                            entry.span().start,
                            format!(
                                "{text:?}: environment variable {var} is not set (set it, give a default with ${{{var}:-/path}}, or mark the entry optional = true)"
                            ),
                        ));
                    }
                };
                let path = PathBuf::from(&expanded);
                if !path.is_absolute() {
                    return Err(ctx.invalid(
                        entry.span().start,
                        format!("{expanded:?} is not an absolute path"),
                    ));
                }
                if !path.exists() {
                    if optional {
                        filesystem
                            .skipped
                            .push((expanded, line, "does not exist".into()));
                        continue;
                    }
                    return Err(ctx.invalid(
                        entry.span().start,
                        format!(
                            "{expanded:?} does not exist (create it, fix the path, or mark the entry optional = true)"
                        ),
                    ));
                }
                out.push(PathGrant { path, line });
            }
        }
        let network = match &raw.network {
            None => None,
            Some(spanned) => {
                let net = spanned.get_ref();
                let mut network = Network {
                    unrestricted_udp: net.unrestricted_udp,
                    line: ctx.line(spanned.span().start),
                    ..Network::default()
                };
                for (list, out) in [
                    (&net.connect_tcp, &mut network.connect_tcp),
                    (&net.bind_tcp, &mut network.bind_tcp),
                ] {
                    for port in list {
                        match ctx.port(port, env) {
                            Ok(p) => out.push(p),
                            // Exporting on an operator's machine: only whether the list is
                            // empty matters (it decides the `listen` rule), not the port.
                            Err(_) if syscalls_only => out.push(0),
                            Err(e) => return Err(e),
                        }
                    }
                }
                for entry in &net.unix_connect {
                    if let Some(grant) = ctx.unix_grant(entry, env, syscalls_only)? {
                        network.unix_connect.push(grant);
                    }
                }
                Some(network)
            }
        };
        let scopes = Scopes {
            signal: raw.scope.signal.unwrap_or(true),
            abstract_unix_socket: raw.scope.abstract_unix_socket.unwrap_or(true),
        };
        let mut process = Process {
            sysv_ipc: raw.process.sysv_ipc,
            danger_nested_seccomp: raw.process.danger_nested_seccomp,
            danger_anonymous_exec: raw.process.danger_anonymous_exec,
            ..Process::default()
        };
        for fd in &raw.process.keep_fds {
            let n = *fd.get_ref();
            if !(3..=i64::from(i32::MAX)).contains(&n) {
                return Err(ctx.invalid(
                    fd.span().start,
                    format!(
                        "keep_fds: {n} is not a descriptor above 2 (0, 1 and 2 are always inherited)"
                    ),
                ));
            }
            let n = n as i32;
            if process.keep_fds.contains(&n) {
                return Err(ctx.invalid(fd.span().start, format!("keep_fds: {n} is listed twice")));
            }
            process.keep_fds.push(n);
        }
        process.keep_fds.sort_unstable();
        if mode == Mode::Required && raw_fs.is_none() && raw.network.is_none() {
            return Err(ctx.invalid(
                raw.mode.span().start,
                "this required profile confines nothing: with no [filesystem] and no [network] table the plugin may read, write and connect anywhere its uid can; add the tables (see profiles/default.toml) or use mode = \"best_effort\" to run unconfined with a warning".into(),
            ));
        }
        let mut syscalls = Vec::new();
        let mut skipped_syscalls = Vec::new();
        // (syscall, action) -> line of an unconditional rule, to find contradictions.
        let mut unconditional: BTreeMap<String, (Action, usize)> = BTreeMap::new();
        for entry in &raw.syscall {
            let rule = entry.get_ref();
            let line = ctx.line(entry.span().start);
            let action = Action::parse(rule.action.get_ref()).ok_or_else(|| {
                ctx.invalid(
                    rule.action.span().start,
                    format!(
                        "unknown action {:?}: use \"kill\", \"eperm\", \"enosys\" or \"log\"",
                        rule.action.get_ref()
                    ),
                )
            })?;
            if rule.names.is_empty() {
                return Err(ctx.invalid(entry.span().start, "names is empty".into()));
            }
            let mut resolved = Vec::new();
            for name in &rule.names {
                let n = name.get_ref();
                if syscalls::elsewhere_only(n) {
                    skipped_syscalls.push((n.clone(), ctx.line(name.span().start)));
                    continue;
                }
                let Some(nr) = syscalls::number(n) else {
                    let hint = syscalls::closest(n)
                        .map(|c| format!(" (did you mean {c:?}?)"))
                        .unwrap_or_default();
                    return Err(ctx.invalid(
                        name.span().start,
                        format!("unknown syscall {n:?} on {}{hint}", std::env::consts::ARCH),
                    ));
                };
                if LAUNCH_PATH.contains(&n.as_str()) {
                    return Err(ctx.invalid(
                        name.span().start,
                        format!(
                            "{n:?} cannot be filtered: the launcher calls it between installing the filter and starting the plugin, so the plugin could never start"
                        ),
                    ));
                }
                if resolved.iter().any(|(r, _)| r == n) {
                    return Err(ctx.invalid(
                        name.span().start,
                        format!("{n:?} is listed twice in this rule"),
                    ));
                }
                resolved.push((n.clone(), nr));
            }
            let mut when = Vec::new();
            for group in &rule.when {
                if group.is_empty() {
                    return Err(ctx.invalid(
                        entry.span().start,
                        "an empty condition group in `when` would match every call: drop `when` to mean always".into(),
                    ));
                }
                let mut conditions = Vec::new();
                for cond in group {
                    conditions.push(ctx.condition(cond)?);
                }
                when.push(conditions);
            }
            if when.is_empty() {
                for (name, _) in &resolved {
                    if let Some((other, other_line)) = unconditional.get(name) {
                        return Err(ctx.invalid(
                            entry.span().start,
                            format!(
                                "{name:?} is already ruled unconditionally on line {other_line} ({}); contradictory rules: keep one",
                                other.as_str()
                            ),
                        ));
                    }
                    unconditional.insert(name.clone(), (action, line));
                }
            }
            if resolved.is_empty() {
                // Every name belongs to the other architecture.
                continue;
            }
            syscalls.push(SyscallRule {
                syscalls: resolved,
                action,
                when,
                line,
            });
        }
        // A conditional rule next to an unconditional one with another action is dead
        // or ambiguous: refuse it too.
        for rule in &syscalls {
            if rule.when.is_empty() {
                continue;
            }
            for (name, _) in &rule.syscalls {
                if let Some((other, other_line)) = unconditional.get(name)
                    && *other != rule.action
                {
                    return Err(ProfileError::Invalid {
                        file: file.to_path_buf(),
                        line: rule.line,
                        reason: format!(
                            "{name:?} is ruled unconditionally on line {other_line} ({}), so this conditional {} rule contradicts it: keep one",
                            other.as_str(),
                            rule.action.as_str()
                        ),
                    });
                }
            }
        }
        Ok(Profile {
            source: file.to_path_buf(),
            name: raw.name.unwrap_or_else(|| {
                file.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "profile".into())
            }),
            mode,
            filesystem: raw_fs.map(|_| filesystem),
            network,
            scopes,
            process,
            syscalls,
            skipped_syscalls,
        })
    }

    /// No `[filesystem]` and no `[network]` table: the plugin may read, write and connect
    /// wherever its uid can. Refused in `required` mode; warned about in `best_effort`.
    pub fn confines_nothing(&self) -> bool {
        self.filesystem.is_none() && self.network.is_none()
    }

    /// The first rule of `action` matching this call, if any.
    pub fn rule_for(&self, action: Action, nr: i64, args: &[u64; 6]) -> Option<&SyscallRule> {
        self.syscalls.iter().find(|r| {
            r.action == action && r.syscalls.iter().any(|(_, n)| *n == nr) && r.matches_args(args)
        })
    }
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    fn invalid(&self, offset: usize, reason: String) -> ProfileError {
        ProfileError::Invalid {
            file: self.file.to_path_buf(),
            line: self.line(offset),
            reason,
        }
    }

    fn port(
        &self,
        port: &Spanned<RawPort>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<u16, ProfileError> {
        let at = port.span().start;
        let (shown, value) = match port.get_ref() {
            RawPort::Number(n) => (n.to_string(), Some(*n)),
            RawPort::Text(t) => {
                let expanded = expand(t, env).map_err(|var| {
                    self.invalid(
                        at,
                        format!(
                            "{t:?}: environment variable {var} is not set (set it or give a default with ${{{var}:-15001}})"
                        ),
                    )
                })?;
                let parsed = expanded.trim().parse::<i64>().ok();
                (format!("{t:?} = {expanded:?}"), parsed)
            }
        };
        match value {
            Some(n) if (1..=65535).contains(&n) => Ok(n as u16),
            _ => Err(self.invalid(at, format!("port {shown} is not a TCP port (1-65535)"))),
        }
    }

    /// A `unix_connect` entry: `None` when it is optional and absent.
    fn unix_grant(
        &self,
        entry: &Spanned<RawPath>,
        env: &dyn Fn(&str) -> Option<String>,
        syscalls_only: bool,
    ) -> Result<Option<UnixGrant>, ProfileError> {
        let at = entry.span().start;
        let line = self.line(at);
        let (text, optional) = match entry.get_ref() {
            RawPath::Plain(p) => (p.as_str(), false),
            RawPath::Table(t) => (t.path.as_str(), t.optional),
        };
        if syscalls_only {
            // Only whether UNIX sockets are granted at all shapes the exported filter.
            let path = PathBuf::from(text);
            return Ok(Some(UnixGrant {
                resolved: path.clone(),
                path,
                line,
            }));
        }
        let expanded = match expand(text, env) {
            Ok(p) => p,
            Err(_) if optional => return Ok(None),
            Err(var) => {
                return Err(self.invalid(
                    at,
                    format!(
                        "{text:?}: environment variable {var} is not set (set it, give a default, or mark the entry optional = true)"
                    ),
                ));
            }
        };
        let path = PathBuf::from(&expanded);
        let normal = path.is_absolute()
            && path.components().all(|c| {
                !matches!(
                    c,
                    std::path::Component::CurDir | std::path::Component::ParentDir
                )
            })
            && !expanded.contains("//")
            && !expanded.ends_with('/');
        if !normal {
            return Err(self.invalid(
                at,
                format!(
                    "unix_connect {expanded:?} is not a plain absolute path (no ., .., // or trailing /): the plugin's address is compared with it byte for byte"
                ),
            ));
        }
        // sun_path holds 108 bytes with its terminating NUL.
        if expanded.len() > 107 || expanded.contains('\0') {
            return Err(self.invalid(
                at,
                format!(
                    "unix_connect {expanded:?} is longer than a UNIX socket path can be (107 bytes)"
                ),
            ));
        }
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(self.invalid(at, format!("unix_connect {expanded:?} names no socket")));
        };
        match std::fs::canonicalize(parent) {
            Ok(dir) => Ok(Some(UnixGrant {
                resolved: dir.join(name),
                path,
                line,
            })),
            Err(_) if optional => Ok(None),
            Err(e) => Err(self.invalid(
                at,
                format!(
                    "unix_connect {expanded:?}: its folder {} cannot be resolved ({e}); the socket itself may appear later, its folder must exist (or mark the entry optional = true)",
                    parent.display()
                ),
            )),
        }
    }

    fn condition(&self, cond: &Spanned<RawCondition>) -> Result<Condition, ProfileError> {
        let at = cond.span().start;
        let raw = cond.get_ref();
        if raw.arg > 5 {
            return Err(self.invalid(
                at,
                format!("arg = {}: syscalls have arguments 0 to 5", raw.arg),
            ));
        }
        let value = self.value(&raw.value, at)?;
        let mask = raw.mask.as_ref().map(|m| self.value(m, at)).transpose()?;
        let op = match (raw.op.as_str(), mask) {
            ("masked_eq", Some(mask)) => Op::MaskedEq(mask),
            ("masked_eq", None) => {
                return Err(self.invalid(at, "op = \"masked_eq\" needs a mask".into()));
            }
            (_, Some(_)) => {
                return Err(self.invalid(
                    at,
                    format!(
                        "mask is only meaningful with op = \"masked_eq\", not {:?}",
                        raw.op
                    ),
                ));
            }
            ("eq", None) => Op::Eq,
            ("ne", None) => Op::Ne,
            ("lt", None) => Op::Lt,
            ("le", None) => Op::Le,
            ("gt", None) => Op::Gt,
            ("ge", None) => Op::Ge,
            (other, None) => {
                return Err(self.invalid(
                    at,
                    format!("unknown op {other:?}: use eq, ne, lt, le, gt, ge or masked_eq"),
                ));
            }
        };
        if value > u64::from(u32::MAX) || mask.is_some_and(|m| m > u64::from(u32::MAX)) {
            return Err(self.invalid(
                at,
                "values and masks compare the argument's low 32 bits: keep them below 2^32".into(),
            ));
        }
        if let Op::MaskedEq(mask) = op
            && value & !mask != 0
        {
            return Err(self.invalid(
                at,
                format!(
                    "value {value:#x} has bits outside mask {mask:#x}: the rule could never match"
                ),
            ));
        }
        Ok(Condition {
            arg: raw.arg,
            op,
            value,
        })
    }

    fn value(&self, value: &RawValue, at: usize) -> Result<u64, ProfileError> {
        match value {
            RawValue::Number(n) => Ok(*n),
            RawValue::Name(name) => {
                let mut total = 0;
                for part in name.split('|') {
                    let part = part.trim();
                    let Some((_, v)) = CONSTANTS.iter().find(|(n, _)| *n == part) else {
                        return Err(self.invalid(
                            at,
                            format!(
                                "unknown constant {part:?} (known: {}; or write the number)",
                                CONSTANTS
                                    .iter()
                                    .map(|(n, _)| *n)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ));
                    };
                    total |= v;
                }
                Ok(total)
            }
        }
    }
}

/// Expands `${VAR}` and `${VAR:-default}`; the error is the first unset variable.
fn expand(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        match env(name).filter(|v| !v.is_empty()) {
            Some(v) => out.push_str(&v),
            None => match default {
                Some(d) => out.push_str(d),
                None => return Err(name.to_string()),
            },
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests;
