//! `nexusctl sandbox export-seccomp|check`: the plugin sandbox profile seen from the
//! operator's side.

use std::path::PathBuf;

use anyhow::Context;
use nexus_sandbox::{Profile, oci};

/// `nexusctl sandbox ...`
#[derive(clap::Subcommand, Debug)]
pub enum SandboxCommand {
    /// Write a profile's syscall rules as a Kubernetes/OCI Localhost seccomp profile
    /// (securityContext.seccompProfile: {type: Localhost, localhostProfile: ...}).
    ExportSeccomp(ExportSeccompArgs),
}

/// `nexusctl sandbox export-seccomp`
#[derive(clap::Args, Debug)]
pub struct ExportSeccompArgs {
    /// The sandbox profile (TOML).
    pub profile: PathBuf,
    /// Write here instead of standard output.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

/// Runs a `nexusctl sandbox` subcommand.
pub fn run(command: SandboxCommand) -> anyhow::Result<()> {
    match command {
        SandboxCommand::ExportSeccomp(args) => export_seccomp(&args),
    }
}

fn export_seccomp(args: &ExportSeccompArgs) -> anyhow::Result<()> {
    let profile = Profile::load_syscalls_only(&args.profile)?;
    let exported = oci::export(&profile)?;
    let mut json = serde_json::to_string_pretty(&exported)?;
    json.push('\n');
    match &args.output {
        Some(path) => {
            std::fs::write(path, json)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!(
                "nexusctl: wrote {} ({} entries) from {}",
                path.display(),
                exported.syscalls.len(),
                args.profile.display()
            );
        }
        None => crate::out!("{json}"),
    }
    Ok(())
}
