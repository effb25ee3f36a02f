//! Building blocks of a test stack: dev Workload APIs, the demo data API, sidecars.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Proc, bin, curl_status, eventually, read_json};

/// Well-known test identities (from certs-dev/).
pub const PLUGIN_ID: &str = "spiffe://nexus.local/ns/plugins/sa/flood-model";
/// The data API's identity.
pub const DATA_API_ID: &str = "spiffe://nexus.local/ns/data/sa/hazard-api";

/// A running dev Workload API.
pub struct WorkloadApi {
    /// The process.
    pub proc: Proc,
    /// Its socket.
    pub socket: PathBuf,
}

impl WorkloadApi {
    /// `unix://` URL of the socket.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

/// Starts `nexusctl dev workload-api` for `spiffe_id` and waits for its socket.
pub fn workload_api(dir: &Path, name: &str, spiffe_id: &str, extra: &[&str]) -> WorkloadApi {
    let socket = dir.join(format!("{name}.sock"));
    let socket_str = socket.to_string_lossy().into_owned();
    let mut args = vec![
        "dev",
        "workload-api",
        "--socket",
        socket_str.as_str(),
        "--spiffe-id",
        spiffe_id,
    ];
    args.extend_from_slice(extra);
    let proc = Proc::spawn(name, dir, &bin("nexusctl"), &args, &[]);
    eventually(Duration::from_secs(20), "workload API socket", || {
        socket.exists().then_some(())
    });
    WorkloadApi { proc, socket }
}

/// A running demo data API.
pub struct DataApi {
    /// The process.
    pub proc: Proc,
    /// HTTP `host:port`.
    pub http: String,
    /// gRPC `host:port`.
    pub grpc: String,
}

/// Starts the demo data API (HTTP and gRPC) on port 0.
pub fn data_api(dir: &Path) -> DataApi {
    let file = dir.join("data-api.json");
    let file_str = file.to_string_lossy().into_owned();
    let proc = Proc::spawn(
        "data-api",
        dir,
        &bin("nexusctl"),
        &[
            "dev",
            "data-api",
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
            "--address-file",
            &file_str,
        ],
        &[],
    );
    let addrs = read_json(&file, Duration::from_secs(20));
    DataApi {
        proc,
        http: addrs["http"].as_str().unwrap_or_default().to_string(),
        grpc: addrs["grpc"].as_str().unwrap_or_default().to_string(),
    }
}

/// A running sidecar.
pub struct Sidecar {
    /// The process.
    pub proc: Proc,
    /// The addresses it wrote.
    pub addresses: serde_json::Value,
    /// Its config file.
    pub config: PathBuf,
}

impl Sidecar {
    /// `host:port` of the inbound listener.
    pub fn inbound(&self) -> String {
        self.addresses["inbound"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Port of the inbound listener.
    pub fn inbound_port(&self) -> u16 {
        port_of(&self.inbound())
    }

    /// `host:port` of an outbound listener.
    pub fn outbound(&self, name: &str) -> String {
        self.addresses["outbound"][name]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Admin base URL.
    pub fn admin(&self) -> String {
        format!(
            "http://{}",
            self.addresses["admin"].as_str().unwrap_or_default()
        )
    }

    /// The /metrics text.
    pub fn metrics(&self) -> String {
        let out = crate::curl(&[&format!("{}/metrics", self.admin())]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sum of the metric samples whose line starts with `prefix` (name and labels).
    pub fn metric_sum(&self, prefix: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// The port of `host:port`.
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

/// Writes `toml` (with `[admin]` added on port 0 and an address file) and starts a
/// sidecar; waits until it listens, and, if `wait_ready`, until `/ready` answers 200.
pub fn sidecar(dir: &Path, name: &str, toml: &str, wait_ready: bool) -> Sidecar {
    sidecar_with_env(dir, name, toml, wait_ready, &[])
}

/// [`sidecar`] with more environment variables (e.g. `LD_PRELOAD` for libfaketime).
pub fn sidecar_with_env(
    dir: &Path,
    name: &str,
    toml: &str,
    wait_ready: bool,
    envs: &[(&str, &str)],
) -> Sidecar {
    let address_file = dir.join(format!("{name}.addresses.json"));
    let config = dir.join(format!("{name}.toml"));
    let full = format!(
        "{toml}\n[admin]\nlisten = \"127.0.0.1:0\"\naddress_file = {:?}\n",
        address_file.to_string_lossy()
    );
    std::fs::write(&config, full).expect("write config");
    let (proc, addresses) = start_with_config(
        dir,
        name,
        "nexus-sidecar",
        &config,
        &address_file,
        Duration::from_secs(20),
        envs,
    );
    let sidecar = Sidecar {
        proc,
        addresses,
        config,
    };
    if wait_ready {
        let url = format!("{}/ready", sidecar.admin());
        eventually(Duration::from_secs(60), "sidecar /ready", || {
            (curl_status(&[&url]) == 200).then_some(())
        });
    }
    sidecar
}

impl Sidecar {
    /// Waits until the sum of the samples matching `prefix` reaches `at_least`, and
    /// returns it.
    pub fn wait_metric(&self, prefix: &str, at_least: f64, timeout: Duration) -> f64 {
        eventually(
            timeout,
            &format!("{prefix} >= {at_least} on {}", self.admin()),
            || {
                let v = self.metric_sum(prefix);
                (v >= at_least).then_some(v)
            },
        )
    }

    /// The HTTP status of `/ready`.
    pub fn ready_status(&self) -> u16 {
        curl_status(&[&format!("{}/ready", self.admin())])
    }
}

/// A certs-dev identity as curl arguments (`--cert`, `--key`), e.g.
/// `nexus.local/flood-model`.
pub fn client_cert_args(identity: &str) -> Vec<String> {
    vec![
        "--cert".into(),
        crate::cert(&format!("{identity}.pem"))
            .to_string_lossy()
            .into_owned(),
        "--key".into(),
        crate::cert(&format!("{identity}.key"))
            .to_string_lossy()
            .into_owned(),
    ]
}

/// curl arguments for `https://localhost:PORT` on an inbound listener: trust the
/// nexus.local CA, resolve `localhost` to 127.0.0.1 only, and present `identity` (a
/// certs-dev name such as `nexus.local/flood-model`) unless it is `None`.
pub fn inbound_curl_args(port: u16, identity: Option<&str>) -> Vec<String> {
    let mut args = vec![
        "--cacert".into(),
        crate::cert("nexus.local/ca.pem")
            .to_string_lossy()
            .into_owned(),
        "--resolve".into(),
        format!("localhost:{port}:127.0.0.1"),
    ];
    if let Some(identity) = identity {
        args.extend(client_cert_args(identity));
    }
    args
}

/// Options of [`two_hop`].
#[derive(Debug, Default, Clone)]
pub struct TwoHopOptions {
    /// The data sidecar's app is the data API's gRPC port instead of its HTTP port.
    pub grpc_app: bool,
    /// Extra arguments for the data API's Workload API (e.g. `--federate`).
    pub data_workload_api_args: Vec<String>,
    /// Appended to the data sidecar's TOML (e.g. a `[limits]` table).
    pub data_toml: String,
    /// Appended to the plugin sidecar's TOML (e.g. more `[[outbound]]` tables).
    pub plugin_toml: String,
    /// The data sidecar's `inbound.allowed_ids`; default `spiffe://nexus.local/ns/plugins/*`.
    pub allowed_ids: Vec<String>,
}

/// The reference path of a request: plugin -> plugin sidecar (outbound `hazard`, plain)
/// -> mTLS -> data sidecar (inbound) -> demo data API, each sidecar with its own dev
/// Workload API (the data API's with `--dns-name localhost`, so curl can verify it).
pub struct TwoHop {
    /// The data API's Workload API (`hazard-api`).
    pub data_workload_api: WorkloadApi,
    /// The plugin's Workload API (`flood-model`).
    pub plugin_workload_api: WorkloadApi,
    /// The demo data API.
    pub data_api: DataApi,
    /// The sidecar in front of the data API.
    pub data: Sidecar,
    /// The plugin's sidecar.
    pub plugin: Sidecar,
}

impl TwoHop {
    /// `http://OUTBOUND{path}` on the plugin sidecar's `hazard` outbound.
    pub fn outbound_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.plugin.outbound("hazard"))
    }

    /// `https://localhost:PORT{path}` on the data sidecar's inbound.
    pub fn inbound_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.data.inbound_port())
    }

    /// curl arguments to call the data sidecar's inbound as `identity` (see
    /// [`inbound_curl_args`]).
    pub fn inbound_args(&self, identity: Option<&str>) -> Vec<String> {
        inbound_curl_args(self.data.inbound_port(), identity)
    }
}

/// Starts a [`TwoHop`] stack in `dir` and waits until both sidecars are ready.
pub fn two_hop(dir: &Path, options: &TwoHopOptions) -> TwoHop {
    let mut data_args = vec!["--dns-name", "localhost"];
    data_args.extend(options.data_workload_api_args.iter().map(String::as_str));
    let data_workload_api = workload_api(dir, "data-workload-api", DATA_API_ID, &data_args);
    let plugin_workload_api = workload_api(dir, "plugin-workload-api", PLUGIN_ID, &[]);
    let data_api = data_api(dir);
    let app = if options.grpc_app {
        &data_api.grpc
    } else {
        &data_api.http
    };
    let allowed = if options.allowed_ids.is_empty() {
        vec!["spiffe://nexus.local/ns/plugins/*".to_string()]
    } else {
        options.allowed_ids.clone()
    };
    let data = sidecar(
        dir,
        "data-sidecar",
        &format!(
            "[identity]\nworkload_api_socket = {socket:?}\n\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = {app:?}\nallowed_ids = {allowed:?}\n\n{extra}\n",
            socket = data_workload_api.url(),
            extra = options.data_toml,
        ),
        true,
    );
    let plugin = sidecar(
        dir,
        "plugin-sidecar",
        &format!(
            "[identity]\nworkload_api_socket = {socket:?}\n\n[[outbound]]\nname = \"hazard\"\nlisten = \"127.0.0.1:0\"\nupstream = {upstream:?}\nexpected_id = {DATA_API_ID:?}\n\n{extra}\n",
            socket = plugin_workload_api.url(),
            upstream = data.inbound(),
            extra = options.plugin_toml,
        ),
        true,
    );
    TwoHop {
        data_workload_api,
        plugin_workload_api,
        data_api,
        data,
        plugin,
    }
}

/// A running OTLP/gRPC receiver (`tests/py/otlp_receiver.py`) writing what it gets to a
/// JSON lines file.
pub struct OtlpReceiver {
    /// The process.
    pub proc: Proc,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The JSON lines file.
    pub out: PathBuf,
}

impl OtlpReceiver {
    /// `http://127.0.0.1:PORT`, for `[telemetry] otlp_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every record received so far whose `signal` is `span` or `metric`.
    pub fn records(&self, signal: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|record| record["signal"] == signal)
            .collect()
    }
}

/// Starts the OTLP receiver in `dir` as `name`; `delay` makes each export answer that
/// many seconds late (a slow collector).
pub fn otlp_receiver(dir: &Path, name: &str, delay: Option<f64>) -> OtlpReceiver {
    let out = dir.join(format!("{name}.jsonl"));
    let port_file = dir.join(format!("{name}.port"));
    let script = crate::repo_root().join("tests/py/otlp_receiver.py");
    let script = script.to_string_lossy().into_owned();
    let out_str = out.to_string_lossy().into_owned();
    let port_str = port_file.to_string_lossy().into_owned();
    let delay = delay.unwrap_or(0.0).to_string();
    let proc = Proc::spawn(
        name,
        dir,
        Path::new("python3"),
        &[
            &script,
            "--out",
            &out_str,
            "--port-file",
            &port_str,
            "--delay",
            &delay,
        ],
        &[],
    );
    let port = eventually(Duration::from_secs(20), "OTLP receiver port", || {
        std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
    });
    OtlpReceiver { proc, port, out }
}

/// The gateway's identity in tests.
pub const GATEWAY_ID: &str = "spiffe://nexus.local/ns/nexus/sa/gateway";
/// The certs-dev operator (`certs-dev/nexus.local/operator.pem`).
pub const OPERATOR_ID: &str = "spiffe://nexus.local/ns/ops/sa/operator";

/// A running gateway.
pub struct Gateway {
    /// The process.
    pub proc: Proc,
    /// `{"grpc": "ip:port", "admin": "ip:port"}`.
    pub addresses: serde_json::Value,
    /// Its config file (rewritten by `restart`).
    pub config: PathBuf,
    /// Its folder.
    pub dir: PathBuf,
    /// Its name (log file, config file).
    pub name: String,
}

impl Gateway {
    /// gRPC `host:port`.
    pub fn grpc(&self) -> String {
        self.addresses["grpc"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Admin base URL.
    pub fn admin(&self) -> String {
        format!(
            "http://{}",
            self.addresses["admin"].as_str().unwrap_or_default()
        )
    }

    /// Sum of the metric samples whose line starts with `prefix`.
    pub fn metric_sum(&self, prefix: &str) -> f64 {
        let out = crate::curl(&[&format!("{}/metrics", self.admin())]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Runs `nexusctl ARGS` against this gateway as `operator` (a certs-dev name such as
    /// `nexus.local/operator`).
    pub fn nexusctl_as(&self, operator: &str, args: &[&str]) -> std::process::Output {
        nexusctl_at(&self.grpc(), operator, args)
    }

    /// `nexusctl ARGS` as the certs-dev operator; panics unless it succeeds; stdout.
    pub fn nexusctl(&self, args: &[&str]) -> String {
        let out = self.nexusctl_as("nexus.local/operator", args);
        assert!(
            out.status.success(),
            "nexusctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `nexusctl exec open`: an execution of `clause` for `plugin`; its id.
    pub fn open_execution(&self, plugin: &str, clause: &str, ttl: &str) -> String {
        self.nexusctl(&[
            "exec", "open", "--plugin", plugin, "--clause", clause, "--ttl", ttl,
        ])
        .trim()
        .to_string()
    }

    /// Opens a control stream with grpcurl (grpc-go) as the certs-dev `identity` and
    /// sends `messages` (grpcurl's JSON, several separated by spaces); its output.
    pub fn grpcurl_stream(&self, identity: &str, messages: &str) -> std::process::Output {
        let proto = crate::repo_root().join("crates/proto/proto");
        let cert = crate::cert(&format!("{identity}.pem"));
        let key = crate::cert(&format!("{identity}.key"));
        crate::run_bounded(
            20,
            "grpcurl",
            &[
                "-insecure",
                "-cert",
                &cert.to_string_lossy(),
                "-key",
                &key.to_string_lossy(),
                "-import-path",
                &proto.to_string_lossy(),
                "-proto",
                "nexus/control/v1/control.proto",
                "-max-time",
                "5",
                "-d",
                messages,
                &self.grpc(),
                "nexus.control.v1.Control/Stream",
            ],
        )
    }

    /// `nexusctl status -o json`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.nexusctl(&["status", "-o", "json"])).expect("status JSON")
    }

    /// Waits until `n` sidecars are connected and in sync with the gateway's revision.
    pub fn wait_in_sync(&self, n: usize) -> serde_json::Value {
        eventually(
            Duration::from_secs(30),
            &format!("{n} sidecars in sync with the gateway"),
            || {
                let s = self.status();
                let revision = s["revision"].as_u64()?;
                let sidecars = s["sidecars"].as_array()?;
                (sidecars.len() == n
                    && sidecars
                        .iter()
                        .all(|x| x["acknowledged_revision"].as_u64() == Some(revision)))
                .then_some(s)
            },
        )
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill9(&mut self) {
        self.proc.signal("KILL");
        eventually(Duration::from_secs(10), "gateway to die", || {
            (!self.proc.is_running()).then_some(())
        });
    }

    /// Starts the same config again (same ports: the address file is re-read).
    pub fn restart(&mut self) {
        let address_file = self.dir.join(format!("{}.addresses.json", self.name));
        let _ = std::fs::remove_file(&address_file);
        (self.proc, self.addresses) = start_with_config(
            &self.dir,
            &format!("{}-restarted", self.name),
            "nexus-gateway",
            &self.config,
            &address_file,
            Duration::from_secs(30),
            &[],
        );
    }
}

/// Runs `nexusctl ARGS` against the gateway at `grpc` as `operator` (a certs-dev name
/// such as `nexus.local/operator`); usable from another thread than the [`Gateway`]'s.
pub fn nexusctl_at(grpc: &str, operator: &str, args: &[&str]) -> std::process::Output {
    let cert = crate::cert(&format!("{operator}.pem"));
    let key = crate::cert(&format!("{operator}.key"));
    let ca = crate::cert("nexus.local/ca.pem");
    let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    full.extend([
        "--gateway".into(),
        grpc.to_string(),
        "--gateway-id".into(),
        GATEWAY_ID.into(),
        "--cert".into(),
        cert.to_string_lossy().into_owned(),
        "--key".into(),
        key.to_string_lossy().into_owned(),
        "--ca".into(),
        ca.to_string_lossy().into_owned(),
        "--up-state".into(),
        "/nonexistent".into(),
    ]);
    let refs: Vec<&str> = full.iter().map(String::as_str).collect();
    crate::run_bounded(30, &bin("nexusctl").to_string_lossy(), &refs)
}

/// Starts a gateway with its identity from `workload_api` (a Workload API serving
/// [`GATEWAY_ID`]), the certs-dev operator allowed, on `database` (default: a SQLite
/// file in `dir`); `extra` is appended to its TOML (after the `[database]` table, so
/// bare keys land there). `listen` may pin the gRPC port.
pub fn gateway(
    dir: &Path,
    name: &str,
    workload_api: &WorkloadApi,
    database: Option<&str>,
    listen: Option<&str>,
    extra: &str,
) -> Gateway {
    gateway_with(
        dir,
        name,
        workload_api,
        database,
        listen,
        GATEWAY_TOP,
        extra,
    )
}

/// The top-level keys [`gateway`] sets besides the operator: the test sidecars' identities
/// may open control streams (`plugins/*`, `data/*`), and the data sidecars get every
/// plugin's executions.
pub const GATEWAY_TOP: &str = "sidecars = [\"spiffe://nexus.local/ns/plugins/*\", \"spiffe://nexus.local/ns/data/*\"]\n\
     data_sidecars = [\"spiffe://nexus.local/ns/data/*\"]\n";

/// [`gateway`] with other top-level keys than [`GATEWAY_TOP`] (e.g. no `sidecars`).
pub fn gateway_with(
    dir: &Path,
    name: &str,
    workload_api: &WorkloadApi,
    database: Option<&str>,
    listen: Option<&str>,
    top: &str,
    extra: &str,
) -> Gateway {
    let address_file = dir.join(format!("{name}.addresses.json"));
    let config = dir.join(format!("{name}.toml"));
    let db = database
        .map(str::to_string)
        .unwrap_or_else(|| format!("sqlite://{}", dir.join(format!("{name}.db")).display()));
    let full = format!(
        "name = {name:?}\nlisten = {listen:?}\noperators = [{OPERATOR_ID:?}]\n\
         {top}\n\
         [identity]\nworkload_api_socket = {socket:?}\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\naddress_file = {addrs:?}\n\n\
         [database]\nurl = {db:?}\n{extra}\n",
        listen = listen.unwrap_or("127.0.0.1:0"),
        socket = workload_api.url(),
        addrs = address_file.to_string_lossy(),
    );
    std::fs::write(&config, full).expect("write config");
    let (proc, addresses) = start_with_config(
        dir,
        name,
        "nexus-gateway",
        &config,
        &address_file,
        Duration::from_secs(30),
        &[],
    );
    let gateway = Gateway {
        proc,
        addresses,
        config,
        dir: dir.to_path_buf(),
        name: name.to_string(),
    };
    let url = format!("{}/ready", gateway.admin());
    eventually(Duration::from_secs(20), "gateway /ready", || {
        (curl_status(&[&url]) == 200).then_some(())
    });
    gateway
}

/// A sidecar's `[gateway]` table for `gateway`, its snapshot in `dir/{name}.snapshot.json`.
pub fn gateway_toml(gateway: &Gateway, dir: &Path, name: &str, extra: &str) -> String {
    format!(
        "[gateway]\naddress = {:?}\nidentity = {GATEWAY_ID:?}\nsnapshot_file = {:?}\nbackoff_max = \"500ms\"\n{extra}\n",
        gateway.grpc(),
        dir.join(format!("{name}.snapshot.json")).to_string_lossy(),
    )
}

/// Now as `nexusctl` prints times (RFC 3339, UTC, milliseconds), so the two compare as
/// strings.
pub fn rfc3339_now() -> String {
    crate::rfc3339(std::time::SystemTime::now())
}

/// Starts `binary --config config` (debug logs for its own crate, plus `envs`) and waits
/// up to `wait` for the address file it writes once listening.
fn start_with_config(
    dir: &Path,
    name: &str,
    binary: &str,
    config: &Path,
    address_file: &Path,
    wait: Duration,
    envs: &[(&str, &str)],
) -> (Proc, serde_json::Value) {
    let config_str = config.to_string_lossy().into_owned();
    let log = format!("info,{}=debug", binary.replace('-', "_"));
    let mut all = vec![("NEXUS_LOG", log.as_str())];
    all.extend_from_slice(envs);
    let proc = Proc::spawn(name, dir, &bin(binary), &["--config", &config_str], &all);
    (proc, read_json(address_file, wait))
}

/// A running slow app (`tests/py/slow_app.py`): `GET /slow/MS/...` answers after MS ms.
pub struct SlowApp {
    /// The process.
    pub proc: Proc,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

/// Starts the slow app on a free port.
pub fn slow_app(dir: &Path) -> SlowApp {
    let port_file = dir.join("slow-app.port");
    let script = crate::repo_root().join("tests/py/slow_app.py");
    let proc = Proc::spawn(
        "slow-app",
        dir,
        Path::new("python3"),
        &[&script.to_string_lossy(), &port_file.to_string_lossy()],
        &[],
    );
    let port = eventually(Duration::from_secs(20), "slow app port file", || {
        std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|p| p.trim().parse::<u16>().ok())
    });
    SlowApp {
        proc,
        addr: format!("127.0.0.1:{port}"),
    }
}

/// The reference two-hop path (plugin sidecar outbound `hazard` -> mTLS -> data sidecar
/// inbound) in front of the [`slow_app`] instead of the demo data API.
pub struct SlowTwoHop {
    /// The data API's Workload API.
    pub data_workload_api: WorkloadApi,
    /// The plugin's Workload API.
    pub plugin_workload_api: WorkloadApi,
    /// The slow app.
    pub app: SlowApp,
    /// The sidecar in front of the app.
    pub data: Sidecar,
    /// The plugin's sidecar.
    pub plugin: Sidecar,
}

impl SlowTwoHop {
    /// `http://OUTBOUND{path}` on the plugin sidecar's `hazard` outbound.
    pub fn outbound_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.plugin.outbound("hazard"))
    }
}

/// Starts a [`SlowTwoHop`]; `data_toml` and `plugin_toml` are appended to each sidecar's
/// TOML (e.g. a `[limits]` table).
pub fn slow_two_hop(dir: &Path, data_toml: &str, plugin_toml: &str) -> SlowTwoHop {
    // `--dns-name localhost`: curl can also call the data sidecar's inbound directly.
    let data_workload_api = workload_api(
        dir,
        "data-workload-api",
        DATA_API_ID,
        &["--dns-name", "localhost"],
    );
    let plugin_workload_api = workload_api(dir, "plugin-workload-api", PLUGIN_ID, &[]);
    let app = slow_app(dir);
    let data = sidecar(
        dir,
        "data-sidecar",
        &format!(
            "[identity]\nworkload_api_socket = {socket:?}\n\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = {app:?}\napp_protocol = \"http1\"\nallowed_ids = [\"spiffe://nexus.local/ns/plugins/*\"]\n\n{data_toml}\n",
            socket = data_workload_api.url(),
            app = app.addr,
        ),
        true,
    );
    let plugin = sidecar(
        dir,
        "plugin-sidecar",
        &format!(
            "[identity]\nworkload_api_socket = {socket:?}\n\n[[outbound]]\nname = \"hazard\"\nlisten = \"127.0.0.1:0\"\nupstream = {upstream:?}\nexpected_id = {DATA_API_ID:?}\n\n{plugin_toml}\n",
            socket = plugin_workload_api.url(),
            upstream = data.inbound(),
        ),
        true,
    );
    SlowTwoHop {
        data_workload_api,
        plugin_workload_api,
        app,
        data,
        plugin,
    }
}
