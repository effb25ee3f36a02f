//! `nexusctl audit verify`: check the hash chain of a sidecar's execution-record files
//! and name the first broken record.

use std::io::Write;
use std::path::PathBuf;

/// `nexusctl audit ...`
#[derive(clap::Subcommand, Debug)]
pub enum AuditCommand {
    /// Check the hash chain of execution-record files: exit 0 when intact (warnings,
    /// such as a record truncated by a crash, are printed), 1 at the first broken record.
    Verify(VerifyArgs),
}

/// `nexusctl audit verify`
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// Record files, oldest first (records.jsonl.2 records.jsonl.1 records.jsonl); or one
    /// file being written (its rotated files are found), or one folder.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// How `verify` prints its report.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// A summary, warnings first.
    Text,
    /// The whole report as one JSON document.
    Json,
}

/// Runs an audit subcommand.
pub fn run(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify(args) => verify(args),
    }
}

fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let report = nexus_audit::verify(&args.files);
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Text => writeln!(out, "{report}")?,
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?,
    }
    out.flush()?;
    match &report.broken {
        None => Ok(()),
        Some(broken) if broken.kind == nexus_audit::FindingKind::Unreadable => {
            anyhow::bail!("could not read the record files")
        }
        Some(broken) => anyhow::bail!(
            "audit chain broken at {}:{}",
            broken.file.display(),
            broken.line
        ),
    }
}
