//! `cargo run --release -p nexus-kube --example admission_bench`
//!
//! 1000 AdmissionReviews (pods of Deployments, Jobs and CronJobs, a third of them
//! sandboxed) through `admission::review`, against a baseline that only parses each review
//! and serializes an allowed answer. Prints p50/p99 of both and what injection adds.
//! Target (issue 7): injection adds at most 5 ms at p99.

use std::time::{Duration, Instant};

use nexus_kube::{InjectConfig, admission};
use serde_json::{Value, json};

fn pod(i: usize) -> (Value, &'static str) {
    let (owner, owner_kind, restart) = match i % 3 {
        0 => ("flood-model-7d9f8b6c5", "ReplicaSet", "Always"),
        1 => ("risk-batch", "Job", "Never"),
        _ => ("nightly-validate-29318400", "Job", "OnFailure"),
    };
    let mut annotations = json!({"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"});
    if i % 3 == 2 {
        annotations["nexus.io/sandbox"] = json!("default");
    }
    let pod = json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {
            "generateName": format!("{owner}-"), "namespace": "plugins",
            "labels": {"app.kubernetes.io/name": owner, "pod-template-hash": format!("{i:08x}")},
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": if owner_kind == "Job" { "batch/v1" } else { "apps/v1" },
                                 "kind": owner_kind, "name": owner, "uid": format!("uid-{i}"),
                                 "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}],
                "defaultMode": 420}}],
            "containers": [{
                "name": "model", "image": "registry.example/plugins/model:1.0.0",
                "command": ["python", "-m", "model"], "args": ["--clause", format!("c-{i}")],
                "env": [{"name": "UPSTREAM", "value": "http://127.0.0.1:15001"}],
                "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}},
                "volumeMounts": [{"name": "kube-api-access-x7k2p", "readOnly": true,
                                  "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"}],
            "restartPolicy": restart, "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "model", "serviceAccount": "model", "securityContext": {},
            "schedulerName": "default-scheduler", "priority": 0, "enableServiceLinks": true
        },
        "status": {}
    });
    (pod, owner_kind)
}

fn review(i: usize) -> Vec<u8> {
    let (object, _) = pod(i);
    serde_json::to_vec(&json!({
        "kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": format!("00000000-0000-0000-0000-{i:012}"),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "plugins", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object, "oldObject": null, "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    }))
    .unwrap_or_default()
}

/// Parse the review and answer "allowed" with kube's types, nothing else.
fn baseline(body: &[u8]) -> Vec<u8> {
    let review: kube::core::admission::AdmissionReview<kube::core::DynamicObject> =
        match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(_) => return Vec::new(),
        };
    let Ok(request) = review.try_into() else {
        return Vec::new();
    };
    let request: kube::core::admission::AdmissionRequest<kube::core::DynamicObject> = request;
    let response = kube::core::admission::AdmissionResponse::from(&request).into_review();
    serde_json::to_vec(&response).unwrap_or_default()
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99))
}

fn main() {
    let cfg = InjectConfig::default();
    let reviews: Vec<Vec<u8>> = (0..1000).map(review).collect();
    // Warm up both paths (allocator, lazy statics).
    for body in reviews.iter().take(50) {
        let _ = admission::review(body, &cfg);
        let _ = baseline(body);
    }
    let mut inject = Vec::with_capacity(reviews.len());
    let mut base = Vec::with_capacity(reviews.len());
    let mut patched = 0;
    for body in &reviews {
        let start = Instant::now();
        let (status, answer) = admission::review(body, &cfg);
        inject.push(start.elapsed());
        assert_eq!(status, 200);
        patched += usize::from(admission::answer_patch(&answer).is_some());
        let start = Instant::now();
        let answer = baseline(body);
        base.push(start.elapsed());
        assert!(!answer.is_empty());
    }
    assert_eq!(patched, reviews.len(), "every review must be injected");
    let avg = reviews.iter().map(Vec::len).sum::<usize>() / reviews.len();
    let (i50, i99) = percentiles(inject);
    let (b50, b99) = percentiles(base);
    println!(
        "1000 AdmissionReviews (Deployment/Job/CronJob pods, 1/3 sandboxed), {avg} bytes each"
    );
    println!("baseline (parse + allowed answer): p50 {b50:>10.1?}  p99 {b99:>10.1?}");
    println!("review (inject + JSONPatch):       p50 {i50:>10.1?}  p99 {i99:>10.1?}");
    println!(
        "ratio: p50 {:.1}x  p99 {:.1}x; injection adds {:.1?} at p99 (target <= 5ms): {}",
        i50.as_secs_f64() / b50.as_secs_f64(),
        i99.as_secs_f64() / b99.as_secs_f64(),
        i99.saturating_sub(b99),
        if i99.saturating_sub(b99) <= Duration::from_millis(5) {
            "met"
        } else {
            "MISSED"
        }
    );
}
