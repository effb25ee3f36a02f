//! The development Workload API (`nexusctl dev workload-api`), driven by independent
//! clients: py-spiffe (gRPC C-core) fetches and verifies the SVID and bundles, a raw
//! grpcio call and grpcurl (grpc-go) check that requests without the security header are
//! refused, and signals rotate and stop the server.
//!
//! Needs `cargo build --workspace --bins` first and the peers from
//! `tests/requirements.txt` (`scripts/test.sh` does both).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nexus_tests::{Proc, bin, cert, eventually, repo_root, temp_dir};
use rustls_pki_types::{CertificateDer, UnixTime};
use serde_json::Value;

const ID: &str = "spiffe://nexus.local/ns/plugins/sa/flood-model";
const WAIT: Duration = Duration::from_secs(10);

struct Server {
    proc: Proc,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

fn start(name: &str, ttl: &str) -> Server {
    let dir = temp_dir(name);
    let socket = dir.path().join("agent.sock");
    let proc = Proc::spawn(
        "workload-api",
        dir.path(),
        &bin("nexusctl"),
        &[
            "dev",
            "workload-api",
            "--socket",
            socket.to_str().expect("utf-8 temp path"),
            "--spiffe-id",
            ID,
            "--ttl",
            ttl,
        ],
        &[],
    );
    eventually(WAIT, "the Workload API socket", || {
        socket.exists().then_some(())
    });
    Server {
        proc,
        socket,
        _dir: dir,
    }
}

fn python(script: &str, socket: &Path) -> Result<Value, String> {
    let out = Command::new("python3")
        .arg(repo_root().join("tests/py").join(script))
        .arg(socket)
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{script} failed ({}): {}{}\n(peers missing? pip install -r tests/requirements.txt)",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("{script} printed no JSON: {e}"))
}

fn fetch(socket: &Path) -> Value {
    python("fetch_svid.py", socket).unwrap_or_else(|e| panic!("{e}"))
}

fn pem_cert(pem: &[u8]) -> CertificateDer<'static> {
    rustls_pemfile::certs(&mut &pem[..])
        .next()
        .expect("a certificate")
        .expect("readable PEM")
}

/// Verifies `leaf_pem` as a client and server certificate against the committed CA.
fn chains_to_dev_ca(leaf_pem: &str) -> Result<(), webpki::Error> {
    let ca = pem_cert(&std::fs::read(cert("nexus.local/ca.pem")).expect("certs-dev CA"));
    let anchors = vec![
        webpki::anchor_from_trusted_cert(&ca)
            .expect("a valid CA")
            .to_owned(),
    ];
    let leaf = pem_cert(leaf_pem.as_bytes());
    let leaf = webpki::EndEntityCert::try_from(&leaf).expect("a valid leaf");
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            UnixTime::now(),
            usage,
            None,
            None,
        )?;
    }
    Ok(())
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[test]
fn py_spiffe_fetches_a_verifiable_svid_that_rotates_at_half_life() {
    let server = start("workload-api-rotate", "4s");
    let first = fetch(&server.socket);
    assert_eq!(str_of(&first, "spiffe_id"), ID);
    assert_eq!(
        first["bundle_trust_domains"],
        serde_json::json!(["nexus.local", "partner.example"])
    );
    assert_eq!(
        first["x509_bundles_trust_domains"],
        serde_json::json!(["nexus.local", "partner.example"])
    );
    chains_to_dev_ca(str_of(&first, "leaf_pem"))
        .expect("the SVID chains to certs-dev/nexus.local/ca.pem");

    // With a 4s TTL the SVID is re-minted every 2s: a later fetch sees a new one.
    let second = eventually(WAIT, "a rotated SVID", || {
        let next = fetch(&server.socket);
        (str_of(&next, "serial") != str_of(&first, "serial")).then_some(next)
    });
    assert_eq!(str_of(&second, "spiffe_id"), ID);
    assert!(str_of(&second, "not_after") > str_of(&first, "not_after"));
    chains_to_dev_ca(str_of(&second, "leaf_pem")).expect("the rotated SVID chains too");
    assert!(
        server
            .proc
            .log_text()
            .contains("rotated the SVID at half-life")
    );
}

#[test]
fn sighup_rotates_at_once_and_sigterm_stops_cleanly() {
    // A long TTL: only SIGHUP can change the SVID during this test.
    let mut server = start("workload-api-hup", "1h");
    let first = fetch(&server.socket);
    server.proc.signal("HUP");
    let second = eventually(WAIT, "a new SVID after SIGHUP", || {
        let next = fetch(&server.socket);
        (str_of(&next, "serial") != str_of(&first, "serial")).then_some(next)
    });
    chains_to_dev_ca(str_of(&second, "leaf_pem")).expect("the new SVID chains");
    assert!(server.proc.log_text().contains("SIGHUP: rotated the SVID"));

    server.proc.signal("TERM");
    let status = eventually(WAIT, "nexusctl to exit on SIGTERM", || {
        server.proc.child.try_wait().ok().flatten()
    });
    assert!(
        status.success(),
        "exit status {status}: {}",
        server.proc.log_text()
    );
    assert!(!server.socket.exists(), "the socket is removed on exit");
}

#[test]
fn requests_without_the_security_header_are_refused() {
    let server = start("workload-api-header", "1h");
    let refused = python("missing_header.py", &server.socket).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(str_of(&refused, "code"), "INVALID_ARGUMENT", "{refused}");
    assert_eq!(
        str_of(&refused, "details"),
        "security header missing from request"
    );

    // The same through grpc-go (grpcurl), with and without the header.
    let proto = std::path::Path::new(nexus_proto::WORKLOAD_PROTO);
    let grpcurl = |header: Option<&str>| {
        let mut command = Command::new("grpcurl");
        command
            .args(["-plaintext", "-max-time", "3", "-import-path"])
            .arg(proto.parent().expect("the proto's folder"))
            .arg("-proto")
            .arg(proto.file_name().expect("the proto's name"));
        if let Some(header) = header {
            command.args(["-H", header]);
        }
        command
            .args(["-unix", server.socket.to_str().expect("utf-8 temp path")])
            .arg("SpiffeWorkloadAPI/FetchX509Bundles");
        command
            .output()
            .expect("grpcurl is installed (pip install -r tests/requirements.txt)")
    };
    let without = grpcurl(None);
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(!without.status.success());
    assert!(stderr.contains("InvalidArgument"), "{stderr}");
    assert!(
        stderr.contains("security header missing from request"),
        "{stderr}"
    );
    // A server stream never ends by itself: -max-time cuts it after the first message.
    let with = grpcurl(Some("workload.spiffe.io: true"));
    let stdout = String::from_utf8_lossy(&with.stdout);
    assert!(
        stdout.contains("nexus.local"),
        "{stdout}{}",
        String::from_utf8_lossy(&with.stderr)
    );
}
