//! The deployment rehearsal: docs/deployment.md followed literally, once per overlay,
//! against a simulated cluster that starts the real binaries (see `rehearsal/sim.rs` for
//! what is simulated and the few addresses it rewrites).
//!
//! Every `sh` block of the runbook runs in order (a `<!-- rehearsal: skip (why) -->`
//! marker skips one, `<!-- rehearsal: overlay NAME -->` scopes one to an overlay), and a
//! `text` block right after an `sh` block must match the output of its last command
//! (`...` matches any text). `kubectl` lines act on the simulated cluster; other lines
//! run in bash in a copy of the repository, with the freshly built binaries first on
//! PATH. A command that fails, an object the API server would refuse, a pod the kubelet
//! could not start, or an output that differs from the runbook fails the test with the
//! runbook's line and the rendered object's kind/name and field.
//!
//! Needs: kubectl with kustomize v5 (`kubectl kustomize`, offline), bubblewrap, openssl,
//! curl, PostgreSQL's binaries; `scripts/install-test-deps.sh` installs what is missing.

#[path = "rehearsal/doc.rs"]
mod doc;
#[path = "rehearsal/sim.rs"]
mod sim;

use std::path::{Path, PathBuf};
use std::process::Command;

use nexus_tests::{free_port, repo_root};
use serde_json::Value;
use sim::{Cluster, Fault};

/// kubectl with a kustomize that knows Components, `labels` and `replacements`:
/// `NEXUS_KUBECTL`, else target/tools/kubectl (install-test-deps.sh puts one there when
/// the machine's is missing or too old), else the one on PATH.
fn kubectl() -> PathBuf {
    let candidates: Vec<PathBuf> = std::env::var_os("NEXUS_KUBECTL")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            repo_root().join("target/tools/kubectl"),
            PathBuf::from("kubectl"),
        ])
        .collect();
    for k in &candidates {
        let ok = Command::new(k)
            .args(["kustomize", "--help"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok && kustomize_is_v5(k) {
            return k.clone();
        }
    }
    panic!("no kubectl with kustomize v5 ({candidates:?}): run scripts/install-test-deps.sh");
}

fn kustomize_is_v5(kubectl: &Path) -> bool {
    let out = Command::new(kubectl)
        .args(["version", "--client", "-o", "json"])
        .output();
    out.ok()
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .and_then(|v| v["kustomizeVersion"].as_str().map(String::from))
        .is_some_and(|v| {
            v.trim_start_matches('v')
                .split('.')
                .next()
                .and_then(|m| m.parse::<u32>().ok())
                .is_some_and(|m| m >= 5)
        })
}

/// Renders a kustomization with kubectl's built-in kustomize; the objects.
fn render(kubectl: &Path, cwd: &Path, dir: &str) -> Result<Vec<Value>, Fault> {
    let out = Command::new(kubectl)
        .args(["kustomize", dir])
        .current_dir(cwd)
        .output()
        .map_err(|e| format!("kubectl kustomize {dir}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "kubectl kustomize {dir}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    yaml_docs(&String::from_utf8_lossy(&out.stdout))
}

fn yaml_docs(text: &str) -> Result<Vec<Value>, Fault> {
    let mut out = Vec::new();
    for doc in yaml_serde::Deserializer::from_str(text) {
        let v: Value = serde::Deserialize::deserialize(doc).map_err(|e| format!("YAML: {e}"))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// The test PostgreSQL: the caller's (`NEXUS_TEST_POSTGRES_URL`, as scripts/test.sh
/// sets it), or one started for this test and stopped when dropped.
struct Postgres {
    host: String,
    url: String,
    ca: PathBuf,
    own: Option<tempfile::TempDir>,
}

impl Postgres {
    fn start() -> Self {
        let (url, ca, own) = match std::env::var("NEXUS_TEST_POSTGRES_URL") {
            Ok(url) => (
                url,
                PathBuf::from(
                    std::env::var("NEXUS_TEST_POSTGRES_CA")
                        .expect("NEXUS_TEST_POSTGRES_CA with NEXUS_TEST_POSTGRES_URL"),
                ),
                None,
            ),
            Err(_) => {
                let dir = tempfile::Builder::new()
                    .prefix("nexus-rehearsal-pg")
                    .tempdir_in("/tmp")
                    .expect("pg dir");
                let data = dir.path().join("data");
                let url = nexus_tests::stdout_of(
                    Command::new(repo_root().join("scripts/postgres.sh")).args([
                        "start",
                        &data.to_string_lossy(),
                        &free_port().to_string(),
                    ]),
                    "scripts/postgres.sh start",
                );
                (url, data.join("nexus-test-ca.pem"), Some(dir))
            }
        };
        let host = url
            .split("://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .map(|a| a.rsplit('@').next().unwrap_or(a).to_string())
            .unwrap_or_default();
        Postgres { host, url, ca, own }
    }

    /// A fresh database: (host:port, name, CA file).
    fn database(&self, name: &str) -> (String, String, PathBuf) {
        let admin = self
            .url
            .rsplit_once('/')
            .map(|(b, _)| format!("{b}/postgres"))
            .unwrap_or_default();
        let db = format!("{name}_{}", std::process::id());
        for sql in [
            format!("DROP DATABASE IF EXISTS {db}"),
            format!("CREATE DATABASE {db}"),
        ] {
            nexus_tests::stdout_of(
                Command::new("psql").args([admin.as_str(), "-qtAc", &sql]),
                &format!("psql {sql}"),
            );
        }
        (self.host.clone(), db, self.ca.clone())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(dir) = &self.own {
            let _ = Command::new(repo_root().join("scripts/postgres.sh"))
                .args(["stop", &dir.path().join("data").to_string_lossy()])
                .output();
        }
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        let p = e.path();
        let dst = to.join(e.file_name());
        if p.is_dir() {
            copy_tree(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).expect("copy");
        }
    }
}

/// The repository as a user has it: deploy/, policies/, profiles/.
fn working_copy(dir: &Path) -> PathBuf {
    let work = dir.join("checkout");
    for sub in ["deploy", "policies", "profiles"] {
        copy_tree(&repo_root().join(sub), &work.join(sub));
    }
    // A CA a previous run (or a user) left in the real checkout does not count.
    let _ = std::fs::remove_file(work.join("deploy/overlays/manual-tls/webhook-ca.crt"));
    work
}

struct Runbook {
    cluster: Cluster,
    transcript: String,
}

impl Runbook {
    fn new(variant: &str, dir: &Path, database: (String, String, PathBuf)) -> Self {
        let work = working_copy(dir);
        let cluster = Cluster::new(
            repo_root(),
            work,
            dir.to_path_buf(),
            kubectl(),
            variant == "cert-manager",
            database,
        );
        Runbook {
            cluster,
            transcript: String::new(),
        }
    }

    fn note(&mut self, text: &str) {
        eprintln!("{text}");
        self.transcript.push_str(text);
        self.transcript.push('\n');
    }

    /// Runs one command line; its output.
    fn run(&mut self, line: &str) -> Result<String, Fault> {
        let parts = doc::pipeline(line);
        match parts.as_slice() {
            [one] => self.one(one, None),
            [left, right] if right.starts_with("kubectl ") => {
                let piped = self.one(left, None)?;
                self.one(right, Some(piped))
            }
            _ => self.bash(line),
        }
    }

    fn one(&mut self, line: &str, stdin: Option<String>) -> Result<String, Fault> {
        if line.starts_with("kubectl ") {
            let words = doc::words(line)?;
            self.kubectl(&words[1..], stdin)
        } else {
            self.bash(line)
        }
    }

    /// A non-kubectl command, in bash, in the checkout; node paths and port-forwarded
    /// addresses rewritten.
    fn bash(&mut self, line: &str) -> Result<String, Fault> {
        let mut text = line.to_string();
        for (local, port) in &self.cluster.forwards {
            for host in ["127.0.0.1", "localhost"] {
                text = text.replace(&format!("{host}:{local}"), &format!("127.0.0.1:{port}"));
            }
        }
        let node = self.cluster.node.join("var/lib/kubelet");
        std::fs::create_dir_all(&node).expect("node kubelet dir");
        text = text.replace("/var/lib/kubelet/", &format!("{}/", node.display()));
        let path = format!(
            "{}:{}",
            repo_root().join("target/debug").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new("timeout")
            .args([
                "--kill-after=5",
                "60",
                "bash",
                "-euo",
                "pipefail",
                "-c",
                &text,
            ])
            .current_dir(&self.cluster.work)
            .env("PATH", path)
            .env_remove("SPIFFE_ENDPOINT_SOCKET")
            .output()
            .map_err(|e| format!("bash: {e}"))?;
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            return Err(format!(
                "`{line}` failed ({}): {}",
                out.status,
                output.trim()
            ));
        }
        Ok(output)
    }

    fn kubectl(&mut self, args: &[String], stdin: Option<String>) -> Result<String, Fault> {
        let mut namespace: Option<String> = None;
        let mut rest: Vec<String> = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "-n" || a == "--namespace" {
                namespace = it.next().cloned();
            } else if let Some(ns) = a.strip_prefix("--namespace=") {
                namespace = Some(ns.to_string());
            } else {
                rest.push(a.clone());
            }
        }
        let ns = namespace.clone().unwrap_or_else(|| "default".into());
        let verb = rest.first().map(String::as_str).unwrap_or("");
        let target = |w: &str| -> Result<String, Fault> {
            w.strip_prefix("deploy/")
                .or_else(|| w.strip_prefix("deployment/"))
                .map(String::from)
                .ok_or_else(|| {
                    format!("kubectl {verb} {w}: the rehearsal knows deploy/NAME targets")
                })
        };
        match verb {
            "apply" => {
                let mut objects = match (rest.get(1).map(String::as_str), rest.get(2)) {
                    (Some("-k"), Some(dir)) => {
                        render(&self.cluster.kubectl, &self.cluster.work, dir)?
                    }
                    (Some("-f"), Some(f)) if f == "-" => yaml_docs(&stdin.unwrap_or_default())?,
                    (Some("-f"), Some(f)) => {
                        let p = self.cluster.work.join(f);
                        let mut text = String::new();
                        let files: Vec<PathBuf> = if p.is_dir() {
                            let mut v: Vec<PathBuf> = std::fs::read_dir(&p)
                                .map_err(|e| format!("{f}: {e}"))?
                                .flatten()
                                .map(|e| e.path())
                                .filter(|p| {
                                    p.extension()
                                        .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
                                })
                                .collect();
                            v.sort();
                            v
                        } else {
                            vec![p]
                        };
                        for file in files {
                            text.push_str(
                                &std::fs::read_to_string(&file)
                                    .map_err(|e| format!("{}: {e}", file.display()))?,
                            );
                            text.push_str("\n---\n");
                        }
                        yaml_docs(&text)?
                    }
                    _ => {
                        return Err(format!(
                            "kubectl {}: the rehearsal knows apply -k DIR and apply -f FILE|-",
                            rest.join(" ")
                        ));
                    }
                };
                if let Some(n) = &namespace {
                    for o in &mut objects {
                        if o["metadata"]["namespace"].is_null() {
                            o["metadata"]["namespace"] = Value::String(n.clone());
                        }
                    }
                }
                // kubectl applies namespaces first, as kustomize orders them.
                objects.sort_by_key(|o| o["kind"] != "Namespace");
                self.cluster.submit(objects, false)
            }
            "create" => {
                if matches!(rest.get(1).map(String::as_str), Some("namespace" | "ns")) {
                    let name = rest.get(2).ok_or("kubectl create namespace NAME")?;
                    let obj = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
                    return self.cluster.submit(vec![obj], true);
                }
                // kubectl itself builds the object (offline, --dry-run=client).
                let dry_run = rest.iter().any(|a| a.starts_with("--dry-run"));
                let mut cmd = Command::new(&self.cluster.kubectl);
                if let Some(n) = &namespace {
                    cmd.args(["-n", n]);
                }
                cmd.args(&rest).current_dir(&self.cluster.work);
                if !dry_run {
                    cmd.args(["--dry-run=client", "-o", "json"]);
                }
                let out = cmd.output().map_err(|e| format!("kubectl: {e}"))?;
                if !out.status.success() {
                    return Err(format!(
                        "kubectl {}: {}",
                        rest.join(" "),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
                if dry_run {
                    return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
                }
                let mut obj: Value = serde_json::from_slice(&out.stdout)
                    .map_err(|e| format!("kubectl create: {e}"))?;
                if obj["metadata"]["namespace"].is_null() {
                    obj["metadata"]["namespace"] = Value::String(ns.clone());
                }
                self.cluster.submit(vec![obj], true)
            }
            "label" => {
                let kind = rest.get(1).ok_or("kubectl label KIND NAME k=v")?;
                let name = rest.get(2).ok_or("kubectl label KIND NAME k=v")?;
                let overwrite = rest.iter().any(|a| a == "--overwrite");
                let pairs: Vec<(String, String)> = rest[3..]
                    .iter()
                    .filter(|a| !a.starts_with("--"))
                    .filter_map(|a| {
                        a.split_once('=')
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                    })
                    .collect();
                self.cluster.label(kind, name, &pairs, overwrite)
            }
            "rollout" if rest.get(1).map(String::as_str) == Some("status") => {
                let name = target(rest.get(2).ok_or("kubectl rollout status deploy/NAME")?)?;
                self.cluster.ensure_pod(&ns, &name)?;
                Ok(format!("deployment \"{name}\" successfully rolled out\n"))
            }
            "exec" => {
                let name = target(rest.get(1).ok_or("kubectl exec deploy/NAME -- CMD")?)?;
                let dash = rest
                    .iter()
                    .position(|a| a == "--")
                    .ok_or("kubectl exec: `--` before the command")?;
                let container = rest[..dash]
                    .iter()
                    .position(|a| a == "-c" || a == "--container")
                    .and_then(|i| rest.get(i + 1))
                    .cloned();
                let key = self.cluster.ensure_pod(&ns, &name)?;
                let (ok, out) = self
                    .cluster
                    .exec(&key, container.as_deref(), &rest[dash + 1..])?;
                if !ok {
                    return Err(format!(
                        "the command failed in the container: {}",
                        out.trim()
                    ));
                }
                Ok(out)
            }
            "port-forward" => {
                let name = target(rest.get(1).ok_or("kubectl port-forward deploy/NAME L:R")?)?;
                let spec = rest.get(2).ok_or("kubectl port-forward deploy/NAME L:R")?;
                let (l, r) = spec.split_once(':').unwrap_or((spec, spec));
                let (l, r): (u16, u16) = (
                    l.parse().map_err(|_| format!("port {l}"))?,
                    r.parse().map_err(|_| format!("port {r}"))?,
                );
                let key = self.cluster.ensure_pod(&ns, &name)?;
                let port = self.cluster.pod_port(&key, r);
                self.cluster.forwards.insert(l, port);
                Ok(format!("Forwarding from 127.0.0.1:{l} -> {r}\n"))
            }
            "logs" => {
                let name = target(rest.get(1).ok_or("kubectl logs deploy/NAME")?)?;
                let container = rest
                    .iter()
                    .position(|a| a == "-c" || a == "--container")
                    .and_then(|i| rest.get(i + 1))
                    .cloned();
                let key = self.cluster.ensure_pod(&ns, &name)?;
                self.cluster.logs(&key, container.as_deref())
            }
            _ => Err(format!(
                "the rehearsal does not know `kubectl {}`: teach tests/tests/rehearsal.rs, or mark the block `<!-- rehearsal: skip (why) -->`",
                rest.join(" ")
            )),
        }
    }

    /// Follows the runbook for `variant`.
    fn follow(&mut self, runbook: &str, name: &str, variant: &str) -> Result<(), Fault> {
        let blocks = doc::blocks(runbook);
        let mut last_output = String::new();
        let mut last_sh_ran = false;
        for block in &blocks {
            match block.lang.as_str() {
                "sh" => {
                    last_sh_ran = false;
                    match block.marker.as_deref() {
                        Some(m) if m.starts_with("skip") => {
                            self.note(&format!("## {name}:{} skipped: {m}", block.line));
                            continue;
                        }
                        Some(m)
                            if m.starts_with("overlay ") && m != format!("overlay {variant}") =>
                        {
                            continue;
                        }
                        Some(m) if !m.starts_with("overlay ") && !m.starts_with("skip") => {
                            return Err(format!(
                                "{name}:{}: unknown rehearsal marker `{m}`",
                                block.line
                            ));
                        }
                        _ => {}
                    }
                    for cmd in doc::commands(&block.text, block.line) {
                        self.note(&format!("$ {}    # {name}:{}", cmd.text, cmd.line));
                        last_output = self
                            .run(&cmd.text)
                            .map_err(|e| format!("{name}:{}: `{}`: {e}", cmd.line, cmd.text))?;
                        let shown: Vec<&str> = last_output.lines().take(12).collect();
                        self.note(&shown.join("\n"));
                    }
                    last_sh_ran = true;
                }
                "text" if block.follows_previous && last_sh_ran => {
                    doc::output_matches(&block.text, &last_output).map_err(|e| {
                        format!("{name}:{}: the output differs from the runbook: {e}; it was:\n{last_output}", block.line)
                    })?;
                    last_sh_ran = false;
                }
                _ => last_sh_ran = false,
            }
        }
        Ok(())
    }
}

fn rehearse(variant: &str) {
    let dir = nexus_tests::temp_dir(&format!("rehearsal-{variant}"));
    let runbook = std::fs::read_to_string(repo_root().join("docs/deployment.md"))
        .expect("docs/deployment.md");
    let postgres = Postgres::start();
    let db = postgres.database(&format!("rehearsal_{}", variant.replace('-', "_")));
    let mut book = Runbook::new(variant, dir.path(), db);
    let started = std::time::Instant::now();
    if let Err(fault) = book.follow(&runbook, "docs/deployment.md", variant) {
        drop(book);
        drop(postgres);
        let dir = dir.keep();
        panic!(
            "rehearsal of docs/deployment.md with the {variant} overlay failed (files in {}):\n{fault}",
            dir.display()
        );
    }
    eprintln!(
        "rehearsal ({variant}) passed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn the_runbook_works_with_the_cert_manager_overlay() {
    rehearse("cert-manager");
}

#[test]
fn the_runbook_works_with_the_manual_tls_overlay() {
    rehearse("manual-tls");
}

/// Every overlay has its rehearsed block, and every kustomization under deploy/ is
/// applied by the runbook (directly, or as what an applied one builds on).
#[test]
fn the_runbook_covers_every_overlay_and_kustomization() {
    let runbook = std::fs::read_to_string(repo_root().join("docs/deployment.md")).expect("runbook");
    let blocks = doc::blocks(&runbook);
    let overlays: Vec<String> = std::fs::read_dir(repo_root().join("deploy/overlays"))
        .expect("overlays")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(overlays.len() >= 2, "{overlays:?}");
    for overlay in &overlays {
        assert!(
            blocks.iter().any(
                |b| b.marker.as_deref() == Some(&format!("overlay {overlay}"))
                    && b.text
                        .contains(&format!("kubectl apply -k deploy/overlays/{overlay}"))
            ),
            "docs/deployment.md has no `<!-- rehearsal: overlay {overlay} -->` block applying it"
        );
    }
    let mut kustomizations = Vec::new();
    fn find(dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                find(&e.path(), out);
            } else if e.file_name() == "kustomization.yaml" {
                let rel = e
                    .path()
                    .parent()
                    .and_then(|p| p.strip_prefix(repo_root()).ok())
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                out.push(rel);
            }
        }
    }
    find(&repo_root().join("deploy"), &mut kustomizations);
    let rehearsed: String = blocks
        .iter()
        .filter(|b| b.lang == "sh" && !b.marker.as_deref().is_some_and(|m| m.starts_with("skip")))
        .map(|b| b.text.clone())
        .collect::<Vec<_>>()
        .join("\n");
    for k in kustomizations {
        let applied = rehearsed.contains(&format!("apply -k {k}"));
        let built_on = match k.as_str() {
            "deploy/base" | "deploy/images" => rehearsed.contains("apply -k deploy/overlays/"),
            _ => false,
        };
        assert!(
            applied || built_on,
            "{k} is neither applied by the runbook nor part of what it applies"
        );
    }
}

/// A manifest the kubelet cannot start is reported with the object, the field and why:
/// here the base alone, which lacks the webhook's certificate.
#[test]
fn a_pod_that_cannot_start_is_reported_with_its_object_and_field() {
    let dir = nexus_tests::temp_dir("rehearsal-base");
    let mut book = Runbook::new(
        "base",
        dir.path(),
        (
            "127.0.0.1:1".into(),
            "none".into(),
            PathBuf::from("/nonexistent"),
        ),
    );
    for line in [
        "kubectl apply -k deploy/spire",
        "kubectl apply -f deploy/base/namespace.yaml",
        "kubectl -n nexus-system create secret generic nexus-gateway-db --from-literal=url=postgres://nexus@db.svc:5432/nexus",
        "kubectl -n nexus-system create configmap nexus-revocation-policy --from-file=policies/revocation/",
        "kubectl apply -k deploy/base",
    ] {
        book.run(line).unwrap_or_else(|e| panic!("{line}: {e}"));
    }
    let fault = book
        .run("kubectl -n nexus-system rollout status deploy/nexus-gateway")
        .expect_err("the base alone has no webhook certificate");
    for part in [
        "Deployment/nexus-gateway",
        "spec.volumes",
        "webhook-tls",
        "secret.secretName",
        "Secret nexus-system/nexus-webhook-tls not found",
    ] {
        assert!(fault.contains(part), "`{part}` missing in: {fault}");
    }
    // Applying a kustomization's folder with -f submits its kustomization.yaml.
    let fault = book
        .run("kubectl apply -f deploy/spire/")
        .expect_err("-f on a kustomization");
    assert!(
        fault.contains("Kustomization") && fault.contains("-k"),
        "{fault}"
    );
    // Labelling what the base already labels needs --overwrite.
    let fault = book
        .run("kubectl label namespace plugins nexus.io/inject=enabled")
        .expect_err("label twice");
    assert!(fault.contains("already has a value"), "{fault}");
}

/// A mount nested in a read-only ConfigMap mount, and a Service port that names no
/// container port: reported with the object and the field, before anything runs.
#[test]
fn manifest_drift_is_reported_with_the_object_and_field() {
    let dir = nexus_tests::temp_dir("rehearsal-drift");
    let mut book = Runbook::new(
        "cert-manager",
        dir.path(),
        (
            "127.0.0.1:1".into(),
            "none".into(),
            PathBuf::from("/nonexistent"),
        ),
    );
    let deployment = book
        .cluster
        .work
        .join("deploy/base/gateway-deployment.yaml");
    let text = std::fs::read_to_string(&deployment).expect("deployment");
    std::fs::write(
        &deployment,
        text.replace(
            "mountPath: /etc/nexus/webhook-tls",
            "mountPath: /etc/nexus/gateway/webhook-tls",
        ),
    )
    .expect("write");
    for line in [
        "kubectl apply -k deploy/spire",
        "kubectl apply -f deploy/base/namespace.yaml",
        "kubectl -n nexus-system create secret generic nexus-gateway-db --from-literal=url=postgres://nexus@db.svc:5432/nexus",
        "kubectl -n nexus-system create configmap nexus-revocation-policy --from-file=policies/revocation/",
        "kubectl apply -k deploy/overlays/cert-manager",
    ] {
        book.run(line).unwrap_or_else(|e| panic!("{line}: {e}"));
    }
    let fault = book
        .run("kubectl -n nexus-system rollout status deploy/nexus-gateway")
        .expect_err("nested mount");
    for part in [
        "Deployment/nexus-gateway",
        "volumeMounts",
        "webhook-tls",
        "read-only",
    ] {
        assert!(fault.contains(part), "`{part}` missing in: {fault}");
    }
    let service = book.cluster.work.join("deploy/base/gateway-service.yaml");
    let text = std::fs::read_to_string(&service).expect("service");
    std::fs::write(
        &service,
        text.replace("targetPort: webhook", "targetPort: https"),
    )
    .expect("write");
    book.run("kubectl apply -k deploy/overlays/cert-manager")
        .expect("apply");
    let fault = book
        .run("kubectl apply -k deploy/examples")
        .and_then(|_| book.run("kubectl -n data rollout status deploy/hazard-api"))
        .expect_err("no such port");
    for part in ["Service/nexus-gateway", "targetPort", "https"] {
        assert!(fault.contains(part), "`{part}` missing in: {fault}");
    }
}

/// One place names every image: changing deploy/images changes the Deployments'
/// images and the images the webhook injects (through the gateway's environment).
#[test]
fn every_image_is_named_in_deploy_images() {
    let dir = nexus_tests::temp_dir("rehearsal-images");
    let work = working_copy(dir.path());
    let images = work.join("deploy/images/kustomization.yaml");
    let text = std::fs::read_to_string(&images).expect("images");
    std::fs::write(
        &images,
        text.replace("newName: ghcr.io/nexus/", "newName: registry.test/team/")
            .replace("newTag: \"0.1.0\"", "newTag: \"9.9.9\""),
    )
    .expect("write");
    let k = kubectl();
    let mut objects = render(&k, &work, "deploy/overlays/cert-manager").expect("render");
    objects.extend(render(&k, &work, "deploy/examples").expect("render"));
    let mut seen = 0;
    for o in &objects {
        for c in o["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let image = c["image"].as_str().unwrap_or("");
            assert!(
                !image.contains("ghcr.io/nexus"),
                "{}: {image} not renamed",
                sim::describe(o)
            );
            if image.starts_with("registry.test/team/") {
                assert!(image.ends_with(":9.9.9"), "{image}");
                seen += 1;
            }
            for e in c["env"].as_array().into_iter().flatten() {
                assert!(
                    !e["value"].as_str().unwrap_or("").contains("ghcr.io/nexus"),
                    "{}: env {} not renamed",
                    sim::describe(o),
                    e["name"]
                );
            }
        }
    }
    assert!(seen >= 3, "gateway, toolbox and data API images: {seen}");
    // The injector, configured as the rendered gateway is (config file + environment).
    let gateway = objects
        .iter()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "nexus-gateway")
        .expect("gateway");
    let config = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "nexus-gateway")
        .expect("config");
    let toml_text = config["data"]["gateway.toml"]
        .as_str()
        .expect("gateway.toml");
    let inject_table = toml_text
        .split("[webhook.inject]")
        .nth(1)
        .expect("[webhook.inject]")
        .split("\n[")
        .next()
        .unwrap_or("");
    let mut cfg: nexus_kube::InjectConfig = toml::from_str(inject_table).expect("inject table");
    let env = gateway["spec"]["template"]["spec"]["containers"][0]["env"].clone();
    cfg.apply_env(|k| {
        env.as_array()
            .and_then(|a| a.iter().find(|e| e["name"] == k))
            .and_then(|e| e["value"].as_str().map(String::from))
    });
    assert_eq!(cfg.sidecar_image, "registry.test/team/nexus-sidecar:9.9.9");
    assert_eq!(cfg.launcher_image, "registry.test/team/nexus-launch:9.9.9");
}
