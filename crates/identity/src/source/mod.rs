//! Where the identity comes from: the SPIFFE Workload API (SPIRE in production, the
//! development server on a laptop) or static PEM files for users without SPIRE.

pub mod files;
pub mod workload_api;

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::IdentityStore;
use files::FileSourceConfig;

/// Identity source selection.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// The SPIFFE Workload API (SPIRE, or `nexusctl dev workload-api`).
    #[default]
    WorkloadApi,
    /// Static PEM files, re-read when they change.
    Files,
}

/// `[identity]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// `workload_api` (default) or `files`.
    pub source: IdentitySource,
    /// Workload API socket (`unix:///path` or a path). Default: `SPIFFE_ENDPOINT_SOCKET`.
    pub workload_api_socket: Option<String>,
    /// Paths for `source = "files"`.
    pub files: Option<FileSourceConfig>,
    /// How often the files are checked for changes. Default 5s.
    #[serde(with = "humantime_serde")]
    pub file_reload_interval: Duration,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            source: IdentitySource::WorkloadApi,
            workload_api_socket: None,
            files: None,
            file_reload_interval: Duration::from_secs(5),
        }
    }
}

/// Starts the configured source in the background; it publishes into `store`.
pub fn spawn(config: &IdentityConfig, store: Arc<IdentityStore>) -> Result<(), String> {
    match config.source {
        IdentitySource::WorkloadApi => {
            tokio::spawn(workload_api::run(config.workload_api_socket.clone(), store));
        }
        IdentitySource::Files => {
            let files = config
                .files
                .clone()
                .ok_or("identity.files is required with source = \"files\"")?;
            tokio::spawn(files::run(files, store, config.file_reload_interval));
        }
    }
    Ok(())
}
