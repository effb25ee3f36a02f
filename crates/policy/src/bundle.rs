//! A policy folder as one revision: its Rego modules, its test modules, and its data
//! files, loaded the way `opa eval -d DIR` loads them (a JSON or YAML file's content is
//! placed at `data.<its folder path>`), with a revision id that hashes every file.

use std::path::{Path, PathBuf};

use regorus::Value;

use crate::error::PolicyError;

/// One Rego file.
#[derive(Clone, Debug)]
pub struct Module {
    /// Path relative to the folder (what errors and coverage show).
    pub path: String,
    /// Its text.
    pub text: String,
}

/// Everything in a policy folder.
#[derive(Clone, Debug)]
pub struct Bundle {
    /// The folder.
    pub root: PathBuf,
    /// Rego modules that decide (not `*_test.rego`).
    pub modules: Vec<Module>,
    /// `*_test.rego` modules.
    pub tests: Vec<Module>,
    /// Data from the JSON/YAML files, merged.
    pub data: Value,
    /// `sha256:` of every file's path and contents, in path order.
    pub revision: String,
}

/// File size cap for anything loaded from the folder.
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

impl Bundle {
    /// Loads `root` recursively. Hidden files and folders (`.name`) are skipped, so an
    /// editor's swap file or a half-written `.tmp` never becomes policy.
    pub fn load(root: &Path) -> Result<Self, PolicyError> {
        let mut files = Vec::new();
        collect(root, root, &mut files)?;
        files.sort();
        let mut modules = Vec::new();
        let mut tests = Vec::new();
        let mut data = Value::new_object();
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        for rel in files {
            let full = root.join(&rel);
            let shown = display_path(root, &rel);
            let bytes = std::fs::read(&full).map_err(|e| PolicyError::Read {
                file: shown.clone(),
                reason: e.to_string(),
            })?;
            hasher.update(rel.to_string_lossy().as_bytes());
            hasher.update(&[0]);
            hasher.update(&bytes);
            hasher.update(&[0]);
            let text = String::from_utf8(bytes).map_err(|_| PolicyError::Data {
                file: shown.clone(),
                message: "not valid UTF-8".into(),
            })?;
            let name = rel.to_string_lossy();
            if name.ends_with("_test.rego") {
                tests.push(Module { path: shown, text });
            } else if name.ends_with(".rego") {
                modules.push(Module { path: shown, text });
            } else {
                let value = parse_data(&shown, &text)?;
                let prefix: Vec<String> = rel
                    .parent()
                    .map(|p| {
                        p.components()
                            .map(|c| c.as_os_str().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                merge_at(&mut data, &prefix, value, &shown)?;
            }
        }
        let revision = data_encoding::HEXLOWER.encode(hasher.finish().as_ref());
        Ok(Self {
            root: root.to_path_buf(),
            modules,
            tests,
            data,
            revision: format!("sha256:{}", &revision[..16.min(revision.len())]),
        })
    }

    /// A bundle from in-memory modules (tests, `policy eval` on single files).
    pub fn from_modules(modules: Vec<Module>, data: Value) -> Self {
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        for m in &modules {
            hasher.update(m.path.as_bytes());
            hasher.update(m.text.as_bytes());
        }
        let (tests, modules) = modules
            .into_iter()
            .partition(|m| m.path.ends_with("_test.rego"));
        let revision = data_encoding::HEXLOWER.encode(hasher.finish().as_ref());
        Self {
            root: PathBuf::new(),
            modules,
            tests,
            data,
            revision: format!("sha256:{}", &revision[..16]),
        }
    }
}

fn display_path(root: &Path, rel: &Path) -> String {
    root.join(rel).to_string_lossy().into_owned()
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), PolicyError> {
    let entries = std::fs::read_dir(dir).map_err(|e| PolicyError::Read {
        file: dir.to_string_lossy().into_owned(),
        reason: e.to_string(),
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            collect(root, &path, out)?;
        } else if [".rego", ".json", ".yaml", ".yml"]
            .iter()
            .any(|ext| name.ends_with(ext))
        {
            if meta.len() > MAX_FILE_BYTES {
                return Err(PolicyError::Read {
                    file: path.to_string_lossy().into_owned(),
                    reason: format!("larger than {MAX_FILE_BYTES} bytes"),
                });
            }
            if let Ok(rel) = path.strip_prefix(root) {
                out.push(rel.to_path_buf());
            }
        }
    }
    Ok(())
}

fn parse_data(file: &str, text: &str) -> Result<Value, PolicyError> {
    if file.ends_with(".json") {
        serde_json::from_str::<Value>(text).map_err(|e| PolicyError::Data {
            file: file.to_string(),
            message: format!("line {} column {}: {e}", e.line(), e.column()),
        })
    } else {
        // As OPA reads YAML data: YAML 1.1 (`yes` is true), first document only.
        crate::builtins::yaml::to_value(text).map_err(|e| PolicyError::Data {
            file: file.to_string(),
            message: format!("{e:#}"),
        })
    }
}

/// Places `value` at `data.<prefix>`, merging objects; a conflicting scalar is an error.
fn merge_at(
    data: &mut Value,
    prefix: &[String],
    value: Value,
    file: &str,
) -> Result<(), PolicyError> {
    let mut wrapped = value;
    for key in prefix.iter().rev() {
        let mut obj = Value::new_object();
        if let Ok(map) = obj.as_object_mut() {
            map.insert(Value::from(key.as_str()), wrapped);
        }
        wrapped = obj;
    }
    merge(data, wrapped).map_err(|path| PolicyError::Data {
        file: file.to_string(),
        message: format!("conflicts with another data file at data.{path}"),
    })
}

/// Deep-merges `src` into `dst`; on a conflict returns the dotted path.
pub(crate) fn merge(dst: &mut Value, src: Value) -> Result<(), String> {
    match (dst.as_object_mut(), src.as_object()) {
        (Ok(dst_map), Ok(src_map)) => {
            for (k, v) in src_map.iter() {
                match dst_map.get_mut(k) {
                    Some(existing) if existing.as_object().is_ok() && v.as_object().is_ok() => {
                        merge(existing, v.clone()).map_err(|p| format!("{}.{p}", key_str(k)))?;
                    }
                    Some(_) => return Err(key_str(k)),
                    None => {
                        dst_map.insert(k.clone(), v.clone());
                    }
                }
            }
            Ok(())
        }
        _ => Err(String::new()),
    }
}

fn key_str(k: &Value) -> String {
    k.as_string()
        .map(|s| s.to_string())
        .unwrap_or_else(|_| k.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A YAML data file means what it means to OPA (`opa eval -d`): YAML 1.1, so an
    /// operator's `strict: yes` is `true`, not the string "yes" a YAML 1.2 reader sees.
    #[test]
    fn yaml_data_is_read_as_opa_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("cfg")).unwrap();
        std::fs::write(
            dir.path().join("cfg/data.yaml"),
            "strict: yes\nmode: off\nport: 0755\nlabel: \"on\"\nbase: &b {x: 1}\nuse:\n  <<: *b\n",
        )
        .unwrap();
        let bundle = Bundle::load(dir.path()).unwrap();
        let cfg = &bundle.data["cfg"];
        assert_eq!(cfg["strict"], Value::from(true));
        assert_eq!(cfg["mode"], Value::from(false));
        assert_eq!(cfg["port"], Value::from(493));
        assert_eq!(cfg["label"], Value::from("on"));
        assert_eq!(cfg["use"]["x"], Value::from(1));

        std::fs::write(dir.path().join("cfg/data.yaml"), "a: [1,\nb: 2\n").unwrap();
        let error = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("cfg/data.yaml"), "{error}");
        assert!(error.contains("line"), "{error}");
    }
}
