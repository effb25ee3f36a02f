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

/// The execution the demo opens, so the first call succeeds.
pub const DEMO_EXECUTION: &str = "ex-demo-1";

/// Writes the policies and the runtime data (one open execution) for the demo.
fn write_policy(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let policies = dir.join("policies");
    for (rel, text) in POLICY_FILES {
        let path = policies.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, text)?;
    }
    let not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(8);
    let not_after = not_after.format(&time::format_description::well_known::Rfc3339)?;
    let runtime = serde_json::json!({
        "executions": {DEMO_EXECUTION: {"plugin": PLUGIN_ID, "clause": "c-flood-17", "not_after": not_after}},
        "revoked": {},
    });
    let state = dir.join("runtime-data.json");
    std::fs::write(&state, serde_json::to_vec_pretty(&runtime)?)?;
    Ok((policies, state))
}

fn policy_section(policies: &Path, state: &Path) -> String {
    format!(
        "[policy]\ndir = {:?}\nstate_file = {:?}\n",
        policies.to_string_lossy(),
        state.to_string_lossy()
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
    /// How long to wait for everything to become ready.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,
}

/// What `nexusctl up` leaves for users, scripts and later `nexusctl` commands.
#[derive(Debug, Serialize)]
pub struct State {
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
    /// Runtime data (open executions, revocations) both sidecars load.
    pub runtime_data: PathBuf,
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

fn sidecar_bin(args: &UpArgs) -> anyhow::Result<PathBuf> {
    if let Some(bin) = &args.sidecar_bin {
        return Ok(bin.clone());
    }
    let beside = std::env::current_exe()?.with_file_name("nexus-sidecar");
    if beside.exists() {
        return Ok(beside);
    }
    Ok(PathBuf::from("nexus-sidecar"))
}

/// Runs the stack until Ctrl-C or SIGTERM.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let dir = args.dir.clone().unwrap_or_else(default_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for stale in ["data-api.json", "data-sidecar.json", "plugin-sidecar.json"] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    let state_file = args
        .state_file
        .clone()
        .unwrap_or_else(|| dir.join("state.json"));
    let me = std::env::current_exe()?;
    let sidecar = sidecar_bin(&args)?;

    // Development PKI: the CA that the dev Workload APIs mint from, and a client SVID
    // of the demo plugin so curl can call the data API's sidecar directly.
    let ca = nexus_identity::dev::DevCa::embedded()?;
    let ca_bundle = dir.join("ca.pem");
    std::fs::write(&ca_bundle, ca.cert_pem())?;
    let client = ca.mint_svid(PLUGIN_ID, Duration::from_secs(24 * 3600))?;
    let client_cert = dir.join("plugin-svid.pem");
    let client_key = dir.join("plugin-svid.key");
    std::fs::write(&client_cert, &client.cert_pem)?;
    write_private(&client_key, client.key_pem.as_bytes())?;

    let (policies, runtime_data) = write_policy(&dir)?;
    let policy = policy_section(&policies, &runtime_data);

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

        let data_records = dir.join("data-sidecar-records.jsonl");
        let plugin_records = dir.join("plugin-sidecar-records.jsonl");
        let data_config = dir.join("data-sidecar.toml");
        std::fs::write(
            &data_config,
            format!(
                "# nexusctl up: the sidecar in front of the demo data API\n\
                 [identity]\nworkload_api_socket = {sock:?}\n\n\
                 [admin]\nlisten = \"127.0.0.1:0\"\naddress_file = {addrs:?}\n\n\
                 [inbound]\nlisten = \"127.0.0.1:0\"\napp = {app:?}\nallowed_ids = [\"spiffe://nexus.local/ns/plugins/*\"]\n\n{policy}\n{audit}",
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
                 [[outbound]]\nname = \"hazard-api\"\nlisten = \"127.0.0.1:0\"\nupstream = {up:?}\nexpected_id = {id:?}\n\n{policy}\n{audit}",
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
            ]),
            pids: pids.clone(),
            policy_dir: policies.clone(),
            runtime_data: runtime_data.clone(),
            record_files: BTreeMap::from([
                ("data-sidecar".to_string(), data_records.clone()),
                ("plugin-sidecar".to_string(), plugin_records.clone()),
            ]),
            dir: dir.clone(),
        };
        let tmp = state_file.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&state)?)?;
        std::fs::rename(&tmp, &state_file)?;
        print_welcome(&state, &state_file);
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

fn print_welcome(state: &State, state_file: &Path) {
    let out = &state.plugin_outbound_url;
    let inb = &state.data_api_inbound_url;
    println!(
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
         Policies: {policy_dir} (edit and save: reloaded within a second)\n\
         Runtime data (executions, revocations): {runtime}\n\
         Execution records (one hash-chained line per request), and how to check them:\n{records}\n\
         Health and metrics: {admins}\n\
         State file: {state_file}\n\
         Press Ctrl-C to stop.",
        exec = DEMO_EXECUTION,
        policy_dir = state.policy_dir.display(),
        runtime = state.runtime_data.display(),
        ca = state.ca_bundle.display(),
        cert = state.client_cert.display(),
        key = state.client_key.display(),
        admins = state
            .admin_urls
            .values()
            .map(|u| format!("{u}/metrics"))
            .collect::<Vec<_>>()
            .join("  "),
        records = state
            .record_files
            .values()
            .map(|f| format!("  nexusctl audit verify {}", f.display()))
            .collect::<Vec<_>>()
            .join("\n"),
        state_file = state_file.display(),
    );
}
