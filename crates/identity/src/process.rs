//! What every Nexus binary does first: logging to stderr, filtered by `NEXUS_LOG`, and
//! rustls's ring provider (the one crypto provider in the dependency graph).

/// Sets both up. `default_log` is the filter when `NEXUS_LOG` is unset; `program` names
/// the binary in the one message this can print.
pub fn init(program: &str, default_log: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NEXUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("{program}: a rustls crypto provider was already installed");
    }
}
