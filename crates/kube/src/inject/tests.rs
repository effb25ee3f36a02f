//! Injection on JSON pods and workloads.

use serde_json::{Value, json};

use super::*;

fn pod(annotations: Value, command: Option<Value>) -> Value {
    let mut container = json!({"name": "model", "image": "model:1", "args": ["--serve"]});
    if let Some(command) = command {
        container["command"] = command;
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "annotations": annotations},
        "spec": {"containers": [container], "initContainers": [{"name": "migrate", "image": "m:1"}]}
    })
}

fn injected(mut pod: Value, cfg: &InjectConfig) -> Value {
    inject_pod(&mut pod, cfg).expect("inject");
    pod
}

#[test]
fn sidecar_is_a_native_sidecar_placed_first_with_socket_and_config() {
    let pod = injected(pod(json!({}), None), &InjectConfig::default());
    let init = pod["spec"]["initContainers"].as_array().expect("init");
    assert_eq!(init.len(), 2);
    let sidecar = &init[0];
    assert_eq!(sidecar["name"], SIDECAR_CONTAINER);
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(
        init[1]["name"], "migrate",
        "the pod's own init containers follow"
    );
    assert_eq!(
        sidecar["args"],
        json!(["--config", "/etc/nexus/sidecar/sidecar.toml"])
    );
    let env: Vec<(&str, &str)> = sidecar["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or(""),
                e["value"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(env.contains(&(
        "SPIFFE_ENDPOINT_SOCKET",
        "unix:///spiffe-workload-api/spire-agent.sock"
    )));
    assert!(env.contains(&("NEXUS_ADMIN_LISTEN", "0.0.0.0:15090")));
    assert!(!env.iter().any(|(k, _)| k.starts_with("NEXUS_INBOUND")));
    assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/ready");
    let volumes = &pod["spec"]["volumes"];
    assert_eq!(
        volumes[0]["csi"],
        json!({"driver": "csi.spiffe.io", "readOnly": true})
    );
    assert_eq!(volumes[1]["configMap"]["name"], "nexus-sidecar");
    assert_eq!(volumes[2]["configMap"]["optional"], true);
    assert_eq!(pod["metadata"]["annotations"][INJECTED_ANNOTATION], VERSION);
    // Not sandboxed: the app container is untouched.
    assert_eq!(
        pod["spec"]["containers"][0],
        json!({"name": "model", "image": "model:1", "args": ["--serve"]})
    );
}

#[test]
fn host_path_mode_and_inbound_annotations() {
    let cfg = InjectConfig {
        workload_api: WorkloadApiSocket::HostPath {
            path: "/run/spire/sockets".into(),
            socket_file: "agent.sock".into(),
        },
        ..Default::default()
    };
    let pod = injected(
        pod(
            json!({INBOUND_APP_ANNOTATION: "127.0.0.1:8080",
                   INBOUND_ALLOWED_IDS_ANNOTATION: "spiffe://nexus.local/ns/plugins/*"}),
            None,
        ),
        &cfg,
    );
    assert_eq!(
        pod["spec"]["volumes"][0]["hostPath"],
        json!({"path": "/run/spire/sockets", "type": "Directory"})
    );
    let env = &pod["spec"]["initContainers"][0]["env"];
    let get = |name: &str| {
        env.as_array()
            .and_then(|a| a.iter().find(|e| e["name"] == name))
            .map(|e| e["value"].clone())
    };
    assert_eq!(
        get("SPIFFE_ENDPOINT_SOCKET"),
        Some(json!("unix:///spiffe-workload-api/agent.sock"))
    );
    assert_eq!(get("NEXUS_INBOUND_LISTEN"), Some(json!("0.0.0.0:15006")));
    assert_eq!(get("NEXUS_INBOUND_APP"), Some(json!("127.0.0.1:8080")));
    assert_eq!(
        get("NEXUS_INBOUND_ALLOWED_IDS"),
        Some(json!("spiffe://nexus.local/ns/plugins/*"))
    );
}

#[test]
fn sandbox_wraps_the_original_command_and_sets_the_localhost_profile() {
    let pod = injected(
        pod(
            json!({SANDBOX_ANNOTATION: "default"}),
            Some(json!(["python", "-m", "model"])),
        ),
        &InjectConfig::default(),
    );
    let init = pod["spec"]["initContainers"].as_array().expect("init");
    assert_eq!(
        init.iter().map(|c| c["name"].clone()).collect::<Vec<_>>(),
        vec![
            json!(SIDECAR_CONTAINER),
            json!(LAUNCHER_INIT_CONTAINER),
            json!("migrate")
        ]
    );
    let app = &pod["spec"]["containers"][0];
    assert_eq!(
        app["command"],
        json!([
            "/nexus/bin/nexus-launch",
            "--profile",
            "/nexus/profiles/default.toml",
            "--",
            "python",
            "-m",
            "model",
            "--serve"
        ])
    );
    assert!(app.get("args").is_none());
    assert_eq!(
        app["securityContext"]["seccompProfile"],
        json!({"type": "Localhost", "localhostProfile": "nexus/default.json"})
    );
    assert_eq!(
        app["volumeMounts"],
        json!([
            {"name": "nexus-launcher", "mountPath": "/nexus", "readOnly": true},
            {"name": "nexus-reports", "mountPath": "/var/run/nexus-reports", "readOnly": true}
        ])
    );
    let env = app["env"].as_array().expect("env");
    // Violations go to the in-pod socket with the per-pod token, never to a TCP port.
    assert!(env.iter().any(|e| e["name"] == "NEXUS_SIGNAL_URL"
        && e["value"] == "unix:///var/run/nexus-reports/signals.sock"));
    assert!(
        env.iter().any(|e| e["name"] == "NEXUS_REPORT_TOKEN_FILE"
            && e["value"] == "/var/run/nexus-reports/token")
    );
    let sidecar = &init[0];
    let sidecar_env = sidecar["env"].as_array().expect("sidecar env");
    assert!(
        sidecar_env
            .iter()
            .any(|e| e["name"] == "NEXUS_REPORT_SOCKET"
                && e["value"] == "/var/run/nexus-reports/signals.sock")
    );
    assert!(
        sidecar["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .any(|m| m["name"] == "nexus-reports" && m.get("readOnly").is_none())
    );
    assert!(env.iter().any(|e| e["name"] == "NEXUS_WORKLOAD_ID"
        && e["value"]
            == "spiffe://nexus.local/ns/$(NEXUS_POD_NAMESPACE)/sa/$(NEXUS_SERVICE_ACCOUNT)"));
    assert!(
        pod["spec"]["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .any(|v| v["name"] == "nexus-launcher" && v["emptyDir"]["sizeLimit"] == "64Mi")
    );
    assert!(
        pod["spec"]["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .any(|v| v["name"] == "nexus-reports" && v["emptyDir"]["medium"] == "Memory")
    );
}

#[test]
fn sandbox_picks_the_named_container() {
    let mut p = pod(
        json!({SANDBOX_ANNOTATION: "strict", SANDBOX_CONTAINER_ANNOTATION: "second"}),
        Some(json!(["a"])),
    );
    p["spec"]["containers"]
        .as_array_mut()
        .expect("containers")
        .push(json!({"name": "second", "image": "s:1", "command": ["/bin/s"]}));
    let pod = injected(p, &InjectConfig::default());
    assert_eq!(pod["spec"]["containers"][0]["command"], json!(["a"]));
    assert_eq!(pod["spec"]["containers"][1]["command"][4], json!("/bin/s"));
    let mut p = pod_without_name();
    let err = inject_pod(&mut p, &InjectConfig::default()).expect_err("unknown container");
    assert!(matches!(err, InjectError::NoSuchContainer { .. }), "{err}");
}

fn pod_without_name() -> Value {
    pod(
        json!({SANDBOX_ANNOTATION: "default", SANDBOX_CONTAINER_ANNOTATION: "nope"}),
        Some(json!(["a"])),
    )
}

#[test]
fn sandbox_without_command_is_refused_and_the_pod_left_as_it_was() {
    let original = pod(json!({SANDBOX_ANNOTATION: "default"}), None);
    let mut p = original.clone();
    let err = inject_pod(&mut p, &InjectConfig::default()).expect_err("no command");
    let message = err.to_string();
    assert!(message.contains("set `command`"), "{message}");
    assert!(message.contains("`model`"), "{message}");
    assert_eq!(p, original);
}

#[test]
fn bad_profile_names_and_values_are_refused() {
    for profile in ["../etc", "Default", "", "a/b", "x..y"] {
        let mut p = pod(json!({SANDBOX_ANNOTATION: profile}), Some(json!(["a"])));
        let err = inject_pod(&mut p, &InjectConfig::default()).expect_err(profile);
        assert!(
            matches!(err, InjectError::BadProfileName { .. }),
            "{profile}: {err}"
        );
    }
    let mut p = pod(json!({INJECT_KEY: "nah"}), None);
    let err = inject_pod(&mut p, &InjectConfig::default()).expect_err("bad value");
    assert!(err.to_string().contains("`enabled` or `disabled`"), "{err}");
}

#[test]
fn injection_is_idempotent() {
    let cfg = InjectConfig::default();
    for annotations in [json!({}), json!({SANDBOX_ANNOTATION: "default"})] {
        let once = injected(pod(annotations, Some(json!(["run"]))), &cfg);
        let mut twice = once.clone();
        assert_eq!(
            inject_pod(&mut twice, &cfg).expect("second pass"),
            Outcome::AlreadyInjected
        );
        assert_eq!(once, twice);
    }
    // A sidecar container without the marker (e.g. annotations stripped) is also "done".
    let mut once = injected(pod(json!({}), None), &cfg);
    if let Some(a) = once["metadata"]["annotations"].as_object_mut() {
        a.remove(INJECTED_ANNOTATION);
    }
    let before = once.clone();
    assert_eq!(
        inject_pod(&mut once, &cfg).expect("pass"),
        Outcome::AlreadyInjected
    );
    assert_eq!(once, before);
}

#[test]
fn opt_out_by_annotation_or_label() {
    let cfg = InjectConfig::default();
    let mut p = pod(json!({INJECT_KEY: "disabled"}), None);
    let before = p.clone();
    assert_eq!(inject_pod(&mut p, &cfg).expect("ok"), Outcome::OptedOut);
    assert_eq!(p, before);
    let mut p = pod(json!({}), None);
    p["metadata"]["labels"] = json!({INJECT_KEY: "disabled"});
    assert_eq!(inject_pod(&mut p, &cfg).expect("ok"), Outcome::OptedOut);
}

#[test]
fn names_injection_needs_must_be_free() {
    let mut p = pod(json!({}), None);
    p["spec"]["volumes"] = json!([{"name": "nexus-config", "emptyDir": {}}]);
    let err = inject_pod(&mut p, &InjectConfig::default()).expect_err("taken");
    assert!(
        err.to_string().contains("volume named `nexus-config`"),
        "{err}"
    );
}

#[test]
fn every_workload_kind_gets_its_pod_template_injected() {
    let template = json!({"metadata": {"labels": {"app": "x"}},
                          "spec": {"containers": [{"name": "x", "image": "x"}]}});
    let cases = [
        ("apps/v1", "Deployment", json!({"template": template})),
        ("apps/v1", "StatefulSet", json!({"template": template})),
        ("apps/v1", "DaemonSet", json!({"template": template})),
        ("apps/v1", "ReplicaSet", json!({"template": template})),
        ("batch/v1", "Job", json!({"template": template})),
        (
            "batch/v1",
            "CronJob",
            json!({"schedule": "@daily", "jobTemplate": {"spec": {"template": template}}}),
        ),
    ];
    for (api_version, kind, spec) in cases {
        let mut obj = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": "w"}, "spec": spec});
        let outcome = inject_object(&mut obj, &InjectConfig::default()).expect(kind);
        assert_eq!(outcome, Some(Outcome::Injected { sandbox: None }), "{kind}");
        let pointer = pod_template_pointer(api_version, kind).expect(kind);
        let t = obj.pointer(pointer).expect(kind);
        assert_eq!(
            t["spec"]["initContainers"][0]["name"], SIDECAR_CONTAINER,
            "{kind}"
        );
        assert_eq!(t["metadata"]["labels"]["app"], "x", "{kind}");
        assert!(
            obj["metadata"].get("annotations").is_none(),
            "{kind}: marker goes on the pod template"
        );
    }
    let mut cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
    assert_eq!(
        inject_object(&mut cm, &InjectConfig::default()).expect("cm"),
        None
    );
    // A Deployment in another group is not ours.
    let mut other = json!({"apiVersion": "example.com/v1", "kind": "Deployment", "spec": {}});
    assert_eq!(
        inject_object(&mut other, &InjectConfig::default()).expect("crd"),
        None
    );
}

#[test]
fn template_without_metadata_gets_the_marker() {
    let mut obj = json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "x", "image": "x"}]}}}});
    inject_object(&mut obj, &InjectConfig::default()).expect("inject");
    assert_eq!(
        obj["spec"]["template"]["metadata"]["annotations"][INJECTED_ANNOTATION],
        VERSION
    );
}

#[test]
fn malformed_pods_are_errors_not_panics() {
    let cfg = InjectConfig::default();
    for bad in [
        json!([]),
        json!({"spec": []}),
        json!({"spec": {"containers": {}}}),
        json!({"spec": {"containers": []}}),
        json!({"metadata": [], "spec": {"containers": [{"name": "a"}]}}),
        json!({"metadata": {"annotations": {SANDBOX_ANNOTATION: "default"}},
               "spec": {"containers": [{"name": "a", "command": "not-a-list"}]}}),
        json!({"spec": {"containers": [{"name": "a"}], "volumes": 3}}),
    ] {
        let mut p = bad.clone();
        assert!(inject_pod(&mut p, &cfg).is_err(), "{bad}");
    }
}

#[test]
fn the_pod_grace_period_holds_the_sidecar_shutdown_grace() {
    let cfg = InjectConfig {
        sidecar_shutdown_grace_seconds: 50,
        ..InjectConfig::default()
    };
    // No period (Kubernetes' 30s) or a shorter one: raised to grace + flush margin.
    let pod = injected(pod(json!({}), None), &cfg);
    assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 55);
    let mut short = pod_with_grace(10);
    inject_pod(&mut short, &cfg).expect("inject");
    assert_eq!(short["spec"]["terminationGracePeriodSeconds"], 55);
    // A longer period the pod asks for is kept.
    let mut long = pod_with_grace(300);
    inject_pod(&mut long, &cfg).expect("inject");
    assert_eq!(long["spec"]["terminationGracePeriodSeconds"], 300);
    let env = &pod["spec"]["initContainers"][0]["env"];
    assert!(
        env.as_array()
            .expect("env")
            .iter()
            .any(|e| e["name"] == "NEXUS_SHUTDOWN_GRACE" && e["value"] == "50s"),
        "{env}"
    );
}

fn pod_with_grace(seconds: i64) -> Value {
    let mut p = pod(json!({}), None);
    p["spec"]["terminationGracePeriodSeconds"] = json!(seconds);
    p
}
