//! `nexusctl`: the operator's CLI. Thin: parse arguments, set up logging, install the
//! one rustls crypto provider (ring), run the subcommand, map errors to exit codes.
#![forbid(unsafe_code)]

mod audit_cmd;
mod console;
mod demo;
mod dev_identity;
mod gateway_cmd;
mod http;
mod inject_cmd;
mod plugin_cmd;
mod policy_cmd;
mod sandbox_cmd;
mod term;
mod up;

pub(crate) use http::http_get;

use clap::{CommandFactory, Parser, Subcommand};

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
    /// Add the Nexus sidecar to Kubernetes manifests offline (as the admission webhook does).
    Inject(inject_cmd::InjectArgs),
    /// Revoke a workload (a SPIFFE ID or spiffe://td/path/* pattern) at the gateway:
    /// every sidecar refuses it within milliseconds.
    Revoke {
        /// The SPIFFE ID or pattern.
        subject: String,
        /// Why (stored with who revoked).
        #[arg(long, default_value = "")]
        reason: String,
        /// Lift it automatically after this long (e.g. 1h); default: until reinstated.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
        #[command(flatten)]
        target: gateway_cmd::Target,
    },
    /// Lift a revocation.
    Reinstate {
        /// The SPIFFE ID or pattern, as revoked.
        subject: String,
        #[command(flatten)]
        target: gateway_cmd::Target,
    },
    /// The gateway's view: connected sidecars and the revision each acknowledged,
    /// revoked workloads, and how long the last revocation took to reach all.
    Status {
        #[command(flatten)]
        target: gateway_cmd::Target,
    },
    /// Execution events: open, close, list.
    Exec {
        #[command(subcommand)]
        command: gateway_cmd::ExecCommand,
        #[command(flatten)]
        target: gateway_cmd::Target,
    },
    /// The plugin registry: register, verify, certify, retire, list, show, bind,
    /// unbind, export, import (docs/registry.md).
    Plugin {
        #[command(subcommand)]
        command: plugin_cmd::PluginCommand,
        #[command(flatten)]
        target: gateway_cmd::Target,
    },
    /// A local web console: every sidecar, revocation, execution and signal, live, and
    /// actions (revoke, reinstate, open, close) with your operator identity.
    Console(console::ConsoleArgs),
    /// Print a shell completion script: `source <(nexusctl completion bash)`, or save it
    /// where your shell loads completions from (zsh: a `_nexusctl` file on $fpath; fish:
    /// ~/.config/fish/completions/nexusctl.fish).
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Anomaly signals the gateway received, with the revocation policy's decisions.
    Signals {
        /// Only signals about this workload.
        #[arg(long)]
        workload: Option<String>,
        /// How far back (e.g. 10m).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        since: std::time::Duration,
        /// Show one signal (by id) and the execution records it cites, from the
        /// gateway's record store: the requests behind it.
        #[arg(long, value_name = "ID", conflicts_with_all = ["workload"])]
        show: Option<String>,
        #[command(flatten)]
        target: gateway_cmd::Target,
    },
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
    nexus_identity::process::init(
        "nexusctl",
        "info,h2=warn,hyper=warn,tonic=warn,tower=warn,nexus_identity::store=warn",
    );
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Audit(command) => audit_cmd::run(command),
        Command::Policy(command) => policy_cmd::run(command),
        Command::Sandbox(command) => sandbox_cmd::run(command),
        Command::Inject(args) => inject_cmd::run(args),
        Command::Revoke {
            subject,
            reason,
            ttl,
            target,
        } => runtime().block_on(gateway_cmd::revoke(target, subject, reason, ttl)),
        Command::Reinstate { subject, target } => {
            runtime().block_on(gateway_cmd::reinstate(target, subject))
        }
        Command::Status { target } => runtime().block_on(gateway_cmd::status(target)),
        Command::Exec { command, target } => runtime().block_on(gateway_cmd::exec(target, command)),
        Command::Plugin { command, target } => runtime().block_on(plugin_cmd::run(target, command)),
        Command::Signals {
            show: Some(id),
            target,
            ..
        } => runtime().block_on(gateway_cmd::signal_evidence(target, id)),
        Command::Signals {
            workload,
            since,
            target,
            show: None,
        } => runtime().block_on(gateway_cmd::signals(target, workload, since)),
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "nexusctl",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Console(args) => runtime().block_on(console::run(args)),
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
