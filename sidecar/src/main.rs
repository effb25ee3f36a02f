//! `nexus-sidecar`: parse arguments, set up logging, install the ring crypto provider,
//! load the config (exit 64 when it is wrong), run.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "nexus-sidecar",
    version,
    about = "Nexus zero-trust sidecar: SPIFFE mTLS proxy with per-request policy"
)]
struct Args {
    /// TOML config file (every field has a default; see the README).
    #[arg(long, short, env = "NEXUS_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the config and exit.
    #[arg(long)]
    check: bool,
}

/// sysexits EX_CONFIG: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;

/// How long a stopping sidecar waits for work still running off the async workers (a
/// policy check, a file write) before it exits anyway: SIGTERM ends the process within
/// this, whatever a policy does (an abandoned policy checker dies with the process).
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

fn main() -> ExitCode {
    // Re-executed as the isolated policy checker (nexus_policy::isolate): nothing else.
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(nexus_policy::isolate::CHILD_ARG))
    {
        return nexus_policy::isolate::child_main();
    }
    nexus_identity::process::init(
        "nexus-sidecar",
        "info,h2=warn,hyper=warn,hyper_util=warn,tonic=warn,tower=warn,rustls=warn",
    );
    let args = Args::parse();
    let config = match nexus_sidecar::Config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("nexus-sidecar: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check {
        println!("config OK");
        return ExitCode::SUCCESS;
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    match config.limits.runtime {
        // Connections run on their own workers (`nexus_serve::workers`, started by
        // `run`); this runtime keeps the control plane: admin, gateway, reloads.
        nexus_sidecar::config::RuntimeKind::Workers => {
            builder.worker_threads(1);
        }
        nexus_sidecar::config::RuntimeKind::Shared if config.limits.worker_threads > 0 => {
            builder.worker_threads(config.limits.worker_threads);
        }
        nexus_sidecar::config::RuntimeKind::Shared => {}
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("nexus-sidecar: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match std::env::current_exe() {
        Ok(exe) => nexus_policy::isolate::install_checker(exe),
        Err(error) => {
            eprintln!(
                "nexus-sidecar: cannot find its own executable to check policies in a child process: {error}"
            );
            return ExitCode::FAILURE;
        }
    }
    let result = runtime.block_on(nexus_sidecar::run(config));
    // A policy check still running is abandoned, not waited for.
    nexus_policy::isolate::abandon_all();
    runtime.shutdown_timeout(STOP_GRACE);
    match result {
        Ok(nexus_sidecar::Exit::Drained) => ExitCode::SUCCESS,
        Ok(exit) => {
            eprintln!(
                "nexus-sidecar: stopped without draining ({exit:?}): requests still in flight were cut (limits.shutdown_grace)"
            );
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("nexus-sidecar: {error:#}");
            ExitCode::FAILURE
        }
    }
}
