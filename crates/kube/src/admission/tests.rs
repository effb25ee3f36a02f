//! The webhook's answers, for every kind of input.

use serde_json::{Value, json};

use super::*;
use crate::inject::{INJECTED_ANNOTATION, SANDBOX_ANNOTATION};

fn review_of(object: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "u-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "plugins", "operation": "CREATE",
            "userInfo": {"username": "alice"},
            "object": object
        }
    })
}

fn pod(annotations: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "p", "namespace": "plugins", "annotations": annotations},
           "spec": {"containers": [{"name": "m", "image": "m:1", "command": ["/m"]}]}})
}

fn answer(review: &Value) -> (u16, Value) {
    let (status, body) = super::review(
        &serde_json::to_vec(review).expect("encode"),
        &InjectConfig::default(),
    );
    (
        status,
        serde_json::from_slice(&body).expect("answer is JSON"),
    )
}

#[test]
fn a_pod_gets_a_base64_jsonpatch_that_yields_the_injected_pod() {
    let original = pod(json!({}));
    let (status, doc) = answer(&review_of(original.clone()));
    assert_eq!(status, 200);
    let response = &doc["response"];
    assert_eq!(doc["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(doc["kind"], "AdmissionReview");
    assert_eq!(response["uid"], "u-1");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    assert!(
        response["patch"].is_string(),
        "patch must be base64: {response}"
    );
    let patch = answer_patch(&serde_json::to_vec(&doc).expect("encode")).expect("patch");
    let mut patched = original.clone();
    json_patch::patch(&mut patched, &patch).expect("the patch applies");
    let mut expected = original;
    crate::inject::inject_pod(&mut expected, &InjectConfig::default()).expect("inject");
    assert_eq!(patched, expected);
}

#[test]
fn already_injected_and_opted_out_pods_are_allowed_without_a_patch() {
    for annotations in [
        json!({INJECTED_ANNOTATION: "0.0.1"}),
        json!({"nexus.io/inject": "disabled"}),
    ] {
        let (status, doc) = answer(&review_of(pod(annotations.clone())));
        assert_eq!(status, 200);
        assert_eq!(doc["response"]["allowed"], true, "{annotations}");
        assert!(doc["response"].get("patch").is_none(), "{annotations}");
        assert!(doc["response"].get("patchType").is_none(), "{annotations}");
    }
}

#[test]
fn a_sandboxed_pod_without_command_is_denied_with_the_fix() {
    let mut p = pod(json!({SANDBOX_ANNOTATION: "default"}));
    p["spec"]["containers"][0]
        .as_object_mut()
        .expect("container")
        .remove("command");
    let (status, doc) = answer(&review_of(p));
    assert_eq!(status, 200);
    assert_eq!(doc["response"]["allowed"], false);
    assert_eq!(doc["response"]["uid"], "u-1");
    let message = doc["response"]["status"]["message"]
        .as_str()
        .expect("message");
    assert!(message.contains("set `command`"), "{message}");
    assert_eq!(doc["response"]["status"]["code"], 400);
}

#[test]
fn other_kinds_subresources_and_operations_are_allowed_with_a_warning() {
    let mut deployment = review_of(json!({"apiVersion": "apps/v1", "kind": "Deployment"}));
    deployment["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    deployment["request"]["resource"] =
        json!({"group": "apps", "version": "v1", "resource": "deployments"});
    let mut status_sub = review_of(pod(json!({})));
    status_sub["request"]["subResource"] = json!("status");
    let mut update = review_of(pod(json!({})));
    update["request"]["operation"] = json!("UPDATE");
    let mut no_object = review_of(Value::Null);
    no_object["request"]["operation"] = json!("CREATE");
    for (case, review, needle) in [
        ("deployment", deployment, "apps/v1/Deployment"),
        ("subresource", status_sub, "subresource status"),
        ("update", update, "created"),
        ("no object", no_object, "no pod"),
    ] {
        let (status, doc) = answer(&review);
        assert_eq!(status, 200, "{case}");
        assert_eq!(doc["response"]["allowed"], true, "{case}");
        assert!(doc["response"].get("patch").is_none(), "{case}");
        let warning = doc["response"]["warnings"][0].as_str().unwrap_or("");
        assert!(warning.contains(needle), "{case}: {warning}");
    }
}

#[test]
fn malformed_bodies_get_400_with_a_json_error() {
    let cfg = InjectConfig::default();
    for (case, body, needle) in [
        ("not json", b"{\"kind\": ".to_vec(), "not JSON"),
        ("empty", Vec::new(), "not JSON"),
        (
            "v1beta1",
            serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}))
                .expect("encode"),
            "admissionReviewVersions",
        ),
        (
            "no request",
            serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}))
                .expect("encode"),
            "no `request`",
        ),
        (
            "request without uid",
            serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}))
                .expect("encode"),
            "not an AdmissionReview",
        ),
        ("array", b"[]".to_vec(), "expected kind AdmissionReview"),
    ] {
        let (status, body) = review(&body, &cfg);
        assert_eq!(status, 400, "{case}");
        let doc: Value = serde_json::from_slice(&body).expect("JSON error");
        let error = doc["error"].as_str().expect("error field");
        assert!(error.contains(needle), "{case}: {error}");
    }
}

#[test]
fn oversized_reviews_get_413() {
    let cfg = InjectConfig {
        max_review_bytes: 1024,
        ..Default::default()
    };
    let mut p = pod(json!({}));
    p["metadata"]["annotations"]["filler"] = json!("x".repeat(2048));
    let body = serde_json::to_vec(&review_of(p)).expect("encode");
    let (status, body) = review(&body, &cfg);
    assert_eq!(status, 413);
    let doc: Value = serde_json::from_slice(&body).expect("JSON error");
    assert!(
        doc["error"]
            .as_str()
            .unwrap_or("")
            .contains("max_review_bytes (1024)"),
        "{doc}"
    );
    assert_eq!(InjectConfig::default().max_review_bytes, 3 * 1024 * 1024);
}

#[test]
fn an_admitted_plugin_version_reaches_the_sidecar_and_cannot_be_claimed_by_the_pod() {
    let run = crate::inject::PluginRun {
        uid: "6f1c2d3e-0000-4000-8000-000000000001".into(),
        version: "1.4.2".into(),
        image_digest: format!("sha256:{}", "a".repeat(64)),
    };
    // The pod's author claims another version in the annotations: the webhook's wins.
    let original = pod(json!({"nexus.io/plugin-version": "9.9.9"}));
    let body = serde_json::to_vec(&review_of(original.clone())).expect("encode");
    let (status, answer_body) = review_plugin(&body, &InjectConfig::default(), Some(&run));
    assert_eq!(status, 200);
    let patch = answer_patch(&answer_body).expect("patch");
    let mut patched = original;
    json_patch::patch(&mut patched, &patch).expect("the patch applies");
    let annotations = &patched["metadata"]["annotations"];
    assert_eq!(annotations["nexus.io/plugin-uid"], run.uid.as_str());
    assert_eq!(annotations["nexus.io/plugin-version"], "1.4.2");
    assert_eq!(
        annotations["nexus.io/plugin-image-digest"],
        run.image_digest.as_str()
    );
    let sidecar = patched["spec"]["initContainers"]
        .as_array()
        .expect("init containers")
        .iter()
        .find(|c| c["name"] == crate::inject::SIDECAR_CONTAINER)
        .expect("the sidecar");
    let env: Vec<(String, String)> = sidecar["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|v| {
            Some((
                v["name"].as_str()?.to_string(),
                v["value"].as_str()?.to_string(),
            ))
        })
        .collect();
    for (name, value) in [
        ("NEXUS_PLUGIN_UID", run.uid.as_str()),
        ("NEXUS_PLUGIN_VERSION", "1.4.2"),
        ("NEXUS_PLUGIN_IMAGE_DIGEST", run.image_digest.as_str()),
    ] {
        assert_eq!(
            env.iter().filter(|(n, _)| n == name).collect::<Vec<_>>(),
            vec![&(name.to_string(), value.to_string())],
            "{env:?}"
        );
    }
    // A pod injected offline (`nexusctl inject`) and then admitted is marked too.
    let mut offline = pod(json!({}));
    crate::inject::inject_pod(&mut offline, &InjectConfig::default()).expect("inject");
    let body = serde_json::to_vec(&review_of(offline.clone())).expect("encode");
    let (_, answer_body) = review_plugin(&body, &InjectConfig::default(), Some(&run));
    let patch = answer_patch(&answer_body).expect("a patch for the version");
    json_patch::patch(&mut offline, &patch).expect("the patch applies");
    assert_eq!(
        offline["metadata"]["annotations"]["nexus.io/plugin-version"],
        "1.4.2"
    );
}
