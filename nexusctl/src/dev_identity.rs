//! `nexusctl dev workload-api` and `nexusctl dev certs`: the development identity
//! commands. The first stands in for a SPIRE agent (one identity, minted by the embedded
//! development CA unless told otherwise, rotated at half-life and on SIGHUP); the second
//! regenerates the committed development PKI in `certs-dev/`. Never for production.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use nexus_dev_identity::{self as dev, DevCa, DevWorkloadApi, DevWorkloadApiConfig};
use rustls::pki_types::CertificateDer;
use tokio::signal::unix::{SignalKind, signal};

/// Serve a development SPIFFE Workload API on a unix socket.
#[derive(clap::Args, Debug)]
pub struct WorkloadApiArgs {
    /// Unix socket to serve on (point SPIFFE_ENDPOINT_SOCKET at unix:PATH). A stale socket
    /// file is replaced; the socket is removed on exit.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// The SPIFFE ID to hand out, e.g. spiffe://nexus.local/ns/plugins/sa/flood-model.
    #[arg(long, value_name = "ID")]
    pub spiffe_id: String,
    /// Also put this DNS name in each SVID (repeatable), for peers that check a hostname
    /// (curl, browsers) rather than a SPIFFE ID.
    #[arg(long = "dns-name", value_name = "NAME")]
    pub dns_names: Vec<String>,
    /// Lifetime of each SVID (e.g. 30s, 10m, 1h); rotated at half of it, and on SIGHUP.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// CA certificate PEM that signs the SVIDs (default: the embedded nexus.local dev CA).
    /// It may hold the signing certificate followed by its chain; the last one is the bundle.
    #[arg(long, value_name = "PATH", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The CA's private key PEM (default: the embedded nexus.local dev CA key).
    #[arg(long, value_name = "PATH", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Also serve a federated bundle: TRUST_DOMAIN=PEM_FILE (repeatable). With the embedded
    /// CA, partner.example is federated by default (its embedded dev CA); a --federate for
    /// partner.example replaces it.
    #[arg(long, value_name = "TD=PEMFILE", value_parser = parse_federate)]
    pub federate: Vec<(String, PathBuf)>,
}

/// Regenerate the development PKI.
#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    /// Directory to write the PKI into (created if missing; existing files are replaced).
    #[arg(long, value_name = "DIR", default_value = "certs-dev")]
    pub out: PathBuf,
}

/// Runs the development Workload API until SIGINT or SIGTERM.
pub async fn run_workload_api(args: WorkloadApiArgs) -> anyhow::Result<()> {
    let embedded = args.ca_cert.is_none();
    let ca = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => {
            let cert_pem = read(cert)?;
            let key_pem = read(key)?;
            DevCa::from_pem(&cert_pem, &key_pem).with_context(|| {
                format!(
                    "loading the CA from {} and {}",
                    cert.display(),
                    key.display()
                )
            })?
        }
        (None, None) => DevCa::from_pem(dev::EMBEDDED_CA_CERT_PEM, dev::EMBEDDED_CA_KEY_PEM)
            .context("loading the embedded development CA (rebuild after `nexusctl dev certs`)")?,
        _ => bail!(
            "--ca-cert and --ca-key go together: pass both, or neither for the embedded dev CA"
        ),
    };

    let mut federated_bundles = BTreeMap::new();
    if embedded {
        let certs = pem_certs(dev::EMBEDDED_PARTNER_CA_CERT_PEM)
            .context("the embedded partner.example CA certificate")?;
        federated_bundles.insert(dev::PARTNER_TRUST_DOMAIN.to_owned(), certs);
    }
    for (trust_domain, path) in &args.federate {
        let certs = pem_certs(&read(path)?).with_context(|| {
            format!(
                "the federated bundle for {trust_domain} in {}",
                path.display()
            )
        })?;
        federated_bundles.insert(trust_domain.clone(), certs);
    }
    let federated: Vec<String> = federated_bundles.keys().cloned().collect();

    let api = DevWorkloadApi::new(DevWorkloadApiConfig {
        spiffe_id: args.spiffe_id.clone(),
        dns_names: args.dns_names.clone(),
        ca,
        ttl: args.ttl,
        federated_bundles,
    })?;

    // Signal handlers first, so a signal sent as soon as the socket appears is not lost.
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let rotator = {
        let api = api.clone();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                match api.rotate_now() {
                    Ok(()) => tracing::info!(
                        spiffe_id = %api.spiffe_id(),
                        not_after = %api.current_svid().not_after,
                        "SIGHUP: rotated the SVID"
                    ),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: could not rotate the SVID"),
                }
            }
        })
    };

    let listener = dev::bind_socket(&args.socket)?;
    tracing::info!(
        socket = %args.socket.display(),
        spiffe_id = %args.spiffe_id,
        ttl = %humantime::format_duration(args.ttl),
        ca = %api_ca_label(embedded, args.ca_cert.as_deref()),
        federated = ?federated,
        "development Workload API serving (DEVELOPMENT ONLY; SIGHUP rotates)"
    );
    let shutdown = async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    };
    let result = api.serve_with_listener(listener, shutdown).await;
    rotator.abort();
    match std::fs::remove_file(&args.socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(socket = %args.socket.display(), error = %e, "could not remove the socket")
        }
    }
    result?;
    tracing::info!("development Workload API stopped");
    Ok(())
}

/// Writes the development PKI into `args.out`.
pub fn run_certs(args: CertsArgs) -> anyhow::Result<()> {
    let written = dev::write_dev_pki(&args.out)?;
    for path in &written {
        crate::outln!("{}", path.display());
    }
    tracing::info!(
        files = written.len(),
        out = %args.out.display(),
        "wrote the development PKI; rebuild so the binaries embed the new nexus.local CA"
    );
    Ok(())
}

fn api_ca_label(embedded: bool, path: Option<&Path>) -> String {
    match (embedded, path) {
        (false, Some(path)) => path.display().to_string(),
        _ => "embedded nexus.local dev CA".to_owned(),
    }
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn pem_certs(pem: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("unreadable PEM")?;
    if certs.is_empty() {
        bail!("no CERTIFICATE block found");
    }
    Ok(certs)
}

fn parse_ttl(value: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(value)
        .map_err(|e| format!("{e}; expected a duration such as 30s, 10m or 1h"))?;
    if ttl < nexus_dev_identity::workload_api::MIN_TTL {
        return Err(format!(
            "{value} is too short; the minimum is {}",
            humantime::format_duration(nexus_dev_identity::workload_api::MIN_TTL)
        ));
    }
    Ok(ttl)
}

fn parse_federate(value: &str) -> Result<(String, PathBuf), String> {
    let Some((trust_domain, path)) = value.split_once('=') else {
        return Err(format!(
            "{value:?}: expected TRUST_DOMAIN=PEM_FILE, e.g. partner.example=certs-dev/partner.example/ca.pem"
        ));
    };
    if trust_domain.is_empty() || path.is_empty() {
        return Err(format!(
            "{value:?}: both the trust domain and the file are required"
        ));
    }
    Ok((trust_domain.to_owned(), PathBuf::from(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_forms() {
        assert_eq!(parse_ttl("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_ttl("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_ttl("10").is_err());
        assert!(parse_ttl("500ms").is_err());
    }

    #[test]
    fn federate_form() {
        assert_eq!(
            parse_federate("partner.example=/tmp/ca.pem").unwrap(),
            ("partner.example".to_owned(), PathBuf::from("/tmp/ca.pem"))
        );
        assert!(parse_federate("partner.example").is_err());
        assert!(parse_federate("=x").is_err());
    }
}
