//! Property tests of AdmissionReview handling, over pods built from the annotations,
//! containers and fields injection reads (valid and invalid), and over damaged review
//! bytes; a bounded number of cases (`PROPTEST_CASES` raises it outside CI):
//!
//! - the webhook never panics and answers 200 (a review), 400 or 413, nothing else;
//! - a 200 answers the request's own uid; a refusal says why;
//! - a patch applies to the object it was made for, puts the native sidecar first, and
//!   sizes the grace period for its shutdown; injecting the patched pod again changes
//!   nothing (idempotent).

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::config::InjectConfig;
use crate::inject::{SANDBOX_ANNOTATION, SIDECAR_CONTAINER};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(512),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn annotation() -> impl Strategy<Value = (String, Value)> {
    let key = prop::sample::select(vec![
        SANDBOX_ANNOTATION,
        "nexus.io/sandbox-container",
        "nexus.io/inject",
        "nexus.io/injected",
        "nexus.io/config-map",
        "nexus.io/inbound-app",
        "nexus.io/inbound-allowed-ids",
        "kubectl.kubernetes.io/default-container",
        "other/annotation",
    ]);
    let value = prop_oneof![
        prop::sample::select(vec![
            "default",
            "false",
            "true",
            "m",
            "sidecar",
            "127.0.0.1:8080",
            "Bad Name!",
            "",
            "spiffe://nexus.local/ns/plugins/*",
            "../../etc",
            "a.b-c_d",
        ])
        .prop_map(|s| json!(s)),
        Just(json!(7)),
        Just(Value::Null),
    ];
    (key, value).prop_map(|(k, v)| (k.to_string(), v))
}

fn container() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec!["m", "model", "sidecar", "nexus-sidecar", "x"]),
        prop::option::of(prop::sample::select(vec!["/m", "/bin/sh", ""])),
    )
        .prop_map(|(name, command)| {
            let mut c = json!({"name": name, "image": "img:1"});
            if let Some(command) = command {
                c["command"] = json!([command]);
            }
            c
        })
}

fn pod() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(annotation(), 0..4),
        prop::collection::vec(container(), 0..3),
        prop::option::of(prop::collection::vec(container(), 0..2)),
        prop_oneof![
            Just(None),
            (-5i64..400).prop_map(|v| Some(json!(v))),
            Just(Some(json!("30"))),
        ],
        prop::option::of(Just(json!([{"name": "data", "emptyDir": {}}]))),
    )
        .prop_map(|(annotations, containers, init, grace, volumes)| {
            let annotations: serde_json::Map<String, Value> = annotations.into_iter().collect();
            let mut spec = json!({"containers": containers});
            if let Some(init) = init {
                spec["initContainers"] = json!(init);
            }
            if let Some(grace) = grace {
                spec["terminationGracePeriodSeconds"] = grace;
            }
            if let Some(volumes) = volumes {
                spec["volumes"] = volumes;
            }
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "p", "namespace": "plugins", "annotations": annotations},
                   "spec": spec})
        })
}

fn review_of(object: &Value, uid: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "plugins", "operation": "CREATE",
            "userInfo": {"username": "alice"},
            "object": object
        }
    }))
    .expect("encode")
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn reviews_are_answered_and_patches_apply_once(pod in pod(), uid in "[a-z0-9-]{1,12}") {
        let cfg = InjectConfig::default();
        let (status, body) = super::review(&review_of(&pod, &uid), &cfg);
        prop_assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let answer: Value = serde_json::from_slice(&body).expect("the answer is JSON");
        prop_assert_eq!(&answer["response"]["uid"], &json!(uid));
        let allowed = answer["response"]["allowed"].as_bool();
        prop_assert!(allowed.is_some(), "{answer}");
        if allowed == Some(false) {
            let why = answer["response"]["status"]["message"].as_str().unwrap_or_default();
            prop_assert!(!why.is_empty(), "a refusal without a reason: {answer}");
            return Ok(());
        }
        let Some(patch) = super::answer_patch(&body) else { return Ok(()) };
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &patch).expect("the patch applies to its pod");
        prop_assert_eq!(&patched["spec"]["initContainers"][0]["name"], &json!(SIDECAR_CONTAINER));
        prop_assert_eq!(&patched["spec"]["initContainers"][0]["restartPolicy"], &json!("Always"));
        let grace = patched["spec"]["terminationGracePeriodSeconds"].as_i64().unwrap_or(0);
        prop_assert!(
            grace >= i64::from(cfg.sidecar_shutdown_grace_seconds) + crate::config::SHUTDOWN_FLUSH_MARGIN_SECS,
            "{patched}"
        );
        let (status, again) = super::review(&review_of(&patched, &uid), &cfg);
        prop_assert_eq!(status, 200);
        prop_assert!(super::answer_patch(&again).is_none(), "injected twice: {}", String::from_utf8_lossy(&again));
    }

    #[test]
    fn damaged_reviews_get_400_or_an_answer_never_a_panic(
        pod in pod(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = review_of(&pod, "u-1");
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        let keep = cut.index(bytes.len() + 1);
        for body in [&bytes[..], &bytes[..keep]] {
            let (status, answer) = super::review(body, &InjectConfig::default());
            prop_assert!(status == 200 || status == 400, "{status}");
            prop_assert!(serde_json::from_slice::<Value>(&answer).is_ok());
        }
    }
}
