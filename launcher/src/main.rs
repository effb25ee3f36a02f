//! `nexus-launch --profile FILE [--report URL] [--check] -- CMD ARGS...`
//!
//! Starts CMD under the sandbox profile and stays as its supervisor: reaps children,
//! forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2, and exits with the child's
//! status (128 + signal when it was killed), as tini does. Violations go to `--report`
//! (default: `$NEXUS_SIGNAL_URL`): the sidecar's in-pod report socket, e.g.
//! `unix:///var/run/nexus-reports/signals.sock`, with the per-pod token read from
//! `$NEXUS_REPORT_TOKEN_FILE` (nothing on the network takes reports).
//!
//! Exit codes of its own: 64 usage or profile error, 69 `required` profile not
//! enforceable here, 71 sandbox setup failed, 126 cannot execute, 127 not found.
//! No argument parser crate: this binary ships in plugin images.
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use nexus_sandbox::launch::{self, Launch};
use nexus_sandbox::{Profile, report};

const USAGE: &str = "usage: nexus-launch --profile FILE [--report URL] [--check] -- CMD [ARGS...]\n\
  --profile FILE  sandbox profile (TOML; see docs/sandbox.md)\n\
  --report URL    the sidecar's report socket, unix:///PATH (default: $NEXUS_SIGNAL_URL)\n\
  --check         check the profile, print what this kernel enforces, and exit";

/// sysexits EX_USAGE / EX_CONFIG family: the command line or the profile is wrong.
const EXIT_USAGE: u8 = 64;

struct Args {
    profile: PathBuf,
    report: Option<String>,
    check: bool,
    command: Vec<OsString>,
}

fn parse(mut args: impl Iterator<Item = OsString>) -> Result<Args, String> {
    let mut profile = None;
    let mut report = None;
    let mut check = false;
    let mut command = Vec::new();
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--") => {
                command.extend(args);
                break;
            }
            Some("--profile") => {
                profile = Some(PathBuf::from(args.next().ok_or("--profile needs a file")?));
            }
            Some("--report") => {
                let url = args.next().ok_or("--report needs a URL")?;
                report = Some(url.into_string().map_err(|_| "--report is not UTF-8")?);
            }
            Some("--check") => check = true,
            Some("-h" | "--help") => return Err(String::new()),
            Some("-V" | "--version") => {
                println!("nexus-launch {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            _ => {
                return Err(format!(
                    "unexpected argument {arg:?} (put the command after --)"
                ));
            }
        }
    }
    let profile = profile.ok_or("--profile is required")?;
    if command.is_empty() && !check {
        return Err("no command: nexus-launch --profile FILE -- CMD [ARGS...]".into());
    }
    let report = report.or_else(|| {
        std::env::var("NEXUS_SIGNAL_URL")
            .ok()
            .filter(|u| !u.is_empty())
    });
    Ok(Args {
        profile,
        report,
        check,
        command,
    })
}

fn main() -> ExitCode {
    let args = match parse(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("nexus-launch: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let profile = match Profile::load(&args.profile) {
        Ok(profile) => profile,
        Err(error) => {
            eprintln!("nexus-launch: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Some(url) = &args.report
        && let Err(error) = report::check_url(url)
    {
        eprintln!("nexus-launch: {error}");
        return ExitCode::from(EXIT_USAGE);
    }
    if args.check {
        return check(&profile);
    }
    match launch::run(Launch {
        profile,
        report_url: args.report,
        command: args.command,
    }) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(255)),
        Err(error) => {
            eprintln!("nexus-launch: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

fn check(profile: &Profile) -> ExitCode {
    let (enforcement, _) = launch::inspect(profile);
    println!(
        "profile {} ({}): {} mode, Landlock ABI {}",
        profile.name,
        profile.source.display(),
        match profile.mode {
            nexus_sandbox::Mode::Required => "required",
            nexus_sandbox::Mode::BestEffort => "best_effort",
        },
        enforcement.landlock_abi
    );
    for feature in &enforcement.features {
        println!(
            "  {:<10} {:<12} {}",
            feature.name,
            feature.state.as_str(),
            feature.detail
        );
    }
    let skipped = profile.filesystem.iter().flat_map(|fs| fs.skipped.iter());
    for (path, line, why) in skipped {
        println!("  skipped    line {line}: {path} ({why})");
    }
    for (name, line) in &profile.skipped_syscalls {
        println!(
            "  skipped    line {line}: syscall {name} (not on {})",
            std::env::consts::ARCH
        );
    }
    let missing = enforcement.missing().count();
    if missing > 0 && profile.mode == nexus_sandbox::Mode::Required {
        return ExitCode::from(launch::EXIT_UNENFORCEABLE);
    }
    ExitCode::SUCCESS
}
