//! The plugin registry end to end (docs/registry.md), with the real gateway and
//! nexusctl: each attack of the threat model is refused with its reason, and what is
//! allowed (a signed, certified version) runs and is recorded by version.
//!
//! Publisher keys and signatures here are made with openssl, not with Nexus's own
//! signer: `openssl dgst -sha256 -sign` over the cosign payload is what `cosign
//! sign-blob --key` outputs (base64 of the DER ECDSA signature), so the gateway is
//! checked against an independent implementation of the format.

use std::path::{Path, PathBuf};
use std::process::Command;

use std::time::Duration;

use nexus_tests::stack::{
    DATA_API_ID, GATEWAY_ID, GATEWAY_TOP, Gateway, OPERATOR_ID, PLUGIN_ID, data_api, gateway_toml,
    gateway_with, inbound_curl_args, sidecar, workload_api,
};
use nexus_tests::{curl, eventually, free_port, repo_root, temp_dir};

const DIGEST_A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const DIGEST_B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const DIGEST_C: &str = "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
const REPO: &str = "registry.example/acme/flood-model";
/// The reviewer: a certs-dev identity other than the operator who registers.
const REVIEWER: &str = "nexus.local/hazard-api";
const REVIEWER_ID: &str = "spiffe://nexus.local/ns/data/sa/hazard-api";

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// An ECDSA P-256 key pair made by openssl: (private PKCS#8, public SPKI).
fn keypair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &key.to_string_lossy(),
    ]);
    openssl(&[
        "pkey",
        "-in",
        &key.to_string_lossy(),
        "-pubout",
        "-out",
        &public.to_string_lossy(),
    ]);
    (key, public)
}

/// The payload `cosign generate REPO@DIGEST` prints.
fn cosign_payload(repo: &str, digest: &str) -> String {
    format!(
        r#"{{"critical":{{"identity":{{"docker-reference":"{repo}"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"cosign container image signature"}},"optional":null}}"#
    )
}

/// Signs `REPO@digest`'s payload with `key` as `cosign sign-blob` does; (payload file,
/// signature file).
fn sign(dir: &Path, key: &Path, digest: &str, tag: &str) -> (PathBuf, PathBuf) {
    let payload = dir.join(format!("{tag}.payload.json"));
    std::fs::write(&payload, cosign_payload(REPO, digest)).expect("write the payload");
    let der = openssl(&[
        "dgst",
        "-sha256",
        "-sign",
        &key.to_string_lossy(),
        &payload.to_string_lossy(),
    ]);
    let signature = dir.join(format!("{tag}.sig"));
    std::fs::write(&signature, data_b64(&der)).expect("write the signature");
    (payload, signature)
}

fn data_b64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The gateway's top-level keys: the usual ones plus reviewers (the operator is one
/// too, so that "certifying one's own upload" is refused for being one's own, not for
/// lacking the role).
fn top() -> String {
    format!("{GATEWAY_TOP}reviewers = [{OPERATOR_ID:?}, {REVIEWER_ID:?}]\n")
}

fn registry_toml(acme_pub: &Path) -> String {
    format!(
        "\n[registry]\n[[registry.publishers]]\nname = \"acme\"\nkey = {:?}\n",
        acme_pub.to_string_lossy()
    )
}

/// `nexusctl ARGS` as `who`; (success, stdout + stderr).
fn ctl(gw: &Gateway, who: &str, args: &[&str]) -> (bool, String) {
    let out = gw.nexusctl_as(who, args);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

const OPERATOR: &str = "nexus.local/operator";

#[allow(clippy::too_many_arguments)]
fn register(
    gw: &Gateway,
    publisher: &str,
    version: &str,
    image: &str,
    clauses: &[&str],
    signed: Option<&(PathBuf, PathBuf)>,
) -> (bool, String) {
    let mut args: Vec<String> = [
        "plugin",
        "register",
        "--name",
        "flood-model",
        "--publisher",
        publisher,
        "--tier",
        "public-good",
        "--description",
        "flood risk model",
        "--version",
        version,
        "--image",
        image,
        "--spiffe-id",
        PLUGIN_ID,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for c in clauses {
        args.extend(["--clause".to_string(), c.to_string()]);
    }
    if let Some((payload, signature)) = signed {
        args.extend([
            "--payload".into(),
            payload.to_string_lossy().into_owned(),
            "--signature".into(),
            signature.to_string_lossy().into_owned(),
        ]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ctl(gw, OPERATOR, &refs)
}

fn refused(result: (bool, String), why: &str) {
    assert!(
        !result.0,
        "expected a refusal ({why}), got success: {}",
        result.1
    );
    assert!(
        result.1.contains(why),
        "expected the refusal to say `{why}`: {}",
        result.1
    );
}

fn plugins(gw: &Gateway) -> serde_json::Value {
    serde_json::from_str(&gw.nexusctl(&["plugin", "list", "-o", "json"])).expect("list JSON")
}

#[test]
fn only_signed_certified_versions_run_and_each_attack_is_refused() {
    let dir = temp_dir("registry-attacks");
    let d = dir.path();
    let (acme_key, acme_pub) = keypair(d, "acme");
    let (rogue_key, _) = keypair(d, "rogue");
    let gw_api = workload_api(d, "gateway-workload-api", GATEWAY_ID, &[]);
    let gw = gateway_with(
        d,
        "gateway",
        &gw_api,
        None,
        None,
        &top(),
        &registry_toml(&acme_pub),
    );
    let image_a = format!("{REPO}@{DIGEST_A}");
    let signed_a = sign(d, &acme_key, DIGEST_A, "a");

    // Unsigned.
    refused(
        register(&gw, "acme", "1.4.2", &image_a, &["c-flood-17"], None),
        "unsigned",
    );
    // Signed by a key the gateway does not trust for this publisher.
    let rogue_a = sign(d, &rogue_key, DIGEST_A, "rogue-a");
    refused(
        register(
            &gw,
            "acme",
            "1.4.2",
            &image_a,
            &["c-flood-17"],
            Some(&rogue_a),
        ),
        "does not verify with publisher key",
    );
    // A publisher the gateway does not know at all.
    refused(
        register(
            &gw,
            "rogue",
            "1.4.2",
            &image_a,
            &["c-flood-17"],
            Some(&rogue_a),
        ),
        "is not trusted by this gateway",
    );
    // A tag-only image.
    refused(
        register(
            &gw,
            "acme",
            "1.4.2",
            &format!("{REPO}:1.4.2"),
            &["c-flood-17"],
            Some(&signed_a),
        ),
        "not pinned by digest",
    );
    // A genuine signature replayed for another digest.
    refused(
        register(
            &gw,
            "acme",
            "1.4.2",
            &format!("{REPO}@{DIGEST_B}"),
            &["c-flood-17"],
            Some(&signed_a),
        ),
        "a signature for another digest",
    );
    // The payload swapped for another digest's, keeping the signature.
    let swapped = d.join("swapped.payload.json");
    std::fs::write(&swapped, cosign_payload(REPO, DIGEST_B)).unwrap();
    refused(
        register(
            &gw,
            "acme",
            "1.4.2",
            &format!("{REPO}@{DIGEST_B}"),
            &["c-flood-17"],
            Some(&(swapped, signed_a.1.clone())),
        ),
        "does not verify",
    );
    // Malformed input, each named.
    refused(
        register(
            &gw,
            "acme",
            "1.4",
            &image_a,
            &["c-flood-17"],
            Some(&signed_a),
        ),
        "not a semantic version",
    );
    refused(
        register(
            &gw,
            "acme",
            "1.4.2",
            &format!("{REPO}@sha256:AB"),
            &["c-flood-17"],
            Some(&signed_a),
        ),
        "64 lowercase hex",
    );
    refused(
        register(
            &gw,
            "acme",
            "1.4.2",
            &image_a,
            &["c-flood-17", "c-flood-17"],
            Some(&signed_a),
        ),
        "bound twice",
    );
    // Budgets every sidecar would fail to load (a zero ceiling): refused here, so no
    // registration can hold the fleet refusing requests.
    refused(
        ctl(
            &gw,
            OPERATOR,
            &[
                "plugin",
                "register",
                "--name",
                "flood-model",
                "--publisher",
                "acme",
                "--tier",
                "public-good",
                "--version",
                "1.4.2",
                "--image",
                &image_a,
                "--spiffe-id",
                PLUGIN_ID,
                "--clause",
                "c-flood-17",
                "--budgets",
                r#"{"requests_per_s":0,"egress_bytes":1,"distinct_clauses":1,"window":"1s"}"#,
                "--payload",
                &signed_a.0.to_string_lossy(),
                "--signature",
                &signed_a.1.to_string_lossy(),
            ],
        ),
        "budgets.requests_per_s",
    );
    // Nothing of the refused registrations was stored.
    assert_eq!(plugins(&gw), serde_json::json!([]));

    // The genuine registration.
    let (ok, out) = register(
        &gw,
        "acme",
        "1.4.2",
        &image_a,
        &["c-flood-17"],
        Some(&signed_a),
    );
    assert!(ok, "{out}");
    let list = plugins(&gw);
    let uid = list[0]["uid"].as_str().unwrap().to_string();
    assert_eq!(uid.len(), 36, "a UUID: {uid}");
    assert_eq!(list[0]["versions"][0]["image_digest"], DIGEST_A);
    assert_eq!(list[0]["versions"][0]["state"], "registered");
    // A duplicate version, and the same digest under another version.
    refused(
        register(
            &gw,
            "acme",
            "1.4.2",
            &image_a,
            &["c-flood-17"],
            Some(&signed_a),
        ),
        "already registered",
    );
    refused(
        register(
            &gw,
            "acme",
            "1.4.3",
            &image_a,
            &["c-flood-17"],
            Some(&signed_a),
        ),
        "already registered",
    );
    // The gateway re-verifies the stored signature on demand.
    let verified = gw.nexusctl(&["plugin", "verify", &uid, "--version", "1.4.2"]);
    assert!(
        verified.contains("verifies with publisher `acme`"),
        "{verified}"
    );

    // Registered is not runnable.
    refused(
        ctl(
            &gw,
            OPERATOR,
            &[
                "exec",
                "open",
                "--plugin",
                PLUGIN_ID,
                "--clause",
                "c-flood-17",
                "--ttl",
                "10m",
            ],
        ),
        "no certified version",
    );
    refused(
        ctl(
            &gw,
            OPERATOR,
            &[
                "exec",
                "open",
                "--plugin",
                &uid,
                "--version",
                "1.4.2",
                "--clause",
                "c-flood-17",
                "--ttl",
                "10m",
            ],
        ),
        "not certified",
    );
    // A caller off `reviewers` cannot certify; the registrar cannot certify their own upload.
    refused(
        ctl(
            &gw,
            "nexus.local/flood-model",
            &["plugin", "certify", &uid, "--version", "1.4.2"],
        ),
        "PERMISSION_DENIED",
    );
    refused(
        ctl(
            &gw,
            OPERATOR,
            &["plugin", "certify", &uid, "--version", "1.4.2"],
        ),
        "another reviewer must certify it",
    );
    let (ok, out) = ctl(
        &gw,
        REVIEWER,
        &["plugin", "certify", &uid, "--version", "1.4.2"],
    );
    assert!(ok, "{out}");
    let list = plugins(&gw);
    assert_eq!(list[0]["versions"][0]["state"], "certified");
    assert_eq!(list[0]["versions"][0]["certified_by"], REVIEWER_ID);

    // A clause the version does not bind; then the bound one runs, recorded by version.
    refused(
        ctl(
            &gw,
            OPERATOR,
            &[
                "exec", "open", "--plugin", PLUGIN_ID, "--clause", "c-other", "--ttl", "10m",
            ],
        ),
        "is not bound to version 1.4.2",
    );
    refused(
        ctl(
            &gw,
            OPERATOR,
            &[
                "plugin",
                "bind",
                &uid,
                "--version",
                "1.4.2",
                "--clause",
                "c-flood-17",
            ],
        ),
        "already bound",
    );
    let exec = gw.open_execution(PLUGIN_ID, "c-flood-17", "10m");
    assert!(exec.starts_with("ex-"), "{exec}");
    let execs: serde_json::Value =
        serde_json::from_str(&gw.nexusctl(&["exec", "list", "-o", "json"])).unwrap();
    assert_eq!(execs[0]["plugin_uid"], uid.as_str());
    assert_eq!(execs[0]["plugin_version"], "1.4.2");
    assert_eq!(execs[0]["image_digest"], DIGEST_A);

    // A sidecar of the plugin workload is connected; retiring revokes it through the
    // normal revocation path (acknowledged within the revocation bound), closes the
    // version's executions, and refuses new ones.
    let plugin_api = workload_api(d, "plugin-workload-api", PLUGIN_ID, &[]);
    let _plugin_sidecar = sidecar(
        d,
        "plugin-sidecar",
        &format!(
            "[identity]\nworkload_api_socket = {:?}\n\n{}",
            plugin_api.url(),
            gateway_toml(&gw, d, "plugin-sidecar", "")
        ),
        false,
    );
    gw.wait_in_sync(1);
    let retired: serde_json::Value = serde_json::from_str(&gw.nexusctl(&[
        "plugin",
        "retire",
        &uid,
        "--version",
        "1.4.2",
        "--reason",
        "CVE in the model",
        "-o",
        "json",
    ]))
    .unwrap();
    let revocation = &retired["revocation"];
    assert_eq!(revocation["subject"], PLUGIN_ID);
    assert_eq!(revocation["sidecars"], 1, "{retired}");
    assert_eq!(revocation["acknowledged"], 1, "{retired}");
    let after_us = revocation["all_acknowledged_after_us"].as_u64().unwrap();
    assert!(
        after_us > 0 && after_us < 5_000_000,
        "acknowledged after {after_us} us"
    );
    let status = gw.status();
    assert!(
        status["revoked"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["subject"] == PLUGIN_ID
                && r["reason"]
                    .as_str()
                    .unwrap()
                    .contains("retired: CVE in the model")),
        "{status}"
    );
    let open: serde_json::Value =
        serde_json::from_str(&gw.nexusctl(&["exec", "list", "-o", "json"])).unwrap();
    assert_eq!(
        open,
        serde_json::json!([]),
        "the retired version's execution is closed"
    );
    refused(
        ctl(
            &gw,
            OPERATOR,
            &[
                "exec",
                "open",
                "--plugin",
                &uid,
                "--version",
                "1.4.2",
                "--clause",
                "c-flood-17",
                "--ttl",
                "10m",
            ],
        ),
        "retired",
    );
    refused(
        ctl(
            &gw,
            REVIEWER,
            &["plugin", "certify", &uid, "--version", "1.4.2"],
        ),
        "retired",
    );
}

#[test]
fn a_mirror_imports_only_what_verifies_and_never_trusts_the_file() {
    let dir = temp_dir("registry-mirror");
    let d = dir.path();
    let (acme_key, acme_pub) = keypair(d, "acme");
    let (rogue_key, _) = keypair(d, "rogue");
    let gw_api = workload_api(d, "gateway-workload-api", GATEWAY_ID, &[]);
    let region = gateway_with(
        d,
        "region",
        &gw_api,
        None,
        None,
        &top(),
        &registry_toml(&acme_pub),
    );
    let mirror = gateway_with(
        d,
        "mirror",
        &gw_api,
        None,
        None,
        &top(),
        &registry_toml(&acme_pub),
    );
    for (version, digest, tag) in [("1.4.2", DIGEST_A, "a"), ("1.5.0", DIGEST_C, "c")] {
        let signed = sign(d, &acme_key, digest, tag);
        let (ok, out) = register(
            &region,
            "acme",
            version,
            &format!("{REPO}@{digest}"),
            &["c-flood-17"],
            Some(&signed),
        );
        assert!(ok, "{out}");
    }
    let uid = plugins(&region)[0]["uid"].as_str().unwrap().to_string();
    region.nexusctl_as(REVIEWER, &["plugin", "certify", &uid, "--version", "1.4.2"]);
    let bundle = d.join("bundle.json");
    region.nexusctl(&["plugin", "export", "--file", &bundle.to_string_lossy()]);
    let text = std::fs::read_to_string(&bundle).unwrap();
    let original: serde_json::Value = serde_json::from_str(&text).unwrap();

    // Tampering, each refused as a whole: nothing imported.
    let tamper = |name: &str, f: &dyn Fn(&mut serde_json::Value)| -> PathBuf {
        let mut b = original.clone();
        f(&mut b);
        let path = d.join(format!("{name}.json"));
        std::fs::write(&path, b.to_string()).unwrap();
        path
    };
    let digest_swap = tamper("digest-swap", &|b| {
        b["plugins"][0]["versions"][1]["image"] = format!("{REPO}@{DIGEST_B}").into();
    });
    let payload_swap = tamper("payload-swap", &|b| {
        b["plugins"][0]["versions"][1]["payload"] = cosign_payload(REPO, DIGEST_B).into();
        b["plugins"][0]["versions"][1]["image"] = format!("{REPO}@{DIGEST_B}").into();
    });
    let rogue_sig = sign(d, &rogue_key, DIGEST_C, "rogue-c");
    let resigned = tamper("resigned", &|b| {
        b["plugins"][0]["versions"][1]["signature"] =
            std::fs::read_to_string(&rogue_sig.1).unwrap().into();
    });
    let identity_swap = tamper("identity-swap", &|b| {
        b["plugins"][0]["versions"][1]["spiffe_id"] =
            "spiffe://nexus.local/ns/other/sa/intruder".into();
    });
    for (path, why) in [
        (&digest_swap, "a signature for another digest"),
        (&payload_swap, "does not verify"),
        (&resigned, "does not verify"),
    ] {
        refused(
            ctl(
                &mirror,
                OPERATOR,
                &["plugin", "import", &path.to_string_lossy()],
            ),
            why,
        );
        assert_eq!(
            plugins(&mirror),
            serde_json::json!([]),
            "nothing half-imported"
        );
    }
    // The SPIFFE ID is not covered by the cosign signature: an edited one imports, but
    // nothing of the bundle is certified here: the mirror's reviewers decide (and see it).
    let (ok, out) = ctl(
        &mirror,
        OPERATOR,
        &["plugin", "import", &identity_swap.to_string_lossy()],
    );
    assert!(ok, "{out}");
    let imported = plugins(&mirror);
    assert_eq!(
        imported[0]["uid"],
        uid.as_str(),
        "the UUID is kept across gateways"
    );
    for v in imported[0]["versions"].as_array().unwrap() {
        assert_eq!(
            v["state"], "registered",
            "a claim of the file is never trusted: {v}"
        );
    }
    assert!(
        imported[0]["versions"][0]["imported_certified_by"]
            .as_str()
            .unwrap()
            .contains(REVIEWER_ID)
    );
    refused(
        ctl(
            &mirror,
            OPERATOR,
            &[
                "exec",
                "open",
                "--plugin",
                &uid,
                "--version",
                "1.4.2",
                "--clause",
                "c-flood-17",
                "--ttl",
                "10m",
            ],
        ),
        "not certified",
    );
    let (ok, out) = ctl(
        &mirror,
        REVIEWER,
        &["plugin", "certify", &uid, "--version", "1.4.2"],
    );
    assert!(ok, "{out}");
    let exec = mirror.open_execution(&uid, "c-flood-17", "10m");
    assert!(exec.starts_with("ex-"), "{exec}");
    // A bundle larger than registry.max_bundle_bytes is refused before parsing.
    let big = d.join("big.json");
    std::fs::write(&big, " ".repeat(2 * 1024 * 1024)).unwrap();
    refused(
        ctl(
            &mirror,
            OPERATOR,
            &["plugin", "import", &big.to_string_lossy()],
        ),
        "registry.max_bundle_bytes",
    );
}

/// A self-signed serving certificate for `localhost` (what cert-manager would issue).
fn serving_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("webhook.pem");
    let key = dir.join("webhook.key");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost",
        "-keyout",
        &key.to_string_lossy(),
        "-out",
        &cert.to_string_lossy(),
    ]);
    (cert, key)
}

#[test]
fn admission_admits_only_pods_pinned_to_a_certified_version_of_their_identity() {
    let dir = temp_dir("registry-admission");
    let d = dir.path();
    let (acme_key, acme_pub) = keypair(d, "acme");
    let (cert, key) = serving_cert(d);
    let gw_api = workload_api(d, "gateway-workload-api", GATEWAY_ID, &[]);
    let extra = format!(
        "{}\n[webhook]\nlisten = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\n",
        registry_toml(&acme_pub),
        cert.to_string_lossy(),
        key.to_string_lossy()
    );
    let gw = gateway_with(d, "gateway", &gw_api, None, None, &top(), &extra);
    for (version, digest, tag) in [("1.4.2", DIGEST_A, "a"), ("1.5.0", DIGEST_C, "c")] {
        let signed = sign(d, &acme_key, digest, tag);
        let (ok, out) = register(
            &gw,
            "acme",
            version,
            &format!("{REPO}@{digest}"),
            &["c-flood-17"],
            Some(&signed),
        );
        assert!(ok, "{out}");
    }
    let uid = plugins(&gw)[0]["uid"].as_str().unwrap().to_string();
    gw.nexusctl_as(REVIEWER, &["plugin", "certify", &uid, "--version", "1.4.2"]);

    let port = nexus_tests::stack::port_of(gw.addresses["webhook"].as_str().unwrap());
    let template: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/kube/reviews/deployment-pod.json"))
            .unwrap(),
    )
    .unwrap();
    let review = |image: &str, account: &str| -> serde_json::Value {
        let mut r = template.clone();
        r["request"]["object"]["spec"]["containers"][0]["image"] = image.into();
        r["request"]["object"]["spec"]["serviceAccountName"] = account.into();
        let file = d.join("review.json");
        std::fs::write(&file, r.to_string()).unwrap();
        let out = nexus_tests::curl(&[
            "-s",
            "--cacert",
            &cert.to_string_lossy(),
            "--resolve",
            &format!("localhost:{port}:127.0.0.1"),
            "-H",
            "content-type: application/json",
            "--data-binary",
            &format!("@{}", file.display()),
            &format!("https://localhost:{port}/inject"),
        ]);
        serde_json::from_slice(&out.stdout).expect("an AdmissionReview")
    };
    let denied = |answer: serde_json::Value, why: &str| {
        assert_eq!(answer["response"]["allowed"], false, "{answer}");
        let message = answer["response"]["status"]["message"]
            .as_str()
            .unwrap_or("");
        assert!(message.contains(why), "expected `{why}`: {message}");
        assert_eq!(
            answer["response"]["uid"], template["request"]["uid"],
            "the answer names the request"
        );
    };
    denied(
        review(&format!("{REPO}:1.4.2"), "flood-model"),
        "not pinned by digest",
    );
    denied(
        review(&format!("{REPO}@{DIGEST_B}"), "flood-model"),
        "not a registered plugin version",
    );
    denied(
        review(&format!("{REPO}@{DIGEST_C}"), "flood-model"),
        "not certified",
    );
    denied(
        review(&format!("{REPO}@{DIGEST_A}"), "intruder"),
        "would run as spiffe://nexus.local/ns/plugins/sa/intruder",
    );
    let admitted = review(&format!("{REPO}@{DIGEST_A}"), "flood-model");
    assert_eq!(admitted["response"]["allowed"], true, "{admitted}");
    assert_eq!(admitted["response"]["patchType"], "JSONPatch", "{admitted}");
    // Injection passes the admitted version to the sidecar (and names it on the pod).
    let patch =
        nexus_kube::admission::answer_patch(admitted.to_string().as_bytes()).expect("a JSONPatch");
    let patch = serde_json::to_string(&patch).unwrap();
    for expected in [
        format!(r#"{{"name":"NEXUS_PLUGIN_UID","value":"{uid}"}}"#),
        r#"{"name":"NEXUS_PLUGIN_VERSION","value":"1.4.2"}"#.to_string(),
        format!(r#"{{"name":"NEXUS_PLUGIN_IMAGE_DIGEST","value":"{DIGEST_A}"}}"#),
        "nexus.io/plugin-version".to_string(),
    ] {
        assert!(patch.contains(&expected), "{expected} in {patch}");
    }
    gw.nexusctl(&[
        "plugin",
        "retire",
        &uid,
        "--version",
        "1.4.2",
        "--reason",
        "superseded",
    ]);
    denied(
        review(&format!("{REPO}@{DIGEST_A}"), "flood-model"),
        "is retired",
    );
}

/// A PostgreSQL: `NEXUS_TEST_POSTGRES_URL` (scripts/test.sh starts one), else one started
/// here with scripts/postgres.sh (stopped on drop).
struct Postgres {
    base: String,
    own: Option<tempfile::TempDir>,
}

impl Postgres {
    fn start() -> Self {
        if let Ok(url) = std::env::var("NEXUS_TEST_POSTGRES_URL") {
            return Self {
                base: url,
                own: None,
            };
        }
        let dir = tempfile::Builder::new()
            .prefix("nexus-pg")
            .tempdir_in("/tmp")
            .expect("pg dir");
        let base = nexus_tests::stdout_of(
            Command::new(repo_root().join("scripts/postgres.sh")).args([
                "start",
                &dir.path().join("data").to_string_lossy(),
                &nexus_tests::free_port().to_string(),
            ]),
            "scripts/postgres.sh start",
        );
        Self {
            base: base.trim().to_string(),
            own: Some(dir),
        }
    }

    /// A new empty database; its URL.
    fn database(&self, name: &str) -> String {
        let (base, _) = self.base.rsplit_once('/').expect("a database URL");
        let db = format!("{name}_{}", std::process::id());
        for sql in [
            format!("DROP DATABASE IF EXISTS {db}"),
            format!("CREATE DATABASE {db}"),
        ] {
            nexus_tests::stdout_of(
                Command::new("psql").args([&format!("{base}/postgres"), "-qtAc", &sql]),
                "psql",
            );
        }
        format!("{base}/{db}")
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

#[test]
fn two_gateways_on_postgresql_agree_on_the_registry() {
    let pg = Postgres::start();
    let url = pg.database("nexus_registry");
    let dir = temp_dir("registry-postgres");
    let d = dir.path();
    let (acme_key, acme_pub) = keypair(d, "acme");
    let gw_api = workload_api(d, "gateway-workload-api", GATEWAY_ID, &[]);
    let a = gateway_with(
        d,
        "gateway-a",
        &gw_api,
        Some(&url),
        None,
        &top(),
        &registry_toml(&acme_pub),
    );
    let b = gateway_with(
        d,
        "gateway-b",
        &gw_api,
        Some(&url),
        None,
        &top(),
        &registry_toml(&acme_pub),
    );
    let signed = sign(d, &acme_key, DIGEST_A, "a");
    let (ok, out) = register(
        &a,
        "acme",
        "1.4.2",
        &format!("{REPO}@{DIGEST_A}"),
        &["c-flood-17"],
        Some(&signed),
    );
    assert!(ok, "{out}");
    // Registered through A, certified through B, run through A, retired through B.
    let on_b = plugins(&b);
    assert_eq!(on_b, plugins(&a), "both replicas read one registry");
    let uid = on_b[0]["uid"].as_str().unwrap().to_string();
    let (ok, out) = ctl(
        &b,
        REVIEWER,
        &["plugin", "certify", &uid, "--version", "1.4.2"],
    );
    assert!(ok, "{out}");
    // The same registration through B is a duplicate (the UNIQUE digest is shared).
    refused(
        register(
            &b,
            "acme",
            "1.4.2",
            &format!("{REPO}@{DIGEST_A}"),
            &["c-flood-17"],
            Some(&signed),
        ),
        "already registered",
    );
    let exec = a.open_execution(&uid, "c-flood-17", "10m");
    assert!(exec.starts_with("ex-"), "{exec}");
    b.nexusctl(&[
        "plugin",
        "retire",
        &uid,
        "--version",
        "1.4.2",
        "--reason",
        "both agree",
    ]);
    assert_eq!(plugins(&a)[0]["versions"][0]["state"], "retired");
    refused(
        ctl(
            &a,
            OPERATOR,
            &[
                "exec",
                "open",
                "--plugin",
                &uid,
                "--version",
                "1.4.2",
                "--clause",
                "c-flood-17",
                "--ttl",
                "10m",
            ],
        ),
        "retired",
    );
    assert_eq!(a.status()["revision"], b.status()["revision"]);
}

/// The plugin (its certs-dev SVID) reads `clause` at the data API's sidecar; the status.
fn read_clause(port: u16, clause: &str) -> u16 {
    let mut args = inbound_curl_args(port, Some("nexus.local/flood-model"));
    args.extend([
        "-s".into(),
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code}".into(),
        format!("https://localhost:{port}/clauses/{clause}/rainfall"),
    ]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    String::from_utf8_lossy(&curl(&refs).stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Issue 17 item 4 with the real binaries: the data API's sidecar runs the reference
/// policy, its folder holding the demo's (stale) bindings file, which binds the plugin to
/// c-flood-17 and c-flood-18. With the gateway's registry, only certified versions bind:
/// certify → allowed, unbind / retire → denied, while the executions stay open; the file
/// cannot widen that, and a restart with the gateway dead keeps the registry's bindings.
/// The records written under the executions carry the plugin version.
#[test]
fn the_registry_binds_clauses_at_every_sidecar_and_a_stale_file_cannot_widen_them() {
    let dir = temp_dir("registry-bindings");
    let d = dir.path();
    let (acme_key, acme_pub) = keypair(d, "acme");
    let gw_api = workload_api(d, "gateway-workload-api", GATEWAY_ID, &[]);
    let mut gw = gateway_with(
        d,
        "gateway",
        &gw_api,
        None,
        Some(&format!("127.0.0.1:{}", free_port())),
        &top(),
        &registry_toml(&acme_pub),
    );
    // The policy folder: the reference policy and the demo's bindings.yaml, which binds
    // the plugin to c-flood-17 and c-flood-18 (the stale file of the attack).
    let policies = d.join("policies");
    nexus_tests::copy_dir(&repo_root().join("policies/nexus"), &policies.join("nexus"));
    let stale = std::fs::read_to_string(policies.join("nexus/bindings.yaml")).unwrap();
    assert!(stale.contains("c-flood-18"), "{stale}");
    let records = d.join("data-records.jsonl");
    let data_workload_api = workload_api(
        d,
        "data-workload-api",
        DATA_API_ID,
        &["--dns-name", "localhost"],
    );
    let app = data_api(d);
    let data_toml = format!(
        "[identity]\nworkload_api_socket = {socket:?}\n\n\
         [inbound]\nlisten = \"127.0.0.1:0\"\napp = {app:?}\nallowed_ids = [\"spiffe://nexus.local/ns/plugins/*\"]\n\n\
         [policy]\ndir = {policies:?}\nreload_interval = \"100ms\"\n\n\
         [audit]\nsink = {{ file = {{ path = {records:?} }} }}\n\n{gateway}",
        socket = data_workload_api.url(),
        app = app.http,
        policies = policies.to_string_lossy(),
        records = records.to_string_lossy(),
        gateway = gateway_toml(
            &gw,
            d,
            "data",
            "on_gateway_loss = \"keep_last\"\nship_interval = \"200ms\"\n"
        ),
    );
    let mut data = sidecar(d, "data-sidecar", &data_toml, true);
    // The plugin's own sidecar (authentication only): it is told its own bindings.
    let plugin_api = workload_api(d, "plugin-workload-api", PLUGIN_ID, &[]);
    let _plugin_sidecar = sidecar(
        d,
        "plugin-sidecar",
        &format!(
            "[identity]\nworkload_api_socket = {:?}\n\n{}",
            plugin_api.url(),
            gateway_toml(&gw, d, "plugin", "")
        ),
        true,
    );
    gw.wait_in_sync(2);
    let port = data.inbound_port();

    // Version 1.4.2 binds both clauses; certified, each gets an execution and is read.
    let signed_a = sign(d, &acme_key, DIGEST_A, "a");
    let (ok, out) = register(
        &gw,
        "acme",
        "1.4.2",
        &format!("{REPO}@{DIGEST_A}"),
        &["c-flood-17", "c-flood-18"],
        Some(&signed_a),
    );
    assert!(ok, "{out}");
    let uid = plugins(&gw)[0]["uid"].as_str().unwrap().to_string();
    let certified: serde_json::Value = serde_json::from_str(&String::from_utf8_lossy(
        &gw.nexusctl_as(
            REVIEWER,
            &[
                "plugin",
                "certify",
                &uid,
                "--version",
                "1.4.2",
                "-o",
                "json",
            ],
        )
        .stdout,
    ))
    .expect("certify JSON");
    // The certify is a revision every connected sidecar acknowledged before the reply.
    assert_eq!(certified["propagation"]["sidecars"], 2, "{certified}");
    assert_eq!(certified["propagation"]["acknowledged"], 2, "{certified}");
    // Another plugin's certified version: the data sidecar binds it, the flood model's
    // sidecar is not told about it (docs/threat-model.md, "What a sidecar is told").
    let other = "spiffe://nexus.local/ns/plugins/sa/other-model";
    let signed_b = sign(d, &acme_key, DIGEST_B, "b");
    let (ok, out) = ctl(
        &gw,
        OPERATOR,
        &[
            "plugin",
            "register",
            "--name",
            "other-model",
            "--publisher",
            "acme",
            "--tier",
            "commercial",
            "--version",
            "2.0.0",
            "--image",
            &format!("{REPO}@{DIGEST_B}"),
            "--spiffe-id",
            other,
            "--clause",
            "c-quake-3",
            "--payload",
            &signed_b.0.to_string_lossy(),
            "--signature",
            &signed_b.1.to_string_lossy(),
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) = ctl(
        &gw,
        REVIEWER,
        &["plugin", "certify", "other-model", "--version", "2.0.0"],
    );
    assert!(ok, "{out}");
    gw.wait_in_sync(2);
    let kept = |name: &str| -> Vec<String> {
        let file: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(d.join(format!("{name}.snapshot.json"))).unwrap(),
        )
        .unwrap();
        let mut ids: Vec<String> = file["state"]["registry"]
            .as_object()
            .unwrap_or_else(|| panic!("{name} keeps registry bindings: {file}"))
            .values()
            .map(|v| v["spiffe_id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(kept("data"), vec![PLUGIN_ID.to_string(), other.to_string()]);
    assert_eq!(kept("plugin"), vec![PLUGIN_ID.to_string()]);
    let e17 = gw.open_execution(PLUGIN_ID, "c-flood-17", "10m");
    let e18 = gw.open_execution(PLUGIN_ID, "c-flood-18", "10m");
    assert_eq!(read_clause(port, "c-flood-17"), 200);
    assert_eq!(read_clause(port, "c-flood-18"), 200);

    // Unbound: denied at once, though its execution is still open and the folder's
    // file still binds it.
    let (ok, out) = ctl(
        &gw,
        OPERATOR,
        &[
            "plugin",
            "unbind",
            &uid,
            "--version",
            "1.4.2",
            "--clause",
            "c-flood-18",
        ],
    );
    assert!(
        ok && out.contains("acknowledged by all 2 sidecars"),
        "{out}"
    );
    assert_eq!(read_clause(port, "c-flood-18"), 403);
    assert_eq!(read_clause(port, "c-flood-17"), 200);
    let execs: serde_json::Value =
        serde_json::from_str(&gw.nexusctl(&["exec", "list", "-o", "json"])).unwrap();
    assert!(
        execs
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["id"] == e18.as_str()),
        "{execs}"
    );

    // A new version binding c-flood-18: registered, it binds nothing; certified, it does.
    let signed_c = sign(d, &acme_key, DIGEST_C, "c");
    let (ok, out) = register(
        &gw,
        "acme",
        "1.5.0",
        &format!("{REPO}@{DIGEST_C}"),
        &["c-flood-18"],
        Some(&signed_c),
    );
    assert!(ok, "{out}");
    gw.wait_in_sync(2);
    assert_eq!(read_clause(port, "c-flood-18"), 403);
    let (ok, out) = ctl(
        &gw,
        REVIEWER,
        &["plugin", "certify", &uid, "--version", "1.5.0"],
    );
    assert!(ok, "{out}");
    assert_eq!(read_clause(port, "c-flood-18"), 200);

    // Retired: its workload is revoked (everything refused); reinstated, the retired
    // version's clause stays unbound while 1.4.2's is served again.
    gw.nexusctl(&[
        "plugin",
        "retire",
        &uid,
        "--version",
        "1.5.0",
        "--reason",
        "superseded",
    ]);
    // (0: the revoked workload's handshake is refused.)
    assert_eq!(read_clause(port, "c-flood-17"), 0);
    gw.nexusctl(&["reinstate", PLUGIN_ID]);
    assert_eq!(read_clause(port, "c-flood-17"), 200);
    assert_eq!(read_clause(port, "c-flood-18"), 403);

    // Requests for an unbound clause are an anomaly the data sidecar reports; the
    // signal names the plugin version the workload runs.
    for _ in 0..4 {
        assert_eq!(read_clause(port, "c-flood-18"), 403);
    }
    let signal = eventually(
        Duration::from_secs(20),
        "an unbound_clause signal naming the plugin version",
        || {
            let list: serde_json::Value =
                serde_json::from_str(&gw.nexusctl(&["signals", "-o", "json"])).ok()?;
            list.as_array()?
                .iter()
                .find(|s| s["kind"] == "unbound_clause" && s["workload"] == PLUGIN_ID)
                .cloned()
        },
    );
    assert_eq!(
        signal["plugins"],
        serde_json::json!([{"plugin_uid": uid, "plugin_version": "1.4.2", "image_digest": DIGEST_A}]),
        "{signal}"
    );
    let text = gw.nexusctl(&["signals"]);
    assert!(
        text.contains(&format!("{PLUGIN_ID} v1.4.2 ({uid}, {DIGEST_A})")),
        "{text}"
    );
    let list = gw.nexusctl(&["exec", "list"]);
    assert!(
        list.contains(&format!("v1.4.2 ({uid}, {DIGEST_A})")),
        "{list}"
    );

    // Every record written under an execution carries its plugin version, in the hash
    // chain (which still verifies).
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&records)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let under: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|r| r["execution_id"] == e17.as_str())
        .collect();
    assert!(under.len() >= 3, "{lines:?}");
    for r in &under {
        assert_eq!(r["plugin_uid"], uid.as_str(), "{r}");
        assert_eq!(r["plugin_version"], "1.4.2", "{r}");
        assert_eq!(r["image_digest"], DIGEST_A, "{r}");
    }
    // (stdout_of fails unless the chain verifies.)
    nexus_tests::stdout_of(
        Command::new(nexus_tests::bin("nexusctl")).args([
            "audit",
            "verify",
            &records.to_string_lossy(),
        ]),
        "nexusctl audit verify",
    );

    // The gateway dies; the data sidecar restarts from its kept snapshot and still
    // enforces the registry's bindings, not its folder's.
    gw.kill9();
    data.proc.signal("KILL");
    let toml = std::fs::read_to_string(&data.config).unwrap();
    let toml = toml.split("\n[admin]").next().unwrap().to_string();
    let _ = std::fs::remove_file(d.join("data-sidecar-2.addresses.json"));
    data = sidecar(d, "data-sidecar-2", &toml, true);
    let port = data.inbound_port();
    assert!(
        data.proc
            .log_text()
            .contains("restored the last gateway snapshot"),
        "{}",
        data.proc.log_text()
    );
    assert_eq!(read_clause(port, "c-flood-17"), 200);
    assert_eq!(read_clause(port, "c-flood-18"), 403);
    drop(e18);
}
