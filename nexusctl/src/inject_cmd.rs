//! `nexusctl inject -f FILE|-`: the admission webhook's injection, offline, on manifests
//! (as `linkerd inject`). The injected YAML goes to stdout, a line per workload to stderr.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use nexus_kube::{InjectConfig, Outcome, Overrides, inject_manifests};

/// `nexusctl inject`
#[derive(clap::Args, Debug)]
pub struct InjectArgs {
    /// The manifests (multi-document YAML); `-` reads standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE|-")]
    pub file: PathBuf,
    /// Sandbox every workload's plugin container with this profile (the
    /// `nexus.io/sandbox` annotation; a workload's own annotation wins).
    #[arg(long, value_name = "PROFILE")]
    pub sandbox: Option<String>,
    /// The sidecar ConfigMap (the `nexus.io/config-map` annotation; a workload's own wins).
    #[arg(long, value_name = "NAME")]
    pub config_map: Option<String>,
    /// Injection settings: a TOML file with the fields of the gateway config's
    /// `[webhook.inject]` table (sidecar_image, launcher_image, config_map, ...), at its top
    /// level; default: the built-in values.
    #[arg(long, value_name = "FILE")]
    pub inject_config: Option<PathBuf>,
}

/// Runs `nexusctl inject`.
pub fn run(args: InjectArgs) -> anyhow::Result<()> {
    let input = if args.file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
        text
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("cannot read {}", args.file.display()))?
    };
    let cfg: InjectConfig = match &args.inject_config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?
        }
        None => InjectConfig::default(),
    };
    let overrides = Overrides {
        sandbox_profile: args.sandbox,
        config_map: args.config_map,
    };
    let injected = inject_manifests(&input, &cfg, &overrides)
        .with_context(|| args.file.display().to_string())?;
    crate::out!("{}", injected.yaml);
    for w in &injected.workloads {
        let what = match &w.outcome {
            Outcome::Injected { sandbox: None } => "injected".to_string(),
            Outcome::Injected {
                sandbox: Some(profile),
            } => format!("injected (sandbox: {profile})"),
            Outcome::AlreadyInjected => "skipped (already injected)".to_string(),
            Outcome::OptedOut => "skipped (nexus.io/inject: disabled)".to_string(),
        };
        eprintln!("{} {what}", w.object);
    }
    Ok(())
}
