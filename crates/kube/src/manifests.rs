//! Offline injection of multi-document YAML (`nexusctl inject`), as `linkerd inject` does:
//! Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs, CronJobs and the
//! workloads inside a `List` get the same changes the webhook would make; every other
//! document (and every workload left alone: opted out, already injected) is copied through
//! byte for byte.
//!
//! An injected document keeps its key order: injection runs on JSON (the one code path the
//! webhook also uses), and the resulting JSONPatch is applied to the order-preserving YAML
//! tree. Comments inside an injected document are lost, as with any YAML re-serialization.
//! YAML is read and written with `yaml_serde`, the YAML organisation's maintained
//! continuation of `serde_yaml` (which regorus already pulls into the build).

use json_patch::PatchOperation;
use serde_json::Value;
use yaml_serde::Value as Yaml;

use crate::config::InjectConfig;
use crate::inject::{
    self, CONFIG_MAP_ANNOTATION, InjectError, Outcome, SANDBOX_ANNOTATION, pod_template_pointer,
};

/// What the command line adds to every workload.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// Sandbox every workload with this profile (unless it names one itself).
    pub sandbox_profile: Option<String>,
    /// Use this sidecar ConfigMap (unless the workload names one itself).
    pub config_map: Option<String>,
}

/// The injected YAML and what happened to each workload.
#[derive(Clone, Debug)]
pub struct Injected {
    /// The output, document for document.
    pub yaml: String,
    /// One line per workload found (documents without a pod template are not listed).
    pub workloads: Vec<WorkloadReport>,
}

/// What happened to one workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadReport {
    /// The document's index (0-based).
    pub document: usize,
    /// `Kind/name`.
    pub object: String,
    /// What injection did.
    pub outcome: Outcome,
}

/// Why the manifests could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A document is not YAML.
    #[error("document {document}: not valid YAML: {message}")]
    Yaml {
        /// The document's index (0-based).
        document: usize,
        /// The parser's message, with its line and column.
        message: String,
    },
    /// A workload cannot be injected as it is written.
    #[error("document {document} ({object}): {source}")]
    Refused {
        /// The document's index (0-based).
        document: usize,
        /// `Kind/name`.
        object: String,
        /// Why, and what to change.
        source: InjectError,
    },
    /// Applying the computed changes to the YAML tree failed (a bug: please report it).
    #[error("document {document}: cannot apply the injection to the YAML ({message})")]
    Apply {
        /// The document's index (0-based).
        document: usize,
        /// What failed.
        message: String,
    },
}

/// Injects every workload in `input` (one or more YAML documents).
pub fn inject_manifests(
    input: &str,
    cfg: &InjectConfig,
    overrides: &Overrides,
) -> Result<Injected, ManifestError> {
    let mut out = String::with_capacity(input.len() * 2);
    let mut workloads = Vec::new();
    for (index, doc) in split_documents(input).into_iter().enumerate() {
        match inject_document(index, doc.text, cfg, overrides, &mut workloads)? {
            None => out.push_str(doc.text),
            Some(yaml) => {
                if doc.has_marker {
                    out.push_str("---\n");
                }
                out.push_str(&yaml);
                if !yaml.ends_with('\n') {
                    out.push('\n');
                }
            }
        }
    }
    Ok(Injected {
        yaml: out,
        workloads,
    })
}

/// One document's text, including its `---` line when it has one.
struct Document<'a> {
    text: &'a str,
    has_marker: bool,
}

/// Splits at `---` lines (column 0); a block scalar's content is indented, so a column-0
/// `---` is always a document marker.
fn split_documents(input: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    let mut has_marker = false;
    for line in input.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if is_marker && offset > start {
            docs.push(Document {
                text: &input[start..offset],
                has_marker,
            });
            start = offset;
        }
        if is_marker {
            has_marker = true;
        } else if offset == start {
            has_marker = false;
        }
        offset += line.len();
    }
    if offset > start {
        docs.push(Document {
            text: &input[start..],
            has_marker,
        });
    }
    docs
}

/// `Some(new text)` when the document changed.
fn inject_document(
    index: usize,
    text: &str,
    cfg: &InjectConfig,
    overrides: &Overrides,
    workloads: &mut Vec<WorkloadReport>,
) -> Result<Option<String>, ManifestError> {
    let yaml: Yaml = yaml_serde::from_str(text).map_err(|e| ManifestError::Yaml {
        document: index,
        message: e.to_string(),
    })?;
    let kind = yaml.get("kind").and_then(Yaml::as_str).unwrap_or("");
    let api_version = yaml.get("apiVersion").and_then(Yaml::as_str).unwrap_or("");
    let is_list = kind == "List" || (kind.ends_with("List") && yaml.get("items").is_some());
    if !is_list && pod_template_pointer(api_version, kind).is_none() {
        return Ok(None);
    }
    let original: Value = serde_json::to_value(&yaml).map_err(|e| ManifestError::Yaml {
        document: index,
        message: format!("not representable as JSON: {e}"),
    })?;
    let mut json = original.clone();
    let mut changed = false;
    if is_list {
        if let Some(items) = json.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                changed |= inject_one(index, item, cfg, overrides, workloads)?;
            }
        }
    } else {
        changed = inject_one(index, &mut json, cfg, overrides, workloads)?;
    }
    if !changed {
        return Ok(None);
    }
    let mut yaml = yaml;
    for op in json_patch::diff(&original, &json).0 {
        apply(&mut yaml, op).map_err(|message| ManifestError::Apply {
            document: index,
            message,
        })?;
    }
    yaml_serde::to_string(&yaml)
        .map(Some)
        .map_err(|e| ManifestError::Apply {
            document: index,
            message: e.to_string(),
        })
}

/// Injects one object; true when it changed.
fn inject_one(
    index: usize,
    obj: &mut Value,
    cfg: &InjectConfig,
    overrides: &Overrides,
    workloads: &mut Vec<WorkloadReport>,
) -> Result<bool, ManifestError> {
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    let Some(pointer) = pod_template_pointer(api_version, kind) else {
        return Ok(false);
    };
    let object = format!(
        "{kind}/{}",
        obj.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("(unnamed)")
    );
    let before = obj.clone();
    if let Some(template) = obj.pointer_mut(pointer) {
        add_overrides(template, overrides);
    }
    let outcome = inject::inject_object(obj, cfg).map_err(|source| ManifestError::Refused {
        document: index,
        object: object.clone(),
        source,
    })?;
    let Some(outcome) = outcome else {
        return Ok(false);
    };
    let changed = matches!(outcome, Outcome::Injected { .. });
    if !changed {
        // Opted out or already injected: the overrides are not applied either.
        *obj = before;
    }
    workloads.push(WorkloadReport {
        document: index,
        object,
        outcome,
    });
    Ok(changed)
}

fn add_overrides(template: &mut Value, overrides: &Overrides) {
    let pairs = [
        (SANDBOX_ANNOTATION, &overrides.sandbox_profile),
        (CONFIG_MAP_ANNOTATION, &overrides.config_map),
    ];
    if pairs.iter().all(|(_, v)| v.is_none()) {
        return;
    }
    let Some(template) = template.as_object_mut() else {
        return;
    };
    let metadata = template
        .entry("metadata")
        .or_insert_with(|| Value::Object(Default::default()));
    if metadata.is_null() {
        *metadata = Value::Object(Default::default());
    }
    let Some(annotations) = metadata.as_object_mut().map(|m| {
        m.entry("annotations")
            .or_insert_with(|| Value::Object(Default::default()))
    }) else {
        return;
    };
    if annotations.is_null() {
        *annotations = Value::Object(Default::default());
    }
    let Some(annotations) = annotations.as_object_mut() else {
        return;
    };
    for (key, value) in pairs {
        if let Some(value) = value {
            annotations
                .entry(key)
                .or_insert_with(|| Value::String(value.clone()));
        }
    }
}

/// Applies one JSONPatch operation (the add/remove/replace that `json_patch::diff` emits) to
/// the YAML tree, keeping the order of existing keys.
fn apply(root: &mut Yaml, op: PatchOperation) -> Result<(), String> {
    let (path, value) = match &op {
        PatchOperation::Add(a) => (a.path.as_str(), Some(&a.value)),
        PatchOperation::Replace(r) => (r.path.as_str(), Some(&r.value)),
        PatchOperation::Remove(r) => (r.path.as_str(), None),
        other => return Err(format!("unexpected operation {other:?}")),
    };
    let value = value
        .map(yaml_serde::to_value)
        .transpose()
        .map_err(|e| e.to_string())?;
    let tokens: Vec<String> = path
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect();
    let Some((last, parents)) = tokens.split_last() else {
        *root = value.ok_or("cannot remove the document")?;
        return Ok(());
    };
    let mut node = root;
    for token in parents {
        node = match node {
            Yaml::Mapping(m) => m.get_mut(token.as_str()),
            Yaml::Sequence(s) => token.parse::<usize>().ok().and_then(|i| s.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| format!("{path}: no `{token}`"))?;
    }
    let replace = matches!(op, PatchOperation::Replace(_));
    match (node, value) {
        (Yaml::Mapping(m), Some(v)) => {
            // IndexMap-backed: inserting an existing key keeps its position.
            m.insert(Yaml::String(last.clone()), v);
        }
        (Yaml::Mapping(m), None) => {
            m.shift_remove(last.as_str())
                .ok_or_else(|| format!("{path}: nothing to remove"))?;
        }
        (Yaml::Sequence(s), value) => {
            let index = if last == "-" {
                s.len()
            } else {
                last.parse::<usize>()
                    .map_err(|_| format!("{path}: not an index"))?
            };
            match value {
                Some(v) if replace => {
                    *s.get_mut(index)
                        .ok_or_else(|| format!("{path}: out of range"))? = v;
                }
                Some(v) if index <= s.len() => s.insert(index, v),
                Some(_) => return Err(format!("{path}: out of range")),
                None if index < s.len() => {
                    s.remove(index);
                }
                None => return Err(format!("{path}: out of range")),
            }
        }
        _ => return Err(format!("{path}: parent is not a map or a list")),
    }
    Ok(())
}

#[cfg(test)]
mod tests;
