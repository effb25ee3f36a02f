//! `nexusctl`: the operator's CLI. Thin: parse arguments, set up logging, install the
//! one rustls crypto provider (ring), run the subcommand, map errors to exit codes.
#![forbid(unsafe_code)]

mod audit_cmd;
mod demo;
mod dev_identity;
mod http;
mod policy_cmd;
mod sandbox_cmd;
mod up;

pub(crate) use http::http_get;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "nexusctl",
    version,
    about = "Operate Nexus: local stack, development identity, policy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the local stack (dev Workload APIs, demo data API, two sidecars) until Ctrl-C.
    Up(up::UpArgs),
    /// Execution records: verify a sidecar's hash chain.
    #[command(subcommand)]
    Audit(audit_cmd::AuditCommand),
    /// Author and test Rego policies (test, eval, check).
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
    /// Development helpers: a Workload API, the dev PKI. Never for production.
    #[command(subcommand)]
    Dev(DevCommand),
    /// Plugin sandbox profiles: export the seccomp filter for the kubelet.
    #[command(subcommand)]
    Sandbox(sandbox_cmd::SandboxCommand),
}

#[derive(Subcommand)]
enum DevCommand {
    /// Serve a development SPIFFE Workload API on a unix socket (stands in for SPIRE).
    WorkloadApi(dev_identity::WorkloadApiArgs),
    /// Regenerate the development PKI in certs-dev/.
    Certs(dev_identity::CertsArgs),
    /// Serve the demo data API (clause data under /clauses/{clause}/...).
    DataApi(demo::DataApiArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NEXUS_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,h2=warn,hyper=warn,tonic=warn,tower=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("nexusctl: a rustls crypto provider was already installed");
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Audit(command) => audit_cmd::run(command),
        Command::Policy(command) => policy_cmd::run(command),
        Command::Sandbox(command) => sandbox_cmd::run(command),
        Command::Up(args) => runtime().block_on(up::run(args)),
        Command::Dev(DevCommand::WorkloadApi(args)) => {
            runtime().block_on(dev_identity::run_workload_api(args))
        }
        Command::Dev(DevCommand::Certs(args)) => dev_identity::run_certs(args),
        Command::Dev(DevCommand::DataApi(args)) => runtime().block_on(demo::run(args)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nexusctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    #[allow(clippy::expect_used)]
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}
