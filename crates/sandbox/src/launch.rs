//! The launcher: start the plugin under its profile and supervise it, as tini does.
//!
//! The launcher is single-threaded until the plugin runs, on purpose: Landlock and seccomp
//! apply to the calling thread only, and the child runs Rust code (the Landlock ruleset)
//! between fork and exec, which is sound only when no other thread could hold a lock at
//! fork time. Once the plugin runs, a connect the launcher performs for it may get a
//! thread of its own (see [`crate::emulate`]); nothing forks after that.
//!
//! Order in the child, after fork: empty signal mask, default actions for the forwarded
//! signals → setsid (no controlling terminal) →
//! close-on-exec every descriptor above 2 but `keep_fds` → Landlock (sets no_new_privs) →
//! drop every capability (bounding set included, so root gets none back at exec) →
//! seccomp filters (the notification filter with a listener, the lock last) → the
//! listener is passed to the parent over a SOCK_SEQPACKET pair (with the outcome) → exec.
//!
//! The parent blocks the signals it forwards and reads them from a signalfd, so one
//! `poll` covers signals, child exits and seccomp notifications.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use landlock::RulesetStatus;

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::access::{self, Enforcement, Feature};
use crate::baseline::{self, Supervised};
use crate::emulate::{self, Decision};
use crate::profile::{Action, Mode, Profile};
use crate::report::{self, Violation};
use crate::seccomp::{self, Program, Reporting};
use crate::{sys, syscalls};

/// Signals the launcher passes on to the plugin.
pub const FORWARDED: &[i32] = &[
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Exit code when the profile cannot be enforced in `required` mode (EX_UNAVAILABLE).
pub const EXIT_UNENFORCEABLE: u8 = 69;
/// Exit code when the sandbox could not be set up (EX_OSERR).
pub const EXIT_SETUP: u8 = 71;
/// Exit code when the command cannot be executed (as shells do).
pub const EXIT_CANNOT_EXECUTE: u8 = 126;
/// Exit code when the command is not found (as shells do).
pub const EXIT_NOT_FOUND: u8 = 127;

/// Why the plugin was not started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// `required` mode and the kernel cannot enforce part of the profile.
    #[error(
        "profile {profile} is required but this kernel cannot enforce it (Landlock ABI {abi}):\n{missing}"
    )]
    Unenforceable {
        /// The profile file.
        profile: String,
        /// The Landlock ABI found.
        abi: i32,
        /// One line per feature not enforced.
        missing: String,
    },
    /// The command is not a file on PATH.
    #[error("{0}: command not found")]
    NotFound(String),
    /// Setting up the sandbox or starting the command failed.
    #[error("cannot start {command}: {detail}")]
    Start {
        /// The command.
        command: String,
        /// What failed.
        detail: String,
        /// Whether the exec itself failed (126) rather than the sandbox (71).
        exec: bool,
    },
}

impl LaunchError {
    /// The launcher's exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            LaunchError::Unenforceable { .. } => EXIT_UNENFORCEABLE,
            LaunchError::NotFound(_) => EXIT_NOT_FOUND,
            LaunchError::Start { exec: true, .. } => EXIT_CANNOT_EXECUTE,
            LaunchError::Start { .. } => EXIT_SETUP,
        }
    }
}

/// What this kernel offers the sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// The Landlock ABI (0: none).
    pub landlock_abi: i32,
    /// seccomp filters.
    pub seccomp: bool,
    /// How kill and log rules reach the launcher.
    pub reporting: Reporting,
    /// The launcher can answer calls itself: user notification and pidfd_getfd.
    pub supervise: bool,
}

impl Kernel {
    /// Probes the running kernel.
    pub fn probe() -> Kernel {
        let reporting = if seccomp::notify_available() {
            Reporting::Notify
        } else {
            Reporting::Kernel
        };
        Kernel {
            landlock_abi: access::kernel_abi(),
            seccomp: seccomp::available(),
            reporting,
            supervise: reporting == Reporting::Notify && sys::has_pidfd_getfd(),
        }
    }
}

/// What will be enforced for `profile` on this kernel, and how violations are reported.
pub fn inspect(profile: &Profile) -> (Enforcement, Kernel) {
    let kernel = Kernel::probe();
    let abi = kernel.landlock_abi;
    let mut features = Vec::new();
    if profile.confines_nothing() {
        features.push(Feature::unconfined(
            "profile",
            "confines nothing: no [filesystem] and no [network] table (refused in required mode)"
                .into(),
        ));
    }
    features.extend(access::plan(profile, abi));
    features.extend(baseline::features(
        profile,
        kernel.seccomp,
        kernel.supervise,
    ));
    if !profile.syscalls.is_empty() {
        features.push(Feature::new(
            "seccomp",
            kernel.seccomp,
            if kernel.seccomp {
                format!(
                    "{} syscall rules; kill and log reported {}",
                    profile.syscalls.len(),
                    match kernel.reporting {
                        Reporting::Notify => "with the syscall name (user notification)",
                        Reporting::Kernel =>
                            "without the syscall name (no user notification on this kernel)",
                    }
                )
            } else {
                "seccomp filters are not available: no syscall is filtered".into()
            },
        ));
    }
    (
        Enforcement {
            landlock_abi: abi,
            features,
        },
        kernel,
    )
}

/// A launch request.
#[derive(Debug)]
pub struct Launch {
    /// The checked profile.
    pub profile: Profile,
    /// Where to POST violations, if anywhere.
    pub report_url: Option<String>,
    /// The command and its arguments (`argv[0]` first).
    pub command: Vec<OsString>,
}

/// Finds `program` as execvp would.
pub fn resolve(program: &OsString) -> Result<PathBuf, LaunchError> {
    let path = Path::new(program);
    if path.as_os_str().as_encoded_bytes().contains(&b'/') {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(LaunchError::NotFound(path.display().to_string()))
        };
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&search) {
        let candidate = dir.join(path);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(LaunchError::NotFound(path.display().to_string()))
}

/// Starts the plugin and supervises it; returns the launcher's exit code (the child's
/// code, or 128 + the signal that killed it).
#[allow(unsafe_code)]
pub fn run(launch: Launch) -> Result<i32, LaunchError> {
    let profile = Arc::new(launch.profile);
    let Some(program) = launch.command.first() else {
        return Err(LaunchError::NotFound(String::new()));
    };
    let exe = resolve(program)?;
    let shown = exe.display().to_string();
    let (enforcement, kernel) = inspect(&profile);
    let missing: Vec<&Feature> = enforcement.missing().collect();
    if !missing.is_empty() {
        let lines = missing
            .iter()
            .map(|f| format!("  {}: {}", f.name, f.detail))
            .collect::<Vec<_>>()
            .join("\n");
        if profile.mode == Mode::Required {
            return Err(LaunchError::Unenforceable {
                profile: profile.source.display().to_string(),
                abi: enforcement.landlock_abi,
                missing: lines,
            });
        }
        eprintln!(
            "nexus-launch: best_effort: Landlock ABI {}; not enforced on this kernel:\n{lines}",
            enforcement.landlock_abi
        );
    }
    if profile.confines_nothing() {
        eprintln!(
            "nexus-launch: WARNING: profile {} ({}) confines nothing: no [filesystem] and no [network] table, so the plugin may read, write and connect wherever its uid can",
            profile.name,
            profile.source.display()
        );
    }
    let start_error = |detail: String, exec: bool| LaunchError::Start {
        command: shown.clone(),
        detail,
        exec,
    };
    let programs: Vec<Program> = if kernel.seccomp {
        seccomp::compile(&profile, kernel.reporting, kernel.supervise)
            .map_err(|e| start_error(e.to_string(), false))?
    } else {
        Vec::new()
    };
    let (parent_end, child_end) =
        sys::seqpacket_pair().map_err(|e| start_error(format!("socketpair: {e}"), false))?;
    let mut blocked = FORWARDED.to_vec();
    blocked.push(libc::SIGCHLD);
    let signals = sys::block_into_signalfd(&blocked)
        .map_err(|e| start_error(format!("signalfd: {e}"), false))?;
    // Orphaned grandchildren are reaped here rather than by the node's init.
    let _ = sys::set_child_subreaper();

    let mut command = std::process::Command::new(&exe);
    command.arg0(program).args(&launch.command[1..]);
    let child_socket = child_end.as_raw_fd();
    let uses_landlock = access::uses_landlock(&profile);
    let setup = ChildSetup {
        profile: Arc::clone(&profile),
        abi: enforcement.landlock_abi,
        exe: exe.clone(),
        programs,
        socket: child_socket,
        uses_landlock,
    };
    // SAFETY: the closure runs in the child between fork and exec. The launcher has no
    // other threads (see the module doc), so the allocations the Landlock builder makes
    // cannot deadlock on a lock held by a thread that does not exist in the child.
    unsafe {
        command.pre_exec(move || setup.apply());
    }
    let spawned = command.spawn();
    drop(child_end);
    let mut buf = [0u8; 1024];
    let (outcome, listener) = match sys::recv_message(&parent_end, &mut buf) {
        Ok((n, fd)) => (String::from_utf8_lossy(&buf[..n]).into_owned(), fd),
        Err(_) => (String::new(), None),
    };
    let child = match spawned {
        Ok(child) => child,
        Err(e) => {
            return Err(match outcome.strip_prefix("err ") {
                Some(detail) => start_error(detail.to_string(), false),
                None => start_error(
                    format!(
                        "{e} (is it granted execute by the profile? the command itself always is)"
                    ),
                    true,
                ),
            });
        }
    };
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    if let Some(status) = outcome.strip_prefix("ok ")
        && uses_landlock
        && status != "fully"
    {
        eprintln!("nexus-launch: Landlock ruleset {status} enforced");
    }
    let supervisor = Supervisor {
        profile: &profile,
        report_url: launch.report_url.as_deref(),
        child: pid,
        reported: Vec::new(),
        supervised: if kernel.supervise {
            baseline::of(&profile).supervised
        } else {
            Vec::new()
        },
        baseline: baseline::of(&profile),
        pending: Arc::new(AtomicUsize::new(0)),
    };
    if profile.confines_nothing() {
        supervisor.report(Violation::now(
            report::UNCONFINED,
            Action::Log.as_str(),
            child.id(),
            None,
            &profile.name,
        ));
    }
    Ok(supervisor.run(&signals, listener.map(Arc::new)))
}

struct ChildSetup {
    profile: Arc<Profile>,
    abi: i32,
    exe: PathBuf,
    programs: Vec<Program>,
    socket: i32,
    /// The profile asks for Landlock features (so `required` checks the ruleset status).
    uses_landlock: bool,
}

impl ChildSetup {
    /// Runs in the child before exec. On failure the reason goes to the parent and the
    /// spawn fails.
    fn apply(&self) -> std::io::Result<()> {
        let fail = |message: &str| {
            let mut bytes = b"err ".to_vec();
            bytes.extend_from_slice(message.as_bytes());
            let _ = sys::send_message(self.socket, &bytes, None);
            std::io::Error::from_raw_os_error(libc::EPERM)
        };
        sys::unblock_all_signals().map_err(|e| fail(&format!("signal mask: {e}")))?;
        // The forwarded signals end the plugin as they would end it without the
        // launcher, whatever the launcher itself was started with.
        sys::default_dispositions(FORWARDED)
            .map_err(|e| fail(&format!("signal dispositions: {e}")))?;
        // No controlling terminal: nothing typed into the plugin's terminal from inside.
        sys::setsid().map_err(|e| fail(&format!("setsid: {e}")))?;
        // Only stdio and the descriptors the profile names reach the plugin.
        sys::cloexec_above_stdio(&self.profile.process.keep_fds)
            .map_err(|e| fail(&format!("closing inherited descriptors: {e}")))?;
        let status = access::restrict(&self.profile, self.abi, &self.exe).map_err(|e| fail(&e))?;
        if self.profile.mode == Mode::Required
            && self.uses_landlock
            && status != RulesetStatus::FullyEnforced
        {
            return Err(fail(&format!(
                "Landlock ruleset {status:?} on ABI {} in required mode",
                self.abi
            )));
        }
        sys::set_no_new_privs().map_err(|e| fail(&format!("no_new_privs: {e}")))?;
        sys::drop_capabilities().map_err(|e| fail(&format!("dropping capabilities: {e}")))?;
        let mut listener: Option<OwnedFd> = None;
        for program in &self.programs {
            match seccomp::install(program) {
                Ok(Some(fd)) => listener = Some(fd),
                Ok(None) => {}
                Err(e) => return Err(fail(&e.to_string())),
            }
        }
        let word: &[u8] = match status {
            RulesetStatus::FullyEnforced => b"ok fully",
            RulesetStatus::PartiallyEnforced => b"ok partially",
            RulesetStatus::NotEnforced => b"ok not",
        };
        sys::send_message(
            self.socket,
            word,
            listener.as_ref().map(|fd| fd.as_raw_fd()),
        )
        .map_err(|e| fail(&format!("cannot hand the seccomp listener over: {e}")))?;
        // The plugin must never hold its own listener: it could answer for itself.
        drop(listener);
        Ok(())
    }
}

struct Supervisor<'a> {
    profile: &'a Profile,
    report_url: Option<&'a str>,
    child: i32,
    /// Pids already reported as killed (the exit is not reported twice).
    reported: Vec<u32>,
    /// The calls this launcher answers itself (empty when the kernel cannot).
    supervised: Vec<Supervised>,
    /// The rules the profile's shape implies: some reach the launcher (see
    /// `seccomp::compile`), which then answers EPERM.
    baseline: baseline::Baseline,
    /// Connects in progress on their own threads.
    pending: Arc<AtomicUsize>,
}

impl Supervisor<'_> {
    fn run(mut self, signals: &OwnedFd, mut listener: Option<Arc<OwnedFd>>) -> i32 {
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: signals.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: listener.as_ref().map_or(-1, |l| l.as_raw_fd()),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            if let Err(e) = sys::poll(&mut fds, -1) {
                eprintln!("nexus-launch: poll: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if fds[1].revents & libc::POLLIN != 0
                && let Some(l) = &listener
            {
                self.notification(l);
            } else if fds[1].revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                // Every process holding the filter is gone.
                listener = None;
            }
            if fds[0].revents & libc::POLLIN != 0 {
                while let Ok(Some(signal)) = sys::read_signal(signals) {
                    if signal == libc::SIGCHLD {
                        if let Some(code) = self.reap() {
                            return code;
                        }
                    } else if let Err(e) = sys::kill(self.child, signal) {
                        eprintln!("nexus-launch: cannot forward signal {signal}: {e}");
                    }
                }
            }
        }
    }

    /// Reaps every exited child; returns the exit code once the plugin itself exited.
    fn reap(&mut self) -> Option<i32> {
        let mut result = None;
        while let Ok(Some((pid, exit))) = sys::reap_one() {
            let upid = u32::try_from(pid).unwrap_or(0);
            if exit == sys::Exit::Signal(libc::SIGSYS) && !self.reported.contains(&upid) {
                // A kernel seccomp kill: the parent is not told which syscall.
                self.report(Violation::now(
                    "unknown",
                    Action::Kill.as_str(),
                    upid,
                    Some(libc::SIGSYS),
                    &self.profile.name,
                ));
            }
            if pid == self.child {
                result = Some(exit.as_code());
            }
        }
        result
    }

    fn notification(&mut self, listener: &Arc<OwnedFd>) {
        let notif = match sys::notification_receive(listener) {
            Ok(Some(n)) => n,
            Ok(None) => return,
            Err(e) => {
                eprintln!("nexus-launch: seccomp notification: {e}");
                return;
            }
        };
        let name = syscalls::name(notif.nr).unwrap_or("unknown");
        let pid = i32::try_from(notif.pid).unwrap_or(0);
        let supervised = self.supervised.iter().find(|s| s.nr() == notif.nr).copied();
        if self
            .profile
            .rule_for(Action::Kill, notif.nr, &notif.args)
            .is_some()
        {
            // SIGKILL while the caller waits in the notification: the call never runs.
            if sys::kill(pid, libc::SIGKILL).is_err() {
                let _ = sys::notification_respond(listener, notif.id, false, libc::EPERM);
            }
            self.reported.push(notif.pid);
            self.report(Violation::now(
                name,
                Action::Kill.as_str(),
                notif.pid,
                Some(libc::SIGKILL),
                &self.profile.name,
            ));
            return;
        }
        let logged = self
            .profile
            .rule_for(Action::Log, notif.nr, &notif.args)
            .is_some();
        if self.baseline.denies(notif.nr, &notif.args) {
            // Refused as the kernel would have refused it; reported only if a log rule
            // asked to hear about this call.
            if logged {
                self.report(Violation::now(
                    name,
                    Action::Eperm.as_str(),
                    notif.pid,
                    None,
                    &self.profile.name,
                ));
            }
            let _ = sys::notification_answer(listener, notif.id, Err(libc::EPERM));
            return;
        }
        if logged {
            self.report(Violation::now(
                name,
                Action::Log.as_str(),
                notif.pid,
                None,
                &self.profile.name,
            ));
        }
        match supervised {
            Some(call) => self.supervise(listener, call, &notif),
            // CONTINUE is sound here: a log rule decides nothing, it only reports.
            None if logged => {
                let _ = sys::notification_respond(listener, notif.id, true, 0);
            }
            None => {
                // The filter and the rules disagree: fail closed.
                let _ = sys::notification_respond(listener, notif.id, false, libc::EPERM);
                eprintln!(
                    "nexus-launch: unexpected notification for {name} from pid {pid}: denied"
                );
            }
        }
    }

    /// Answers a call the launcher performs itself (see [`emulate`]): never by letting
    /// the plugin's own call continue.
    fn supervise(&mut self, listener: &Arc<OwnedFd>, call: Supervised, notif: &sys::Notification) {
        let decision = emulate::decide(self.profile, listener, call, notif);
        match decision {
            Decision::Refuse { errno, why } => {
                if errno == libc::EACCES || errno == libc::EPERM {
                    eprintln!(
                        "nexus-launch: refused {} from pid {}: {why}",
                        call.name(),
                        notif.pid
                    );
                    self.report(Violation::now(
                        call.name(),
                        Action::Eperm.as_str(),
                        notif.pid,
                        None,
                        &self.profile.name,
                    ));
                }
                let _ = sys::notification_answer(listener, notif.id, Err(errno));
            }
            Decision::Listen { .. } => {
                let result = emulate::perform(decision);
                let _ = sys::notification_answer(listener, notif.id, result);
            }
            Decision::Connect { .. } => {
                // A blocking connect may take minutes: never on the supervisor's thread.
                if self.pending.fetch_add(1, Ordering::SeqCst) >= emulate::MAX_PENDING_CONNECTS {
                    self.pending.fetch_sub(1, Ordering::SeqCst);
                    let _ = sys::notification_answer(listener, notif.id, Err(libc::EAGAIN));
                    return;
                }
                let answer_on = Arc::clone(listener);
                let pending = Arc::clone(&self.pending);
                let id = notif.id;
                let spawned = std::thread::Builder::new()
                    .name("connect".into())
                    .spawn(move || {
                        let result = emulate::perform(decision);
                        let _ = sys::notification_answer(&answer_on, id, result);
                        pending.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    self.pending.fetch_sub(1, Ordering::SeqCst);
                    let _ = sys::notification_answer(listener, id, Err(libc::EAGAIN));
                }
            }
        }
    }

    /// The one place violations leave the launcher: stderr, and the sidecar if a report
    /// URL is set (see [`report`]).
    fn report(&self, violation: Violation) {
        if let Ok(line) = serde_json::to_string(&violation) {
            eprintln!("nexus-launch: violation {line}");
        }
        if let Some(url) = self.report_url
            && let Err(e) = report::send(url, &violation)
        {
            eprintln!("nexus-launch: {e}");
        }
    }
}
