//! Sidecar injection into one pod (or pod template), as JSON: the admission webhook and
//! `nexusctl inject` both come here, so a pod injected offline and then admitted is the
//! same pod.
//!
//! The pod is edited as a `serde_json::Value`, never round-tripped through typed structs:
//! a field this crate's k8s-openapi does not know (a newer API server's) is kept, so the
//! JSONPatch touches only what injection adds. The added containers and volumes are built
//! with k8s-openapi's types, so their field names are right by construction.

use k8s_openapi::api::core::v1::{
    CSIVolumeSource, Capabilities, ConfigMapVolumeSource, Container, ContainerPort,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, HostPathVolumeSource,
    ObjectFieldSelector, Probe, ResourceRequirements, SeccompProfile, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Map, Value};

use crate::config::{InjectConfig, Resources, VERSION, WorkloadApiSocket};

/// Namespace label `nexus.io/inject=enabled` selects namespaces (the webhook's
/// namespaceSelector); on a pod, the label or annotation `disabled` opts it out and the
/// label `enabled` opts a pod in from an unlabelled namespace (objectSelector).
pub const INJECT_KEY: &str = "nexus.io/inject";
/// Pod annotation naming a sandbox profile: the plugin container runs under `nexus-launch`.
pub const SANDBOX_ANNOTATION: &str = "nexus.io/sandbox";
/// Pod annotation naming the container to sandbox (default: kubectl's default container,
/// then the first container).
pub const SANDBOX_CONTAINER_ANNOTATION: &str = "nexus.io/sandbox-container";
/// Pod annotation naming another sidecar ConfigMap than the configured one.
pub const CONFIG_MAP_ANNOTATION: &str = "nexus.io/config-map";
/// Pod annotation `host:port` of the local app: the sidecar terminates mTLS for it
/// (`NEXUS_INBOUND_APP`).
pub const INBOUND_APP_ANNOTATION: &str = "nexus.io/inbound-app";
/// Pod annotation, comma-separated SPIFFE IDs (or `spiffe://td/path/*` prefixes) allowed in
/// (`NEXUS_INBOUND_ALLOWED_IDS`).
pub const INBOUND_ALLOWED_IDS_ANNOTATION: &str = "nexus.io/inbound-allowed-ids";
/// Marker annotation set on every injected pod, valued with the injector's version.
pub const INJECTED_ANNOTATION: &str = "nexus.io/injected";
/// Annotations the webhook sets on a plugin pod it admitted by a certified registry
/// version (docs/registry.md): the plugin's UUID, the version, its image digest. The
/// sidecar gets the same values as `NEXUS_PLUGIN_UID`, `NEXUS_PLUGIN_VERSION`,
/// `NEXUS_PLUGIN_IMAGE_DIGEST`.
pub const PLUGIN_UID_ANNOTATION: &str = "nexus.io/plugin-uid";
/// See [`PLUGIN_UID_ANNOTATION`].
pub const PLUGIN_VERSION_ANNOTATION: &str = "nexus.io/plugin-version";
/// See [`PLUGIN_UID_ANNOTATION`].
pub const PLUGIN_DIGEST_ANNOTATION: &str = "nexus.io/plugin-image-digest";
/// kubectl's default container annotation, the sandbox's fallback target.
const KUBECTL_DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

/// Kubernetes' `terminationGracePeriodSeconds` when a pod sets none.
const KUBERNETES_DEFAULT_GRACE_SECS: i64 = 30;

/// The injected native sidecar's container name.
pub const SIDECAR_CONTAINER: &str = "nexus-sidecar";
/// The init container that copies the launcher into the pod.
pub const LAUNCHER_INIT_CONTAINER: &str = "nexus-launcher";
/// Where the launcher and its profiles appear in the plugin container.
pub const LAUNCHER_DIR: &str = "/nexus";
/// The launcher binary in the plugin container.
pub const LAUNCHER_BIN: &str = "/nexus/bin/nexus-launch";

const VOLUME_WORKLOAD_API: &str = "nexus-workload-api";
const VOLUME_CONFIG: &str = "nexus-config";
const VOLUME_POLICIES: &str = "nexus-policies";
const VOLUME_LAUNCHER: &str = "nexus-launcher";
/// The sidecar's own writable state (the gateway snapshot it keeps across restarts of
/// the sidecar container).
const VOLUME_STATE: &str = "nexus-state";
const STATE_DIR: &str = "/var/run/nexus";
/// The in-pod report channel (sandboxed pods): an `emptyDir` shared by the sidecar and
/// the sandboxed container only, holding the sidecar's report socket and the per-pod
/// token nexus-launch presents. Nothing on the network takes reports.
const VOLUME_REPORTS: &str = "nexus-reports";
/// Where that folder is mounted in both containers.
pub const REPORTS_DIR: &str = "/var/run/nexus-reports";
/// The report socket in it.
pub const REPORT_SOCKET: &str = "/var/run/nexus-reports/signals.sock";
/// The per-pod report token in it.
pub const REPORT_TOKEN: &str = "/var/run/nexus-reports/token";
const WORKLOAD_API_DIR: &str = "/spiffe-workload-api";
const CONFIG_DIR: &str = "/etc/nexus/sidecar";
const POLICY_DIR: &str = "/etc/nexus/policies";
const LAUNCHER_INSTALL_DIR: &str = "/nexus-install";

/// What injection did to a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The sidecar (and, if asked, the sandbox) was added.
    Injected {
        /// The sandbox profile applied, if any.
        sandbox: Option<String>,
    },
    /// The pod already carries the marker annotation or a `nexus-sidecar` container.
    AlreadyInjected,
    /// The pod opted out (`nexus.io/inject: disabled`).
    OptedOut,
}

/// Why a pod cannot be injected. Each message says what to change in the manifest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    /// Sandboxing wraps the container's `command`; the image's entrypoint is not visible at
    /// admission.
    #[error(
        "container `{container}` asks for the `{profile}` sandbox but has no `command`: the image's \
         entrypoint cannot be read at admission, so set `command` (and `args`) in the pod spec to \
         what the image runs, or remove the `{SANDBOX_ANNOTATION}` annotation"
    )]
    SandboxWithoutCommand {
        /// The container.
        container: String,
        /// The profile asked for.
        profile: String,
    },
    /// The profile name becomes a file name in the pod and on the node.
    #[error(
        "`{SANDBOX_ANNOTATION}: {profile}` is not a profile name: use 1-63 characters of a-z, 0-9, \
         `-`, `_` and `.`, starting with a letter or digit (e.g. `default`)"
    )]
    BadProfileName {
        /// The annotation's value.
        profile: String,
    },
    /// The container named to be sandboxed is not in the pod.
    #[error(
        "`{SANDBOX_CONTAINER_ANNOTATION}` names container `{name}`, which the pod does not have"
    )]
    NoSuchContainer {
        /// The annotation's value.
        name: String,
    },
    /// A pod without containers.
    #[error("the pod has no containers")]
    NoContainers,
    /// An annotation or label has a value injection does not understand.
    #[error("`{key}: {value}` is not understood: {expected}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// Its value.
        value: String,
        /// What would be accepted.
        expected: &'static str,
    },
    /// The pod already uses a name injection needs.
    #[error("the pod already has a {what} named `{name}`, which Nexus injection adds: rename it")]
    NameTaken {
        /// "volume" or "container".
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A field has the wrong JSON type (e.g. `spec.containers` is not a list).
    #[error("`{path}` is not {expected}")]
    Malformed {
        /// Where.
        path: String,
        /// What it should be.
        expected: &'static str,
    },
}

/// Where the pod template is inside a workload of this kind, as a JSON pointer; `""` for a
/// Pod itself. `None`: the kind has no pod template (left alone).
pub fn pod_template_pointer(api_version: &str, kind: &str) -> Option<&'static str> {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    match (group, kind) {
        ("", "Pod") => Some(""),
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => {
            Some("/spec/template")
        }
        ("batch", "Job") => Some("/spec/template"),
        ("batch", "CronJob") => Some("/spec/jobTemplate/spec/template"),
        ("", "ReplicationController") => Some("/spec/template"),
        _ => None,
    }
}

/// Injects a Kubernetes object (a Pod or a workload with a pod template). `Ok(None)`:
/// the kind has no pod template and the object is untouched.
pub fn inject_object(obj: &mut Value, cfg: &InjectConfig) -> Result<Option<Outcome>, InjectError> {
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let Some(pointer) = pod_template_pointer(api_version, &kind) else {
        return Ok(None);
    };
    let template = obj
        .pointer_mut(pointer)
        .filter(|t| t.is_object())
        .ok_or_else(|| InjectError::Malformed {
            path: format!("{kind}{}", pointer.replace('/', ".")),
            expected: "an object (the pod template)",
        })?;
    inject_pod(template, cfg).map(Some)
}

/// Injects a pod (or pod template): an object with `metadata` and `spec`.
pub fn inject_pod(pod: &mut Value, cfg: &InjectConfig) -> Result<Outcome, InjectError> {
    let Some(pod) = pod.as_object_mut() else {
        return Err(malformed("pod", "an object"));
    };
    let meta = PodMeta::read(pod.get("metadata"))?;
    if meta.injected {
        return Ok(Outcome::AlreadyInjected);
    }
    if meta.opted_out {
        return Ok(Outcome::OptedOut);
    }
    let spec = pod
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| malformed("spec", "an object"))?;
    if names(spec, "initContainers")?.any(|n| n == SIDECAR_CONTAINER) {
        return Ok(Outcome::AlreadyInjected);
    }
    let plan = Plan::new(&meta, spec, cfg)?;
    plan.apply(spec, cfg)?;
    let annotations = annotations_mut(pod)?;
    annotations.insert(INJECTED_ANNOTATION.into(), Value::String(VERSION.into()));
    Ok(Outcome::Injected {
        sandbox: plan.sandbox.map(|s| s.profile),
    })
}

/// The registry version a plugin pod was admitted as (the gateway's webhook decides it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginRun {
    /// The plugin's UUID.
    pub uid: String,
    /// The certified version (semver).
    pub version: String,
    /// Its image digest, `sha256:…`.
    pub image_digest: String,
}

/// Marks an injected pod with the plugin version it was admitted as: the annotations
/// [`PLUGIN_UID_ANNOTATION`] and siblings (set, replacing any the pod's author wrote),
/// and the same values in the `nexus-sidecar` container's environment. A pod without
/// that container (not injected) is left alone.
pub fn mark_plugin(pod: &mut Value, plugin: &PluginRun) -> Result<(), InjectError> {
    let values = [
        (
            PLUGIN_UID_ANNOTATION,
            "NEXUS_PLUGIN_UID",
            plugin.uid.as_str(),
        ),
        (
            PLUGIN_VERSION_ANNOTATION,
            "NEXUS_PLUGIN_VERSION",
            plugin.version.as_str(),
        ),
        (
            PLUGIN_DIGEST_ANNOTATION,
            "NEXUS_PLUGIN_IMAGE_DIGEST",
            plugin.image_digest.as_str(),
        ),
    ];
    let Some(pod) = pod.as_object_mut() else {
        return Err(malformed("pod", "an object"));
    };
    let sidecar = pod
        .get_mut("spec")
        .and_then(|s| s.get_mut("initContainers"))
        .and_then(Value::as_array_mut)
        .and_then(|list| {
            list.iter_mut()
                .find(|c| c.get("name").and_then(Value::as_str) == Some(SIDECAR_CONTAINER))
        });
    let Some(sidecar) = sidecar.and_then(Value::as_object_mut) else {
        return Ok(());
    };
    let vars = list_mut(sidecar, "env")?;
    vars.retain(|v| {
        !values
            .iter()
            .any(|(_, name, _)| v.get("name").and_then(Value::as_str) == Some(*name))
    });
    for (_, name, value) in values {
        vars.push(to_value(env(name, value)));
    }
    let annotations = annotations_mut(pod)?;
    for (annotation, _, value) in values {
        annotations.insert(annotation.into(), Value::String(value.into()));
    }
    Ok(())
}

/// The pod's `metadata.annotations`, created when missing.
fn annotations_mut(pod: &mut Map<String, Value>) -> Result<&mut Map<String, Value>, InjectError> {
    pod.entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| malformed("metadata", "an object"))?
        .entry("annotations")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| malformed("metadata.annotations", "an object"))
}

fn malformed(path: &str, expected: &'static str) -> InjectError {
    InjectError::Malformed {
        path: path.into(),
        expected,
    }
}

/// What the pod's labels and annotations ask for.
#[derive(Default)]
struct PodMeta {
    injected: bool,
    opted_out: bool,
    sandbox: Option<String>,
    sandbox_container: Option<String>,
    default_container: Option<String>,
    config_map: Option<String>,
    inbound_app: Option<String>,
    inbound_allowed_ids: Option<String>,
}

impl PodMeta {
    fn read(metadata: Option<&Value>) -> Result<PodMeta, InjectError> {
        let Some(metadata) = metadata.filter(|m| !m.is_null()) else {
            return Ok(PodMeta::default());
        };
        let metadata = metadata
            .as_object()
            .ok_or_else(|| malformed("metadata", "an object"))?;
        let map = |key: &str| -> Result<Option<&Map<String, Value>>, InjectError> {
            match metadata.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Object(m)) => Ok(Some(m)),
                Some(_) => Err(InjectError::Malformed {
                    path: format!("metadata.{key}"),
                    expected: "a map of strings",
                }),
            }
        };
        let annotations = map("annotations")?;
        let labels = map("labels")?;
        let get = |m: Option<&Map<String, Value>>, key: &str| {
            m.and_then(|m| m.get(key))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let opt_out = |value: Option<String>| match value.as_deref() {
            None | Some("enabled") => Ok(false),
            Some("disabled") => Ok(true),
            Some(other) => Err(InjectError::BadValue {
                key: INJECT_KEY,
                value: other.into(),
                expected: "use `enabled` or `disabled`",
            }),
        };
        Ok(PodMeta {
            injected: get(annotations, INJECTED_ANNOTATION).is_some(),
            opted_out: opt_out(get(annotations, INJECT_KEY))? || opt_out(get(labels, INJECT_KEY))?,
            sandbox: get(annotations, SANDBOX_ANNOTATION),
            sandbox_container: get(annotations, SANDBOX_CONTAINER_ANNOTATION),
            default_container: get(annotations, KUBECTL_DEFAULT_CONTAINER),
            config_map: get(annotations, CONFIG_MAP_ANNOTATION),
            inbound_app: get(annotations, INBOUND_APP_ANNOTATION),
            inbound_allowed_ids: get(annotations, INBOUND_ALLOWED_IDS_ANNOTATION),
        })
    }
}

/// The checked decisions, made before anything is changed (so a refusal leaves the pod
/// as it was).
struct Plan {
    sandbox: Option<Sandbox>,
    config_map: String,
    inbound_app: Option<String>,
    inbound_allowed_ids: Option<String>,
}

struct Sandbox {
    profile: String,
    /// Index into `spec.containers`.
    container: usize,
    /// The original `command` followed by `args`.
    argv: Vec<Value>,
}

impl Plan {
    fn new(
        meta: &PodMeta,
        spec: &Map<String, Value>,
        cfg: &InjectConfig,
    ) -> Result<Plan, InjectError> {
        let containers = list(spec, "containers")?;
        if containers.is_empty() {
            return Err(InjectError::NoContainers);
        }
        for (what, field, name) in [
            ("volume", "volumes", VOLUME_WORKLOAD_API),
            ("volume", "volumes", VOLUME_CONFIG),
            ("volume", "volumes", VOLUME_POLICIES),
            ("volume", "volumes", VOLUME_LAUNCHER),
            ("container", "containers", SIDECAR_CONTAINER),
            ("container", "initContainers", LAUNCHER_INIT_CONTAINER),
            ("container", "containers", LAUNCHER_INIT_CONTAINER),
        ] {
            if names(spec, field)?.any(|n| n == name) {
                return Err(InjectError::NameTaken {
                    what,
                    name: name.into(),
                });
            }
        }
        let sandbox = match &meta.sandbox {
            None => None,
            Some(profile) => Some(Sandbox::plan(profile, meta, containers)?),
        };
        if let Some(name) = &meta.config_map
            && !is_dns_subdomain(name)
        {
            return Err(InjectError::BadValue {
                key: CONFIG_MAP_ANNOTATION,
                value: name.clone(),
                expected: "a ConfigMap name (lowercase DNS subdomain)",
            });
        }
        Ok(Plan {
            sandbox,
            config_map: meta
                .config_map
                .clone()
                .unwrap_or_else(|| cfg.config_map.clone()),
            inbound_app: meta.inbound_app.clone(),
            inbound_allowed_ids: meta.inbound_allowed_ids.clone(),
        })
    }

    fn apply(&self, spec: &mut Map<String, Value>, cfg: &InjectConfig) -> Result<(), InjectError> {
        let mut init = vec![to_value(self.sidecar(cfg))];
        if self.sandbox.is_some() {
            init.push(to_value(launcher_copy(cfg)));
        }
        let existing = spec
            .remove("initContainers")
            .filter(|v| !v.is_null())
            .map(|v| match v {
                Value::Array(items) => Ok(items),
                _ => Err(malformed("spec.initContainers", "a list")),
            })
            .transpose()?
            .unwrap_or_default();
        init.extend(existing);
        spec.insert("initContainers".into(), Value::Array(init));

        // The kubelet stops a native sidecar after the app containers, within the pod's
        // one grace period: it must hold the sidecar's shutdown_grace and a flush. A
        // longer period the pod asks for is kept.
        let needed = i64::from(
            cfg.sidecar_shutdown_grace_seconds
                .clamp(1, crate::config::MAX_SHUTDOWN_GRACE_SECS),
        ) + crate::config::SHUTDOWN_FLUSH_MARGIN_SECS;
        let current = spec
            .get("terminationGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(KUBERNETES_DEFAULT_GRACE_SECS);
        if current < needed {
            spec.insert("terminationGracePeriodSeconds".into(), Value::from(needed));
        }

        let mut volumes = vec![
            workload_api_volume(&cfg.workload_api),
            Volume {
                name: VOLUME_CONFIG.into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: self.config_map.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Volume {
                name: VOLUME_POLICIES.into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: cfg.policy_config_map.clone(),
                    optional: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ];
        volumes.push(Volume {
            name: VOLUME_STATE.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("16Mi".into())),
                ..Default::default()
            }),
            ..Default::default()
        });
        if self.sandbox.is_some() {
            volumes.push(Volume {
                name: VOLUME_REPORTS.into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    medium: Some("Memory".into()),
                    size_limit: Some(Quantity("1Mi".into())),
                }),
                ..Default::default()
            });
            volumes.push(Volume {
                name: VOLUME_LAUNCHER.into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: Some(Quantity("64Mi".into())),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        list_mut(spec, "volumes")?.extend(volumes.into_iter().map(to_value));

        if let Some(sandbox) = &self.sandbox {
            sandbox.wrap(spec, cfg)?;
        }
        Ok(())
    }

    fn sidecar(&self, cfg: &InjectConfig) -> Container {
        let socket = format!(
            "unix://{WORKLOAD_API_DIR}/{}",
            cfg.workload_api.socket_file()
        );
        let mut vars = vec![
            env("SPIFFE_ENDPOINT_SOCKET", &socket),
            env("NEXUS_ADMIN_LISTEN", &format!("0.0.0.0:{}", cfg.admin_port)),
            env("NEXUS_GATEWAY_ADDRESS", &cfg.gateway_address),
            env("NEXUS_GATEWAY_ID", &cfg.gateway_id),
            env(
                "NEXUS_SHUTDOWN_GRACE",
                &format!(
                    "{}s",
                    cfg.sidecar_shutdown_grace_seconds
                        .clamp(1, crate::config::MAX_SHUTDOWN_GRACE_SECS)
                ),
            ),
            env(
                "NEXUS_GATEWAY_SNAPSHOT_FILE",
                &format!("{STATE_DIR}/gateway-snapshot.json"),
            ),
        ];
        // The admin listener stays on the pod IP for the kubelet's probes and metrics
        // scrapes: it is read-only (POST /v1/signals is refused there). Sandbox reports
        // come over the in-pod socket, checked by the per-pod token.
        if self.sandbox.is_some() {
            vars.push(env("NEXUS_REPORT_SOCKET", REPORT_SOCKET));
            vars.push(env("NEXUS_REPORT_TOKEN_FILE", REPORT_TOKEN));
        }
        if self.inbound_app.is_some() || self.inbound_allowed_ids.is_some() {
            vars.push(env(
                "NEXUS_INBOUND_LISTEN",
                &format!("0.0.0.0:{}", cfg.inbound_port),
            ));
        }
        if let Some(app) = &self.inbound_app {
            vars.push(env("NEXUS_INBOUND_APP", app));
        }
        if let Some(ids) = &self.inbound_allowed_ids {
            vars.push(env("NEXUS_INBOUND_ALLOWED_IDS", ids));
        }
        let probe = |path: &str, period: i32, failures: i32| Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.into()),
                port: IntOrString::Int(i32::from(cfg.admin_port)),
                ..Default::default()
            }),
            period_seconds: Some(period),
            failure_threshold: Some(failures),
            ..Default::default()
        };
        Container {
            name: SIDECAR_CONTAINER.into(),
            image: Some(cfg.sidecar_image.clone()),
            image_pull_policy: Some(cfg.image_pull_policy.clone()),
            // A native sidecar: started before the app containers (and after its startup
            // probe passes, i.e. once it holds an SVID), stopped after them, so Jobs complete.
            restart_policy: Some("Always".into()),
            args: Some(vec![
                "--config".into(),
                format!("{CONFIG_DIR}/sidecar.toml"),
            ]),
            env: Some(vars),
            ports: Some(vec![
                port("nexus-inbound", cfg.inbound_port),
                port("nexus-admin", cfg.admin_port),
            ]),
            resources: Some(resources(&cfg.sidecar_resources)),
            security_context: Some(restricted(cfg.sidecar_uid)),
            startup_probe: Some(probe("/ready", 1, 120)),
            readiness_probe: Some(probe("/ready", 5, 3)),
            liveness_probe: Some(probe("/live", 10, 3)),
            volume_mounts: Some({
                let mut mounts = vec![
                    mount(VOLUME_WORKLOAD_API, WORKLOAD_API_DIR),
                    mount(VOLUME_CONFIG, CONFIG_DIR),
                    mount(VOLUME_POLICIES, POLICY_DIR),
                    state_mount(),
                ];
                if self.sandbox.is_some() {
                    mounts.push(VolumeMount {
                        name: VOLUME_REPORTS.into(),
                        mount_path: REPORTS_DIR.into(),
                        ..Default::default()
                    });
                }
                mounts
            }),
            ..Default::default()
        }
    }
}

impl Sandbox {
    fn plan(profile: &str, meta: &PodMeta, containers: &[Value]) -> Result<Sandbox, InjectError> {
        if !is_profile_name(profile) {
            return Err(InjectError::BadProfileName {
                profile: profile.into(),
            });
        }
        let name_of = |c: &Value| c.get("name").and_then(Value::as_str).map(str::to_string);
        let container = match &meta.sandbox_container {
            Some(wanted) => containers
                .iter()
                .position(|c| name_of(c).as_deref() == Some(wanted))
                .ok_or_else(|| InjectError::NoSuchContainer {
                    name: wanted.clone(),
                })?,
            None => meta
                .default_container
                .as_ref()
                .and_then(|d| {
                    containers
                        .iter()
                        .position(|c| name_of(c).as_deref() == Some(d))
                })
                .unwrap_or(0),
        };
        let target = &containers[container];
        let name = name_of(target).unwrap_or_default();
        let strings = |field: &str| -> Result<Vec<Value>, InjectError> {
            match target.get(field) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
                    Ok(items.clone())
                }
                Some(_) => Err(InjectError::Malformed {
                    path: format!("containers[{name}].{field}"),
                    expected: "a list of strings",
                }),
            }
        };
        let command = strings("command")?;
        if command.is_empty() {
            return Err(InjectError::SandboxWithoutCommand {
                container: name,
                profile: profile.into(),
            });
        }
        let mut argv = command;
        argv.extend(strings("args")?);
        Ok(Sandbox {
            profile: profile.into(),
            container,
            argv,
        })
    }

    fn wrap(&self, spec: &mut Map<String, Value>, cfg: &InjectConfig) -> Result<(), InjectError> {
        let containers = list_mut(spec, "containers")?;
        let container = containers
            .get_mut(self.container)
            .and_then(Value::as_object_mut)
            .ok_or_else(|| malformed("spec.containers", "a list of objects"))?;
        let mut command = vec![
            Value::String(LAUNCHER_BIN.into()),
            Value::String("--profile".into()),
            Value::String(format!("{LAUNCHER_DIR}/profiles/{}.toml", self.profile)),
            Value::String("--".into()),
        ];
        command.extend(self.argv.iter().cloned());
        container.insert("command".into(), Value::Array(command));
        container.remove("args");

        list_mut(container, "volumeMounts")?.push(to_value(mount(VOLUME_LAUNCHER, LAUNCHER_DIR)));
        // Read-only: connecting to a socket needs no write access to its file system, and
        // the launcher only reads the token (the plugin's profile must not grant it).
        list_mut(container, "volumeMounts")?.push(to_value(mount(VOLUME_REPORTS, REPORTS_DIR)));

        let env_list = list_mut(container, "env")?;
        let present: Vec<String> = env_list
            .iter()
            .filter_map(|e| e.get("name").and_then(Value::as_str).map(str::to_string))
            .collect();
        let field = |name: &str, path: &str| EnvVar {
            name: name.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let added = [
            env("NEXUS_SIGNAL_URL", &format!("unix://{REPORT_SOCKET}")),
            env("NEXUS_REPORT_TOKEN_FILE", REPORT_TOKEN),
            field("NEXUS_POD_NAMESPACE", "metadata.namespace"),
            field("NEXUS_SERVICE_ACCOUNT", "spec.serviceAccountName"),
            // Dependent variables: the kubelet expands $(NAME) from the ones defined above.
            env(
                "NEXUS_WORKLOAD_ID",
                &format!(
                    "spiffe://{}/ns/$(NEXUS_POD_NAMESPACE)/sa/$(NEXUS_SERVICE_ACCOUNT)",
                    cfg.trust_domain
                ),
            ),
        ];
        env_list.extend(
            added
                .into_iter()
                .filter(|e| !present.contains(&e.name))
                .map(to_value),
        );

        let security = container
            .entry("securityContext")
            .or_insert_with(|| Value::Object(Map::new()));
        if security.is_null() {
            *security = Value::Object(Map::new());
        }
        let security = security
            .as_object_mut()
            .ok_or_else(|| malformed("securityContext", "an object"))?;
        security.insert(
            "seccompProfile".into(),
            to_value(SeccompProfile {
                type_: "Localhost".into(),
                localhost_profile: Some(format!(
                    "{}/{}.json",
                    cfg.seccomp_profile_dir, self.profile
                )),
            }),
        );
        Ok(())
    }
}

fn launcher_copy(cfg: &InjectConfig) -> Container {
    Container {
        name: LAUNCHER_INIT_CONTAINER.into(),
        image: Some(cfg.launcher_image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        command: Some(vec![
            "cp".into(),
            "-R".into(),
            format!("{LAUNCHER_DIR}/."),
            format!("{LAUNCHER_INSTALL_DIR}/"),
        ]),
        resources: Some(resources(&cfg.launcher_resources)),
        security_context: Some(restricted(cfg.sidecar_uid)),
        volume_mounts: Some(vec![VolumeMount {
            name: VOLUME_LAUNCHER.into(),
            mount_path: LAUNCHER_INSTALL_DIR.into(),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

fn workload_api_volume(socket: &WorkloadApiSocket) -> Volume {
    match socket {
        WorkloadApiSocket::Csi { driver, .. } => Volume {
            name: VOLUME_WORKLOAD_API.into(),
            csi: Some(CSIVolumeSource {
                driver: driver.clone(),
                read_only: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        },
        WorkloadApiSocket::HostPath { path, .. } => Volume {
            name: VOLUME_WORKLOAD_API.into(),
            host_path: Some(HostPathVolumeSource {
                path: path.clone(),
                type_: Some("Directory".into()),
            }),
            ..Default::default()
        },
    }
}

/// The `restricted` Pod Security profile's container settings.
fn restricted(uid: i64) -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

fn resources(r: &Resources) -> ResourceRequirements {
    let quantities = |m: &std::collections::BTreeMap<String, String>| {
        (!m.is_empty()).then(|| {
            m.iter()
                .map(|(k, v)| (k.clone(), Quantity(v.clone())))
                .collect()
        })
    };
    ResourceRequirements {
        requests: quantities(&r.requests),
        limits: quantities(&r.limits),
        ..Default::default()
    }
}

/// The sidecar's writable state folder (read-write, unlike its other mounts).
fn state_mount() -> VolumeMount {
    VolumeMount {
        name: VOLUME_STATE.into(),
        mount_path: STATE_DIR.into(),
        ..Default::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn port(name: &str, number: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: i32::from(number),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn mount(volume: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    }
}

fn to_value<T: serde::Serialize>(v: T) -> Value {
    // k8s-openapi's types serialize to plain JSON objects; nothing here can fail.
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// The list at `spec[field]`, empty when absent or null.
fn list<'a>(spec: &'a Map<String, Value>, field: &str) -> Result<&'a [Value], InjectError> {
    match spec.get(field) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(InjectError::Malformed {
            path: field.into(),
            expected: "a list",
        }),
    }
}

fn list_mut<'a>(
    obj: &'a mut Map<String, Value>,
    field: &str,
) -> Result<&'a mut Vec<Value>, InjectError> {
    let slot = obj.entry(field).or_insert_with(|| Value::Array(Vec::new()));
    if slot.is_null() {
        *slot = Value::Array(Vec::new());
    }
    slot.as_array_mut().ok_or_else(|| InjectError::Malformed {
        path: field.into(),
        expected: "a list",
    })
}

fn names<'a>(
    spec: &'a Map<String, Value>,
    field: &str,
) -> Result<impl Iterator<Item = &'a str>, InjectError> {
    Ok(list(spec, field)?
        .iter()
        .filter_map(|v| v.get("name").and_then(Value::as_str)))
}

fn is_profile_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    s.len() <= 63
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes.all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
        && !s.contains("..")
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
mod tests;
