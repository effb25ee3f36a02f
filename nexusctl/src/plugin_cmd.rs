//! `nexusctl plugin ...`: the gateway's plugin registry (docs/registry.md) over the admin
//! API, plus the offline helpers a publisher uses (keygen, sign, verify with a key).
//! Signatures are cosign's: `cosign sign-blob --key cosign.key payload.json` makes the
//! same bytes `plugin sign` makes, and either is accepted.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use nexus_identity::cosign;
use nexus_proto::control::{
    BindPluginRequest, ExportPluginsRequest, ImportPluginsRequest, ListPluginsRequest, Plugin,
    PluginVersionRequest, RegisterPluginRequest, RegistryResponse, RetirePluginRequest,
};

use crate::gateway_cmd::{Target, WAIT_MS, client, rfc3339, status_error};
use crate::term::{json_line, safe};

/// `nexusctl plugin ...`
#[derive(Subcommand)]
pub enum PluginCommand {
    /// Register a signed plugin version (a new plugin on its first version).
    Register {
        /// The plugin's name (or UUID, for a new version of a registered plugin).
        #[arg(long)]
        name: String,
        /// The publisher (a key name in the gateway's [[registry.publishers]]).
        #[arg(long, default_value = "")]
        publisher: String,
        /// What it does.
        #[arg(long, default_value = "")]
        description: String,
        /// public-good, academic-only or commercial.
        #[arg(long, default_value = "")]
        tier: String,
        /// Its semantic version (e.g. 1.4.2).
        #[arg(long)]
        version: String,
        /// The image, pinned by digest: REPO@sha256:…
        #[arg(long)]
        image: String,
        /// The SPIFFE ID its pods run as.
        #[arg(long)]
        spiffe_id: String,
        /// A clause it may serve (repeat for several).
        #[arg(long = "clause")]
        clauses: Vec<String>,
        /// Budgets carried into its bindings (a JSON object).
        #[arg(long, default_value = "")]
        budgets: String,
        /// The signed cosign payload (`cosign generate IMAGE`); default: that payload.
        #[arg(long)]
        payload: Option<PathBuf>,
        /// The signature file (base64, as `cosign sign-blob` prints it).
        #[arg(long)]
        signature: Option<PathBuf>,
    },
    /// Re-verify a version's signature at the gateway, or offline with --key.
    Verify {
        /// The plugin's UUID or name (gateway mode).
        plugin: Option<String>,
        /// The version.
        #[arg(long, default_value = "")]
        version: String,
        /// Offline: the publisher's public key (PEM).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Offline: the payload file.
        #[arg(long)]
        payload: Option<PathBuf>,
        /// Offline: the signature file.
        #[arg(long)]
        signature: Option<PathBuf>,
        /// Offline: the digest the signature must be for.
        #[arg(long, default_value = "")]
        digest: String,
    },
    /// Certify a registered version (reviewers only; not the one who registered it).
    Certify {
        /// UUID or name.
        plugin: String,
        /// The version.
        #[arg(long)]
        version: String,
    },
    /// Retire a version: it never runs again; its workload is revoked.
    Retire {
        /// UUID or name.
        plugin: String,
        /// The version.
        #[arg(long)]
        version: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List plugins with their versions, digests and states.
    List,
    /// One plugin in full.
    Show {
        /// UUID or name.
        plugin: String,
    },
    /// Bind a clause to a version.
    Bind {
        /// UUID or name.
        plugin: String,
        /// The version.
        #[arg(long)]
        version: String,
        /// The clause.
        #[arg(long)]
        clause: String,
    },
    /// Remove a clause binding.
    Unbind {
        /// UUID or name.
        plugin: String,
        /// The version.
        #[arg(long)]
        version: String,
        /// The clause.
        #[arg(long)]
        clause: String,
    },
    /// Write signed versions to a bundle file (for another gateway's `plugin import`).
    Export {
        /// Plugins (UUIDs or names); default: all.
        plugins: Vec<String>,
        /// The file (default: standard output).
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Import a bundle: every signature is re-verified here; versions arrive registered.
    Import {
        /// The bundle file.
        file: PathBuf,
    },
    /// Offline: make an ECDSA P-256 key pair (PREFIX.key PKCS#8, PREFIX.pub as cosign.pub).
    Keygen {
        /// Path prefix of the two files.
        #[arg(long)]
        out: PathBuf,
    },
    /// Offline: sign an image's cosign payload with a PKCS#8 key (as cosign sign-blob).
    Sign {
        /// The private key (PEM PKCS#8).
        #[arg(long)]
        key: PathBuf,
        /// REPO@sha256:…
        #[arg(long)]
        image: String,
        /// Where to write the payload.
        #[arg(long)]
        payload_out: PathBuf,
        /// Where to write the signature.
        #[arg(long)]
        signature_out: PathBuf,
    },
}

fn read(path: &PathBuf, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the {what} {}", path.display()))
}

fn plugin_json(p: &Plugin) -> serde_json::Value {
    serde_json::json!({
        "uid": p.uid, "name": p.name, "publisher": p.publisher, "description": p.description,
        "license_tier": p.license_tier, "registered_by": p.registered_by,
        "registered": rfc3339(p.registered_unix_ms),
        "versions": p.versions.iter().map(|v| serde_json::json!({
            "version": v.version, "image_digest": v.image_digest,
            "image": format!("{}@{}", v.image_repository, v.image_digest),
            "spiffe_id": v.spiffe_id, "clauses": v.clauses, "state": v.state,
            "budgets": serde_json::from_str::<serde_json::Value>(&v.budgets_json).ok(),
            "key_fingerprint": v.key_fingerprint,
            "registered_by": v.registered_by, "registered": rfc3339(v.registered_unix_ms),
            "certified_by": (!v.certified_by.is_empty()).then_some(&v.certified_by),
            "certified": (v.certified_unix_ms > 0).then(|| rfc3339(v.certified_unix_ms)),
            "retired_by": (!v.retired_by.is_empty()).then_some(&v.retired_by),
            "retired": (v.retired_unix_ms > 0).then(|| rfc3339(v.retired_unix_ms)),
            "retire_reason": (!v.retire_reason.is_empty()).then_some(&v.retire_reason),
            "imported_certified_by": (!v.imported_certified_by.is_empty()).then_some(&v.imported_certified_by),
            "revision": v.revision,
        })).collect::<Vec<_>>(),
    })
}

fn print_plugins(target: &Target, plugins: &[Plugin]) {
    if target.output == "json" {
        let all: Vec<_> = plugins.iter().map(plugin_json).collect();
        crate::outln!("{}", json_line(&serde_json::Value::Array(all)));
        return;
    }
    for p in plugins {
        crate::outln!(
            "{} {} (publisher {}, {})",
            safe(&p.uid),
            safe(&p.name),
            safe(&p.publisher),
            safe(&p.license_tier)
        );
        for v in &p.versions {
            let who = match v.state.as_str() {
                "certified" => format!(" by {}", v.certified_by),
                "retired" => format!(" by {}: {}", v.retired_by, v.retire_reason),
                _ => String::new(),
            };
            crate::outln!(
                "  v{:<10} {} {:<10}{} as {} clauses [{}]",
                safe(&v.version),
                safe(&v.image_digest),
                safe(&v.state),
                safe(&who),
                safe(&v.spiffe_id),
                safe(&v.clauses.join(", "))
            );
        }
    }
}

fn print_response(target: &Target, what: &str, r: &RegistryResponse) {
    if target.output == "json" {
        crate::outln!(
            "{}",
            json_line(&serde_json::json!({
                "revision": r.revision,
                "plugin": r.plugin.as_ref().map(plugin_json),
                "notes": r.notes,
                "revocation": r.revocation.as_ref().map(|c| serde_json::json!({
                    "revision": c.revision, "subject": c.subject, "sidecars": c.sidecars,
                    "acknowledged": c.acknowledged,
                    "all_acknowledged_after_us": c.all_acknowledged_after_us,
                })),
                "propagation": r.propagation.as_ref().map(|c| serde_json::json!({
                    "revision": c.revision, "sidecars": c.sidecars,
                    "acknowledged": c.acknowledged,
                    "all_acknowledged_after_us": c.all_acknowledged_after_us,
                })),
            }))
        );
        return;
    }
    let acks = match &r.propagation {
        Some(p) if p.all_acknowledged_after_us > 0 => format!(
            "; acknowledged by all {} sidecars in {:.3} ms",
            p.sidecars,
            p.all_acknowledged_after_us as f64 / 1000.0
        ),
        Some(p) => format!(
            "; acknowledged by {} of {} sidecars so far",
            p.acknowledged, p.sidecars
        ),
        None => String::new(),
    };
    crate::outln!("{} at revision {}{acks}", safe(what), r.revision);
    for n in &r.notes {
        crate::outln!("  {}", safe(n));
    }
    if let Some(p) = &r.plugin {
        print_plugins(target, std::slice::from_ref(p));
    }
}

/// Runs a `plugin` subcommand.
pub async fn run(target: Target, command: PluginCommand) -> anyhow::Result<()> {
    match command {
        PluginCommand::Keygen { out } => {
            let key = cosign::SigningKey::generate()?;
            let private = out.with_extension("key");
            let public = out.with_extension("pub");
            write_private(&private, &key.to_pem())?;
            std::fs::write(&public, key.public_key().to_pem())
                .with_context(|| format!("cannot write {}", public.display()))?;
            crate::outln!(
                "wrote {} and {} (key {})",
                private.display(),
                public.display(),
                key.public_key().fingerprint()
            );
            return Ok(());
        }
        PluginCommand::Sign {
            key,
            image,
            payload_out,
            signature_out,
        } => {
            let key = cosign::SigningKey::from_pem(read(&key, "key")?.as_bytes())?;
            let (repo, digest) = cosign::split_image(&image);
            let digest = digest.ok_or_else(|| {
                anyhow::anyhow!("image `{image}` is not pinned by digest: give REPO@sha256:…")
            })?;
            cosign::validate_digest(digest)?;
            let payload = cosign::image_payload(repo, digest);
            let signature = key.sign(payload.as_bytes())?;
            std::fs::write(&payload_out, &payload)?;
            std::fs::write(&signature_out, &signature)?;
            crate::outln!(
                "signed {repo}@{digest}: payload {}, signature {}",
                payload_out.display(),
                signature_out.display()
            );
            return Ok(());
        }
        PluginCommand::Verify {
            plugin: None,
            key: Some(key),
            payload: Some(payload),
            signature: Some(signature),
            digest,
            ..
        } => {
            let key = cosign::PublicKey::from_pem(read(&key, "key")?.as_bytes())?;
            let signed = cosign::verify(
                &key,
                read(&payload, "payload")?.as_bytes(),
                &read(&signature, "signature")?,
                &digest,
            )?;
            crate::outln!(
                "Verified OK: {}@{} signed by key {}",
                safe(&signed.repository),
                safe(&signed.digest),
                key.fingerprint()
            );
            return Ok(());
        }
        _ => {}
    }
    let mut c = client(&target).await?;
    match command {
        PluginCommand::Register {
            name,
            publisher,
            description,
            tier,
            version,
            image,
            spiffe_id,
            clauses,
            budgets,
            payload,
            signature,
        } => {
            let payload = payload.map(|p| read(&p, "payload")).transpose()?;
            let signature = signature.map(|p| read(&p, "signature")).transpose()?;
            let r = c
                .register_plugin(RegisterPluginRequest {
                    name,
                    publisher,
                    description,
                    license_tier: tier,
                    version: version.clone(),
                    image,
                    spiffe_id,
                    clauses,
                    budgets_json: budgets,
                    payload: payload.unwrap_or_default(),
                    signature: signature.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_response(&target, &format!("registered version {version}"), &r);
        }
        PluginCommand::Verify {
            plugin: Some(plugin),
            version,
            ..
        } => {
            let r = c
                .verify_plugin(PluginVersionRequest {
                    plugin,
                    version,
                    ..PluginVersionRequest::default()
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_response(&target, "verified", &r);
        }
        PluginCommand::Verify { .. } => anyhow::bail!(
            "give a plugin and --version (verify at the gateway), or --key, --payload, --signature and --digest (offline)"
        ),
        PluginCommand::Certify { plugin, version } => {
            let r = c
                .certify_plugin(PluginVersionRequest {
                    plugin,
                    version: version.clone(),
                    wait_ms: WAIT_MS,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_response(&target, &format!("certified version {version}"), &r);
        }
        PluginCommand::Retire {
            plugin,
            version,
            reason,
        } => {
            let r = c
                .retire_plugin(RetirePluginRequest {
                    plugin,
                    version: version.clone(),
                    reason,
                    wait_ms: WAIT_MS,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_response(&target, &format!("retired version {version}"), &r);
        }
        PluginCommand::List => {
            let r = c
                .list_plugins(ListPluginsRequest::default())
                .await
                .map_err(status_error)?
                .into_inner();
            print_plugins(&target, &r.plugins);
        }
        PluginCommand::Show { plugin } => {
            let r = c
                .list_plugins(ListPluginsRequest { plugin })
                .await
                .map_err(status_error)?
                .into_inner();
            if target.output == "json" {
                let one = r.plugins.first().map(plugin_json);
                crate::outln!("{}", json_line(&one.unwrap_or_default()));
            } else {
                print_plugins(&target, &r.plugins);
            }
        }
        PluginCommand::Bind {
            plugin,
            version,
            clause,
        } => {
            let r = c
                .bind_plugin(BindPluginRequest {
                    plugin,
                    version,
                    clause: clause.clone(),
                    wait_ms: WAIT_MS,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_response(&target, &format!("bound {clause}"), &r);
        }
        PluginCommand::Unbind {
            plugin,
            version,
            clause,
        } => {
            let r = c
                .unbind_plugin(BindPluginRequest {
                    plugin,
                    version,
                    clause: clause.clone(),
                    wait_ms: WAIT_MS,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_response(&target, &format!("unbound {clause}"), &r);
        }
        PluginCommand::Export { plugins, file } => {
            let r = c
                .export_plugins(ExportPluginsRequest { plugins })
                .await
                .map_err(status_error)?
                .into_inner();
            match file {
                Some(f) => {
                    std::fs::write(&f, &r.bundle)
                        .with_context(|| format!("cannot write {}", f.display()))?;
                    crate::outln!("wrote {}", f.display());
                }
                None => crate::outln!("{}", r.bundle),
            }
        }
        PluginCommand::Import { file } => {
            let bundle = read(&file, "bundle")?;
            let r = c
                .import_plugins(ImportPluginsRequest { bundle })
                .await
                .map_err(status_error)?
                .into_inner();
            print_response(&target, "imported", &r);
        }
        PluginCommand::Keygen { .. } | PluginCommand::Sign { .. } => {}
    }
    Ok(())
}

fn write_private(path: &PathBuf, pem: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(pem.as_bytes())?;
    Ok(())
}
