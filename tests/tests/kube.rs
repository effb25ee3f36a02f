//! Kubernetes: the admission webhook's answers against golden files, the patched pods and
//! every manifest under deploy/ against the Kubernetes API schemas (`kubernetes-validate
//! --strict`, PyPI, pinned in tests/requirements.txt), and `nexusctl inject`.
//!
//! Target Kubernetes version: 1.34 (k8s-openapi's `v1_34` feature in nexus-kube; native
//! sidecars are GA since 1.33). No API server runs here: nothing in this file talks to a
//! cluster. Regenerate the golden files with `UPDATE_GOLDEN=1`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nexus_kube::{InjectConfig, admission};
use nexus_tests::{bin, repo_root};
use serde_json::{Value, json};

const K8S_VERSION: &str = "1.34.0";

fn data(rel: &str) -> PathBuf {
    repo_root().join("tests/kube").join(rel)
}

fn update_golden() -> bool {
    std::env::var_os("UPDATE_GOLDEN").is_some()
}

/// The answer with its patch decoded, so the golden file reads as a JSONPatch.
fn readable(status: u16, body: &[u8]) -> Value {
    let mut doc: Value = serde_json::from_slice(body).expect("answers are JSON");
    if let Some(patch) = admission::answer_patch(body) {
        doc["response"]["patch"] = serde_json::to_value(patch).expect("patch");
    }
    json!({"status": status, "body": doc})
}

fn check_golden(name: &str, actual: &Value) {
    let path = data(&format!("golden/{name}.json"));
    let text = serde_json::to_string_pretty(actual).expect("encode") + "\n";
    if update_golden() {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, &text).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    assert_eq!(
        serde_json::from_str::<Value>(&expected).expect("golden JSON"),
        *actual,
        "{name}: the answer differs from {} (UPDATE_GOLDEN=1 rewrites it)",
        path.display()
    );
}

fn read_review(name: &str) -> Vec<u8> {
    std::fs::read(data(&format!("reviews/{name}.json"))).expect("review fixture")
}

/// The pod the API server would store: the object with the answer's patch applied and,
/// as the API server does for generateName, a name.
fn patched_pod(review: &[u8], answer: &[u8]) -> Value {
    let review: Value = serde_json::from_slice(review).expect("review");
    let mut pod = review["request"]["object"].clone();
    let patch = admission::answer_patch(answer).expect("a patch");
    json_patch::patch(&mut pod, &patch).expect("the patch applies to the pod");
    if pod["metadata"].get("name").is_none() {
        let base = pod["metadata"]["generateName"].as_str().unwrap_or("pod-");
        pod["metadata"]["name"] = json!(format!("{base}x7q2z"));
    }
    pod
}

fn kubernetes_validate(files: &[PathBuf]) {
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", K8S_VERSION])
        .args(files)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run kubernetes-validate ({e}): pip install -r tests/requirements.txt")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kubernetes-validate --strict failed:\n{text}"
    );
    assert_eq!(
        text.matches(" passed for resource ").count(),
        files.len(),
        "every file must pass:\n{text}"
    );
}

#[test]
fn admission_answers_match_golden_files_and_patched_pods_validate() {
    let cfg = InjectConfig::default();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut patched = Vec::new();
    for (name, expect_patch) in [
        ("deployment-pod", true),
        ("job-pod", true),
        ("cronjob-pod-sandbox", true),
        ("deployment-pod-sandbox", true),
        ("deployment-pod-sandbox-no-command", false),
        ("deployment-pod-opt-out", false),
        ("wrong-kind-deployment", false),
        ("malformed", false),
    ] {
        let review = read_review(name);
        let (status, body) = admission::review(&review, &cfg);
        check_golden(name, &readable(status, &body));
        assert_eq!(
            admission::answer_patch(&body).is_some(),
            expect_patch,
            "{name}"
        );
        if expect_patch {
            let pod = patched_pod(&review, &body);
            // The kubelet's one grace period holds the sidecar's shutdown_grace and a flush.
            let grace = pod["spec"]["terminationGracePeriodSeconds"].as_i64();
            let needed = i64::from(cfg.sidecar_shutdown_grace_seconds)
                + nexus_kube::SHUTDOWN_FLUSH_MARGIN_SECS;
            assert!(
                grace >= Some(needed),
                "{name}: terminationGracePeriodSeconds {grace:?}"
            );
            let sidecar = pod["spec"]["initContainers"][0].clone();
            assert!(
                sidecar["env"]
                    .as_array()
                    .is_some_and(|env| env.iter().any(|e| e["name"] == "NEXUS_SHUTDOWN_GRACE"
                        && e["value"] == format!("{}s", cfg.sidecar_shutdown_grace_seconds))),
                "{name}: {sidecar}"
            );
            let file = dir.path().join(format!("{name}.json"));
            std::fs::write(&file, serde_json::to_vec_pretty(&pod).expect("pod")).expect("write");
            patched.push(file);
        }
    }
    kubernetes_validate(&patched);
}

#[test]
fn an_injected_pod_is_allowed_unchanged_the_second_time() {
    let cfg = InjectConfig::default();
    for name in [
        "deployment-pod",
        "job-pod",
        "cronjob-pod-sandbox",
        "deployment-pod-sandbox",
    ] {
        let review = read_review(name);
        let (_, body) = admission::review(&review, &cfg);
        let pod = patched_pod(&review, &body);
        let mut again: Value = serde_json::from_slice(&review).expect("review");
        again["request"]["object"] = pod;
        let again = serde_json::to_vec(&again).expect("encode");
        if name == "deployment-pod" {
            let path = data("reviews/deployment-pod-already-injected.json");
            if update_golden() {
                let pretty: Value = serde_json::from_slice(&again).expect("json");
                std::fs::write(
                    &path,
                    serde_json::to_string_pretty(&pretty).expect("e") + "\n",
                )
                .expect("write fixture");
            }
            let (status, body) = admission::review(&std::fs::read(&path).expect("fixture"), &cfg);
            check_golden("deployment-pod-already-injected", &readable(status, &body));
        }
        let (status, body) = admission::review(&again, &cfg);
        assert_eq!(status, 200, "{name}");
        let doc: Value = serde_json::from_slice(&body).expect("answer");
        assert_eq!(doc["response"]["allowed"], true, "{name}");
        assert!(
            doc["response"].get("patch").is_none(),
            "{name}: second pass patched"
        );
    }
}

#[test]
fn oversized_review_gets_413() {
    let mut review: Value = serde_json::from_slice(&read_review("deployment-pod")).expect("r");
    review["request"]["object"]["metadata"]["annotations"] =
        json!({"filler": "x".repeat(nexus_kube::DEFAULT_MAX_REVIEW_BYTES)});
    let body = serde_json::to_vec(&review).expect("encode");
    let (status, answer) = admission::review(&body, &InjectConfig::default());
    check_golden("oversized", &readable(status, &answer));
    assert_eq!(status, 413);
}

/// Files under deploy/ that are not Kubernetes objects: kustomize's transformer
/// configuration and policy data for a ConfigMap. Listed so a new one is noticed.
const NOT_MANIFESTS: &[&str] = &["images/image-fields.yaml", "examples/policies/data.yaml"];

/// kubectl with kustomize v5 (see tests/rehearsal.rs): `NEXUS_KUBECTL`,
/// target/tools/kubectl, or the one on PATH.
fn kubectl() -> PathBuf {
    std::env::var_os("NEXUS_KUBECTL")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            repo_root().join("target/tools/kubectl"),
            PathBuf::from("kubectl"),
        ])
        .find(|k| {
            Command::new(k)
                .args(["kustomize", "--help"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("no kubectl with kustomize: run scripts/install-test-deps.sh")
}

/// Every file under deploy/, plus each kustomization rendered by `kubectl kustomize`
/// (offline) and the examples after `nexusctl inject`.
#[test]
fn every_manifest_under_deploy_validates_strictly() {
    let deploy = repo_root().join("deploy");
    let mut files = Vec::new();
    collect_yaml(&deploy, &mut files);
    files.retain(|f| {
        !NOT_MANIFESTS
            .iter()
            .any(|n| f.strip_prefix(&deploy).is_ok_and(|r| r == Path::new(n)))
    });
    files.sort();
    assert!(files.len() >= 15, "deploy/ looks empty: {files:?}");
    let dir = tempfile::tempdir().expect("tempdir");
    let kustomizations: Vec<&Path> = files
        .iter()
        .filter(|f| f.ends_with("kustomization.yaml"))
        .filter_map(|f| f.parent())
        .collect();
    // Rendered from a copy holding what the runbook adds (the manual-tls overlay's CA).
    let copy = dir.path().join("deploy");
    copy_tree(&deploy, &copy);
    std::fs::copy(
        repo_root().join("certs-dev/nexus.local/ca.pem"),
        copy.join("overlays/manual-tls/webhook-ca.crt"),
    )
    .expect("ca");
    let kubectl = kubectl();
    let mut rendered = Vec::new();
    for k in &kustomizations {
        let rel = k.strip_prefix(&deploy).expect("under deploy");
        if rel == Path::new("images") {
            continue; // a Component: rendered as part of the base and the examples
        }
        let out = Command::new(&kubectl)
            .arg("kustomize")
            .arg(copy.join(rel))
            .output()
            .expect("kubectl kustomize");
        assert!(
            out.status.success(),
            "kubectl kustomize {}: {}",
            k.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let name = rel.to_string_lossy().replace('/', "-");
        let file = dir.path().join(format!("rendered-{name}.yaml"));
        std::fs::write(&file, &out.stdout).expect("write");
        rendered.push(file);
    }
    // The examples as the webhook would admit them.
    let injected = dir.path().join("examples-injected.yaml");
    let examples = std::fs::read_to_string(deploy.join("examples/flood-model.yaml")).expect("e")
        + "---\n"
        + &std::fs::read_to_string(deploy.join("examples/hazard-api.yaml")).expect("e");
    let out = nexusctl_inject(&["-f", "-"], &examples);
    assert!(out.0, "nexusctl inject failed: {}", out.2);
    std::fs::write(&injected, &out.1).expect("write");

    let mut all = files.clone();
    all.extend(rendered.iter().cloned());
    all.push(injected);
    let report = Command::new("python3")
        .arg(data("validate.py"))
        .arg(K8S_VERSION)
        .args(&all)
        .output()
        .expect("python3 tests/kube/validate.py");
    assert!(
        report.status.success(),
        "validate.py: {}",
        String::from_utf8_lossy(&report.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&report.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("report line"))
        .collect();
    let failed: Vec<&Value> = lines.iter().filter(|l| l["result"] == "failed").collect();
    assert!(
        failed.is_empty(),
        "manifests failing strict validation: {failed:#?}"
    );
    // The CRD kinds kubernetes-validate has no schema for, checked against
    // tests/kube/schemas/ instead. Listed explicitly so a new one is noticed.
    let mut crd_kinds: Vec<&str> = lines
        .iter()
        .filter(|l| l["result"] == "crd-schema")
        .filter_map(|l| l["kind"].as_str())
        .collect();
    crd_kinds.sort();
    crd_kinds.dedup();
    assert_eq!(
        crd_kinds,
        [
            "Certificate",
            "ClusterSPIFFEID",
            "Component",
            "Issuer",
            "Kustomization"
        ]
    );
    let passed = lines.iter().filter(|l| l["result"] == "passed").count();
    eprintln!(
        "{} documents: {passed} passed kubernetes-validate --strict ({K8S_VERSION}), {} checked against CRD schemas",
        lines.len(),
        lines.len() - passed
    );
    // Every workload document under deploy/ was seen.
    for kind in [
        "Deployment",
        "Service",
        "MutatingWebhookConfiguration",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    ] {
        assert!(
            lines.iter().any(|l| l["kind"] == kind),
            "no {kind} validated"
        );
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            copy_tree(&path, &to.join(entry.file_name()));
        } else {
            std::fs::copy(&path, to.join(entry.file_name())).expect("copy");
        }
    }
}

fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_yaml(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// Runs `nexusctl inject ARGS` with `stdin`; (success, stdout, stderr).
fn nexusctl_inject(args: &[&str], stdin: &str) -> (bool, String, String, Option<i32>) {
    use std::io::Write;
    let mut child = Command::new(bin("nexusctl"))
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nexusctl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
    )
}

#[test]
fn nexusctl_inject_is_offline_injection_and_idempotent() {
    let input = std::fs::read_to_string(repo_root().join("deploy/examples/flood-model.yaml"))
        .expect("example");
    let (ok, once, stderr, _) =
        nexusctl_inject(&["-f", "-", "--config-map", "flood-config"], &input);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("Deployment/flood-model injected (sandbox: default)"),
        "{stderr}"
    );
    assert!(once.starts_with(&input[..input.find("---").expect("two documents")]));
    assert!(once.contains("name: flood-config"), "{once}");
    assert!(once.contains("/nexus/bin/nexus-launch"), "{once}");
    // From a file, a second pass changes nothing.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("injected.yaml");
    std::fs::write(&file, &once).expect("write");
    let (ok, twice, stderr, _) = nexusctl_inject(
        &[
            "-f",
            file.to_str().expect("utf-8"),
            "--config-map",
            "flood-config",
        ],
        "",
    );
    assert!(ok, "{stderr}");
    assert_eq!(once, twice);
    assert!(stderr.contains("skipped (already injected)"), "{stderr}");
}

#[test]
fn nexusctl_inject_refuses_sandboxing_a_container_without_command() {
    let input = "apiVersion: batch/v1
kind: Job
metadata: {name: nightly}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: validator, image: validator:1}]
";
    let (ok, stdout, stderr, code) = nexusctl_inject(&["-f", "-", "--sandbox", "default"], input);
    assert!(!ok);
    assert_eq!(code, Some(1));
    assert!(
        stdout.is_empty(),
        "nothing on stdout when refused: {stdout}"
    );
    assert!(stderr.contains("document 0 (Job/nightly)"), "{stderr}");
    assert!(stderr.contains("set `command`"), "{stderr}");
}

/// The Dockerfile's targets, as `(target, base image, body lines)`.
fn dockerfile_targets() -> Vec<(String, String, Vec<String>)> {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).expect("Dockerfile");
    let mut targets: Vec<(String, String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["FROM", image, "AS", name] => {
                targets.push(((*name).to_string(), (*image).to_string(), Vec::new()))
            }
            _ => {
                if let Some(last) = targets.last_mut() {
                    last.2.push(line.trim().to_string());
                }
            }
        }
    }
    targets
}

#[test]
fn the_dockerfile_builds_every_image_the_manifests_and_the_injector_use() {
    // No Docker engine runs here: this checks the recipe against its users instead.
    let targets = dockerfile_targets();
    let header = std::fs::read_to_string(repo_root().join("Dockerfile")).expect("Dockerfile");
    let target_of = |image: &str| -> String {
        let line = header
            .lines()
            .find(|l| {
                l.starts_with('#') && l.contains("--target") && l.contains(&format!("-t {image} "))
            })
            .unwrap_or_else(|| panic!("the Dockerfile says how to build {image}"));
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words
            .iter()
            .position(|w| *w == "--target")
            .expect("--target");
        words[at + 1].to_string()
    };
    let body = |target: &str| -> Vec<String> {
        targets
            .iter()
            .find(|(name, _, _)| name == target)
            .unwrap_or_else(|| panic!("no `FROM … AS {target}` in the Dockerfile"))
            .2
            .clone()
    };
    // Every Nexus image a manifest under deploy/ runs.
    let mut files = Vec::new();
    collect_yaml(&repo_root().join("deploy"), &mut files);
    let mut images = std::collections::BTreeSet::new();
    for file in &files {
        for line in std::fs::read_to_string(file).unwrap().lines() {
            if let Some(image) = line.trim().strip_prefix("image: ")
                && image.starts_with("ghcr.io/nexus/")
            {
                images.insert(image.to_string());
            }
        }
    }
    // And the two the injector adds.
    let inject = InjectConfig::default();
    images.insert(inject.sidecar_image.clone());
    images.insert(inject.launcher_image.clone());
    assert!(images.len() >= 4, "{images:?}");
    for image in &images {
        let target = target_of(image);
        let lines = body(&target);
        let binary = image
            .rsplit('/')
            .next()
            .and_then(|n| n.split(':').next())
            .unwrap();
        if image == &inject.launcher_image {
            // The init container copies LAUNCHER_DIR; the wrapped command runs
            // LAUNCHER_BIN with LAUNCHER_DIR/profiles/<profile>.toml.
            assert!(
                lines.contains(&format!(
                    "COPY --from=build /out{} {}",
                    nexus_kube::inject::LAUNCHER_DIR,
                    nexus_kube::inject::LAUNCHER_DIR
                )),
                "{lines:?}"
            );
            let build = body("build").join("\n");
            let bin_dir = nexus_kube::inject::LAUNCHER_BIN
                .rsplit_once('/')
                .map(|(d, _)| d)
                .unwrap();
            assert!(build.contains(&format!("/out{bin_dir}/")), "{build}");
            assert!(
                build.contains("+crt-static"),
                "the launcher is static: {build}"
            );
            assert!(
                build.contains(&format!(
                    "/out{}/profiles/",
                    nexus_kube::inject::LAUNCHER_DIR
                )),
                "{build}"
            );
        } else {
            assert!(
                lines.contains(&format!(
                    "COPY --from=build /src/target/release/{binary} /usr/local/bin/{binary}"
                )),
                "{image}: {lines:?}"
            );
            assert!(
                lines.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]")),
                "{image}: {lines:?}"
            );
        }
        // Non-root, as the manifests and the injector run it.
        assert!(lines.contains(&"USER 65532:65532".to_string()), "{image}");
        assert!(
            image.ends_with(&format!(":{}", env!("CARGO_PKG_VERSION"))),
            "{image} is tagged with the workspace version"
        );
    }
    assert_eq!(inject.sidecar_uid, 65532);
}

/// What the images' binaries are built from: the development CA, PKI and Workload API
/// (crates/dev-identity, whose keys are public) are reachable from nexusctl only. The
/// sidecar, the gateway and the launcher do not depend on them, nor on the certificate
/// minting they need (rcgen), in any build (dev-dependencies aside).
#[test]
fn production_binaries_do_not_depend_on_the_development_identity() {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--manifest-path",
        ])
        .arg(repo_root().join("Cargo.toml"))
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let name_of = |id: &str| -> String {
        meta["packages"]
            .as_array()
            .and_then(|packages| packages.iter().find(|p| p["id"] == id))
            .and_then(|p| p["name"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    let nodes = meta["resolve"]["nodes"].as_array().expect("resolve nodes");
    // Everything `package` links: its normal and build dependencies, transitively.
    let linked = |package: &str| -> std::collections::BTreeSet<String> {
        let mut seen = std::collections::BTreeSet::new();
        let mut todo: Vec<String> = nodes
            .iter()
            .filter(|n| name_of(n["id"].as_str().unwrap_or_default()) == package)
            .filter_map(|n| n["id"].as_str().map(str::to_string))
            .collect();
        assert!(!todo.is_empty(), "{package} is not in the workspace");
        while let Some(id) = todo.pop() {
            if !seen.insert(name_of(&id)) {
                continue;
            }
            let Some(node) = nodes.iter().find(|n| n["id"] == id.as_str()) else {
                continue;
            };
            for dep in node["deps"].as_array().into_iter().flatten() {
                let kinds = dep["dep_kinds"].as_array().cloned().unwrap_or_default();
                if kinds.iter().any(|k| k["kind"] != "dev") {
                    todo.push(dep["pkg"].as_str().unwrap_or_default().to_string());
                }
            }
        }
        seen
    };
    assert!(
        linked("nexusctl").contains("nexus-dev-identity"),
        "the walk sees nexusctl's development identity"
    );
    for binary in ["nexus-sidecar", "nexus-gateway", "nexus-launch"] {
        let deps = linked(binary);
        for dev_only in ["nexus-dev-identity", "rcgen"] {
            assert!(!deps.contains(dev_only), "{binary} links {dev_only}");
        }
    }
}
