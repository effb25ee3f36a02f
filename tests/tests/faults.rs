//! The fault matrix (docs/faults.md): one test per fault, with the real binaries, each
//! asserting that nothing fails open and nothing acknowledged is lost. Faults covered in
//! other targets are listed in docs/faults.md with their test.

use std::collections::BTreeSet;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use nexus_tests::stack::{
    DATA_API_ID, GATEWAY_ID, PLUGIN_ID, SlowTwoHop, data_api, gateway, gateway_toml,
    inbound_curl_args, nexusctl_at, sidecar, sidecar_with_env, slow_app, slow_two_hop,
    workload_api,
};
use nexus_tests::{
    bin, cert, copy_dir, curl, curl_status, eventually, raw_tcp, repo_root, rfc3339,
    stack::port_of, temp_dir,
};

/// What one client saw.
#[derive(Debug)]
struct Answer {
    status: u16,
    seconds: f64,
    retry_after: String,
    body: String,
}

/// One GET with curl on its own thread (HTTP/2 with prior knowledge if `h2`).
fn fire(url: String, h2: bool) -> JoinHandle<Answer> {
    std::thread::spawn(move || {
        let mut command = Command::new("curl");
        command.args([
            "-sS",
            "--max-time",
            "60",
            "-w",
            "\n%{http_code} %{time_total} %header{retry-after}",
        ]);
        if h2 {
            command.arg("--http2-prior-knowledge");
        }
        let out = command.arg(&url).output().expect("curl is installed");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, last) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        let mut fields = last.split(' ');
        Answer {
            status: fields.next().and_then(|s| s.parse().ok()).unwrap_or(0),
            seconds: fields
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN),
            retry_after: fields.next().unwrap_or_default().trim().to_string(),
            body: body.to_string(),
        }
    })
}

fn collect(calls: Vec<JoinHandle<Answer>>) -> Vec<Answer> {
    calls
        .into_iter()
        .map(|c| c.join().expect("client thread"))
        .collect()
}

/// Waits (bounded) for the process to exit and returns its exit code.
fn exit_code(proc: &mut nexus_tests::Proc, within: Duration, what: &str) -> Option<i32> {
    eventually(within, what, || {
        proc.child
            .try_wait()
            .ok()
            .flatten()
            .map(|status| status.code())
    })
}

/// A request to the data sidecar's inbound on a new connection: 0 when refused.
fn inbound_status(stack: &SlowTwoHop) -> u16 {
    let port = stack.data.inbound_port();
    let args = nexus_tests::stack::inbound_curl_args(port, Some("nexus.local/flood-model"));
    let url = format!("https://localhost:{port}/fast");
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend(["--max-time", "5", url.as_str()]);
    curl_status(&all)
}

/// SIGTERM under load: /ready turns 503 at once, the listener keeps accepting for
/// drain_delay and then refuses, every request in flight (HTTP/1.1 and HTTP/2 streams,
/// the latter after GOAWAY) finishes with 200, and the sidecar exits 0.
#[test]
fn sigterm_under_load_fails_no_request_in_flight() {
    let dir = temp_dir("fault-sigterm");
    let mut stack = slow_two_hop(
        dir.path(),
        "[limits]\ndrain_delay = \"4s\"\nshutdown_grace = \"25s\"\n",
        "",
    );
    let n = 24;
    let calls: Vec<_> = (0..n)
        .map(|i| fire(stack.outbound_url(&format!("/slow/5000/{i}")), i % 2 == 0))
        .collect();
    stack.data.wait_metric(
        "nexus_requests_in_flight{direction=\"inbound\"}",
        f64::from(n),
        Duration::from_secs(20),
    );
    stack.data.proc.signal("TERM");
    let signaled = Instant::now();
    eventually(
        Duration::from_secs(2),
        "/ready 503 right after SIGTERM",
        || (stack.data.ready_status() == 503).then_some(()),
    );
    // Still accepting during the drain delay (4s, room for a loaded machine): a request
    // sent now, on a new connection, is served.
    let during = fire(stack.outbound_url("/slow/10/during-delay"), false);
    eventually(
        Duration::from_secs(15),
        "the inbound listener to refuse new connections after drain_delay",
        || (inbound_status(&stack) == 0).then_some(()),
    );
    assert!(
        signaled.elapsed() >= Duration::from_millis(3500),
        "the listener closed before drain_delay (4s): {:?}",
        signaled.elapsed()
    );
    let during = during.join().expect("client");
    assert_eq!(
        during.status, 200,
        "a request during the drain delay: {during:?}"
    );
    let answers = collect(calls);
    let failed: Vec<&Answer> = answers.iter().filter(|a| a.status != 200).collect();
    assert!(
        failed.is_empty(),
        "in-flight requests failed across SIGTERM: {failed:?}"
    );
    let code = exit_code(
        &mut stack.data.proc,
        Duration::from_secs(25),
        "sidecar exit",
    );
    assert_eq!(code, Some(0), "log:\n{}", stack.data.proc.log_text());
    assert!(stack.data.proc.log_text().contains("drained"));
}

/// Overload: beyond limits.max_in_flight a request is answered 503 with retry-after at
/// once (not queued behind the slow ones), counted, and the sidecar serves again after.
#[test]
fn overload_is_shed_with_503_not_queued() {
    let dir = temp_dir("fault-overload");
    let stack = slow_two_hop(dir.path(), "[limits]\nmax_in_flight = 4\n", "");
    let n = 16;
    let calls: Vec<_> = (0..n)
        .map(|i| fire(stack.outbound_url(&format!("/slow/8000/{i}")), false))
        .collect();
    let answers = collect(calls);
    let ok: Vec<&Answer> = answers.iter().filter(|a| a.status == 200).collect();
    let shed: Vec<&Answer> = answers.iter().filter(|a| a.status == 503).collect();
    assert_eq!(ok.len(), 4, "exactly max_in_flight served: {answers:?}");
    assert_eq!(shed.len(), n - 4, "the rest shed: {answers:?}");
    for answer in &shed {
        assert_eq!(answer.retry_after, "1", "{answer:?}");
        assert!(answer.body.contains("overloaded"), "{answer:?}");
        assert!(answer.body.contains("limits.max_in_flight"), "{answer:?}");
        assert!(
            answer.seconds < 4.0,
            "a shed request waited behind the slow ones: {answer:?}"
        );
    }
    let counted = stack
        .data
        .metric_sum("nexus_requests_shed_total{direction=\"inbound\"}");
    assert_eq!(counted, (n - 4) as f64);
    assert_eq!(
        curl_status(&[&stack.outbound_url("/slow/10/after")]),
        200,
        "serves again once the load is gone"
    );
}

/// The threads of process `pid` whose name starts with `prefix`, with the CPU time
/// each has run (ns, from `/proc/PID/task/TID/schedstat`).
fn threads(pid: u32, prefix: &str) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .filter_map(|t| {
            let path = t.ok()?.path();
            let comm = std::fs::read_to_string(path.join("comm")).ok()?;
            if !comm.trim().starts_with(prefix) {
                return None;
            }
            let sched = std::fs::read_to_string(path.join("schedstat")).ok()?;
            sched.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// limits.worker_threads is how many threads serve requests, and limits.runtime how:
/// a sidecar with one connection worker (the default runtime) and a sidecar with three
/// shared-runtime threads both carry the two-hop traffic. Each runs exactly that many,
/// and with workers the requests run on the worker, not on the control-plane thread.
#[test]
fn worker_threads_is_the_number_of_request_threads() {
    let dir = temp_dir("fault-workers");
    let stack = slow_two_hop(
        dir.path(),
        "[limits]\nworker_threads = 1\n",
        "[limits]\nworker_threads = 3\nruntime = \"shared\"\n",
    );
    let (data, plugin) = (stack.data.proc.pid(), stack.plugin.proc.pid());
    assert_eq!(
        threads(data, "nexus-worker").len(),
        1,
        "one connection worker"
    );
    assert_eq!(
        threads(data, "tokio-rt-worker").len(),
        1,
        "one control-plane thread"
    );
    assert_eq!(
        threads(plugin, "tokio-rt-worker").len(),
        3,
        "three shared threads"
    );
    assert!(
        threads(plugin, "nexus-worker").is_empty(),
        "no workers when shared"
    );
    let before = (
        threads(data, "nexus-worker")[0],
        threads(data, "tokio-rt-worker")[0],
    );
    for i in 0..20 {
        assert_eq!(
            curl_status(&[&stack.outbound_url(&format!("/slow/1/{i}"))]),
            200
        );
    }
    let after = (
        threads(data, "nexus-worker")[0],
        threads(data, "tokio-rt-worker")[0],
    );
    let (worker, control) = (after.0 - before.0, after.1 - before.1);
    assert!(
        worker > control,
        "the worker ran the connections ({worker} ns) more than the control plane did ({control} ns)"
    );
}

/// limits.runtime = "workers" (the default): a client opening many connections does not
/// pile them on one worker (each goes to the worker serving the fewest), the workers
/// share one limits.max_connections, and a closed connection gives its place back.
#[test]
fn connections_are_spread_over_the_workers_and_given_back() {
    let dir = temp_dir("fault-spread");
    let stack = slow_two_hop(
        dir.path(),
        "",
        "[limits]\nworker_threads = 2\nmax_connections = 8\nheader_read_timeout = \"60s\"\n",
    );
    let outbound = stack.plugin.outbound("hazard");
    let per_worker = |stack: &nexus_tests::stack::SlowTwoHop| {
        (
            stack
                .plugin
                .metric_sum("nexus_worker_connections{worker=\"0\"}"),
            stack
                .plugin
                .metric_sum("nexus_worker_connections{worker=\"1\"}"),
        )
    };
    // Eight idle connections: every place under max_connections taken.
    let held: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(&outbound).expect("connect"))
        .collect();
    let counts = eventually(
        Duration::from_secs(10),
        "8 connections on the workers",
        || {
            let (a, b) = per_worker(&stack);
            (a + b == 8.0).then_some((a, b))
        },
    );
    assert_eq!(counts, (4.0, 4.0), "spread evenly over the two workers");
    // A ninth waits in the accept queue, on neither worker, until a place is free.
    let ninth = fire(stack.outbound_url("/slow/10/ninth"), false);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!ninth.is_finished(), "served past limits.max_connections");
    assert_eq!(per_worker(&stack), (4.0, 4.0));
    drop(held);
    let answer = ninth.join().expect("client");
    assert_eq!(
        answer.status, 200,
        "served once places were free: {answer:?}"
    );
    eventually(Duration::from_secs(10), "every place given back", || {
        (per_worker(&stack) == (0.0, 0.0)).then_some(())
    });
}

/// A request whose upstream does not answer within limits.request_timeout gets 504 with
/// the reason, at the timeout, counted.
#[test]
fn request_timeout_answers_504_with_the_reason() {
    let dir = temp_dir("fault-timeout");
    let stack = slow_two_hop(dir.path(), "[limits]\nrequest_timeout = \"1s\"\n", "");
    let answer = collect(vec![fire(stack.outbound_url("/slow/8000/late"), false)])
        .pop()
        .expect("one answer");
    assert_eq!(answer.status, 504, "{answer:?}");
    assert!(answer.body.contains("limits.request_timeout"), "{answer:?}");
    assert!(answer.seconds < 5.0, "{answer:?}");
    assert_eq!(
        stack
            .data
            .metric_sum("nexus_requests_timed_out_total{direction=\"inbound\"}"),
        1.0
    );
    assert_eq!(curl_status(&[&stack.outbound_url("/slow/10/fast")]), 200);
}

/// The grace running out ends the drain (exit status 1: a request was cut), and so
/// does a second SIGTERM, at once.
#[test]
fn grace_expiry_or_second_sigterm_stops_at_once() {
    let dir = temp_dir("fault-second-sigterm");
    let mut stack = slow_two_hop(
        dir.path(),
        "[limits]\ndrain_delay = \"1s\"\nshutdown_grace = \"60s\"\n",
        "[limits]\ndrain_delay = \"0s\"\nshutdown_grace = \"3s\"\n",
    );
    // The plugin sidecar's grace (3s) runs out with a request in flight.
    let cut = fire(stack.outbound_url("/slow/40000/cut-by-grace"), false);
    stack.plugin.wait_metric(
        "nexus_requests_in_flight{direction=\"outbound\"}",
        1.0,
        Duration::from_secs(20),
    );
    let signaled = Instant::now();
    stack.plugin.proc.signal("TERM");
    let code = exit_code(
        &mut stack.plugin.proc,
        Duration::from_secs(15),
        "exit at the grace",
    );
    let took = signaled.elapsed();
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert_eq!(code, Some(1), "log:\n{}", stack.plugin.proc.log_text());
    assert!(stack.plugin.proc.log_text().contains("shutdown_grace"));
    assert_ne!(cut.join().expect("client").status, 200);

    // A second SIGTERM on the data sidecar (grace 60s) while a request is in flight.
    let port = stack.data.inbound_port();
    let url = format!("https://localhost:{port}/slow/40000/cut-by-second-sigterm");
    let args = nexus_tests::stack::inbound_curl_args(port, Some("nexus.local/flood-model"));
    let in_flight = std::thread::spawn(move || {
        let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
        all.extend(["--max-time", "60", url.as_str()]);
        curl_status(&all)
    });
    eventually(Duration::from_secs(20), "one request in flight", || {
        (stack
            .data
            .metric_sum("nexus_requests_in_flight{direction=\"inbound\"}")
            >= 1.0)
            .then_some(())
    });
    stack.data.proc.signal("TERM");
    eventually(Duration::from_secs(2), "/ready 503", || {
        (stack.data.ready_status() == 503).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(stack.data.proc.is_running(), "still draining (grace 60s)");
    let second = Instant::now();
    stack.data.proc.signal("TERM");
    let code = exit_code(
        &mut stack.data.proc,
        Duration::from_secs(10),
        "exit on the second SIGTERM",
    );
    assert!(
        second.elapsed() < Duration::from_secs(5),
        "{:?}",
        second.elapsed()
    );
    assert_eq!(code, Some(1));
    assert_ne!(in_flight.join().expect("client"), 200);
}

/// Limits out of bounds are refused at load with the field named (exit 64).
#[test]
fn out_of_bounds_limits_are_refused_naming_the_field() {
    let dir = temp_dir("fault-limits");
    for (toml, field) in [
        (
            "[limits]\nshutdown_grace = \"0s\"\n",
            "limits.shutdown_grace",
        ),
        (
            "[limits]\nshutdown_grace = \"2h\"\n",
            "limits.shutdown_grace",
        ),
        (
            "[limits]\nrequest_timeout = \"0s\"\n",
            "limits.request_timeout",
        ),
        (
            "[limits]\nrequest_timeout = \"3h\"\n",
            "limits.request_timeout",
        ),
        ("[limits]\nmax_in_flight = 0\n", "limits.max_in_flight"),
        ("[limits]\nworker_threads = 5000\n", "limits.worker_threads"),
        (
            "[limits]\nmax_in_flight = 5000000\n",
            "limits.max_in_flight",
        ),
        (
            "[limits]\ndrain_delay = \"40s\"\nshutdown_grace = \"30s\"\n",
            "limits.drain_delay",
        ),
        ("[limits]\nshutdown_grace = \"-1s\"\n", "shutdown_grace"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, toml).expect("write");
        let out = Command::new(bin("nexus-sidecar"))
            .args(["--check", "--config"])
            .arg(&path)
            .env_remove("SPIFFE_ENDPOINT_SOCKET")
            .env("NEXUS_WORKLOAD_API_SOCKET", "unix:///nonexistent.sock")
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{toml}: {stderr}");
        assert!(stderr.contains(field), "{toml}: {stderr}");
    }
    for (toml, field) in [
        (
            "[limits]\nshutdown_grace = \"0s\"\n",
            "limits.shutdown_grace",
        ),
        (
            "[limits]\ndrain_delay = \"30s\"\nshutdown_grace = \"30s\"\n",
            "limits.drain_delay",
        ),
        (
            "[admin]\nheader_read_timeout = \"0s\"\n",
            "admin.header_read_timeout",
        ),
    ] {
        let path = dir.path().join("bad-gateway.toml");
        std::fs::write(&path, toml).expect("write");
        let out = Command::new(bin("nexus-gateway"))
            .args(["--check", "--config"])
            .arg(&path)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{toml}: {stderr}");
        assert!(stderr.contains(field), "{toml}: {stderr}");
    }
}

/// The gateway drains too: /ready 503 at once, control streams end (the sidecar sees
/// the link drop instead of the gateway waiting out its grace for them), exit 0 well
/// within the grace; its admin listener closes a connection that sends no request head
/// (admin.header_read_timeout, default 10s), as the sidecar's listeners do.
#[test]
fn gateway_sigterm_drains_and_ends_control_streams() {
    let dir = temp_dir("fault-gateway-drain");
    let gw_api = workload_api(dir.path(), "gateway-workload-api", GATEWAY_ID, &[]);
    let mut gw = gateway(
        dir.path(),
        "gateway",
        &gw_api,
        None,
        None,
        "[limits]\ndrain_delay = \"1s\"\nshutdown_grace = \"20s\"\n",
    );
    let api = workload_api(dir.path(), "plugin-workload-api", PLUGIN_ID, &[]);
    let sc = sidecar(
        dir.path(),
        "plugin-sidecar",
        &format!(
            "[identity]\nworkload_api_socket = {:?}\n\n{}",
            api.url(),
            gateway_toml(&gw, dir.path(), "plugin-sidecar", "")
        ),
        true,
    );
    sc.wait_metric(
        "nexus_gateway_link{state=\"connected\"}",
        1.0,
        Duration::from_secs(20),
    );
    let admin_port = port_of(gw.addresses["admin"].as_str().unwrap_or_default());
    let idle = raw_tcp(
        admin_port,
        b"GET /ready HTTP/1.1\r\n",
        Duration::from_secs(20),
    );
    assert!(
        idle.end == "eof" || idle.end == "reset",
        "an unfinished head was not cut: {} after {}s",
        idle.end,
        idle.elapsed
    );
    assert!(idle.elapsed < 15.0, "{}", idle.elapsed);

    let signaled = Instant::now();
    gw.proc.signal("TERM");
    eventually(Duration::from_secs(2), "gateway /ready 503", || {
        (curl_status(&[&format!("{}/ready", gw.admin())]) == 503).then_some(())
    });
    let code = exit_code(&mut gw.proc, Duration::from_secs(20), "gateway exit");
    assert_eq!(code, Some(0), "log:\n{}", gw.proc.log_text());
    assert!(
        signaled.elapsed() < Duration::from_secs(10),
        "the gateway waited for its control streams instead of ending them: {:?}",
        signaled.elapsed()
    );
    assert!(gw.proc.log_text().contains("the gateway is draining"));
    sc.wait_metric(
        "nexus_gateway_link{state=\"disconnected\"}",
        1.0,
        Duration::from_secs(20),
    );
}

/// The Workload API goes away until the SVID expires: the sidecar turns not ready and
/// serves nothing with the expired SVID (no fail-open); when the Workload API is back,
/// the sidecar picks up a fresh SVID by itself and serves again.
#[test]
fn workload_api_gone_until_the_svid_expires_and_back() {
    let dir = temp_dir("fault-workload-api");
    let d = dir.path();
    let args = ["--dns-name", "localhost", "--ttl", "4s"];
    let mut wl = workload_api(d, "data-workload-api", DATA_API_ID, &args);
    let app = slow_app(d);
    let data = sidecar(
        d,
        "data-sidecar",
        &format!(
            "[identity]\nworkload_api_socket = {:?}\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = {:?}\napp_protocol = \"http1\"\nallowed_ids = [\"spiffe://nexus.local/ns/plugins/*\"]\n",
            wl.url(),
            app.addr
        ),
        true,
    );
    let port = data.inbound_port();
    let call = || {
        let args = nexus_tests::stack::inbound_curl_args(port, Some("nexus.local/flood-model"));
        let url = format!("https://localhost:{port}/slow/1/x");
        let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
        all.extend(["--max-time", "5", url.as_str()]);
        curl_status(&all)
    };
    assert_eq!(call(), 200);
    wl.proc.signal("TERM");
    eventually(Duration::from_secs(20), "the Workload API to stop", || {
        (!wl.proc.is_running()).then_some(())
    });
    eventually(
        Duration::from_secs(20),
        "/ready 503 on the expired SVID",
        || (data.ready_status() == 503).then_some(()),
    );
    assert_eq!(call(), 0, "a request was served with an expired SVID");
    let socket = wl.socket.clone();
    let _ = std::fs::remove_file(&socket);
    let back = workload_api(d, "data-workload-api-back", DATA_API_ID, &args);
    assert_eq!(
        back.socket,
        socket.with_file_name("data-workload-api-back.sock")
    );
    // Same socket path as the sidecar's config: move the new socket into place.
    std::fs::rename(&back.socket, &socket).expect("move the socket into place");
    eventually(
        Duration::from_secs(30),
        "/ready 200 with a fresh SVID",
        || (data.ready_status() == 200).then_some(()),
    );
    assert_eq!(call(), 200);
}

/// The gateway is killed with -9 while operators are revoking workloads and opening
/// executions: every call that was acknowledged (exit 0, an id printed) is in the state
/// after the restart and reaches the sidecar; calls made while it was down fail
/// visibly instead of being acknowledged.
#[test]
fn gateway_kill_9_mid_revoke_and_mid_execution_open_loses_nothing_acknowledged() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let dir = temp_dir("fault-gateway-kill9");
    let gw_api = workload_api(dir.path(), "gateway-workload-api", GATEWAY_ID, &[]);
    let mut gw = gateway(
        dir.path(),
        "gateway",
        &gw_api,
        None,
        Some(&format!("127.0.0.1:{}", nexus_tests::free_port())),
        "",
    );
    let api = workload_api(dir.path(), "data-workload-api", DATA_API_ID, &[]);
    let data = sidecar(
        dir.path(),
        "data-sidecar",
        &format!(
            "[identity]\nworkload_api_socket = {:?}\n\n{}",
            api.url(),
            gateway_toml(&gw, dir.path(), "data-sidecar", "")
        ),
        true,
    );
    gw.wait_in_sync(1);

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let grpc = gw.grpc();
    let worker = {
        let (stop, acked) = (stop.clone(), acked.clone());
        std::thread::spawn(move || {
            let (mut revoked, mut opened, mut failed) = (Vec::new(), Vec::new(), 0);
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let subject = format!("spiffe://nexus.local/ns/t/sa/k{i}");
                let out = nexusctl_at(
                    &grpc,
                    "nexus.local/operator",
                    &["revoke", &subject, "--reason", "kill-9 fault"],
                );
                if out.status.success() {
                    revoked.push(subject);
                    acked.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed += 1;
                }
                let out = nexusctl_at(
                    &grpc,
                    "nexus.local/operator",
                    &[
                        "exec",
                        "open",
                        "--plugin",
                        PLUGIN_ID,
                        "--clause",
                        &format!("c-{i}"),
                        "--ttl",
                        "1h",
                    ],
                );
                let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if out.status.success() && !id.is_empty() {
                    opened.push(id);
                    acked.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed += 1;
                }
                i += 1;
            }
            (revoked, opened, failed)
        })
    };
    eventually(
        Duration::from_secs(60),
        "calls acknowledged before the kill",
        || (acked.load(Ordering::SeqCst) >= 6).then_some(()),
    );
    gw.kill9();
    std::thread::sleep(Duration::from_millis(500));
    gw.restart();
    let after = acked.load(Ordering::SeqCst);
    eventually(
        Duration::from_secs(60),
        "calls acknowledged after the restart",
        || (acked.load(Ordering::SeqCst) >= after + 4).then_some(()),
    );
    stop.store(true, Ordering::SeqCst);
    let (revoked, opened, failed) = worker.join().expect("worker");
    assert!(failed > 0, "no call was made while the gateway was down");

    let status = gw.wait_in_sync(1);
    let kept: BTreeSet<String> = status["revoked"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["subject"].as_str().map(str::to_string))
        .collect();
    for subject in &revoked {
        assert!(
            kept.contains(subject),
            "acknowledged revocation {subject} lost: {status}"
        );
    }
    let list: serde_json::Value =
        serde_json::from_str(&gw.nexusctl(&["exec", "list", "-o", "json"])).expect("JSON");
    let open: BTreeSet<String> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["open"] == true)
        .filter_map(|e| e["id"].as_str().map(str::to_string))
        .collect();
    for id in &opened {
        assert!(
            open.contains(id),
            "acknowledged execution {id} lost: {list}"
        );
    }
    // The sidecar applied everything: the revision it acknowledged is the gateway's.
    let revision = status["revision"].as_u64().expect("revision");
    assert!(revision >= (revoked.len() + opened.len()) as u64);
    drop(data);
}

/// PostgreSQL restarts under two gateways: while it is down a change is refused, never
/// acknowledged; the sidecars keep enforcing; once it is back, both gateways serve again
/// by themselves, every acknowledged change is kept, and a change made through one
/// gateway reaches the other's sidecar.
#[test]
fn postgresql_restart_under_two_gateways() {
    let dir = temp_dir("fault-postgres-restart");
    let pg_dir = tempfile::Builder::new()
        .prefix("nexus-pg")
        .tempdir_in("/tmp")
        .expect("pg dir");
    let data = pg_dir.path().join("data");
    let port = nexus_tests::free_port().to_string();
    let script = nexus_tests::repo_root().join("scripts/postgres.sh");
    let pg = |what: &str| {
        let mut command = Command::new(&script);
        command.arg(what).arg(&data);
        if what == "start" {
            command.arg(&port);
        }
        nexus_tests::stdout_of(&mut command, &format!("scripts/postgres.sh {what}"))
    };
    struct Stop<F: Fn()>(F);
    impl<F: Fn()> Drop for Stop<F> {
        fn drop(&mut self) {
            (self.0)();
        }
    }
    let url = pg("start");
    let _stop = Stop(|| {
        let _ = Command::new(&script).arg("stop").arg(&data).output();
    });

    let gw_api = workload_api(dir.path(), "gateway-workload-api", GATEWAY_ID, &[]);
    let a = gateway(dir.path(), "gateway-a", &gw_api, Some(&url), None, "");
    let b = gateway(dir.path(), "gateway-b", &gw_api, Some(&url), None, "");
    let api = workload_api(dir.path(), "data-workload-api", DATA_API_ID, &[]);
    let sc = sidecar(
        dir.path(),
        "data-sidecar",
        &format!(
            "[identity]\nworkload_api_socket = {:?}\n\n{}",
            api.url(),
            gateway_toml(&b, dir.path(), "data-sidecar", "")
        ),
        true,
    );
    a.nexusctl(&[
        "revoke",
        "spiffe://nexus.local/ns/t/sa/before",
        "--reason",
        "pg fault",
    ]);
    sc.wait_metric("nexus_gateway_revision", 1.0, Duration::from_secs(20));

    pg("stop");
    let refused = a.nexusctl_as(
        "nexus.local/operator",
        &[
            "revoke",
            "spiffe://nexus.local/ns/t/sa/during",
            "--reason",
            "pg down",
        ],
    );
    assert!(
        !refused.status.success(),
        "a change was acknowledged while the store was down: {}",
        String::from_utf8_lossy(&refused.stdout)
    );
    for gw in [&a, &b] {
        eventually(
            Duration::from_secs(20),
            "gateway /ready 503 without its store",
            || (curl_status(&[&format!("{}/ready", gw.admin())]) == 503).then_some(()),
        );
    }
    // The sidecar keeps enforcing what it has.
    assert_eq!(sc.ready_status(), 200);

    pg("start");
    for gw in [&a, &b] {
        eventually(
            Duration::from_secs(30),
            "gateway /ready 200 with its store back",
            || (curl_status(&[&format!("{}/ready", gw.admin())]) == 200).then_some(()),
        );
    }
    eventually(
        Duration::from_secs(30),
        "a change through A after the restart",
        || {
            a.nexusctl_as(
                "nexus.local/operator",
                &[
                    "revoke",
                    "spiffe://nexus.local/ns/t/sa/after",
                    "--reason",
                    "pg back",
                ],
            )
            .status
            .success()
            .then_some(())
        },
    );
    let status = b.status();
    let kept: BTreeSet<String> = status["revoked"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["subject"].as_str().map(str::to_string))
        .collect();
    assert!(
        kept.contains("spiffe://nexus.local/ns/t/sa/before"),
        "{status}"
    );
    let revision = eventually(Duration::from_secs(30), "B to see A's change", || {
        let s = b.status();
        s["revoked"]
            .as_array()?
            .iter()
            .any(|r| r["subject"] == "spiffe://nexus.local/ns/t/sa/after")
            .then(|| s["revision"].as_u64())
            .flatten()
    });
    sc.wait_metric(
        "nexus_gateway_revision",
        revision as f64,
        Duration::from_secs(30),
    );
}

/// A peer's SVID expires in the middle of a connection (its Workload API is gone, so it
/// is not renewed): the connection authenticated with it is closed at the certificate's
/// not-after instead of carrying requests on an expired identity, and new handshakes
/// with it fail. Counted as `reason="peer_certificate_expired"`.
#[test]
fn svid_expiry_mid_connection_closes_the_connection() {
    let dir = temp_dir("fault-svid-expiry");
    let d = dir.path();
    let data_api = workload_api(d, "data-workload-api", DATA_API_ID, &[]);
    let plugin_api = workload_api(d, "plugin-workload-api", PLUGIN_ID, &["--ttl", "5s"]);
    let app = slow_app(d);
    let data = sidecar(
        d,
        "data-sidecar",
        &format!(
            "[identity]\nworkload_api_socket = {:?}\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = {:?}\napp_protocol = \"http1\"\nallowed_ids = [\"spiffe://nexus.local/ns/plugins/*\"]\n",
            data_api.url(),
            app.addr
        ),
        true,
    );
    let plugin = sidecar(
        d,
        "plugin-sidecar",
        &format!(
            "[identity]\nworkload_api_socket = {socket:?}\n\n[[outbound]]\nname = \"hazard\"\nlisten = \"127.0.0.1:0\"\nupstream = {upstream:?}\nexpected_id = {DATA_API_ID:?}\n",
            socket = plugin_api.url(),
            upstream = data.inbound(),
        ),
        true,
    );
    // The plugin's agent goes away: its SVID is not renewed and expires within 5s.
    plugin_api.proc.signal("KILL");
    let url = format!("http://{}/slow/1/keep-alive", plugin.outbound("hazard"));
    // One keep-alive connection from the plugin sidecar to the data sidecar carries
    // these (its pool keeps it between requests 200 ms apart).
    let started = Instant::now();
    let mut served_after_expiry = 0;
    let mut refused = 0;
    while started.elapsed() < Duration::from_secs(12) {
        let status = curl_status(&["--max-time", "5", &url]);
        if started.elapsed() > Duration::from_secs(8) {
            if status == 200 {
                served_after_expiry += 1;
            } else {
                refused += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        served_after_expiry, 0,
        "requests were served on a connection whose peer SVID had expired"
    );
    assert!(refused > 0);
    assert!(
        data.metric_sum(
            "nexus_connection_errors_total{direction=\"inbound\",reason=\"peer_certificate_expired\"}"
        ) >= 1.0,
        "{}",
        data.metrics()
    );
}

/// The plugin's own shutdown is not cut by its sidecar: when both get SIGTERM together
/// (as outside Kubernetes' native-sidecar ordering), the calls the plugin makes while it
/// shuts down (new connections, during the sidecar's drain delay) still go through, and
/// a call in flight finishes.
#[test]
fn the_plugins_shutdown_calls_pass_while_its_sidecar_drains() {
    let dir = temp_dir("fault-plugin-shutdown");
    let mut stack = slow_two_hop(
        dir.path(),
        "",
        "[limits]\ndrain_delay = \"5s\"\nshutdown_grace = \"20s\"\n",
    );
    let in_flight = fire(stack.outbound_url("/slow/2500/in-flight"), false);
    stack.plugin.wait_metric(
        "nexus_requests_in_flight{direction=\"outbound\"}",
        1.0,
        Duration::from_secs(20),
    );
    stack.plugin.proc.signal("TERM");
    let signaled = Instant::now();
    // The plugin's last calls, each on a new connection, during the drain delay.
    let mut last_calls = Vec::new();
    while signaled.elapsed() < Duration::from_millis(2000) {
        last_calls.push(curl_status(&[
            "--max-time",
            "5",
            &stack.outbound_url("/slow/10/flush"),
        ]));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!last_calls.is_empty());
    assert!(
        last_calls.iter().all(|s| *s == 200),
        "a call made during the sidecar's drain delay failed: {last_calls:?}"
    );
    assert_eq!(in_flight.join().expect("client").status, 200);
    let code = exit_code(
        &mut stack.plugin.proc,
        Duration::from_secs(20),
        "plugin sidecar exit",
    );
    assert_eq!(code, Some(0), "{}", stack.plugin.proc.log_text());
}

/// libfaketime's multi-threaded build (Debian's `libfaketime` package).
fn libfaketime() -> String {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
        "/usr/local/lib/faketime/libfaketimeMT.so.1",
    ];
    candidates
        .iter()
        .find(|c| std::path::Path::new(c).exists())
        .unwrap_or_else(|| {
            panic!(
                "libfaketime is not installed ({candidates:?}): run scripts/install-test-deps.sh"
            )
        })
        .to_string()
}

/// The wall clock of a sidecar jumps (libfaketime steps its CLOCK_REALTIME and leaves
/// CLOCK_MONOTONIC alone, as stepping the system clock does). Stepped six years back,
/// into a certificate's validity that ended in 2021: an execution that had ended stays
/// closed, the expired certificate stays refused, and the open execution keeps
/// serving. Stepped forward past a revocation's `expires_at`: the workload stays
/// revoked (only the gateway lifts revocations) and nothing else is refused.
#[test]
fn a_clock_jump_on_a_sidecar_reopens_nothing_and_lifts_no_revocation() {
    let preload = libfaketime();
    let dir = temp_dir("fault-clock-jump");
    let policies = dir.path().join("policies");
    copy_dir(&repo_root().join("policies"), &policies);
    let state = dir.path().join("runtime-data.json");
    let write_state = |revoked: serde_json::Value, executions: &serde_json::Value| {
        let tmp = dir.path().join("runtime-data.json.tmp");
        let text = serde_json::json!({"executions": executions, "revoked": revoked});
        std::fs::write(&tmp, text.to_string()).expect("write state");
        std::fs::rename(&tmp, &state).expect("rename state");
    };
    let now = SystemTime::now();
    let ends = now + Duration::from_secs(4);
    let execution = |clause: &str, not_after: SystemTime| serde_json::json!({"plugin": PLUGIN_ID, "clause": clause, "not_after": rfc3339(not_after)});
    let executions = serde_json::json!({
        "ex-live": execution("c-flood-18", now + Duration::from_secs(3600)),
        "ex-short": execution("c-flood-17", ends),
    });
    write_state(serde_json::json!({}), &executions);
    let clock = dir.path().join("faketime");
    std::fs::write(&clock, "+0").expect("write faketime file");

    let workload = workload_api(
        dir.path(),
        "data-workload-api",
        DATA_API_ID,
        &["--dns-name", "localhost", "--ttl", "24h"],
    );
    let app = data_api(dir.path());
    let toml = format!(
        "[identity]\nworkload_api_socket = {socket:?}\n\n[inbound]\nlisten = \"127.0.0.1:0\"\n\
         app = {app:?}\nallowed_ids = [\"spiffe://nexus.local/ns/plugins/*\"]\n\n\
         [policy]\ndir = {policies:?}\nstate_file = {state:?}\nreload_interval = \"100ms\"\n",
        socket = workload.url(),
        app = app.http,
    );
    let clock_file = clock.to_string_lossy().into_owned();
    let sidecar = sidecar_with_env(
        dir.path(),
        "data-sidecar",
        &toml,
        true,
        &[
            ("LD_PRELOAD", preload.as_str()),
            ("FAKETIME_TIMESTAMP_FILE", clock_file.as_str()),
            ("FAKETIME_NO_CACHE", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    let port = sidecar.inbound_port();
    // (status, body) of GET /clauses/CLAUSE/rainfall as a certs-dev identity.
    let get = |name: &str, clause: &str| {
        let mut args = inbound_curl_args(port, None);
        args.extend([
            "--cert".into(),
            cert(&format!("nexus.local/{name}.pem"))
                .to_string_lossy()
                .into_owned(),
            "--key".into(),
            cert(&format!("nexus.local/{name}.key"))
                .to_string_lossy()
                .into_owned(),
            "-w".into(),
            "\n%{http_code}".into(),
            format!("https://localhost:{port}/clauses/{clause}/rainfall"),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = String::from_utf8_lossy(&curl(&args).stdout).into_owned();
        let (body, status) = out.rsplit_once('\n').unwrap_or(("", &out));
        (status.trim().parse::<u16>().unwrap_or(0), body.to_string())
    };
    let no_open_17 = "no open execution of clause c-flood-17";
    let revoked = format!("workload {PLUGIN_ID} is revoked");

    // Before any jump: both executions open, then the short one ends; the certificate
    // that expired in 2021 is refused at the handshake.
    assert_eq!(get("flood-model", "c-flood-18").0, 200);
    eventually(Duration::from_secs(20), "ex-short ended", || {
        let (status, body) = get("flood-model", "c-flood-17");
        (status == 403 && body.contains(no_open_17)).then_some(())
    });
    assert!(SystemTime::now() >= ends, "denied before its not_after");
    assert_eq!(
        get("expired", "c-flood-18").0,
        0,
        "an expired certificate is refused"
    );

    // Waits until the sidecar's wall clock, as its log lines are stamped, is in
    // [from, to) (RFC 3339 prefixes compare as times), making requests so it logs.
    let clock_in = |what: &str, from: &str, to: &str| {
        eventually(Duration::from_secs(20), what, || {
            let _ = get("expired", "c-flood-18");
            let log = sidecar.proc.log_text();
            let stamp = log.lines().rev().find(|l| l.starts_with("20"))?.get(..19)?;
            (stamp >= &from[..19] && stamp < &to[..19]).then_some(())
        });
    };
    let hours = |h: u64| Duration::from_secs(h * 3600);

    // An hour back: the execution that ended would be open again at that time.
    std::fs::write(&clock, "-1h").expect("step the clock back");
    let real = SystemTime::now();
    clock_in(
        "the sidecar's clock an hour back",
        &rfc3339(real - hours(2)),
        &rfc3339(real - Duration::from_secs(50 * 60)),
    );
    // The ended execution stays closed; the open one keeps serving.
    let executions_hold = || {
        for _ in 0..3 {
            let (status, body) = get("flood-model", "c-flood-17");
            assert!(
                status == 403 && body.contains(no_open_17),
                "an ended execution reopened: {status} {body}"
            );
            let (status, body) = get("flood-model", "c-flood-18");
            assert_eq!(status, 200, "the open execution stopped serving: {body}");
        }
    };
    executions_hold();

    // Six years back, into the validity of the certificate that expired in 2021.
    std::fs::write(&clock, "-2200d").expect("step the clock back");
    clock_in(
        "the sidecar's clock in 2020",
        "2020-01-01T00:00:00",
        "2021-01-01T00:00:00",
    );
    for _ in 0..3 {
        let (status, body) = get("expired", "c-flood-18");
        assert_eq!(status, 0, "an expired certificate got through: {body}");
    }
    executions_hold();

    // Ten minutes ahead, past the expiry of a revocation the gateway gave.
    std::fs::write(&clock, "+10m").expect("step the clock forward");
    let real = SystemTime::now();
    clock_in(
        "the sidecar's clock 10 minutes ahead",
        &rfc3339(real + Duration::from_secs(9 * 60)),
        &rfc3339(real + hours(1)),
    );
    let expires = rfc3339(SystemTime::now() + Duration::from_secs(60));
    write_state(
        serde_json::json!({PLUGIN_ID: {"reason": "exfiltration", "by": "test", "expires_at": expires}}),
        &executions,
    );
    eventually(Duration::from_secs(20), "the revocation applied", || {
        let (status, body) = get("flood-model", "c-flood-18");
        (status == 403 && body.contains(&revoked)).then_some(())
    });
    for _ in 0..3 {
        let (status, body) = get("flood-model", "c-flood-18");
        assert!(
            status == 403 && body.contains(&revoked),
            "the revocation was lifted: {status} {body}"
        );
    }

    // The gateway lifts it: served again (the forward jump ended nothing else).
    write_state(serde_json::json!({}), &executions);
    eventually(Duration::from_secs(20), "reinstated", || {
        (get("flood-model", "c-flood-18").0 == 200).then_some(())
    });
    assert!(
        sidecar
            .proc
            .log_text()
            .lines()
            .all(|l| !l.contains("panicked"))
    );
}
