//! The committed development PKI in `certs-dev/`: three CAs (the `nexus.local` trust
//! domain, the federated `partner.example`, and a rogue CA nobody trusts) and the leaves
//! the tests and the local stack use, each a fixture for one case (allowed, not allowed,
//! federated, expired, not yet valid, forged by a rogue CA). `nexusctl dev certs`
//! regenerates all of it; every file says it is for development only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use time::OffsetDateTime;
use time::macros::datetime;

use super::ca::{DevCa, DevCaError};

/// The first line of every PEM file in `certs-dev/`. PEM readers skip text outside the
/// BEGIN/END markers, so the files stay loadable.
pub const DEV_PKI_HEADER: &str = "# DEVELOPMENT ONLY: never use in production. Regenerate with: \
                                  cargo run -p nexusctl -- dev certs --out certs-dev\n";

/// The command that regenerates the development PKI.
pub const REGENERATE_COMMAND: &str = "cargo run -p nexusctl -- dev certs --out certs-dev";

/// How long the committed development leaves are valid.
const LEAF_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);

/// The CAs outlive every fixture, including the not-yet-valid one, so that a failing
/// fixture fails for its own reason and never because its CA is out of date.
const CA_NOT_BEFORE: OffsetDateTime = datetime!(2019-01-01 00:00 UTC);
const CA_NOT_AFTER: OffsetDateTime = datetime!(2101-01-01 00:00 UTC);

/// One file of the development PKI.
#[derive(Clone)]
pub struct PkiFile {
    /// Path relative to the PKI directory, e.g. `nexus.local/ca.pem`.
    pub path: String,
    /// The file's contents, header line included.
    pub contents: String,
    /// What the file is for, as the README lists it.
    pub purpose: String,
}

impl std::fmt::Debug for PkiFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PkiFile")
            .field("path", &self.path)
            .field("purpose", &self.purpose)
            .finish_non_exhaustive()
    }
}

struct LeafSpec {
    dir: &'static str,
    name: &'static str,
    spiffe_id: &'static str,
    window: Option<(OffsetDateTime, OffsetDateTime)>,
    purpose: &'static str,
}

const FLOOD_MODEL: &str = "spiffe://nexus.local/ns/plugins/sa/flood-model";

const LEAVES: &[LeafSpec] = &[
    LeafSpec {
        dir: "nexus.local",
        name: "flood-model",
        spiffe_id: FLOOD_MODEL,
        window: None,
        purpose: "the plugin workload (a flood model): the usual allowed client",
    },
    LeafSpec {
        dir: "nexus.local",
        name: "hazard-api",
        spiffe_id: "spiffe://nexus.local/ns/data/sa/hazard-api",
        window: None,
        purpose: "the data API workload: the usual server",
    },
    LeafSpec {
        dir: "nexus.local",
        name: "intruder",
        spiffe_id: "spiffe://nexus.local/ns/other/sa/intruder",
        window: None,
        purpose: "a valid workload of the trust domain that is on no allow list: must be refused by policy",
    },
    LeafSpec {
        dir: "nexus.local",
        name: "operator",
        spiffe_id: "spiffe://nexus.local/ns/ops/sa/operator",
        window: None,
        purpose: "the operator (nexusctl) talking to the gateway's admin API",
    },
    LeafSpec {
        dir: "nexus.local",
        name: "expired",
        spiffe_id: FLOOD_MODEL,
        window: Some((
            datetime!(2020-01-01 00:00 UTC),
            datetime!(2021-01-01 00:00 UTC),
        )),
        purpose: "flood-model's ID, valid 2020-01-01..2021-01-01: must be refused as expired",
    },
    LeafSpec {
        dir: "nexus.local",
        name: "not-yet-valid",
        spiffe_id: FLOOD_MODEL,
        window: Some((
            datetime!(2099-01-01 00:00 UTC),
            datetime!(2100-01-01 00:00 UTC),
        )),
        purpose: "flood-model's ID, valid 2099-01-01..2100-01-01: must be refused as not yet valid",
    },
    LeafSpec {
        dir: "partner.example",
        name: "partner-model",
        spiffe_id: "spiffe://partner.example/ns/plugins/sa/partner-model",
        window: None,
        purpose: "a workload of the federated trust domain: accepted where partner.example is federated",
    },
    LeafSpec {
        dir: "rogue",
        name: "flood-model",
        spiffe_id: FLOOD_MODEL,
        window: None,
        purpose: "flood-model's ID forged by the rogue CA: must be refused as an unknown issuer",
    },
];

struct CaSpec {
    dir: &'static str,
    trust_domain: &'static str,
    common_name: &'static str,
    purpose: &'static str,
}

const CAS: &[CaSpec] = &[
    CaSpec {
        dir: "nexus.local",
        trust_domain: "nexus.local",
        common_name: "Nexus Dev CA nexus.local",
        purpose: "the nexus.local trust domain",
    },
    CaSpec {
        dir: "partner.example",
        trust_domain: "partner.example",
        common_name: "Nexus Dev CA partner.example",
        purpose: "the federated partner.example trust domain",
    },
    CaSpec {
        dir: "rogue",
        // It claims nexus.local, as an attacker's CA would; nobody trusts it.
        trust_domain: "nexus.local",
        common_name: "Nexus Dev Rogue CA (trusted by nobody)",
        purpose: "a rogue CA claiming nexus.local, trusted by nobody",
    },
];

/// Generates the whole development PKI in memory: new keys and certificates every time,
/// plus the README that lists the files.
pub fn generate_dev_pki() -> Result<Vec<PkiFile>, DevCaError> {
    let mut files = Vec::new();
    let mut cas = Vec::new();
    for spec in CAS {
        let ca = DevCa::generate(
            spec.trust_domain,
            spec.common_name,
            CA_NOT_BEFORE,
            CA_NOT_AFTER,
        )?;
        files.push(pem_file(
            format!("{}/ca.pem", spec.dir),
            ca.cert_pem(),
            format!(
                "CA certificate of {} (CN \"{}\")",
                spec.purpose, spec.common_name
            ),
        ));
        files.push(pem_file(
            format!("{}/ca.key", spec.dir),
            &ca.key_pem(),
            format!("private key of {}", spec.purpose),
        ));
        cas.push((spec.dir, ca));
    }
    let now = OffsetDateTime::now_utc();
    for leaf in LEAVES {
        let Some((_, ca)) = cas.iter().find(|(dir, _)| *dir == leaf.dir) else {
            return Err(DevCaError::Validity(format!("no CA for {}", leaf.dir)));
        };
        let svid = match leaf.window {
            Some((not_before, not_after)) => {
                ca.mint_svid_between(leaf.spiffe_id, not_before, not_after)?
            }
            None => ca.mint_svid_between(
                leaf.spiffe_id,
                now - time::Duration::seconds(60),
                now + LEAF_VALIDITY,
            )?,
        };
        files.push(pem_file(
            format!("{}/{}.pem", leaf.dir, leaf.name),
            &svid.cert_pem,
            format!("`{}`: {}", leaf.spiffe_id, leaf.purpose),
        ));
        files.push(pem_file(
            format!("{}/{}.key", leaf.dir, leaf.name),
            &svid.key_pem,
            format!("private key of `{}/{}.pem`", leaf.dir, leaf.name),
        ));
    }
    let readme = readme(&files);
    files.push(PkiFile {
        path: "README.md".into(),
        contents: readme,
        purpose: "this file".into(),
    });
    Ok(files)
}

/// Generates the development PKI and writes it under `out`, replacing the files there.
/// Returns the paths written.
pub fn write_dev_pki(out: &Path) -> Result<Vec<PathBuf>, DevCaError> {
    let files = generate_dev_pki()?;
    let mut written = Vec::with_capacity(files.len());
    for file in files {
        let path = out.join(&file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| DevCaError::Write {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        std::fs::write(&path, file.contents).map_err(|source| DevCaError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

fn pem_file(path: String, pem: &str, purpose: String) -> PkiFile {
    PkiFile {
        path,
        contents: format!("{DEV_PKI_HEADER}{}", pem.replace("\r\n", "\n")),
        purpose,
    }
}

fn readme(files: &[PkiFile]) -> String {
    let mut out = String::from(
        "# certs-dev: the development PKI\n\n\
         **DEVELOPMENT ONLY. Never use these certificates or keys in production:** every \
         private key here is public, committed to the repository.\n\n",
    );
    out.push_str(&format!(
        "Regenerate everything (new keys, new certificates, this README) with:\n\n\
         ```sh\n{REGENERATE_COMMAND}\n```\n\n\
         then rebuild: the `nexus.local` CA certificate and key and the `partner.example` \
         CA certificate are embedded in nexusctl (`nexus_dev_identity`, never in the \
         sidecar or gateway), so `nexusctl dev workload-api` and the local stack need no files on disk.\n\n\
         CAs are ECDSA P-256, valid 2019-01-01..2101-01-01, each with its own subject CN \
         and a URI SAN naming its trust domain. Leaves are ECDSA P-256 X.509-SVIDs: exactly \
         one URI SAN (the SPIFFE ID), CA:FALSE, digitalSignature + keyEncipherment, \
         serverAuth + clientAuth, valid 20 years from generation unless listed otherwise. \
         Keys are PKCS#8. Every PEM file starts with a one-line warning before the PEM \
         block; PEM readers (rustls-pemfile, openssl) skip it.\n\n\
         Who trusts what: `nexus.local` workloads trust `nexus.local/ca.pem` and federate \
         with `partner.example/ca.pem`; nobody trusts `rogue/ca.pem`.\n\n\
         | file | purpose |\n| --- | --- |\n"
    ));
    for file in files {
        out.push_str(&format!("| `{}` | {} |\n", file.path, file.purpose));
    }
    out.push_str("| `README.md` | this file |\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::{CertificateDer, UnixTime};

    fn der(files: &[PkiFile], path: &str) -> CertificateDer<'static> {
        let file = files.iter().find(|f| f.path == path).unwrap();
        assert!(file.contents.starts_with(DEV_PKI_HEADER), "{path}");
        rustls_pemfile::certs(&mut file.contents.as_bytes())
            .next()
            .unwrap()
            .unwrap()
    }

    fn verify(files: &[PkiFile], ca: &str, leaf: &str, at: UnixTime) -> Result<(), webpki::Error> {
        let ca = der(files, ca);
        let anchors = vec![webpki::anchor_from_trusted_cert(&ca).unwrap().to_owned()];
        let leaf = der(files, leaf);
        webpki::EndEntityCert::try_from(&leaf)
            .unwrap()
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &[],
                at,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map(|_| ())
    }

    /// Every fixture verifies, or fails, for its own reason; every key belongs to its
    /// certificate; every file carries the warning and is listed in the README.
    fn check(files: &[PkiFile]) {
        let now = UnixTime::now();
        let ours = "nexus.local/ca.pem";
        for ok in ["flood-model", "hazard-api", "intruder", "operator"] {
            verify(files, ours, &format!("nexus.local/{ok}.pem"), now).unwrap();
        }
        verify(
            files,
            "partner.example/ca.pem",
            "partner.example/partner-model.pem",
            now,
        )
        .unwrap();
        assert!(matches!(
            verify(files, ours, "nexus.local/expired.pem", now),
            Err(webpki::Error::CertExpired { .. })
        ));
        assert!(matches!(
            verify(files, ours, "nexus.local/not-yet-valid.pem", now),
            Err(webpki::Error::CertNotValidYet { .. })
        ));
        assert!(matches!(
            verify(files, ours, "rogue/flood-model.pem", now),
            Err(webpki::Error::UnknownIssuer)
        ));
        assert!(matches!(
            verify(files, ours, "partner.example/partner-model.pem", now),
            Err(webpki::Error::UnknownIssuer)
        ));
        let contents = |path: &str| {
            &files
                .iter()
                .find(|f| f.path == path)
                .unwrap_or_else(|| panic!("{path} is missing"))
                .contents
        };
        let readme = contents("README.md");
        for file in files {
            assert!(
                readme.contains(&format!("`{}`", file.path)),
                "{}",
                file.path
            );
            if let Some(stem) = file.path.strip_suffix(".pem") {
                assert!(file.contents.starts_with(DEV_PKI_HEADER), "{}", file.path);
                let key = contents(&format!("{stem}.key"));
                assert!(key.starts_with(DEV_PKI_HEADER), "{stem}.key");
                // Loading the pair as an issuer checks that the key is the certificate's.
                DevCa::from_pem(&file.contents, key)
                    .unwrap_or_else(|e| panic!("{}: {e}", file.path));
            }
        }
    }

    #[test]
    fn generated_fixtures_fail_for_their_own_reason() {
        check(&generate_dev_pki().unwrap());
    }

    #[test]
    fn the_committed_certs_dev_is_consistent() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../certs-dev");
        let mut paths = vec!["README.md".to_owned()];
        for ca in CAS {
            paths.push(format!("{}/ca.pem", ca.dir));
            paths.push(format!("{}/ca.key", ca.dir));
        }
        for leaf in LEAVES {
            paths.push(format!("{}/{}.pem", leaf.dir, leaf.name));
            paths.push(format!("{}/{}.key", leaf.dir, leaf.name));
        }
        let files: Vec<PkiFile> = paths
            .into_iter()
            .map(|path| PkiFile {
                contents: std::fs::read_to_string(root.join(&path)).unwrap_or_else(|e| {
                    panic!("certs-dev/{path}: {e}; regenerate: {REGENERATE_COMMAND}")
                }),
                path,
                purpose: String::new(),
            })
            .collect();
        check(&files);
        assert_eq!(
            super::super::EMBEDDED_CA_CERT_PEM,
            files
                .iter()
                .find(|f| f.path == "nexus.local/ca.pem")
                .unwrap()
                .contents
        );
    }
}
