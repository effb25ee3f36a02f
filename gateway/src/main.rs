//! `nexus-gateway --config FILE`: thin; the wiring is in the library (`app`).
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(name = "nexus-gateway", version, about = "The Nexus control plane")]
struct Args {
    /// The TOML configuration file.
    #[arg(long, env = "NEXUS_GATEWAY_CONFIG")]
    config: PathBuf,
    /// Check the configuration (and the revocation policy) and exit: 0 if usable, 64 if not.
    #[arg(long)]
    check: bool,
}

/// How long a stopping gateway waits for work still running off the async workers (a
/// revocation policy check) before it exits anyway.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

fn main() -> std::process::ExitCode {
    // Re-executed as the isolated policy checker (nexus_policy::isolate): nothing else.
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(nexus_policy::isolate::CHILD_ARG))
    {
        return nexus_policy::isolate::child_main();
    }
    nexus_identity::process::init(
        "nexus-gateway",
        "info,h2=warn,hyper=warn,tonic=warn,tower=warn,sqlx=warn",
    );
    let args = Args::parse();
    let config = match nexus_gateway::config::Config::load(&args.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("nexus-gateway: {error}");
            return std::process::ExitCode::from(64);
        }
    };
    match std::env::current_exe() {
        Ok(exe) => nexus_policy::isolate::install_checker(exe),
        Err(error) => {
            eprintln!(
                "nexus-gateway: cannot find its own executable to check policies in a child process: {error}"
            );
            return std::process::ExitCode::FAILURE;
        }
    }
    if args.check {
        if let Some(policy) = &config.revocation_policy
            && let Err(error) = nexus_gateway::signals::RevocationPolicy::build(policy)
        {
            eprintln!("nexus-gateway: revocation_policy.dir: {error}");
            return std::process::ExitCode::from(64);
        }
        println!("nexus-gateway: {} is valid", args.config.display());
        return std::process::ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("nexus-gateway: cannot start the runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(nexus_gateway::app::run(config));
    // A policy check still running is abandoned, not waited for.
    nexus_policy::isolate::abandon_all();
    runtime.shutdown_timeout(STOP_GRACE);
    match result {
        Ok(nexus_serve::Stopped::Drained) => std::process::ExitCode::SUCCESS,
        Ok(stopped) => {
            eprintln!(
                "nexus-gateway: stopped without draining ({stopped:?}): calls still in flight were cut (limits.shutdown_grace)"
            );
            std::process::ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("nexus-gateway: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
