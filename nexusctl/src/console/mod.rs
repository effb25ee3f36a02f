//! `nexusctl console`: a local web console for operators (docs/console.md). It watches
//! the gateway through the Admin `Watch` feed with the caller's identity, keeps a copy
//! of the state ([`model`]), renders pages on the server ([`html`]) and pushes each
//! change to open pages over Server-Sent Events ([`server`]). Actions go back through
//! the Admin API with the same identity, so the gateway's authorization and audit
//! apply unchanged.

mod html;
mod model;
mod server;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nexus_proto::control::WatchRequest;
use tokio::sync::watch;

use crate::gateway_cmd::{Target, client, status_error};
use model::{Link, Model};

/// `nexusctl console`
#[derive(clap::Args, Debug)]
pub struct ConsoleArgs {
    /// Where the console listens (a loopback address; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Print the URL without opening a browser.
    #[arg(long)]
    pub no_browser: bool,
    /// Allow a --listen address other than loopback. The console acts with your
    /// operator identity: anyone who obtains its URL (it holds the session token) can
    /// act as you.
    #[arg(long)]
    pub danger_listen_non_loopback: bool,
    /// How many of the newest signals the console keeps and shows (at most 10000).
    #[arg(long, default_value_t = 1000)]
    pub signals: u32,
    /// Connections served at once (each open page holds one for its live updates);
    /// more wait in the accept queue. 1 to 10000.
    #[arg(long, default_value_t = MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_connections: u32,
    /// A browser must send each request head within this time (more than 0, at most 1h).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_header_timeout)]
    pub header_read_timeout: std::time::Duration,
    #[command(flatten)]
    pub target: Target,
}

/// `--max-connections` by default.
const MAX_CONNECTIONS: u32 = 64;
/// `--header-read-timeout` by default (keep in step with its `default_value`).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `--header-read-timeout`: more than 0, at most an hour.
fn parse_header_timeout(value: &str) -> Result<std::time::Duration, String> {
    let timeout = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if timeout.is_zero() || timeout > std::time::Duration::from_secs(3600) {
        return Err(format!(
            "{value}: must be more than 0 and at most 1h (e.g. 10s)"
        ));
    }
    Ok(timeout)
}

/// What the console's tasks share.
pub struct Shared {
    model: Mutex<Model>,
    /// Bumped after every applied event; open pages re-render on it.
    version: watch::Sender<u64>,
    target: Target,
    /// The session token in the printed URL (and the session cookie's value).
    token: String,
    /// The per-session CSRF token every action form carries.
    csrf: String,
    /// `host:port` spellings the console answers to (DNS-rebinding guard).
    hosts: Vec<String>,
}

impl Shared {
    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.version.send_modify(|v| *v += 1);
    }
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| anyhow::anyhow!("no randomness for the session token"))?;
    Ok(data_encoding::HEXLOWER.encode(&buf))
}

pub(crate) fn unix_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

/// Runs the console until Ctrl-C.
pub async fn run(args: ConsoleArgs) -> anyhow::Result<()> {
    let no_browser = args.no_browser;
    let (url, serve) = start(args).await?;
    crate::outln!("Nexus console: {url}");
    crate::outln!("(the URL holds this session's token: do not share it) Press Ctrl-C to stop.");
    if !no_browser {
        open_browser(&url);
    }
    tokio::select! {
        () = serve => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// Binds the console and starts following the gateway; returns its URL (with the
/// session token) and the server to run.
pub async fn start(
    args: ConsoleArgs,
) -> anyhow::Result<(String, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>)> {
    if !args.listen.ip().is_loopback() && !args.danger_listen_non_loopback {
        anyhow::bail!(
            "--listen {}: the console listens on loopback only (127.0.0.1 or [::1]); it acts with your operator identity. Use ssh -L to reach it from elsewhere, or pass --danger-listen-non-loopback",
            args.listen
        );
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let local = listener.local_addr()?;
    let port = local.port();
    let mut hosts = vec![
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ];
    if !local.ip().is_loopback() {
        hosts.push(local.to_string());
    }
    let shared = Arc::new(Shared {
        model: Mutex::new(Model::default()),
        version: watch::channel(0).0,
        target: args.target.clone(),
        token: random_hex(24)?,
        csrf: random_hex(24)?,
        hosts,
    });
    tokio::spawn(watch_gateway(shared.clone(), args.signals.min(10_000)));
    let shown = if local.ip().is_loopback() {
        match local {
            SocketAddr::V4(_) => format!("127.0.0.1:{port}"),
            SocketAddr::V6(_) => format!("[::1]:{port}"),
        }
    } else {
        local.to_string()
    };
    let url = format!("http://{shown}/login?token={}", shared.token);
    let limits = nexus_serve::ConnLimits {
        header_read_timeout: args.header_read_timeout,
        ..nexus_serve::ConnLimits::default()
    };
    let max_connections = args.max_connections as usize;
    Ok((
        url,
        Box::pin(server::serve(listener, shared, limits, max_connections)),
    ))
}

/// The console `nexusctl up` runs beside its stack: loopback, a free port, no browser.
pub fn for_up(target: Target) -> ConsoleArgs {
    ConsoleArgs {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        no_browser: true,
        danger_listen_non_loopback: false,
        signals: 1000,
        max_connections: MAX_CONNECTIONS,
        header_read_timeout: HEADER_READ_TIMEOUT,
        target,
    }
}

/// Opens `url` with the desktop's browser when there is a desktop.
fn open_browser(url: &str) {
    let desktop = std::env::var_os("DISPLAY").is_some()
        || std::env::var_os("WAYLAND_DISPLAY").is_some()
        || cfg!(target_os = "macos");
    if !desktop {
        return;
    }
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    if let Err(error) = std::process::Command::new(opener)
        .arg(url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        tracing::info!(%error, "could not open a browser; open the URL above");
    }
}

/// First retry delay after the gateway went away, and the longest one.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Keeps the model fed from the gateway's Watch feed, reconnecting for ever.
async fn watch_gateway(shared: Arc<Shared>, signals: u32) {
    let mut delay = RETRY_FIRST;
    loop {
        let result = follow(&shared, signals).await;
        let why = match result {
            Ok(()) => "the gateway ended the feed".to_string(),
            Err(e) => format!("{e:#}"),
        };
        let was_live = matches!(shared.model().link, Link::Live);
        tracing::warn!(error = %why, "gateway feed lost; retrying");
        shared.model().link = Link::Down(why);
        shared.changed();
        if was_live {
            delay = RETRY_FIRST;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RETRY_MAX);
    }
}

async fn follow(shared: &Shared, signals: u32) -> anyhow::Result<()> {
    let mut c = client(&shared.target).await?;
    let mut feed = c
        .watch(WatchRequest { signals })
        .await
        .map_err(status_error)?
        .into_inner();
    while let Some(event) = feed.message().await.map_err(status_error)? {
        {
            let mut model = shared.model();
            model.apply(event, unix_ms());
            model.link = Link::Live;
        }
        shared.changed();
    }
    Ok(())
}
