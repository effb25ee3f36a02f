//! A cluster for the rehearsal, without an API server: an object store that creates and
//! applies as the API server would, the two controllers the manifests rely on
//! (cert-manager's issuance and CA injection), the admission webhook called over HTTPS as
//! the API server calls it, and a kubelet that starts a pod's containers from exactly
//! what the pod spec gives them.
//!
//! What a pod's container gets: its volumes materialized on disk (ConfigMaps and Secrets
//! in the kubelet's atomic layout: `..<timestamp>/` holding the files, `..data` pointing
//! at it, one symlink per top-level entry; `items` and `subPath` honoured; emptyDir; the
//! SPIFFE CSI driver's socket served by `nexusctl dev workload-api` with the ID the
//! matching ClusterSPIFFEID gives the pod), its env (values, `$(VAR)` expansion,
//! Secret/ConfigMap key references, the downward API, and the Service links the kubelet
//! adds), its command and args (or the image's entrypoint), in a mount namespace of its
//! own (bubblewrap) where those volumes sit at their mount paths, the machine's /usr is
//! the base image, and the Nexus binaries sit where the Dockerfile copies them.
//!
//! The only rewrites (pods here share one loopback): every `host:port` whose host is a
//! local address (`0.0.0.0`, `127.0.0.1`, `localhost`, `[::]`) becomes a free port on
//! 127.0.0.1, one per (pod, port); every `NAME.NS.svc[.cluster.local]:PORT` becomes the
//! port of the pod behind that Service's target port. They apply to env values, args,
//! commands, ConfigMap files and HTTP probes. A `postgres://` URL in the environment gets
//! the test database's host, port, database and CA. Nothing else is changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nexus_tests::{Proc, bin, curl_status, eventually, free_port};
use serde_json::{Value, json};

/// A failure the rehearsal reports: which object, which field, what is wrong.
pub type Fault = String;

/// The kinds served by the simulated API server without a CRD (built-in), with whether
/// they are namespaced.
fn builtin_kind(api_version: &str, kind: &str) -> Option<bool> {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    Some(match (group, kind) {
        ("", "Namespace") => false,
        ("", "ServiceAccount" | "ConfigMap" | "Secret" | "Service" | "Pod") => true,
        ("apps", "Deployment" | "DaemonSet" | "StatefulSet") => true,
        ("policy", "PodDisruptionBudget") => true,
        ("networking.k8s.io", "NetworkPolicy") => true,
        ("rbac.authorization.k8s.io", "Role" | "RoleBinding") => true,
        ("rbac.authorization.k8s.io", "ClusterRole" | "ClusterRoleBinding") => false,
        ("admissionregistration.k8s.io", "MutatingWebhookConfiguration") => false,
        _ => return None,
    })
}

/// The custom resources the requirements install (SPIRE's controller manager, and
/// cert-manager when the overlay uses it), with whether they are namespaced.
fn crd_kind(api_version: &str, kind: &str, cert_manager: bool) -> Option<bool> {
    match (api_version, kind) {
        ("spire.spiffe.io/v1alpha1", "ClusterSPIFFEID") => Some(false),
        ("cert-manager.io/v1", "Certificate" | "Issuer") if cert_manager => Some(true),
        _ => None,
    }
}

/// `Kind/name` (with the namespace when there is one).
pub fn describe(obj: &Value) -> String {
    let kind = obj["kind"].as_str().unwrap_or("?");
    let name = obj["metadata"]["name"].as_str().unwrap_or("?");
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind}/{name} (namespace {ns})"),
        None => format!("{kind}/{name}"),
    }
}

/// A Nexus image as the Dockerfile builds it: which files it holds and its entrypoint.
#[derive(Clone, Debug)]
pub struct Image {
    /// Container path -> file on this machine.
    pub files: Vec<(String, PathBuf)>,
    /// `ENTRYPOINT`.
    pub entrypoint: Vec<String>,
    /// Directories the base image adds to `PATH` (distroless debug: /busybox).
    pub extra_path: Vec<String>,
    /// Programs the base image ships that the rehearsal does not run (busybox's).
    pub base_programs: Vec<String>,
}

/// The Nexus images of the Dockerfile, by image name without tag.
pub fn dockerfile_images(repo: &Path) -> BTreeMap<String, Image> {
    let text = std::fs::read_to_string(repo.join("Dockerfile")).expect("Dockerfile");
    let mut target_image = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with('#')) {
        let w: Vec<&str> = line.split_whitespace().collect();
        if let (Some(t), Some(i)) = (
            w.iter().position(|x| *x == "--target"),
            w.iter().position(|x| *x == "-t"),
        ) && let (Some(target), Some(image)) = (w.get(t + 1), w.get(i + 1))
        {
            let name = image.rsplit_once(':').map_or(*image, |(n, _)| n);
            target_image.insert(target.to_string(), name.to_string());
        }
    }
    let debug = repo.join("target/debug");
    let mut out = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    let mut image = Image {
        files: Vec::new(),
        entrypoint: Vec::new(),
        extra_path: Vec::new(),
        base_programs: Vec::new(),
    };
    let mut flush = |current: &Option<(String, String)>, image: &mut Image| {
        if let Some((target, _)) = current
            && let Some(name) = target_image.get(target)
        {
            out.insert(
                name.clone(),
                std::mem::replace(
                    image,
                    Image {
                        files: Vec::new(),
                        entrypoint: Vec::new(),
                        extra_path: Vec::new(),
                        base_programs: Vec::new(),
                    },
                ),
            );
        }
        *image = Image {
            files: Vec::new(),
            entrypoint: Vec::new(),
            extra_path: Vec::new(),
            base_programs: Vec::new(),
        };
    };
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["FROM", base, "AS", target] => {
                flush(&current, &mut image);
                current = Some((target.to_string(), base.to_string()));
                if base.contains(":debug") {
                    image.extra_path.push("/busybox".into());
                    image.base_programs.push("/busybox/".into());
                }
                if base.starts_with("busybox") {
                    image.base_programs.push("/bin/".into());
                }
            }
            ["COPY", "--from=build", src, dst] => {
                if let Some(bin_name) = src.strip_prefix("/src/target/release/") {
                    image.files.push((dst.to_string(), debug.join(bin_name)));
                } else if *src == "/out/nexus" {
                    // The launcher's tree, as the build stage makes it.
                    image.files.push((
                        format!("{dst}/bin/nexus-launch"),
                        debug.join("nexus-launch"),
                    ));
                    image
                        .files
                        .push((format!("{dst}/profiles"), repo.join("profiles")));
                }
            }
            ["ENTRYPOINT", ..] => {
                let json = line.trim().trim_start_matches("ENTRYPOINT").trim();
                image.entrypoint = serde_json::from_str(json).unwrap_or_default();
            }
            _ => {}
        }
    }
    flush(&current, &mut image);
    out
}

/// One started pod.
pub struct Pod {
    /// The admitted pod.
    pub spec: Value,
    /// Its folder (volumes, logs).
    pub dir: PathBuf,
    /// Volume name -> materialized folder.
    pub volumes: BTreeMap<String, PathBuf>,
    /// Container name -> (log file, resolved env) of started containers.
    pub containers: BTreeMap<String, (PathBuf, Vec<(String, String)>)>,
}

/// The simulated cluster.
pub struct Cluster {
    /// The working copy commands run in.
    pub work: PathBuf,
    /// Scratch.
    pub dir: PathBuf,
    /// The node's file system root (seccomp profiles).
    pub node: PathBuf,
    /// kubectl with kustomize v5.
    pub kubectl: PathBuf,
    /// Whether cert-manager is installed in this variant.
    pub cert_manager: bool,
    /// Every object.
    pub objects: Vec<Value>,
    /// Started pods by `namespace/deployment`.
    pub pods: BTreeMap<String, Pod>,
    /// (pod key, container port) -> port on 127.0.0.1.
    ports: BTreeMap<(String, u16), u16>,
    /// Operator machine port (kubectl port-forward) -> port on 127.0.0.1.
    pub forwards: BTreeMap<u16, u16>,
    /// Processes started (killed on drop).
    pub procs: Vec<Proc>,
    /// The Nexus images.
    pub images: BTreeMap<String, Image>,
    /// Image name mapping of deploy/images (newName -> name).
    pub image_names: BTreeMap<String, String>,
    /// The test database: (host:port, database, CA file).
    pub database: (String, String, PathBuf),
    generation: u32,
}

impl Cluster {
    /// An empty cluster.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        repo: PathBuf,
        work: PathBuf,
        dir: PathBuf,
        kubectl: PathBuf,
        cert_manager: bool,
        database: (String, String, PathBuf),
    ) -> Self {
        let node = dir.join("node");
        std::fs::create_dir_all(&node).expect("node dir");
        let images = dockerfile_images(&repo);
        let mut image_names = BTreeMap::new();
        if let Ok(text) = std::fs::read_to_string(work.join("deploy/images/kustomization.yaml"))
            && let Ok(doc) = yaml_serde::from_str::<Value>(&text)
        {
            for entry in doc["images"].as_array().cloned().unwrap_or_default() {
                if let Some(name) = entry["name"].as_str() {
                    let new = entry["newName"].as_str().unwrap_or(name);
                    image_names.insert(new.to_string(), name.to_string());
                }
            }
        }
        let mut cluster = Cluster {
            work,
            dir,
            node,
            kubectl,
            cert_manager,
            objects: Vec::new(),
            pods: BTreeMap::new(),
            ports: BTreeMap::new(),
            forwards: BTreeMap::new(),
            procs: Vec::new(),
            images,
            image_names,
            database,
            generation: 0,
        };
        // What every cluster has.
        for ns in ["default", "kube-system"] {
            cluster.objects.push(namespace_object(ns, &Value::Null));
        }
        cluster.objects.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {"ports": [{"name": "https", "port": 443}]}
        }));
        cluster
    }

    /// The object of this kind, namespace and name.
    pub fn get(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<&Value> {
        self.objects.iter().find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"] == name
                && o["metadata"]["namespace"].as_str() == namespace
        })
    }

    fn index(&self, obj: &Value) -> Option<usize> {
        self.objects.iter().position(|o| {
            o["kind"] == obj["kind"]
                && o["apiVersion"] == obj["apiVersion"]
                && o["metadata"]["name"] == obj["metadata"]["name"]
                && o["metadata"]["namespace"] == obj["metadata"]["namespace"]
        })
    }

    /// Creates (`create: true`: AlreadyExists is an error) or applies objects, in order,
    /// as the API server would accept them; then lets the controllers act.
    pub fn submit(&mut self, objects: Vec<Value>, create: bool) -> Result<String, Fault> {
        let mut out = String::new();
        for mut obj in objects {
            let api_version = obj["apiVersion"].as_str().unwrap_or("").to_string();
            let kind = obj["kind"].as_str().unwrap_or("").to_string();
            let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
            let namespaced = builtin_kind(&api_version, &kind)
                .or_else(|| crd_kind(&api_version, &kind, self.cert_manager))
                .ok_or_else(|| {
                    format!(
                        "{}: no matches for kind \"{kind}\" in version \"{api_version}\" \
                         (ensure CRDs are installed first{})",
                        describe(&obj),
                        if kind == "Kustomization" {
                            "; a kustomization is applied with -k, not -f"
                        } else {
                            ""
                        }
                    )
                })?;
            if name.is_empty() {
                return Err(format!("{kind}: metadata.name is required"));
            }
            if namespaced {
                let ns = obj["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string();
                obj["metadata"]["namespace"] = json!(ns);
                if self.get("Namespace", None, &ns).is_none() {
                    return Err(format!(
                        "{}: metadata.namespace: namespaces \"{ns}\" not found",
                        describe(&obj)
                    ));
                }
            } else if let Some(map) = obj["metadata"].as_object_mut() {
                map.remove("namespace");
            }
            if kind == "Namespace" {
                obj = namespace_object(&name, &obj);
            }
            if kind == "Secret" {
                normalize_secret(&mut obj)?;
            }
            let what = format!("{}/{}", kind.to_lowercase(), name);
            match self.index(&obj) {
                Some(_) if create => {
                    return Err(format!("{what}: AlreadyExists (created twice)"));
                }
                Some(i) => {
                    self.objects[i] = obj;
                    out.push_str(&format!("{what} configured\n"));
                }
                None => {
                    self.objects.push(obj);
                    out.push_str(&format!("{what} created\n"));
                }
            }
        }
        self.run_controllers()?;
        self.refresh_volumes()?;
        Ok(out)
    }

    /// `kubectl label namespace NAME k=v [--overwrite]`.
    pub fn label(
        &mut self,
        kind: &str,
        name: &str,
        pairs: &[(String, String)],
        overwrite: bool,
    ) -> Result<String, Fault> {
        if kind != "namespace" && kind != "ns" {
            return Err(format!(
                "kubectl label {kind}: only namespaces are rehearsed"
            ));
        }
        let obj = self
            .objects
            .iter_mut()
            .find(|o| o["kind"] == "Namespace" && o["metadata"]["name"] == name)
            .ok_or_else(|| format!("namespaces \"{name}\" not found"))?;
        for (k, v) in pairs {
            if let Some(old) = obj["metadata"]["labels"][k].as_str()
                && !overwrite
            {
                return Err(format!(
                    "Namespace/{name}: metadata.labels: '{k}' already has a value ({old}), and --overwrite is false"
                ));
            }
            obj["metadata"]["labels"][k] = json!(v);
        }
        Ok(format!("namespace/{name} labeled\n"))
    }

    /// cert-manager (issuance from Issuers, CA injection), when installed.
    fn run_controllers(&mut self) -> Result<(), Fault> {
        if !self.cert_manager {
            return Ok(());
        }
        loop {
            let mut progress = false;
            let certs: Vec<Value> = self
                .objects
                .iter()
                .filter(|o| o["kind"] == "Certificate")
                .cloned()
                .collect();
            for cert in certs {
                let ns = cert["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                let secret = cert["spec"]["secretName"]
                    .as_str()
                    .ok_or_else(|| format!("{}: spec.secretName is required", describe(&cert)))?;
                if self.get("Secret", Some(&ns), secret).is_some() {
                    continue;
                }
                let issuer_name = cert["spec"]["issuerRef"]["name"].as_str().unwrap_or("");
                if cert["spec"]["issuerRef"]["kind"]
                    .as_str()
                    .unwrap_or("Issuer")
                    != "Issuer"
                {
                    return Err(format!(
                        "{}: spec.issuerRef.kind: only Issuer is rehearsed",
                        describe(&cert)
                    ));
                }
                let Some(issuer) = self.get("Issuer", Some(&ns), issuer_name).cloned() else {
                    continue;
                };
                let dir = self.dir.join(format!("cert-manager/{ns}-{secret}"));
                std::fs::create_dir_all(&dir).expect("dir");
                let dns: Vec<String> = cert["spec"]["dnsNames"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                let cn = cert["spec"]["commonName"]
                    .as_str()
                    .unwrap_or(secret)
                    .to_string();
                let (ca_cert, ca_key) = if issuer["spec"].get("selfSigned").is_some() {
                    (None, None)
                } else if let Some(ca_secret) = issuer["spec"]["ca"]["secretName"].as_str() {
                    let Some(s) = self.get("Secret", Some(&ns), ca_secret) else {
                        continue;
                    };
                    (
                        Some(secret_value(s, "tls.crt")?),
                        Some(secret_value(s, "tls.key")?),
                    )
                } else {
                    return Err(format!(
                        "{}: spec: only selfSigned and ca issuers are rehearsed",
                        describe(&issuer)
                    ));
                };
                let is_ca = cert["spec"]["isCA"].as_bool().unwrap_or(false);
                let (crt, key) = issue(
                    &dir,
                    &cn,
                    &dns,
                    is_ca,
                    ca_cert.as_deref(),
                    ca_key.as_deref(),
                );
                let ca = ca_cert.clone().unwrap_or_else(|| crt.clone());
                let encode = |b: &[u8]| data_encoding::BASE64.encode(b);
                self.objects.push(json!({
                    "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                    "metadata": {"name": secret, "namespace": ns,
                                 "annotations": {"cert-manager.io/certificate-name": cert["metadata"]["name"]}},
                    "data": {"tls.crt": encode(&crt), "tls.key": encode(&key), "ca.crt": encode(&ca)}
                }));
                progress = true;
            }
            if !progress {
                break;
            }
        }
        // cainjector.
        for i in 0..self.objects.len() {
            let obj = self.objects[i].clone();
            if obj["kind"] != "MutatingWebhookConfiguration" {
                continue;
            }
            let Some(from) =
                obj["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].as_str()
            else {
                continue;
            };
            let (ns, name) = from.split_once('/').ok_or_else(|| {
                format!("{}: metadata.annotations[cert-manager.io/inject-ca-from]: `{from}` is not namespace/name", describe(&obj))
            })?;
            let cert = self.get("Certificate", Some(ns), name).ok_or_else(|| {
                format!("{}: metadata.annotations[cert-manager.io/inject-ca-from]: Certificate {from} not found", describe(&obj))
            })?;
            let secret_name = cert["spec"]["secretName"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let Some(secret) = self.get("Secret", Some(ns), &secret_name) else {
                continue;
            };
            let ca = secret["data"]["ca.crt"].clone();
            if let Some(hooks) = self.objects[i]["webhooks"].as_array_mut() {
                for hook in hooks {
                    hook["clientConfig"]["caBundle"] = ca.clone();
                }
            }
        }
        Ok(())
    }

    // ---- pods -------------------------------------------------------------------------

    /// The Deployment `ns/name`.
    fn deployment(&self, ns: &str, name: &str) -> Result<Value, Fault> {
        self.get("Deployment", Some(ns), name)
            .cloned()
            .ok_or_else(|| format!("deployments.apps \"{name}\" not found in namespace {ns}"))
    }

    /// The port on 127.0.0.1 standing for `port` of pod `key`.
    pub fn pod_port(&mut self, key: &str, port: u16) -> u16 {
        *self
            .ports
            .entry((key.to_string(), port))
            .or_insert_with(free_port)
    }

    /// `NAME.NS.svc[.cluster.local]:PORT` -> the port on 127.0.0.1 of the pod behind it.
    fn service_port(&mut self, host: &str, port: u16) -> Result<u16, Fault> {
        let trimmed = host.trim_end_matches(".cluster.local");
        let parts: Vec<&str> = trimmed.split('.').collect();
        let [name, ns, "svc"] = parts.as_slice() else {
            return Err(format!("`{host}` is not NAME.NAMESPACE.svc"));
        };
        let svc = self
            .get("Service", Some(ns), name)
            .cloned()
            .ok_or_else(|| format!("`{host}:{port}`: Service {ns}/{name} does not exist"))?;
        let entry = svc["spec"]["ports"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["port"] == port))
            .cloned()
            .ok_or_else(|| {
                format!(
                    "`{host}:{port}`: {} has no port {port} (spec.ports)",
                    describe(&svc)
                )
            })?;
        let selector = svc["spec"]["selector"].clone();
        let deploy = self
            .objects
            .iter()
            .find(|o| {
                o["kind"] == "Deployment"
                    && o["metadata"]["namespace"] == **ns
                    && selector_matches_labels(
                        &selector,
                        &o["spec"]["template"]["metadata"]["labels"],
                    )
            })
            .cloned()
            .ok_or_else(|| {
                format!(
                    "{}: spec.selector matches no Deployment's pods",
                    describe(&svc)
                )
            })?;
        let key = format!("{ns}/{}", deploy["metadata"]["name"].as_str().unwrap_or(""));
        let target = match &entry["targetPort"] {
            Value::Null => port,
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()).unwrap_or(0),
            Value::String(named) => container_port(&deploy["spec"]["template"]["spec"], named).ok_or_else(|| {
                format!(
                    "{}: spec.ports[{}].targetPort: no container of {} declares a port named `{named}`",
                    describe(&svc),
                    entry["name"].as_str().unwrap_or("?"),
                    describe(&deploy)
                )
            })?,
            _ => 0,
        };
        Ok(self.pod_port(&key, target))
    }

    /// Rewrites the addresses in `text` for pod `key` (see the module doc).
    pub fn rewrite(&mut self, key: &str, text: &str) -> Result<String, Fault> {
        let mut out = String::new();
        let mut rest = text;
        while let Some(colon) = rest.find(':') {
            let before = &rest[..colon];
            let host_start = before
                .rfind(|c: char| {
                    !(c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '[' || c == ']')
                })
                .map_or(0, |i| i + 1);
            let host = &before[host_start..];
            let after = &rest[colon + 1..];
            let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
            let port: Option<u16> = if digits.is_empty() {
                None
            } else {
                digits.parse().ok()
            };
            // An address rewritten once already (the webhook's gateway_address, read from
            // the gateway's rewritten config, reaches the injected pods) stays as it is.
            let port = port.filter(|p| !self.ports.values().any(|mine| mine == p));
            let replacement = match port {
                Some(port) if matches!(host, "0.0.0.0" | "127.0.0.1" | "localhost" | "[::]") => {
                    Some(format!("127.0.0.1:{}", self.pod_port(key, port)))
                }
                Some(port) if host.ends_with(".svc") || host.ends_with(".svc.cluster.local") => {
                    Some(format!("127.0.0.1:{}", self.service_port(host, port)?))
                }
                _ => None,
            };
            match replacement {
                Some(r) => {
                    out.push_str(&rest[..host_start]);
                    out.push_str(&r);
                    rest = &rest[colon + 1 + digits.len()..];
                }
                None => {
                    out.push_str(&rest[..=colon]);
                    rest = &rest[colon + 1..];
                }
            }
        }
        out.push_str(rest);
        Ok(out)
    }

    /// The pod of Deployment `ns/name`, admitted and started (once).
    pub fn ensure_pod(&mut self, ns: &str, name: &str) -> Result<String, Fault> {
        let key = format!("{ns}/{name}");
        if self.pods.contains_key(&key) {
            return Ok(key);
        }
        let deploy = self.deployment(ns, name)?;
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": deploy["spec"]["template"]["metadata"].clone(),
            "spec": deploy["spec"]["template"]["spec"].clone(),
        });
        pod["metadata"]["generateName"] = json!(format!("{name}-7d9f8c6b5-"));
        pod["metadata"]["namespace"] = json!(ns);
        let what = format!("Pod of {}", describe(&deploy));
        self.admit(&mut pod, &what)?;
        pod["metadata"]["name"] = json!(format!("{name}-7d9f8c6b5-x7q2z"));
        self.start(&key, pod, &what)?;
        Ok(key)
    }

    /// Mutating admission: every webhook whose selectors match, called over HTTPS.
    fn admit(&mut self, pod: &mut Value, what: &str) -> Result<(), Fault> {
        let ns = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let ns_labels = self
            .get("Namespace", None, &ns)
            .map(|n| n["metadata"]["labels"].clone())
            .unwrap_or(Value::Null);
        let configs: Vec<Value> = self
            .objects
            .iter()
            .filter(|o| o["kind"] == "MutatingWebhookConfiguration")
            .cloned()
            .collect();
        for config in configs {
            for (i, hook) in config["webhooks"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                let pods_create = hook["rules"].as_array().is_some_and(|rules| {
                    rules.iter().any(|r| {
                        has(&r["operations"], "CREATE")
                            && has(&r["resources"], "pods")
                            && has(&r["apiVersions"], "v1")
                    })
                });
                if !pods_create
                    || !selector_matches(&hook["namespaceSelector"], &ns_labels)
                    || !selector_matches(&hook["objectSelector"], &pod["metadata"]["labels"])
                {
                    continue;
                }
                let field = format!("{}: webhooks[{i}]", describe(&config));
                self.call_webhook(&config, hook, &field, pod, what)?;
            }
        }
        Ok(())
    }

    fn call_webhook(
        &mut self,
        _config: &Value,
        hook: &Value,
        field: &str,
        pod: &mut Value,
        what: &str,
    ) -> Result<(), Fault> {
        let service = &hook["clientConfig"]["service"];
        let (Some(name), Some(ns)) = (service["name"].as_str(), service["namespace"].as_str())
        else {
            return Err(format!(
                "{field}.clientConfig.service: name and namespace are required"
            ));
        };
        let port = service["port"].as_u64().unwrap_or(443) as u16;
        let path = service["path"].as_str().unwrap_or("/");
        let bundle = hook["clientConfig"]["caBundle"].as_str().unwrap_or("");
        let clean: String = bundle.chars().filter(|c| !c.is_whitespace()).collect();
        let pem = data_encoding::BASE64
            .decode(clean.as_bytes())
            .ok()
            .filter(|b| String::from_utf8_lossy(b).contains("-----BEGIN CERTIFICATE-----"))
            .ok_or_else(|| {
                format!(
                    "{field}.clientConfig.caBundle: not a base64 PEM certificate, so the API server \
                     cannot verify the webhook and ({what}) is refused (failurePolicy {})",
                    hook["failurePolicy"].as_str().unwrap_or("Fail")
                )
            })?;
        // The Service's pods must be up to answer.
        let host = format!("{name}.{ns}.svc");
        let local = self.service_port(&host, port)?;
        let backing = self
            .ports
            .iter()
            .find(|(_, p)| **p == local)
            .map(|((k, _), _)| k.clone())
            .unwrap_or_default();
        if let Some((bns, bname)) = backing.split_once('/') {
            let (bns, bname) = (bns.to_string(), bname.to_string());
            self.ensure_pod(&bns, &bname)?;
        }
        let dir = self.dir.join("admission");
        std::fs::create_dir_all(&dir).expect("dir");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &pem).expect("write");
        let review = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "7f0b2c1e-rehearsal", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": pod["metadata"]["namespace"], "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": pod.clone(), "oldObject": null, "dryRun": false,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
            }
        });
        let body = dir.join("review.json");
        std::fs::write(&body, serde_json::to_vec(&review).expect("json")).expect("write");
        let url = format!("https://{host}:{port}{path}?timeout=5s");
        let out = nexus_tests::curl(&[
            "--cacert",
            &ca.to_string_lossy(),
            "--connect-to",
            &format!("{host}:{port}:127.0.0.1:{local}"),
            "-H",
            "content-type: application/json",
            "--data-binary",
            &format!("@{}", body.display()),
            &url,
        ]);
        if !out.status.success() {
            return Err(format!(
                "{field}: failed calling webhook {url} for {what}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let answer: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            format!("{field}: the webhook's answer is not an AdmissionReview ({e})")
        })?;
        if answer["response"]["allowed"] != true {
            return Err(format!(
                "admission webhook {} denied {what}: {}",
                hook["name"].as_str().unwrap_or("?"),
                answer["response"]["status"]["message"]
            ));
        }
        if let Some(patch) = nexus_kube::admission::answer_patch(&out.stdout) {
            json_patch::patch(pod, &patch)
                .map_err(|e| format!("{field}: the webhook's JSONPatch does not apply: {e}"))?;
        }
        Ok(())
    }

    /// The kubelet: volumes, then init containers in order (native sidecars until their
    /// startup probe passes), then the app containers.
    fn start(&mut self, key: &str, pod: Value, what: &str) -> Result<(), Fault> {
        // Short paths: a unix socket's path must fit in 108 bytes.
        let dir = self.dir.join(format!("p{}", self.pods.len()));
        std::fs::create_dir_all(&dir).expect("pod dir");
        self.pods.insert(
            key.to_string(),
            Pod {
                spec: pod.clone(),
                dir: dir.clone(),
                volumes: BTreeMap::new(),
                containers: BTreeMap::new(),
            },
        );
        for (i, volume) in pod["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let name = volume["name"].as_str().unwrap_or("").to_string();
            let field = format!("{what}: spec.volumes[{i}] ({name})");
            let path = dir.join(format!("v{i}"));
            std::fs::create_dir_all(&path).expect("volume dir");
            self.materialize(key, volume, &path, &field)?;
            if let Some(p) = self.pods.get_mut(key) {
                p.volumes.insert(name, path);
            }
        }
        for (i, c) in pod["spec"]["initContainers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let field = format!(
                "{what}: spec.initContainers[{i}] ({})",
                c["name"].as_str().unwrap_or("?")
            );
            if c["restartPolicy"] == "Always" {
                self.run_container(key, c, &field, false)?;
                self.wait_probe(key, c, "startupProbe", &field)?;
            } else {
                self.run_container(key, c, &field, true)?;
            }
        }
        for (i, c) in pod["spec"]["containers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let field = format!(
                "{what}: spec.containers[{i}] ({})",
                c["name"].as_str().unwrap_or("?")
            );
            self.run_container(key, c, &field, false)?;
            self.wait_probe(key, c, "startupProbe", &field)?;
            self.wait_probe(key, c, "readinessProbe", &field)?;
        }
        Ok(())
    }

    fn materialize(
        &mut self,
        key: &str,
        volume: &Value,
        path: &Path,
        field: &str,
    ) -> Result<(), Fault> {
        let ns = key.split('/').next().unwrap_or("").to_string();
        if volume.get("emptyDir").is_some() {
            return Ok(());
        }
        if let Some(csi) = volume.get("csi") {
            if csi["driver"] != "csi.spiffe.io" {
                return Err(format!(
                    "{field}.csi.driver: only csi.spiffe.io is rehearsed"
                ));
            }
            return self.spiffe_csi(key, path, field);
        }
        let (source, kind, name_field) = if let Some(cm) = volume.get("configMap") {
            (cm, "ConfigMap", "name")
        } else if let Some(s) = volume.get("secret") {
            (s, "Secret", "secretName")
        } else {
            return Err(format!(
                "{field}: this volume type is not rehearsed (configMap, secret, emptyDir, csi)"
            ));
        };
        let name = source[name_field].as_str().unwrap_or("");
        let optional = source["optional"].as_bool().unwrap_or(false);
        let Some(obj) = self.get(kind, Some(&ns), name).cloned() else {
            if optional {
                return Ok(());
            }
            return Err(format!(
                "{field}.{}.{name_field}: {kind} {ns}/{name} not found (the kubelet keeps the pod in ContainerCreating)",
                if kind == "Secret" {
                    "secret"
                } else {
                    "configMap"
                }
            ));
        };
        let files = self.volume_files(key, &obj, source, optional, field, kind == "ConfigMap")?;
        write_atomic(path, &files, self.next_generation());
        Ok(())
    }

    fn next_generation(&mut self) -> u32 {
        self.generation += 1;
        self.generation
    }

    /// The files a ConfigMap or Secret volume holds (relative path -> bytes).
    fn volume_files(
        &mut self,
        key: &str,
        obj: &Value,
        source: &Value,
        optional: bool,
        field: &str,
        rewrite: bool,
    ) -> Result<Vec<(String, Vec<u8>)>, Fault> {
        let mut data: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (k, v) in obj["data"].as_object().cloned().unwrap_or_default() {
            let bytes = if obj["kind"] == "Secret" {
                data_encoding::BASE64
                    .decode(v.as_str().unwrap_or("").as_bytes())
                    .map_err(|e| format!("{}: data[{k}]: {e}", describe(obj)))?
            } else {
                v.as_str().unwrap_or("").as_bytes().to_vec()
            };
            data.insert(k, bytes);
        }
        for (k, v) in obj["binaryData"].as_object().cloned().unwrap_or_default() {
            data.insert(
                k,
                data_encoding::BASE64
                    .decode(v.as_str().unwrap_or("").as_bytes())
                    .unwrap_or_default(),
            );
        }
        let mut files = Vec::new();
        match source["items"].as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    let k = item["key"].as_str().unwrap_or("");
                    let p = item["path"].as_str().unwrap_or(k);
                    match data.get(k) {
                        Some(b) => files.push((p.to_string(), b.clone())),
                        None if optional => {}
                        None => {
                            return Err(format!(
                                "{field}.items[{i}].key: `{k}` is not in {}",
                                describe(obj)
                            ));
                        }
                    }
                }
            }
            None => files.extend(data),
        }
        if rewrite {
            for (_, bytes) in &mut files {
                if let Ok(text) = String::from_utf8(bytes.clone()) {
                    *bytes = self.rewrite(key, &text)?.into_bytes();
                }
            }
        }
        Ok(files)
    }

    /// After an apply, running pods see changed ConfigMaps and Secrets (the kubelet's
    /// atomic update: a new `..<timestamp>` folder, then `..data` swapped).
    fn refresh_volumes(&mut self) -> Result<(), Fault> {
        let keys: Vec<String> = self.pods.keys().cloned().collect();
        for key in keys {
            let (spec, volumes) = {
                let p = &self.pods[&key];
                (p.spec.clone(), p.volumes.clone())
            };
            let ns = key.split('/').next().unwrap_or("").to_string();
            for volume in spec["spec"]["volumes"]
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                let name = volume["name"].as_str().unwrap_or("").to_string();
                let (source, kind, nf) = if let Some(cm) = volume.get("configMap") {
                    (cm.clone(), "ConfigMap", "name")
                } else if let Some(s) = volume.get("secret") {
                    (s.clone(), "Secret", "secretName")
                } else {
                    continue;
                };
                let Some(obj) = self
                    .get(kind, Some(&ns), source[nf].as_str().unwrap_or(""))
                    .cloned()
                else {
                    continue;
                };
                let Some(path) = volumes.get(&name) else {
                    continue;
                };
                let files =
                    self.volume_files(&key, &obj, &source, true, &name, kind == "ConfigMap")?;
                let current = read_atomic(path);
                if current != files {
                    write_atomic(path, &files, self.next_generation());
                }
            }
        }
        Ok(())
    }

    /// The SPIFFE CSI driver's socket: the SPIRE agent stand-in, serving the ID of the
    /// one ClusterSPIFFEID that selects this pod.
    fn spiffe_csi(&mut self, key: &str, path: &Path, field: &str) -> Result<(), Fault> {
        let pod = self.pods[key].spec.clone();
        let ns = key.split('/').next().unwrap_or("");
        let ns_labels = self
            .get("Namespace", None, ns)
            .map(|n| n["metadata"]["labels"].clone())
            .unwrap_or(Value::Null);
        let matching: Vec<Value> = self
            .objects
            .iter()
            .filter(|o| o["kind"] == "ClusterSPIFFEID")
            .filter(|o| selector_matches(&o["spec"]["namespaceSelector"], &ns_labels))
            .filter(|o| selector_matches(&o["spec"]["podSelector"], &pod["metadata"]["labels"]))
            .cloned()
            .collect();
        let entry = match matching.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(format!(
                    "{field}: no ClusterSPIFFEID selects this pod (namespace {ns} labels {}, pod labels {}): SPIRE gives it no SVID",
                    ns_labels, pod["metadata"]["labels"]
                ));
            }
            many => {
                return Err(format!(
                    "{field}: several ClusterSPIFFEIDs select this pod ({}): SPIRE would register one entry each",
                    many.iter().map(describe).collect::<Vec<_>>().join(", ")
                ));
            }
        };
        let template = |t: &str, what: &str| -> Result<String, Fault> {
            let mut out = t.to_string();
            for (var, value) in [
                (".TrustDomain", TRUST_DOMAIN.to_string()),
                (".PodMeta.Namespace", ns.to_string()),
                (
                    ".PodMeta.Name",
                    pod["metadata"]["name"].as_str().unwrap_or("").to_string(),
                ),
                (
                    ".PodSpec.ServiceAccountName",
                    pod["spec"]["serviceAccountName"]
                        .as_str()
                        .unwrap_or("default")
                        .to_string(),
                ),
            ] {
                for spelled in [format!("{{{{ {var} }}}}"), format!("{{{{{var}}}}}")] {
                    out = out.replace(&spelled, &value);
                }
            }
            if out.contains("{{") {
                return Err(format!(
                    "{}: {what}: a template variable the rehearsal does not know: {t}",
                    describe(&entry)
                ));
            }
            Ok(out)
        };
        let id = template(
            entry["spec"]["spiffeIDTemplate"].as_str().unwrap_or(""),
            "spec.spiffeIDTemplate",
        )?;
        let socket = path.join(SPIRE_SOCKET);
        let socket_s = socket.to_string_lossy().into_owned();
        let mut args = vec![
            "dev".to_string(),
            "workload-api".into(),
            "--socket".into(),
            socket_s,
            "--spiffe-id".into(),
            id.clone(),
        ];
        for t in entry["spec"]["dnsNameTemplates"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            args.push("--dns-name".into());
            args.push(template(t.as_str().unwrap_or(""), "spec.dnsNameTemplates")?);
        }
        let name = format!("spire-agent-{}", key.replace('/', "_"));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = Proc::spawn(&name, &self.dir, &bin("nexusctl"), &argv, &[]);
        eventually(Duration::from_secs(20), "the Workload API socket", || {
            socket.exists().then_some(())
        });
        self.procs.push(proc);
        Ok(())
    }

    /// The environment of a container, as the kubelet computes it.
    fn env(
        &mut self,
        key: &str,
        c: &Value,
        image_path: &str,
        field: &str,
    ) -> Result<Vec<(String, String)>, Fault> {
        let pod = self.pods[key].spec.clone();
        let ns = key.split('/').next().unwrap_or("").to_string();
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), image_path.to_string()),
            (
                "HOSTNAME".into(),
                pod["metadata"]["name"].as_str().unwrap_or("").to_string(),
            ),
            ("HOME".into(), "/home/nonroot".into()),
        ];
        // Service links (enableServiceLinks defaults to true).
        if pod["spec"]["enableServiceLinks"] != false {
            let services: Vec<Value> = self
                .objects
                .iter()
                .filter(|o| {
                    o["kind"] == "Service"
                        && (o["metadata"]["namespace"] == ns.as_str()
                            || (o["metadata"]["name"] == "kubernetes"
                                && o["metadata"]["namespace"] == "default"))
                })
                .cloned()
                .collect();
            for (n, svc) in services.iter().enumerate() {
                let prefix = svc["metadata"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .to_uppercase()
                    .replace('-', "_");
                let ip = format!("10.96.0.{}", n + 10);
                let ports = svc["spec"]["ports"].as_array().cloned().unwrap_or_default();
                env.push((format!("{prefix}_SERVICE_HOST"), ip.clone()));
                if let Some(first) = ports.first() {
                    env.push((format!("{prefix}_SERVICE_PORT"), first["port"].to_string()));
                    env.push((
                        format!("{prefix}_PORT"),
                        format!("tcp://{ip}:{}", first["port"]),
                    ));
                }
                for p in &ports {
                    if let Some(pn) = p["name"].as_str() {
                        env.push((
                            format!(
                                "{prefix}_SERVICE_PORT_{}",
                                pn.to_uppercase().replace('-', "_")
                            ),
                            p["port"].to_string(),
                        ));
                    }
                    let proto = p["protocol"].as_str().unwrap_or("TCP");
                    let base = format!("{prefix}_PORT_{}_{}", p["port"], proto);
                    env.push((
                        base.clone(),
                        format!("{}://{ip}:{}", proto.to_lowercase(), p["port"]),
                    ));
                    env.push((format!("{base}_PROTO"), proto.to_lowercase()));
                    env.push((format!("{base}_PORT"), p["port"].to_string()));
                    env.push((format!("{base}_ADDR"), ip.clone()));
                }
            }
        }
        for (i, from) in c["envFrom"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let (kind, r) = if let Some(r) = from.get("configMapRef") {
                ("ConfigMap", r)
            } else if let Some(r) = from.get("secretRef") {
                ("Secret", r)
            } else {
                continue;
            };
            let name = r["name"].as_str().unwrap_or("");
            let Some(obj) = self.get(kind, Some(&ns), name).cloned() else {
                if r["optional"] == true {
                    continue;
                }
                return Err(format!(
                    "{field}.envFrom[{i}]: {kind} {ns}/{name} not found (CreateContainerConfigError)"
                ));
            };
            for (k, v) in obj["data"].as_object().cloned().unwrap_or_default() {
                let value = if kind == "Secret" {
                    String::from_utf8_lossy(
                        &data_encoding::BASE64
                            .decode(v.as_str().unwrap_or("").as_bytes())
                            .unwrap_or_default(),
                    )
                    .into_owned()
                } else {
                    v.as_str().unwrap_or("").to_string()
                };
                set(
                    &mut env,
                    &format!("{}{k}", from["prefix"].as_str().unwrap_or("")),
                    value,
                );
            }
        }
        for (i, e) in c["env"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let name = e["name"].as_str().unwrap_or("").to_string();
            let f = format!("{field}.env[{i}] ({name})");
            let value = if let Some(v) = e["value"].as_str() {
                expand(v, &env)
            } else if let Some(from) = e.get("valueFrom") {
                if let Some(r) = from
                    .get("secretKeyRef")
                    .or_else(|| from.get("configMapKeyRef"))
                {
                    let kind = if from.get("secretKeyRef").is_some() {
                        "Secret"
                    } else {
                        "ConfigMap"
                    };
                    let (n, k) = (
                        r["name"].as_str().unwrap_or(""),
                        r["key"].as_str().unwrap_or(""),
                    );
                    let obj = self.get(kind, Some(&ns), n).cloned();
                    let raw = obj
                        .as_ref()
                        .and_then(|o| o["data"][k].as_str().map(String::from));
                    match raw {
                        Some(raw) if kind == "Secret" => String::from_utf8_lossy(
                            &data_encoding::BASE64
                                .decode(raw.as_bytes())
                                .map_err(|e| format!("{f}: {e}"))?,
                        )
                        .into_owned(),
                        Some(raw) => raw,
                        None if r["optional"] == true => continue,
                        None => {
                            return Err(format!(
                                "{f}.valueFrom: {kind} {ns}/{n} {} (CreateContainerConfigError)",
                                if obj.is_some() {
                                    format!("has no key `{k}`")
                                } else {
                                    "not found".into()
                                }
                            ));
                        }
                    }
                } else if let Some(r) = from.get("fieldRef") {
                    match r["fieldPath"].as_str().unwrap_or("") {
                        "metadata.namespace" => ns.clone(),
                        "metadata.name" => {
                            pod["metadata"]["name"].as_str().unwrap_or("").to_string()
                        }
                        "spec.serviceAccountName" => pod["spec"]["serviceAccountName"]
                            .as_str()
                            .unwrap_or("default")
                            .to_string(),
                        "spec.nodeName" => "node-1".into(),
                        "status.podIP" | "status.hostIP" => "127.0.0.1".into(),
                        other => {
                            return Err(format!(
                                "{f}.valueFrom.fieldRef.fieldPath: `{other}` is not rehearsed"
                            ));
                        }
                    }
                } else {
                    return Err(format!("{f}.valueFrom: not rehearsed"));
                }
            } else {
                String::new()
            };
            set(&mut env, &name, value);
        }
        let (db_host, db_name, _) = self.database.clone();
        let mut out = Vec::new();
        for (k, v) in env {
            let v = if v.starts_with("postgres://") || v.starts_with("postgresql://") {
                rewrite_database_url(&v, &db_host, &db_name, Path::new(DATABASE_CA))
            } else {
                self.rewrite(key, &v)?
            };
            out.push((k, v));
        }
        Ok(out)
    }

    /// The image a container runs, or `None` for an image that is not Nexus's (the
    /// machine's /usr stands in for it).
    fn image_of(&self, c: &Value) -> Option<Image> {
        let image = c["image"].as_str()?;
        let name = image
            .rsplit_once(':')
            .map_or(image, |(n, t)| if t.contains('/') { image } else { n });
        let original = self.image_names.get(name).map_or(name, String::as_str);
        self.images.get(original).cloned()
    }

    /// Starts a container (or, `to_completion`, runs it and waits for exit 0).
    fn run_container(
        &mut self,
        key: &str,
        c: &Value,
        field: &str,
        to_completion: bool,
    ) -> Result<(), Fault> {
        let name = c["name"].as_str().unwrap_or("").to_string();
        // A Localhost seccomp profile is read by the kubelet from the node.
        for (scope, sc) in [
            ("securityContext", &c["securityContext"]),
            (
                "pod securityContext",
                &self.pods[key].spec["spec"]["securityContext"],
            ),
        ] {
            if sc["seccompProfile"]["type"] == "Localhost" {
                let rel = sc["seccompProfile"]["localhostProfile"]
                    .as_str()
                    .unwrap_or("");
                let file = self.node.join("var/lib/kubelet/seccomp").join(rel);
                let parsed: Option<Value> = std::fs::read(&file)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                if !parsed
                    .as_ref()
                    .is_some_and(|p| p["defaultAction"].is_string())
                {
                    return Err(format!(
                        "{field}: {scope}.seccompProfile.localhostProfile: {rel} is not a seccomp profile under the node's /var/lib/kubelet/seccomp (CreateContainerError)"
                    ));
                }
            }
        }
        let image = self.image_of(c);
        let mut path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string();
        if let Some(img) = &image {
            for p in &img.extra_path {
                path.push(':');
                path.push_str(p);
            }
        }
        let env = self.env(key, c, &path, field)?;
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut argv = strings(&c["command"]);
        let args = strings(&c["args"]);
        if argv.is_empty() {
            argv = image
                .as_ref()
                .map(|i| i.entrypoint.clone())
                .unwrap_or_default();
            if argv.is_empty() {
                return Err(format!("{field}: neither command nor an image entrypoint"));
            }
        }
        argv.extend(args);
        let mut expanded = Vec::new();
        for a in &argv {
            expanded.push(self.rewrite(key, &expand(a, &env))?);
        }
        let log = self.pods[key].dir.join(format!("{name}.log"));
        if let Some(p) = self.pods.get_mut(key) {
            p.containers
                .insert(name.clone(), (log.clone(), env.clone()));
        }
        // A program of the base image (busybox's sleep in the toolbox) is not ours to
        // run: the container is taken as running, and `kubectl exec` runs in its mounts.
        if let Some(img) = &image
            && img
                .base_programs
                .iter()
                .any(|p| expanded[0].starts_with(p.as_str()))
        {
            return Ok(());
        }
        let command = self.bwrap(key, c, image.as_ref(), &env, &expanded, field)?;
        let (program, rest) = command.split_first().expect("bwrap argv");
        let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
        let label = format!("{}-{name}", key.replace('/', "_"));
        if to_completion {
            let out = Command::new(program)
                .args(&rest)
                .stdin(Stdio::null())
                .output()
                .expect("bwrap");
            std::fs::write(
                &log,
                [out.stdout.as_slice(), out.stderr.as_slice()].concat(),
            )
            .expect("log");
            if !out.status.success() {
                return Err(format!(
                    "{field}: exited with {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            return Ok(());
        }
        let mut proc = Proc::spawn(&label, &self.pods[key].dir, Path::new(program), &rest, &[]);
        std::thread::sleep(Duration::from_millis(50));
        if !proc.is_running() {
            let _ = proc.child.wait();
            return Err(format!(
                "{field}: exited at once: {}",
                proc.log_text().trim()
            ));
        }
        // The kubelet's log is the container's output.
        let _ = std::fs::remove_file(&log);
        std::os::unix::fs::symlink(&proc.log, &log).expect("log link");
        self.procs.push(proc);
        Ok(())
    }

    /// The bubblewrap command that runs `argv` in the container's file system view.
    pub fn bwrap(
        &mut self,
        key: &str,
        c: &Value,
        image: Option<&Image>,
        env: &[(String, String)],
        argv: &[String],
        field: &str,
    ) -> Result<Vec<String>, Fault> {
        let mut a: Vec<String> = vec![
            "bwrap".into(),
            "--die-with-parent".into(),
            "--new-session".into(),
        ];
        let mut push = |v: &[&str]| a.extend(v.iter().map(|s| s.to_string()));
        push(&[
            "--ro-bind",
            "/usr",
            "/usr",
            "--symlink",
            "usr/bin",
            "/bin",
            "--symlink",
            "usr/sbin",
            "/sbin",
            "--symlink",
            "usr/lib",
            "/lib",
        ]);
        if Path::new("/usr/lib64").exists() {
            push(&["--symlink", "usr/lib64", "/lib64"]);
        }
        push(&["--proc", "/proc", "--dev", "/dev", "--dir", "/etc"]);
        for f in [
            "/etc/hosts",
            "/etc/resolv.conf",
            "/etc/nsswitch.conf",
            "/etc/ld.so.cache",
            "/etc/ssl",
            "/etc/passwd",
            "/etc/group",
            "/etc/localtime",
        ] {
            if Path::new(f).exists() {
                push(&["--ro-bind", f, f]);
            }
        }
        push(&["--tmpfs", "/usr/local"]);
        if let Some(img) = image {
            for (dst, src) in &img.files {
                if !src.exists() {
                    return Err(format!(
                        "{field}: the image's {dst} would come from {}, which is missing (cargo build --workspace --bins)",
                        src.display()
                    ));
                }
                a.extend([
                    "--ro-bind".into(),
                    src.to_string_lossy().into_owned(),
                    dst.clone(),
                ]);
            }
        }
        // Volume mounts, parents first; a mount point inside a read-only volume cannot
        // be created by the runtime.
        let volumes = self.pods[key].volumes.clone();
        let mut mounts: Vec<(String, PathBuf, bool, String)> = Vec::new();
        for (i, m) in c["volumeMounts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let vname = m["name"].as_str().unwrap_or("");
            let mpath = m["mountPath"].as_str().unwrap_or("").to_string();
            let src = volumes.get(vname).ok_or_else(|| {
                format!("{field}.volumeMounts[{i}].name: the pod has no volume `{vname}`")
            })?;
            let src = match m["subPath"].as_str() {
                Some(sub) if !sub.is_empty() => {
                    let p = src.join(sub);
                    if !p.exists() {
                        std::fs::create_dir_all(&p).expect("subPath dir");
                    }
                    p
                }
                _ => src.clone(),
            };
            mounts.push((
                mpath,
                src,
                m["readOnly"] == true,
                format!("{field}.volumeMounts[{i}] ({vname})"),
            ));
        }
        mounts.sort_by(|x, y| x.0.cmp(&y.0));
        for (i, (path, _, _, mfield)) in mounts.iter().enumerate() {
            for (parent, psrc, ro, pfield) in &mounts[..i] {
                if let Some(rel) = path.strip_prefix(&format!("{}/", parent.trim_end_matches('/')))
                    && *ro
                    && !psrc.join(rel).exists()
                {
                    return Err(format!(
                        "{mfield}.mountPath: {path} lies inside the read-only mount {parent} ({pfield}): \
                         the container runtime cannot create the mount point (read-only file system); \
                         mount them side by side"
                    ));
                }
            }
        }
        for (path, src, ro, _) in &mounts {
            a.extend([
                if *ro { "--ro-bind" } else { "--bind" }.to_string(),
                src.to_string_lossy().into_owned(),
                path.clone(),
            ]);
        }
        if env.iter().any(|(_, v)| v.contains(DATABASE_CA)) {
            a.extend([
                "--ro-bind".into(),
                self.database.2.to_string_lossy().into_owned(),
                DATABASE_CA.into(),
            ]);
        }
        if c["securityContext"]["readOnlyRootFilesystem"] == true {
            a.extend(["--remount-ro".into(), "/".into()]);
        } else {
            a.extend(["--tmpfs".into(), "/tmp".into()]);
        }
        a.extend([
            "--chdir".into(),
            c["workingDir"].as_str().unwrap_or("/").to_string(),
            "--clearenv".into(),
        ]);
        for (k, v) in env {
            a.extend(["--setenv".into(), k.clone(), v.clone()]);
        }
        a.push("--".into());
        a.extend(argv.iter().cloned());
        Ok(a)
    }

    /// Waits for a container's probe (httpGet) to succeed, if it has one.
    fn wait_probe(&mut self, key: &str, c: &Value, probe: &str, field: &str) -> Result<(), Fault> {
        let p = &c[probe];
        if p.is_null() {
            // No probe: ready once it listens on the addresses it was given.
            let ports: Vec<u16> = self.own_ports(key, c);
            for port in ports {
                eventually(
                    Duration::from_secs(30),
                    &format!("{field} to listen on 127.0.0.1:{port}"),
                    || {
                        std::net::TcpStream::connect(("127.0.0.1", port))
                            .ok()
                            .map(|_| ())
                    },
                );
            }
            return Ok(());
        }
        let Some(get) = p.get("httpGet") else {
            return Err(format!(
                "{field}.{probe}: only httpGet probes are rehearsed"
            ));
        };
        let port = match &get["port"] {
            Value::Number(n) => n.as_u64().unwrap_or(0) as u16,
            Value::String(name) => {
                container_port(&self.pods[key].spec["spec"], name).ok_or_else(|| {
                    format!("{field}.{probe}.httpGet.port: no container port named `{name}`")
                })?
            }
            _ => 0,
        };
        let local = self.pod_port(key, port);
        let url = format!(
            "http://127.0.0.1:{local}{}",
            get["path"].as_str().unwrap_or("/")
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        loop {
            let status = curl_status(&["--max-time", "2", &url]);
            if (200..400).contains(&status) {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                let log = self.pods[key]
                    .containers
                    .get(c["name"].as_str().unwrap_or(""))
                    .and_then(|(l, _)| std::fs::read_to_string(l).ok())
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                return Err(format!(
                    "{field}.{probe}: {url} answered {status} for 40s (container {port}); its log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Local ports a container was told to listen on (`127.0.0.1:N` in its rewritten
    /// args), for containers without probes.
    fn own_ports(&self, key: &str, c: &Value) -> Vec<u16> {
        let args: Vec<String> = ["command", "args"]
            .iter()
            .flat_map(|f| c[*f].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        let mut out = Vec::new();
        for a in args {
            for host in ["127.0.0.1:", "0.0.0.0:"] {
                if let Some(p) = a.strip_prefix(host).and_then(|p| p.parse::<u16>().ok())
                    && let Some(local) = self.ports.get(&(key.to_string(), p))
                {
                    out.push(*local);
                }
            }
        }
        out
    }

    /// `kubectl exec`: `argv` in container `name` of pod `key`, with its env and mounts.
    pub fn exec(
        &mut self,
        key: &str,
        container: Option<&str>,
        argv: &[String],
    ) -> Result<(bool, String), Fault> {
        let spec = self.pods[key].spec.clone();
        let containers = spec["spec"]["containers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let wanted = container.map(String::from).or_else(|| {
            spec["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"]
                .as_str()
                .map(String::from)
        });
        let c = match &wanted {
            Some(w) => containers
                .iter()
                .chain(
                    spec["spec"]["initContainers"]
                        .as_array()
                        .into_iter()
                        .flatten(),
                )
                .find(|c| c["name"] == w.as_str())
                .cloned()
                .ok_or_else(|| format!("container {w} not found in pod of {key}"))?,
            None => containers.first().cloned().ok_or("no containers")?,
        };
        let name = c["name"].as_str().unwrap_or("").to_string();
        let env = self.pods[key]
            .containers
            .get(&name)
            .map(|(_, e)| e.clone())
            .ok_or_else(|| format!("container {name} of {key} is not running"))?;
        let image = self.image_of(&c);
        let mut args = Vec::new();
        for a in argv {
            args.push(self.rewrite(key, a)?);
        }
        let command = self.bwrap(
            key,
            &c,
            image.as_ref(),
            &env,
            &args,
            &format!("exec in {key}/{name}"),
        )?;
        let out = run_bounded_vec(60, &command);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.success(), text))
    }

    /// `kubectl logs`.
    pub fn logs(&self, key: &str, container: Option<&str>) -> Result<String, Fault> {
        let pod = &self.pods[key];
        let name = match container {
            Some(c) => c.to_string(),
            None => pod.spec["spec"]["containers"][0]["name"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        };
        let (log, _) = pod
            .containers
            .get(&name)
            .ok_or_else(|| format!("container {name} not found in pod of {key}"))?;
        Ok(std::fs::read_to_string(log).unwrap_or_default())
    }
}

/// Where a container whose environment names the test database sees its CA (the one
/// mount the rehearsal adds, with the database URL it rewrites).
const DATABASE_CA: &str = "/run/nexus-rehearsal/postgres-ca.pem";

/// The trust domain the requirements set up SPIRE with.
pub const TRUST_DOMAIN: &str = "nexus.local";
/// The SPIRE agent's socket name in the SPIFFE CSI volume (spiffe/helm-charts-hardened).
pub const SPIRE_SOCKET: &str = "spire-agent.sock";

fn namespace_object(name: &str, given: &Value) -> Value {
    let mut ns = if given.is_null() {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    } else {
        given.clone()
    };
    ns["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
    ns
}

fn normalize_secret(obj: &mut Value) -> Result<(), Fault> {
    if let Some(string_data) = obj["stringData"].as_object().cloned() {
        for (k, v) in string_data {
            obj["data"][k.as_str()] =
                json!(data_encoding::BASE64.encode(v.as_str().unwrap_or("").as_bytes()));
        }
        if let Some(m) = obj.as_object_mut() {
            m.remove("stringData");
        }
    }
    for (k, v) in obj["data"].as_object().cloned().unwrap_or_default() {
        let clean: String = v
            .as_str()
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        data_encoding::BASE64
            .decode(clean.as_bytes())
            .map_err(|e| format!("{}: data[{k}]: not base64: {e}", describe(obj)))?;
        obj["data"][k.as_str()] = json!(clean);
    }
    Ok(())
}

fn secret_value(secret: &Value, key: &str) -> Result<Vec<u8>, Fault> {
    data_encoding::BASE64
        .decode(secret["data"][key].as_str().unwrap_or("").as_bytes())
        .map_err(|e| format!("{}: data[{key}]: {e}", describe(secret)))
}

/// Issues a certificate with openssl: self-signed when no CA is given.
fn issue(
    dir: &Path,
    cn: &str,
    dns: &[String],
    is_ca: bool,
    ca_cert: Option<&[u8]>,
    ca_key: Option<&[u8]>,
) -> (Vec<u8>, Vec<u8>) {
    let key = dir.join("tls.key");
    let crt = dir.join("tls.crt");
    let ext = dir.join("ext.cnf");
    let mut ext_text = String::new();
    if is_ca {
        ext_text.push_str("basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n");
    } else {
        ext_text.push_str("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n");
    }
    if !dns.is_empty() {
        ext_text.push_str(&format!(
            "subjectAltName={}\n",
            dns.iter()
                .map(|d| format!("DNS:{d}"))
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    std::fs::write(&ext, ext_text).expect("ext");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let subj = format!("/CN={cn}");
    let ext_s = ext.to_string_lossy().into_owned();
    match (ca_cert, ca_key) {
        (Some(c), Some(k)) => {
            std::fs::write(dir.join("ca.crt"), c).expect("ca");
            std::fs::write(dir.join("ca.key"), k).expect("ca key");
            run(&[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &subj,
                "-keyout",
                "tls.key",
                "-out",
                "tls.csr",
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                "tls.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-set_serial",
                "1",
                "-days",
                "90",
                "-extfile",
                &ext_s,
                "-out",
                "tls.crt",
            ]);
        }
        _ => {
            // openssl's default req -x509 extensions (v3_ca) make it a CA.
            run(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "3650",
                "-subj",
                &subj,
                "-keyout",
                "tls.key",
                "-out",
                "tls.crt",
            ]);
        }
    }
    (
        std::fs::read(crt).expect("crt"),
        std::fs::read(key).expect("key"),
    )
}

/// The kubelet's AtomicWriter layout.
fn write_atomic(dir: &Path, files: &[(String, Vec<u8>)], generation: u32) {
    let ts = format!(
        "..2026_01_01_00_00_{generation:02}.{}",
        100_000 + generation
    );
    let data_dir = dir.join(&ts);
    for (rel, bytes) in files {
        let p = data_dir.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, bytes).expect("write");
    }
    std::fs::create_dir_all(&data_dir).expect("data dir");
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&ts, &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    let mut tops: Vec<String> = files
        .iter()
        .filter_map(|(rel, _)| rel.split('/').next().map(String::from))
        .collect();
    tops.sort();
    tops.dedup();
    for top in tops {
        let link = dir.join(&top);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{top}"), &link).expect("user link");
        }
    }
}

fn read_atomic(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    fn walk(root: &Path, d: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if let Ok(b) = std::fs::read(&p) {
                out.push((
                    p.strip_prefix(root)
                        .unwrap_or(&p)
                        .to_string_lossy()
                        .into_owned(),
                    b,
                ));
            }
        }
    }
    let data = dir.join("..data");
    walk(&data, &data, &mut out);
    out.sort();
    out
}

fn has(list: &Value, item: &str) -> bool {
    list.as_array()
        .is_some_and(|a| a.iter().any(|v| v == item || v == "*"))
}

/// A `LabelSelector` (matchLabels, matchExpressions) against labels; null matches all.
pub fn selector_matches(selector: &Value, labels: &Value) -> bool {
    if selector.is_null() {
        return true;
    }
    let label = |k: &str| labels[k].as_str();
    let labels_ok = selector["matchLabels"]
        .as_object()
        .is_none_or(|m| m.iter().all(|(k, v)| label(k) == v.as_str()));
    let exprs_ok = selector["matchExpressions"].as_array().is_none_or(|es| {
        es.iter().all(|e| {
            let k = e["key"].as_str().unwrap_or("");
            let values: Vec<&str> = e["values"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            match e["operator"].as_str().unwrap_or("") {
                "In" => label(k).is_some_and(|v| values.contains(&v)),
                "NotIn" => label(k).is_none_or(|v| !values.contains(&v)),
                "Exists" => label(k).is_some(),
                "DoesNotExist" => label(k).is_none(),
                _ => false,
            }
        })
    });
    labels_ok && exprs_ok
}

/// A Service's `selector` (a plain map) against labels.
fn selector_matches_labels(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels[k.as_str()] == *v))
}

fn container_port(pod_spec: &Value, name: &str) -> Option<u16> {
    ["containers", "initContainers"]
        .iter()
        .flat_map(|f| pod_spec[*f].as_array().cloned().unwrap_or_default())
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
}

fn set(env: &mut Vec<(String, String)>, k: &str, v: String) {
    env.retain(|(n, _)| n != k);
    env.push((k.to_string(), v));
}

/// The kubelet's `$(VAR)` expansion (`$$` escapes; unknown names stay as written).
pub fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, v)) = env.iter().rev().find(|(k, _)| k == &inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn rewrite_database_url(url: &str, host: &str, database: &str, ca: &Path) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let userinfo = authority
        .rsplit_once('@')
        .map(|(u, _)| format!("{u}@"))
        .unwrap_or_default();
    let query = tail.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut params: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("sslrootcert="))
        .map(String::from)
        .collect();
    params.push(format!("sslrootcert={}", ca.display()));
    format!(
        "{scheme}://{userinfo}{host}/{database}?{}",
        params.join("&")
    )
}

fn run_bounded_vec(secs: u32, argv: &[String]) -> std::process::Output {
    Command::new("timeout")
        .args(["--kill-after=5", &secs.to_string()])
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .expect("timeout")
}

#[test]
fn kubelet_rules() {
    let env = vec![("A".to_string(), "x".to_string())];
    assert_eq!(expand("$(A)/$(B)/$$(A)", &env), "x/$(B)/$(A)");
    assert!(selector_matches(
        &json!({"matchExpressions": [{"key": "k", "operator": "NotIn", "values": ["disabled"]}]}),
        &json!({})
    ));
    assert!(!selector_matches(
        &json!({"matchLabels": {"a": "b"}}),
        &json!({"a": "c"})
    ));
    assert_eq!(
        rewrite_database_url(
            "postgres://nexus:PW@db.svc:5432/nexus?sslmode=verify-full",
            "127.0.0.1:5",
            "d1",
            Path::new("/ca.pem")
        ),
        "postgres://nexus:PW@127.0.0.1:5/d1?sslmode=verify-full&sslrootcert=/ca.pem"
    );
}
