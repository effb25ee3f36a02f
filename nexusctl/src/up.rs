//! `nexusctl up`: the whole local stack on loopback with no setup. It starts a dev
//! Workload API per workload, the demo data API, a sidecar in front of it (inbound mTLS)
//! and a sidecar for the demo plugin (outbound), waits until all are ready, writes the
//! state file and prints commands that go through them. Ctrl-C or SIGTERM stops all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::process::{Child, Command};

/// The demo plugin's workload.
pub const PLUGIN_ID: &str = "spiffe://nexus.local/ns/plugins/sa/flood-model";
/// The demo data API's workload.
pub const DATA_API_ID: &str = "spiffe://nexus.local/ns/data/sa/hazard-api";

/// The reference policies, embedded so `up` needs no checkout.
const POLICY_FILES: &[(&str, &str)] = &[
    (
        "nexus/authz/authz.rego",
        include_str!("../../policies/nexus/authz/authz.rego"),
    ),
    (
        "nexus/authz/authz_test.rego",
        include_str!("../../policies/nexus/authz/authz_test.rego"),
    ),
    (
        "nexus/bindings.yaml",
        include_str!("../../policies/nexus/bindings.yaml"),
    ),
];

/// The gateway's workload.
pub const GATEWAY_ID: &str = "spiffe://nexus.local/ns/nexus/sa/gateway";
/// The local operator (allowed to revoke, open executions).
pub const OPERATOR_ID: &str = "spiffe://nexus.local/ns/nexus/sa/operator";

/// The local reviewer (certifies plugin versions; not the operator who registers them).
pub const REVIEWER_ID: &str = "spiffe://nexus.local/ns/nexus/sa/reviewer";
/// The demo plugin's image (there is no image locally: its digest stands for one).
const DEMO_REPO: &str = "localhost/nexus/demo-flood-model";
const DEMO_VERSION: &str = "1.0.0";
/// The demo version's budgets: those of its binding in policies/nexus/bindings.yaml,
/// whose bindings the registry's replace in this stack (docs/registry.md).
const DEMO_BUDGETS: &str =
    r#"{"requests_per_s":100,"egress_bytes":33554432,"distinct_clauses":4,"window":"10s"}"#;

/// The reference revocation policy the gateway judges anomaly signals with.
const REVOCATION_FILES: &[(&str, &str)] = &[
    (
        "revocation.rego",
        include_str!("../../policies/revocation/revocation.rego"),
    ),
    (
        "revocation_test.rego",
        include_str!("../../policies/revocation/revocation_test.rego"),
    ),
    (
        "data.yaml",
        include_str!("../../policies/revocation/data.yaml"),
    ),
];

/// Registers the demo plugin version (signed with the development publisher key) as the
/// operator and certifies it as the reviewer, unless the kept registry has it already;
/// a line for the welcome text.
async fn register_demo(
    operator: &crate::gateway_cmd::Target,
    publisher: &nexus_identity::cosign::SigningKey,
    reviewer: &crate::gateway_cmd::Target,
) -> anyhow::Result<String> {
    use nexus_proto::control::{ListPluginsRequest, PluginVersionRequest, RegisterPluginRequest};
    let digest = nexus_identity::cosign::sha256_digest(b"nexus demo flood-model 1.0.0");
    let mut c = crate::gateway_cmd::client(operator).await?;
    let listed = c
        .list_plugins(ListPluginsRequest::default())
        .await
        .map_err(crate::gateway_cmd::status_error)?
        .into_inner();
    let known = listed
        .plugins
        .iter()
        .flat_map(|p| p.versions.iter())
        .find(|v| v.image_digest == digest)
        .cloned();
    let version = match known {
        Some(v) => v,
        None => {
            let payload = nexus_identity::cosign::image_payload(DEMO_REPO, &digest);
            let signature = publisher.sign(payload.as_bytes())?;
            let r = c
                .register_plugin(RegisterPluginRequest {
                    name: "flood-model".into(),
                    publisher: "nexus-dev".into(),
                    description: "the demo flood model".into(),
                    license_tier: "public-good".into(),
                    version: DEMO_VERSION.into(),
                    image: format!("{DEMO_REPO}@{digest}"),
                    spiffe_id: PLUGIN_ID.into(),
                    clauses: vec!["c-flood-17".into(), "c-flood-18".into()],
                    budgets_json: DEMO_BUDGETS.into(),
                    payload,
                    signature,
                })
                .await
                .map_err(crate::gateway_cmd::status_error)?
                .into_inner();
            r.plugin
                .and_then(|p| p.versions.into_iter().find(|v| v.image_digest == digest))
                .context("the gateway did not return the registered version")?
        }
    };
    let version = if version.state == "registered" {
        let r = crate::gateway_cmd::client(reviewer)
            .await?
            .certify_plugin(PluginVersionRequest {
                plugin: version.plugin_uid.clone(),
                version: version.version.clone(),
                wait_ms: crate::gateway_cmd::WAIT_MS,
            })
            .await
            .map_err(crate::gateway_cmd::status_error)?
            .into_inner();
        r.plugin
            .and_then(|p| p.versions.into_iter().find(|v| v.image_digest == digest))
            .context("the gateway did not return the certified version")?
    } else {
        version
    };
    if version.state != "certified" {
        bail!(
            "the demo plugin version {} is {} in the kept registry ({}): start with a fresh --dir",
            version.version,
            version.state,
            version.retire_reason
        );
    }
    Ok(format!(
        "flood-model v{} ({}, {}) {} by {}",
        version.version,
        version.plugin_uid,
        version.image_digest,
        version.state,
        version.certified_by
    ))
}

/// Writes the policies for the demo: the sidecars' folder and the gateway's
/// revocation policy folder.
fn write_policy(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let policies = dir.join("policies");
    for (rel, text) in POLICY_FILES {
        let path = policies.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, text)?;
    }
    let revocation = dir.join("revocation-policy");
    std::fs::create_dir_all(&revocation)?;
    for (rel, text) in REVOCATION_FILES {
        std::fs::write(revocation.join(rel), text)?;
    }
    Ok((policies, revocation))
}

fn policy_section(policies: &Path) -> String {
    format!("[policy]\ndir = {:?}\n", policies.to_string_lossy())
}

/// The `[gateway]` table of a sidecar: the control stream, its snapshot kept on disk.
fn gateway_section(address: &str, snapshot: &Path) -> String {
    format!(
        "[gateway]\naddress = {address:?}\nidentity = {GATEWAY_ID:?}\nsnapshot_file = {snapshot:?}\n"
    )
}

/// `nexusctl up`
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Where to write the state file (JSON). Default: DIR/state.json.
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// Working folder for sockets, configs, certificates and logs.
    /// Default: $NEXUS_HOME/up, with NEXUS_HOME defaulting to ~/.nexus.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The nexus-sidecar binary. Default: next to nexusctl, else on PATH.
    #[arg(long, env = "NEXUS_SIDECAR_BIN")]
    pub sidecar_bin: Option<PathBuf>,
    /// The nexus-gateway binary. Default: next to nexusctl, else on PATH.
    #[arg(long, env = "NEXUS_GATEWAY_BIN")]
    pub gateway_bin: Option<PathBuf>,
    /// How long to wait for everything to become ready.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,
    /// The anomaly watch's prior for a workload with no history, in requests per
    /// second while active: written as the gateway's `[baselines] prior_rate_per_s`
    /// and both sidecars' `[anomaly.baseline] prior_rate_per_s` (docs/anomaly.md).
    /// Default: their default (25). Raise it for a plugin whose usual load is far above
    /// it (bench/soak.py does), or the watch takes the load for a spike.
    #[arg(long)]
    pub prior_rate_per_s: Option<f64>,
    /// The same for egress bytes per second (default 65536).
    #[arg(long)]
    pub prior_bytes_per_s: Option<f64>,
}

/// The `[baselines]` (gateway) or `[anomaly.baseline]` (sidecar) lines for the priors
/// given on the command line ("" for none).
fn prior_section(table: &str, rate: Option<f64>, bytes: Option<f64>) -> String {
    if rate.is_none() && bytes.is_none() {
        return String::new();
    }
    let mut out = format!("\n[{table}]\n");
    if let Some(r) = rate {
        out.push_str(&format!("prior_rate_per_s = {r:?}\n"));
    }
    if let Some(b) = bytes {
        out.push_str(&format!("prior_bytes_per_s = {b:?}\n"));
    }
    out
}

/// What `nexusctl up` leaves for users, scripts and later `nexusctl` commands.
#[derive(Debug, Serialize)]
pub struct State {
    /// The demo plugin in the registry: "flood-model v1.0.0 (UUID, sha256:…) certified by …".
    pub registry: String,
    /// The plain URL the plugin calls (its sidecar's outbound listener).
    pub plugin_outbound_url: String,
    /// The data API sidecar's mTLS URL.
    pub data_api_inbound_url: String,
    /// The data API itself (behind its sidecar; for comparison only).
    pub data_api_direct_url: String,
    /// CA bundle of the nexus.local trust domain (PEM).
    pub ca_bundle: PathBuf,
    /// A dev SVID of the demo plugin, usable by curl.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// Admin endpoints by component.
    pub admin_urls: BTreeMap<String, String>,
    /// Process ids by component, and of `nexusctl up` itself.
    pub pids: BTreeMap<String, u32>,
    /// The policy folder both sidecars load (edit it: they reload within a second).
    pub policy_dir: PathBuf,
    /// The gateway's gRPC address (control streams, admin API).
    pub gateway_address: String,
    /// The gateway's SPIFFE ID.
    pub gateway_id: String,
    /// The local operator's dev SVID (nexusctl revoke/status/exec use it).
    pub operator_cert: PathBuf,
    /// Its key.
    pub operator_key: PathBuf,
    /// The execution the demo opened for the plugin on clause c-flood-17.
    pub demo_execution: String,
    /// The gateway's revocation policy folder.
    pub revocation_policy_dir: PathBuf,
    /// The sidecars' execution-record files by component (hash-chained JSON lines;
    /// check them with `nexusctl audit verify FILE`).
    pub record_files: BTreeMap<String, PathBuf>,
    /// The working folder.
    pub dir: PathBuf,
}

/// The `[audit]` table of a sidecar writing its execution records to `file`.
fn audit_section(file: &Path) -> String {
    format!("[audit]\nsink = {{ file = {{ path = {file:?} }} }}\n")
}

/// The default working folder.
pub fn default_dir() -> PathBuf {
    let home = std::env::var_os("NEXUS_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".nexus")))
        .unwrap_or_else(|| std::env::temp_dir().join("nexus"));
    home.join("up")
}

struct Stack {
    children: Vec<(String, Child)>,
}

impl Stack {
    fn spawn(&mut self, name: &str, command: &mut Command, log_dir: &Path) -> anyhow::Result<u32> {
        let log = std::fs::File::create(log_dir.join(format!("{name}.log")))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let pid = child.id().unwrap_or(0);
        self.children.push((name.to_string(), child));
        Ok(pid)
    }

    /// The first child that has exited, if any.
    fn exited(&mut self) -> Option<(String, std::process::ExitStatus)> {
        self.children.iter_mut().find_map(|(name, child)| {
            child
                .try_wait()
                .ok()
                .flatten()
                .map(|status| (name.clone(), status))
        })
    }

    async fn stop(mut self) {
        for (_, child) in &self.children {
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX)),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        for (name, child) in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                tracing::warn!(%name, "did not stop on SIGTERM; killing");
                let _ = child.kill().await;
            }
        }
    }
}

async fn wait_for_file(
    path: &Path,
    stack: &mut Stack,
    deadline: Instant,
) -> anyhow::Result<serde_json::Value> {
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(value) = serde_json::from_str(&text)
        {
            return Ok(value);
        }
        check_alive(stack, deadline, &path.display().to_string())?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn check_alive(stack: &mut Stack, deadline: Instant, waiting_for: &str) -> anyhow::Result<()> {
    if let Some((name, status)) = stack.exited() {
        bail!(
            "{name} exited ({status}) while waiting for {waiting_for}; see its log in the working folder"
        );
    }
    if Instant::now() > deadline {
        bail!("timed out waiting for {waiting_for}");
    }
    Ok(())
}

async fn wait_ready(admin: &str, stack: &mut Stack, deadline: Instant) -> anyhow::Result<()> {
    let url = format!("{admin}/ready");
    loop {
        if crate::http_get(&url)
            .await
            .map(|(status, _)| status == 200)
            .unwrap_or(false)
        {
            return Ok(());
        }
        check_alive(stack, deadline, &url)?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn addr(value: &serde_json::Value, pointer: &str) -> anyhow::Result<String> {
    value
        .pointer(pointer)
        .and_then(|v| v.as_str())
        .map(String::from)
        .ok_or_else(|| anyhow::anyhow!("address {pointer} missing in {value}"))
}

fn bin(flag: &Option<PathBuf>, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(bin) = flag {
        return Ok(bin.clone());
    }
    let beside = std::env::current_exe()?.with_file_name(name);
    if beside.exists() {
        return Ok(beside);
    }
    Ok(PathBuf::from(name))
}

/// Runs the stack until Ctrl-C or SIGTERM.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let dir = args.dir.clone().unwrap_or_else(default_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for stale in [
        "data-api.json",
        "data-sidecar.json",
        "plugin-sidecar.json",
        "gateway.json",
    ] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    let state_file = args
        .state_file
        .clone()
        .unwrap_or_else(|| dir.join("state.json"));
    // A --state-file in a folder that does not exist yet: create it, or say which.
    if let Some(parent) = state_file.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| {
            anyhow::anyhow!(
                "--state-file {}: cannot create its folder {}: {e}",
                state_file.display(),
                parent.display()
            )
        })?;
    }
    let me = std::env::current_exe()?;
    let sidecar = bin(&args.sidecar_bin, "nexus-sidecar")?;
    let gateway_bin = bin(&args.gateway_bin, "nexus-gateway")?;

    // Development PKI: the CA that the dev Workload APIs mint from, and a client SVID
    // of the demo plugin so curl can call the data API's sidecar directly.
    let ca = nexus_dev_identity::DevCa::embedded()?;
    let ca_bundle = dir.join("ca.pem");
    std::fs::write(&ca_bundle, ca.cert_pem())?;
    let client = ca.mint_svid(PLUGIN_ID, Duration::from_secs(24 * 3600))?;
    let client_cert = dir.join("plugin-svid.pem");
    let client_key = dir.join("plugin-svid.key");
    std::fs::write(&client_cert, &client.cert_pem)?;
    write_private(&client_key, client.key_pem.as_bytes())?;

    // The gateway and the local operator get dev SVIDs from files.
    let mut minted = BTreeMap::new();
    for (name, id) in [
        ("gateway", GATEWAY_ID),
        ("operator", OPERATOR_ID),
        ("reviewer", REVIEWER_ID),
    ] {
        let svid = ca.mint_svid(id, Duration::from_secs(24 * 3600))?;
        let cert = dir.join(format!("{name}-svid.pem"));
        let key = dir.join(format!("{name}-svid.key"));
        std::fs::write(&cert, &svid.cert_pem)?;
        write_private(&key, svid.key_pem.as_bytes())?;
        minted.insert(name, (cert, key));
    }
    let (gateway_cert, gateway_key) = minted.remove("gateway").unwrap_or_default();
    let (operator_cert, operator_key) = minted.remove("operator").unwrap_or_default();
    let (reviewer_cert, reviewer_key) = minted.remove("reviewer").unwrap_or_default();
    // The development publisher key (kept in the folder: the registry is kept too).
    let publisher_key_file = dir.join("dev-publisher.key");
    let publisher = match std::fs::read(&publisher_key_file) {
        Ok(pem) => nexus_identity::cosign::SigningKey::from_pem(&pem)?,
        Err(_) => {
            let key = nexus_identity::cosign::SigningKey::generate()?;
            write_private(&publisher_key_file, key.to_pem().as_bytes())?;
            key
        }
    };
    let publisher_pub = dir.join("dev-publisher.pub");
    std::fs::write(&publisher_pub, publisher.public_key().to_pem())?;

    let (policies, revocation_policy) = write_policy(&dir)?;
    let policy = policy_section(&policies);

    let deadline = Instant::now() + args.ready_timeout;
    let mut stack = Stack {
        children: Vec::new(),
    };
    let mut pids = BTreeMap::new();
    pids.insert("nexusctl-up".to_string(), std::process::id());

    let result = async {
        let plugin_sock = dir.join("plugin-agent.sock");
        let data_sock = dir.join("data-agent.sock");
        for (name, sock, id) in [
            ("plugin-workload-api", &plugin_sock, PLUGIN_ID),
            ("data-workload-api", &data_sock, DATA_API_ID),
        ] {
            let pid = stack.spawn(
                name,
                Command::new(&me).args(["dev", "workload-api", "--socket"]).arg(sock).args([
                    "--spiffe-id",
                    id,
                    "--ttl",
                    "1h",
                    "--dns-name",
                    "localhost",
                ]),
                &dir,
            )?;
            pids.insert(name.to_string(), pid);
        }
        let pid = stack.spawn(
            "data-api",
            Command::new(&me)
                .args(["dev", "data-api", "--listen", "127.0.0.1:0", "--address-file"])
                .arg(dir.join("data-api.json")),
            &dir,
        )?;
        pids.insert("data-api".to_string(), pid);
        let data_api = wait_for_file(&dir.join("data-api.json"), &mut stack, deadline).await?;
        let data_api_addr = addr(&data_api, "/http")?;

        // The gateway (SQLite in the working folder: state survives restarts of `up`).
        let gateway_config = dir.join("gateway.toml");
        std::fs::write(
            &gateway_config,
            format!(
                "# nexusctl up: the gateway (development identity from files)\n\
                 name = \"local\"\nlisten = \"127.0.0.1:0\"\noperators = [{op:?}]\nreviewers = [{reviewer:?}]\n\
                 # Who may open a control stream (nobody else), and which sidecars stand in\n\
                 # front of data APIs (they receive every plugin's executions).\n\
                 sidecars = [{plugin:?}, {data:?}]\ndata_sidecars = [{data:?}]\n\n\
                 [identity]\nsource = \"files\"\nfiles = {{ cert = {cert:?}, key = {key:?}, bundle = {ca:?} }}\n\n\
                 [admin]\nlisten = \"127.0.0.1:0\"\naddress_file = {addrs:?}\n\n\
                 # One machine, no load balancer to wait for: close the listeners at once\n\
                 # on Ctrl-C; `up` waits 5s for each child.\n\
                 [limits]\ndrain_delay = \"0s\"\nshutdown_grace = \"3s\"\n\n\
                 [database]\nurl = {db:?}\n\n\
                 [revocation_policy]\ndir = {rev:?}\n\n\
                 # The plugin registry: only certified versions run (docs/registry.md).\n\
                 [registry]\n[[registry.publishers]]\nname = \"nexus-dev\"\nkey = {publisher:?}\n{priors}",
                priors = prior_section("baselines", args.prior_rate_per_s, args.prior_bytes_per_s),
                op = OPERATOR_ID,
                reviewer = REVIEWER_ID,
                publisher = publisher_pub,
                plugin = PLUGIN_ID,
                data = DATA_API_ID,
                cert = gateway_cert,
                key = gateway_key,
                ca = ca_bundle,
                addrs = dir.join("gateway.json"),
                db = format!("sqlite://{}", dir.join("gateway.db").display()),
                rev = revocation_policy,
            ),
        )?;
        let pid = stack.spawn("gateway", Command::new(&gateway_bin).arg("--config").arg(&gateway_config), &dir)?;
        pids.insert("gateway".to_string(), pid);
        let gateway = wait_for_file(&dir.join("gateway.json"), &mut stack, deadline).await?;
        let gateway_address = addr(&gateway, "/grpc")?;
        let gateway_admin = format!("http://{}", addr(&gateway, "/admin")?);

        let data_records = dir.join("data-sidecar-records.jsonl");
        let plugin_records = dir.join("plugin-sidecar-records.jsonl");
        let data_config = dir.join("data-sidecar.toml");
        std::fs::write(
            &data_config,
            format!(
                "# nexusctl up: the sidecar in front of the demo data API\n\
                 [identity]\nworkload_api_socket = {sock:?}\n\n\
                 [admin]\nlisten = \"127.0.0.1:0\"\naddress_file = {addrs:?}\n\n\
                 # One machine, no load balancer to wait for: close the listeners at once\n\
                 # on Ctrl-C; `up` waits 5s for each child.\n\
                 [limits]\ndrain_delay = \"0s\"\nshutdown_grace = \"3s\"\n\n\
                 [inbound]\nlisten = \"127.0.0.1:0\"\napp = {app:?}\nallowed_ids = [\"spiffe://nexus.local/ns/plugins/*\"]\n\n{policy}\n{audit}\n{gateway}{priors}",
                gateway = gateway_section(&gateway_address, &dir.join("data-sidecar-snapshot.json")),
                priors = prior_section("anomaly.baseline", args.prior_rate_per_s, args.prior_bytes_per_s),
                sock = format!("unix://{}", data_sock.display()),
                audit = audit_section(&data_records),
                addrs = dir.join("data-sidecar.json"),
                app = data_api_addr,
                policy = policy,
            ),
        )?;
        let pid = stack.spawn("data-sidecar", Command::new(&sidecar).arg("--config").arg(&data_config), &dir)?;
        pids.insert("data-sidecar".to_string(), pid);
        let data_sidecar = wait_for_file(&dir.join("data-sidecar.json"), &mut stack, deadline).await?;
        let inbound = addr(&data_sidecar, "/inbound")?;
        let data_admin = format!("http://{}", addr(&data_sidecar, "/admin")?);

        let plugin_config = dir.join("plugin-sidecar.toml");
        std::fs::write(
            &plugin_config,
            format!(
                "# nexusctl up: the demo plugin's sidecar\n\
                 [identity]\nworkload_api_socket = {sock:?}\n\n\
                 [admin]\nlisten = \"127.0.0.1:0\"\naddress_file = {addrs:?}\n\n\
                 # One machine, no load balancer to wait for: close the listeners at once\n\
                 # on Ctrl-C; `up` waits 5s for each child.\n\
                 [limits]\ndrain_delay = \"0s\"\nshutdown_grace = \"3s\"\n\n\
                 [[outbound]]\nname = \"hazard-api\"\nlisten = \"127.0.0.1:0\"\nupstream = {up:?}\nexpected_id = {id:?}\n\n{policy}\n{audit}\n{gateway}{priors}",
                gateway = gateway_section(&gateway_address, &dir.join("plugin-sidecar-snapshot.json")),
                priors = prior_section("anomaly.baseline", args.prior_rate_per_s, args.prior_bytes_per_s),
                sock = format!("unix://{}", plugin_sock.display()),
                audit = audit_section(&plugin_records),
                addrs = dir.join("plugin-sidecar.json"),
                up = inbound,
                id = DATA_API_ID,
                policy = policy,
            ),
        )?;
        let pid = stack.spawn("plugin-sidecar", Command::new(&sidecar).arg("--config").arg(&plugin_config), &dir)?;
        pids.insert("plugin-sidecar".to_string(), pid);
        let plugin_sidecar = wait_for_file(&dir.join("plugin-sidecar.json"), &mut stack, deadline).await?;
        let outbound = addr(&plugin_sidecar, "/outbound/hazard-api")?;
        let plugin_admin = format!("http://{}", addr(&plugin_sidecar, "/admin")?);

        wait_ready(&data_admin, &mut stack, deadline).await?;
        wait_ready(&plugin_admin, &mut stack, deadline).await?;
        wait_ready(&gateway_admin, &mut stack, deadline).await?;

        // Both sidecars on the control stream, then the demo's execution, acknowledged
        // by both before the first request.
        let target = crate::gateway_cmd::Target::local(
            &gateway_address,
            GATEWAY_ID,
            &operator_cert,
            &operator_key,
            &ca_bundle,
        );
        loop {
            let connected = crate::gateway_cmd::connected_sidecars(&target).await.unwrap_or(0);
            if connected >= 2 {
                break;
            }
            check_alive(&mut stack, deadline, "both sidecars to connect to the gateway")?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // What this stack's store kept from a previous run in the same folder: said, so
        // a refused request is not a surprise.
        let (inherited_revoked, inherited_open) =
            crate::gateway_cmd::current_state(&target).await?;
        let registry = register_demo(&target, &publisher, &crate::gateway_cmd::Target::local(
            &gateway_address,
            GATEWAY_ID,
            &reviewer_cert,
            &reviewer_key,
            &ca_bundle,
        ))
        .await?;
        let demo_execution = crate::gateway_cmd::open_execution(
            &target,
            PLUGIN_ID,
            "c-flood-17",
            Duration::from_secs(8 * 3600),
        )
        .await?;

        let inbound_port = inbound.rsplit(':').next().unwrap_or_default();
        let state = State {
            plugin_outbound_url: format!("http://{outbound}"),
            data_api_inbound_url: format!("https://localhost:{inbound_port}"),
            data_api_direct_url: format!("http://{data_api_addr}"),
            ca_bundle: ca_bundle.clone(),
            client_cert: client_cert.clone(),
            client_key: client_key.clone(),
            admin_urls: BTreeMap::from([
                ("data-sidecar".to_string(), data_admin),
                ("plugin-sidecar".to_string(), plugin_admin),
                ("gateway".to_string(), gateway_admin),
            ]),
            gateway_address: gateway_address.clone(),
            gateway_id: GATEWAY_ID.to_string(),
            operator_cert: operator_cert.clone(),
            operator_key: operator_key.clone(),
            demo_execution,
            registry,
            revocation_policy_dir: revocation_policy.clone(),
            pids: pids.clone(),
            policy_dir: policies.clone(),
            record_files: BTreeMap::from([
                ("data-sidecar".to_string(), data_records.clone()),
                ("plugin-sidecar".to_string(), plugin_records.clone()),
            ]),
            dir: dir.clone(),
        };
        let tmp = state_file.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&state)?)?;
        std::fs::rename(&tmp, &state_file)?;
        // The web console, on a free loopback port, as the stack's operator.
        let (console_url, console) =
            crate::console::start(crate::console::for_up(target.clone())).await?;
        tokio::spawn(console);
        print_welcome(&state, &state_file, &console_url);
        if !inherited_revoked.is_empty() || inherited_open > 0 {
            crate::outln!(
                "\nInherited from a previous run in {} (its store, gateway.db):",
                dir.display()
            );
            for r in &inherited_revoked {
                crate::outln!(
                    "  revoked: {} ({}); lift it with: {}",
                    crate::term::safe(&r.subject),
                    crate::term::safe(&r.reason),
                    nexusctl_line(&state_file, &format!("reinstate {}", shell_quote(&r.subject)))
                );
            }
            if inherited_open > 0 {
                crate::outln!(
                    "  {inherited_open} execution(s) still open: {}",
                    nexusctl_line(&state_file, "exec list")
                );
            }
            crate::outln!("  (start with an empty store: stop, then remove {})", dir.join("gateway.db").display());
        }
        anyhow::Ok(())
    }
    .await;

    if let Err(error) = result {
        stack.stop().await;
        return Err(error);
    }

    let outcome = wait_for_stop(&mut stack).await;
    stack.stop().await;
    let _ = std::fs::remove_file(&state_file);
    outcome
}

async fn wait_for_stop(stack: &mut Stack) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { eprintln!("stopping the local stack"); return Ok(()) }
            _ = term.recv() => { eprintln!("stopping the local stack"); return Ok(()) }
            _ = tick.tick() => {
                if let Some((name, status)) = stack.exited() {
                    bail!("{name} exited unexpectedly ({status}); stopping the local stack");
                }
            }
        }
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    Ok(())
}

/// `text` quoted for a POSIX shell when it holds anything but safe characters.
fn shell_quote(text: &str) -> String {
    let safe = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:=@%,".contains(&b));
    if safe {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// The printed `nexusctl` lines: the full path of this binary (the quick start builds it
/// in target/debug, which is not on PATH) and, when the state file is not the default
/// one, `--up-state FILE` at the end so the commands find this stack.
fn nexusctl_line(state_file: &Path, args: &str) -> String {
    let me = std::env::current_exe()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "nexusctl".into());
    let mut line = format!("{} {args}", shell_quote(&me));
    if state_file != default_dir().join("state.json") {
        line.push_str(" --up-state ");
        line.push_str(&shell_quote(&state_file.to_string_lossy()));
    }
    line
}

fn print_welcome(state: &State, state_file: &Path, console_url: &str) {
    let out = &state.plugin_outbound_url;
    let inb = &state.data_api_inbound_url;
    let ctl = |args: &str| nexusctl_line(state_file, args);
    let plain = shell_quote(
        &std::env::current_exe()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "nexusctl".into()),
    );
    let q = |p: &Path| shell_quote(&p.to_string_lossy());
    crate::outln!(
        "Nexus local stack is up (development identities; never for production).\n\n\
         The plugin calls its sidecar in plain HTTP; the sidecar carries it over mTLS, and\n\
         both sidecars check the policy (execution {exec} is open for clause c-flood-17):\n  \
         curl -s {out}/clauses/c-flood-17/rainfall\n\n\
         Denied by policy (bound to c-flood-18 but no open execution; not bound to c-quake-3):\n  \
         curl -s {out}/clauses/c-flood-18/rainfall\n  \
         curl -s {out}/clauses/c-quake-3/magnitude\n\n\
         Call the data API's sidecar directly with the plugin's dev SVID:\n  \
         curl -s --cacert {ca} --cert {cert} --key {key} {inb}/clauses/c-flood-17/rainfall\n\n\
         Without a client certificate the sidecar refuses the connection:\n  \
         curl -s --cacert {ca} {inb}/clauses/c-flood-17/rainfall\n\n\
         Revoke the plugin at the gateway: every sidecar refuses it within milliseconds\n\
         (403 from its own sidecar and from the data API's), until reinstated:\n  \
         {revoke}\n  \
         curl -s {out}/clauses/c-flood-17/rainfall\n  \
         {status}\n  \
         {reinstate}\n\n\
         Executions:\n  \
         {exec_list}\n  \
         {exec_open}\n\n\
         Plugin registry (only certified versions run): {registry}\n  \
         {plugin_list}\n\n\
         Policies: {policy_dir} (edit and save: reloaded within a second)\n\
         Revocation policy (anomaly signals): {revocation}\n\
         Execution records (one hash-chained line per request), and how to check them:\n{records}\n\
         Health and metrics: {admins}\n\
         Web console (live view and actions; the URL holds its session token):\n  {console_url}\n\
         State file: {state_file}\n\
         Press Ctrl-C to stop.",
        exec = state.demo_execution,
        revoke = ctl(&format!("revoke {PLUGIN_ID} --reason demo")),
        status = ctl("status"),
        reinstate = ctl(&format!("reinstate {PLUGIN_ID}")),
        exec_list = ctl("exec list"),
        exec_open = ctl(&format!(
            "exec open --plugin {PLUGIN_ID} --clause c-flood-18 --ttl 10m"
        )),
        registry = state.registry,
        plugin_list = ctl("plugin list"),
        policy_dir = state.policy_dir.display(),
        revocation = state.revocation_policy_dir.display(),
        ca = q(&state.ca_bundle),
        cert = q(&state.client_cert),
        key = q(&state.client_key),
        admins = state
            .admin_urls
            .values()
            .map(|u| format!("{u}/metrics"))
            .collect::<Vec<_>>()
            .join("  "),
        records = state
            .record_files
            .values()
            .map(|f| format!("  {plain} audit verify {}", q(f)))
            .collect::<Vec<_>>()
            .join("\n"),
        state_file = state_file.display(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_commands_name_a_state_file_that_is_not_the_default() {
        let line = nexusctl_line(Path::new("/tmp/my stack/state.json"), "status");
        assert!(
            line.ends_with(" status --up-state '/tmp/my stack/state.json'"),
            "{line}"
        );
        let default = nexusctl_line(&default_dir().join("state.json"), "status");
        assert!(default.ends_with(" status"), "{default}");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
    /// The demo's registry budgets are its binding's (the console shows them).
    #[test]
    fn demo_budgets_match_the_demo_binding() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let bundle = nexus_policy::Bundle::load(&dir).expect("policies load");
        let data = serde_json::to_value(&bundle.data).expect("data as JSON");
        let declared = &data["nexus"]["bindings"][PLUGIN_ID]["budgets"];
        let registered: serde_json::Value = serde_json::from_str(DEMO_BUDGETS).expect("json");
        assert_eq!(declared, &registered);
    }
}
