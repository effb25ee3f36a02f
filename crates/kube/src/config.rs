//! What injection adds to a pod: images, resources, the Workload API socket, the sidecar's
//! ConfigMaps, the gateway address. Every field has a default that works with the
//! manifests in `deploy/`, so an empty `[inject]` table (or `{}`) is a valid config.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The version written into the injected marker annotation.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The API server's own limit on a request body (etcd's 3 MiB object limit with room for
/// the review envelope); larger reviews get 413.
pub const DEFAULT_MAX_REVIEW_BYTES: usize = 3 * 1024 * 1024;

/// How the injected pod reaches the SPIFFE Workload API.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkloadApiSocket {
    /// The SPIFFE CSI driver mounts the SPIRE agent's socket directory (the default: no
    /// hostPath, so the pod passes the `baseline` Pod Security level).
    Csi {
        /// The CSI driver's name.
        #[serde(default = "default_csi_driver")]
        driver: String,
        /// The socket's file name inside the mounted directory.
        #[serde(default = "default_socket_file")]
        socket_file: String,
    },
    /// A hostPath directory holding the agent's socket (needs a privileged namespace).
    HostPath {
        /// The directory on the node.
        #[serde(default = "default_host_path")]
        path: String,
        /// The socket's file name inside that directory.
        #[serde(default = "default_socket_file")]
        socket_file: String,
    },
}

impl Default for WorkloadApiSocket {
    fn default() -> Self {
        WorkloadApiSocket::Csi {
            driver: default_csi_driver(),
            socket_file: default_socket_file(),
        }
    }
}

impl WorkloadApiSocket {
    /// The socket's file name.
    pub fn socket_file(&self) -> &str {
        match self {
            WorkloadApiSocket::Csi { socket_file, .. }
            | WorkloadApiSocket::HostPath { socket_file, .. } => socket_file,
        }
    }
}

/// Requests and limits (Kubernetes quantities, e.g. `cpu = "50m"`, `memory = "64Mi"`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// `resources.requests`.
    #[serde(default)]
    pub requests: BTreeMap<String, String>,
    /// `resources.limits`.
    #[serde(default)]
    pub limits: BTreeMap<String, String>,
}

impl Resources {
    fn of(requests: &[(&str, &str)], limits: &[(&str, &str)]) -> Self {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        Resources {
            requests: map(requests),
            limits: map(limits),
        }
    }
}

/// What injection adds. Deserialize with serde (TOML in the gateway's config, JSON or
/// YAML elsewhere); unknown fields are errors.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct InjectConfig {
    /// The `nexus-sidecar` image.
    pub sidecar_image: String,
    /// The image holding `/nexus/bin/nexus-launch` and `/nexus/profiles/*.toml` (and a
    /// `cp`); copied into the pod when sandboxing is asked for.
    pub launcher_image: String,
    /// `imagePullPolicy` of both injected images.
    pub image_pull_policy: String,
    /// The sidecar container's resources.
    pub sidecar_resources: Resources,
    /// The launcher copy step's resources (it runs for a second).
    pub launcher_resources: Resources,
    /// How the Workload API socket is mounted (`csi`, the default, or `host_path`).
    pub workload_api: WorkloadApiSocket,
    /// The ConfigMap with the sidecar's `sidecar.toml` (a pod may name another with the
    /// `nexus.io/config-map` annotation).
    pub config_map: String,
    /// The ConfigMap with the Rego policies, mounted at `/etc/nexus/policies`
    /// (optional: a pod without it starts in authentication-only mode if its config says so).
    pub policy_config_map: String,
    /// The gateway's control address, passed as `NEXUS_GATEWAY_ADDRESS`.
    pub gateway_address: String,
    /// The gateway's SPIFFE ID, passed as `NEXUS_GATEWAY_ID` (its certificate must match).
    pub gateway_id: String,
    /// The trust domain of the plugin's SPIFFE ID, given to the launcher as
    /// `NEXUS_WORKLOAD_ID=spiffe://<trust_domain>/ns/<namespace>/sa/<service account>`.
    pub trust_domain: String,
    /// The sidecar's inbound port (`NEXUS_INBOUND_LISTEN=0.0.0.0:<port>`).
    pub inbound_port: u16,
    /// The sidecar's admin port (`/live`, `/ready`, `/metrics`; read-only), on the pod
    /// IP so the kubelet can probe it.
    pub admin_port: u16,
    /// The uid the sidecar runs as (non-root).
    pub sidecar_uid: i64,
    /// Seccomp Localhost profiles live under `<kubelet seccomp root>/<this>/<profile>.json`
    /// (`nexusctl sandbox export-seccomp` writes them).
    pub seccomp_profile_dir: String,
    /// Reviews larger than this get 413.
    pub max_review_bytes: usize,
    /// The injected sidecar's `limits.shutdown_grace`, seconds (`NEXUS_SHUTDOWN_GRACE`);
    /// the pod's `terminationGracePeriodSeconds` is raised to at least this plus
    /// [`SHUTDOWN_FLUSH_MARGIN_SECS`]. Default 30; 1 to 3600.
    pub sidecar_shutdown_grace_seconds: u32,
}

/// Seconds a stopping sidecar gets beyond its shutdown grace to flush records and
/// telemetry before the kubelet's SIGKILL.
pub const SHUTDOWN_FLUSH_MARGIN_SECS: i64 = 5;
/// Largest `sidecar_shutdown_grace_seconds`.
pub const MAX_SHUTDOWN_GRACE_SECS: u32 = 3600;

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            sidecar_image: format!("ghcr.io/nexus/nexus-sidecar:{VERSION}"),
            launcher_image: format!("ghcr.io/nexus/nexus-launch:{VERSION}"),
            image_pull_policy: "IfNotPresent".into(),
            sidecar_resources: Resources::of(
                &[("cpu", "50m"), ("memory", "64Mi")],
                &[("cpu", "1"), ("memory", "256Mi")],
            ),
            launcher_resources: Resources::of(
                &[("cpu", "10m"), ("memory", "16Mi")],
                &[("cpu", "100m"), ("memory", "32Mi")],
            ),
            workload_api: WorkloadApiSocket::default(),
            config_map: "nexus-sidecar".into(),
            policy_config_map: "nexus-policies".into(),
            gateway_address: "nexus-gateway.nexus-system.svc:7443".into(),
            gateway_id: "spiffe://nexus.local/ns/nexus-system/sa/nexus-gateway".into(),
            trust_domain: "nexus.local".into(),
            inbound_port: 15006,
            admin_port: 15090,
            sidecar_uid: 65532,
            seccomp_profile_dir: "nexus".into(),
            max_review_bytes: DEFAULT_MAX_REVIEW_BYTES,
            sidecar_shutdown_grace_seconds: 30,
        }
    }
}

/// Environment variables that override the injected images, so a kustomize `images:`
/// entry (which rewrites env values of the gateway Deployment through deploy/images'
/// transformer configuration) names the sidecar and launcher images in the same place as
/// every other Nexus image.
pub const SIDECAR_IMAGE_ENV: &str = "NEXUS_INJECT_SIDECAR_IMAGE";
/// See [`SIDECAR_IMAGE_ENV`].
pub const LAUNCHER_IMAGE_ENV: &str = "NEXUS_INJECT_LAUNCHER_IMAGE";

impl InjectConfig {
    /// Applies [`SIDECAR_IMAGE_ENV`] and [`LAUNCHER_IMAGE_ENV`] (an empty value is ignored).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        for (var, field) in [
            (SIDECAR_IMAGE_ENV, &mut self.sidecar_image),
            (LAUNCHER_IMAGE_ENV, &mut self.launcher_image),
        ] {
            if let Some(value) = get(var).filter(|v| !v.trim().is_empty()) {
                *field = value.trim().to_string();
            }
        }
    }
}

fn default_csi_driver() -> String {
    "csi.spiffe.io".into()
}

fn default_socket_file() -> String {
    "spire-agent.sock".into()
}

fn default_host_path() -> String {
    "/run/spire/agent-sockets".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_default_and_unknown_fields_are_refused() {
        let cfg: InjectConfig = serde_json::from_str("{}").expect("empty config");
        assert_eq!(cfg, InjectConfig::default());
        let err = serde_json::from_str::<InjectConfig>(r#"{"sidecar_imag": "x"}"#)
            .expect_err("typo must fail");
        assert!(err.to_string().contains("sidecar_imag"), "{err}");
    }

    #[test]
    fn image_environment_overrides_the_configured_images() {
        let mut cfg = InjectConfig::default();
        cfg.apply_env(|k| match k {
            SIDECAR_IMAGE_ENV => Some("registry.test/nexus-sidecar:9".into()),
            LAUNCHER_IMAGE_ENV => Some("  ".into()),
            _ => None,
        });
        assert_eq!(cfg.sidecar_image, "registry.test/nexus-sidecar:9");
        assert_eq!(cfg.launcher_image, InjectConfig::default().launcher_image);
    }

    #[test]
    fn host_path_mode_parses_with_defaults() {
        let cfg: InjectConfig =
            serde_json::from_str(r#"{"workload_api": {"mode": "host_path"}}"#).expect("parse");
        assert_eq!(
            cfg.workload_api,
            WorkloadApiSocket::HostPath {
                path: "/run/spire/agent-sockets".into(),
                socket_file: "spire-agent.sock".into()
            }
        );
    }
}
