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

fn main() -> std::process::ExitCode {
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
    if args.check {
        if let Some(policy) = &config.revocation_policy
            && let Err(error) = nexus_policy::Bundle::load(&policy.dir)
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
    match runtime.block_on(nexus_gateway::app::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nexus-gateway: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
