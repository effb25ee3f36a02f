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

fn main() -> ExitCode {
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("nexus-sidecar: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(nexus_sidecar::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nexus-sidecar: {error:#}");
            ExitCode::FAILURE
        }
    }
}
