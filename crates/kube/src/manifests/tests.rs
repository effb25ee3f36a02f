//! Offline injection of YAML streams.

use super::*;
use crate::inject::{INJECTED_ANNOTATION, SIDECAR_CONTAINER};

const CONFIG_MAP: &str = "# settings, kept verbatim
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings   # a comment
data:
  key: 'quoted'
";

const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: flood-model
  namespace: plugins
spec:
  replicas: 2
  selector:
    matchLabels:
      app: flood-model
  template:
    metadata:
      labels:
        app: flood-model
    spec:
      serviceAccountName: flood-model
      containers:
      - name: flood-model
        image: registry.example/flood-model:1
        command: [python, -m, flood_model]
";

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: flood-model}
spec:
  ports: [{port: 80, targetPort: 15006}]
";

fn stream() -> String {
    format!("{CONFIG_MAP}---\n{DEPLOYMENT}--- # the service\n{SERVICE}")
}

fn docs(yaml: &str) -> Vec<yaml_serde::Value> {
    split_documents(yaml)
        .into_iter()
        .map(|d| yaml_serde::from_str(d.text).expect("yaml"))
        .collect()
}

#[test]
fn workloads_are_injected_and_everything_else_is_copied_byte_for_byte() {
    let out = inject_manifests(&stream(), &InjectConfig::default(), &Overrides::default())
        .expect("inject");
    assert!(out.yaml.starts_with(CONFIG_MAP), "{}", out.yaml);
    assert!(
        out.yaml.ends_with(&format!("--- # the service\n{SERVICE}")),
        "{}",
        out.yaml
    );
    assert_eq!(
        out.workloads,
        vec![WorkloadReport {
            document: 1,
            object: "Deployment/flood-model".into(),
            outcome: Outcome::Injected { sandbox: None },
        }]
    );
    let docs = docs(&out.yaml);
    assert_eq!(docs.len(), 3);
    let deployment = &docs[1];
    // Key order is the author's: apiVersion, kind, metadata, spec.
    let keys: Vec<&str> = deployment
        .as_mapping()
        .expect("map")
        .keys()
        .filter_map(|k| k.as_str())
        .collect();
    assert_eq!(keys, ["apiVersion", "kind", "metadata", "spec"]);
    let template = &deployment["spec"]["template"];
    assert_eq!(
        template["spec"]["initContainers"][0]["name"].as_str(),
        Some(SIDECAR_CONTAINER)
    );
    assert_eq!(
        template["metadata"]["annotations"][INJECTED_ANNOTATION].as_str(),
        Some(crate::config::VERSION)
    );
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(2));
}

#[test]
fn a_second_pass_changes_nothing() {
    let cfg = InjectConfig::default();
    let overrides = Overrides {
        sandbox_profile: Some("default".into()),
        config_map: Some("flood-config".into()),
    };
    let once = inject_manifests(&stream(), &cfg, &overrides).expect("once");
    let twice = inject_manifests(&once.yaml, &cfg, &overrides).expect("twice");
    assert_eq!(once.yaml, twice.yaml);
    assert_eq!(twice.workloads[0].outcome, Outcome::AlreadyInjected);
}

#[test]
fn overrides_sandbox_and_config_map() {
    let overrides = Overrides {
        sandbox_profile: Some("default".into()),
        config_map: Some("flood-config".into()),
    };
    let out = inject_manifests(DEPLOYMENT, &InjectConfig::default(), &overrides).expect("inject");
    let doc = &docs(&out.yaml)[0];
    let spec = &doc["spec"]["template"]["spec"];
    assert_eq!(
        spec["containers"][0]["command"][0].as_str(),
        Some("/nexus/bin/nexus-launch")
    );
    let volumes = spec["volumes"].as_sequence().expect("volumes");
    assert!(
        volumes
            .iter()
            .any(|v| v["configMap"]["name"].as_str() == Some("flood-config"))
    );
    assert_eq!(
        out.workloads[0].outcome,
        Outcome::Injected {
            sandbox: Some("default".into())
        }
    );
}

#[test]
fn sandbox_without_command_names_the_document_and_the_fix() {
    let no_command = DEPLOYMENT.replace("        command: [python, -m, flood_model]\n", "");
    let input = format!("{CONFIG_MAP}---\n{no_command}");
    let overrides = Overrides {
        sandbox_profile: Some("default".into()),
        ..Default::default()
    };
    let err = inject_manifests(&input, &InjectConfig::default(), &overrides)
        .expect_err("refused")
        .to_string();
    assert!(
        err.starts_with("document 1 (Deployment/flood-model)"),
        "{err}"
    );
    assert!(err.contains("set `command`"), "{err}");
}

#[test]
fn lists_opt_outs_and_odd_documents() {
    let list = "apiVersion: v1
kind: List
items:
- apiVersion: batch/v1
  kind: Job
  metadata: {name: once}
  spec:
    template:
      spec:
        restartPolicy: Never
        containers: [{name: job, image: job:1}]
- apiVersion: v1
  kind: Pod
  metadata:
    name: skip
    annotations: {nexus.io/inject: disabled}
  spec:
    containers: [{name: p, image: p:1}]
";
    let input = format!("# only a comment\n---\n{list}---\n---\n");
    let out =
        inject_manifests(&input, &InjectConfig::default(), &Overrides::default()).expect("inject");
    assert!(
        out.yaml.starts_with("# only a comment\n---\n"),
        "{}",
        out.yaml
    );
    assert!(out.yaml.ends_with("---\n---\n"), "{}", out.yaml);
    let outcomes: Vec<_> = out.workloads.iter().map(|w| w.outcome.clone()).collect();
    assert_eq!(
        outcomes,
        vec![Outcome::Injected { sandbox: None }, Outcome::OptedOut]
    );
    let doc = &docs(&out.yaml)[1];
    assert_eq!(
        doc["items"][0]["spec"]["template"]["spec"]["initContainers"][0]["name"].as_str(),
        Some(SIDECAR_CONTAINER)
    );
    assert!(doc["items"][1]["spec"].get("initContainers").is_none());
}

#[test]
fn invalid_yaml_names_the_document() {
    let err = inject_manifests(
        "kind: ConfigMap\n---\nkind: [unclosed\n",
        &InjectConfig::default(),
        &Overrides::default(),
    )
    .expect_err("bad yaml")
    .to_string();
    assert!(err.starts_with("document 1: not valid YAML"), "{err}");
}

#[test]
fn crlf_and_no_trailing_newline_survive() {
    let input = "kind: ConfigMap\r\napiVersion: v1\r\n---\r\nkind: Secret\r\napiVersion: v1";
    let out =
        inject_manifests(input, &InjectConfig::default(), &Overrides::default()).expect("inject");
    assert_eq!(out.yaml, input);
}
