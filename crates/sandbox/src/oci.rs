//! The profile's syscall rules as an OCI runtime-spec / Kubernetes `Localhost` seccomp
//! profile, so the kubelet's runtime enforces the same filter under the launcher.
//!
//! Semantics match the launcher's filter: default allow; the rules the profile's shape
//! implies ([`baseline`]) first become ordinary rules; `kill` → `SCMP_ACT_KILL_PROCESS`,
//! `eperm` → `SCMP_ACT_ERRNO` (1), `enosys` → `SCMP_ACT_ERRNO` (38), `log` →
//! `SCMP_ACT_LOG`. Each `when` group becomes its own entry (entries are OR'ed, the args of
//! one entry AND'ed). runc ORs conditions that name the same argument twice in one entry,
//! so such a group is refused rather than exported with a different meaning.

use serde::{Deserialize, Serialize};

use crate::baseline;
use crate::profile::{Action, Op, Profile};

/// The top-level OCI `linux.seccomp` object (the subset this export writes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeccompProfile {
    /// Always `SCMP_ACT_ALLOW`: the profile is a deny-list.
    pub default_action: String,
    /// The native architecture only: other ABIs are refused by the runtime.
    pub architectures: Vec<String>,
    /// One entry per rule group.
    pub syscalls: Vec<SyscallEntry>,
}

/// One `syscalls` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyscallEntry {
    /// Syscall names.
    pub names: Vec<String>,
    /// `SCMP_ACT_*`.
    pub action: String,
    /// The errno for `SCMP_ACT_ERRNO`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub errno_ret: Option<u32>,
    /// AND'ed argument conditions.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub args: Vec<Arg>,
}

/// One argument condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Arg {
    /// Argument index.
    pub index: u32,
    /// The value (the mask for `SCMP_CMP_MASKED_EQ`).
    pub value: u64,
    /// The datum for `SCMP_CMP_MASKED_EQ`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub value_two: Option<u64>,
    /// `SCMP_CMP_*`.
    pub op: String,
}

/// Why a profile cannot be exported faithfully.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct ExportError {
    /// The profile file.
    pub file: String,
    /// The rule's line.
    pub line: usize,
    /// Why.
    pub reason: String,
}

/// Converts the profile's syscall rules and the rules its shape implies
/// ([`baseline`]: the socket allow-list, terminal ioctls, IPC, anonymous executables,
/// io_uring).
///
/// The runtime's filter confines the whole container, the launcher included, so it leaves
/// open what the launcher itself does: installing its filters (`seccomp`: the baseline's
/// lock is not exported; the launcher's own filter refuses it to the plugin) and the
/// calls the launcher answers for the plugin (`listen`, `connect` when it supervises
/// them), which a runtime's filter could not decide anyway, and the UNIX stream socket
/// the launcher reports over ([`baseline::LAUNCHER_SOCKETS`]; the launcher's own filter
/// still refuses it to the plugin unless the profile lists `unix_connect`).
pub fn export(profile: &Profile) -> Result<SeccompProfile, ExportError> {
    let mut syscalls = Vec::new();
    let implied = baseline::of_container(profile);
    for rule in profile.syscalls.iter().chain(&implied.rules) {
        let (action, errno_ret) = match rule.action {
            Action::Kill => ("SCMP_ACT_KILL_PROCESS", None),
            Action::Eperm => ("SCMP_ACT_ERRNO", Some(libc::EPERM as u32)),
            Action::Enosys => ("SCMP_ACT_ERRNO", Some(libc::ENOSYS as u32)),
            Action::Log => ("SCMP_ACT_LOG", None),
        };
        let names: Vec<String> = rule.syscalls.iter().map(|(n, _)| n.clone()).collect();
        let entry = |args: Vec<Arg>| SyscallEntry {
            names: names.clone(),
            action: action.into(),
            errno_ret,
            args,
        };
        if rule.when.is_empty() {
            syscalls.push(entry(Vec::new()));
            continue;
        }
        for group in &rule.when {
            let mut args = Vec::new();
            for (i, c) in group.iter().enumerate() {
                if group[..i].iter().any(|o| o.arg == c.arg) {
                    return Err(ExportError {
                        file: profile.source.display().to_string(),
                        line: rule.line,
                        reason: format!(
                            "two conditions on argument {} in one group: runc would OR them, so the exported filter would differ; split the rule",
                            c.arg
                        ),
                    });
                }
                let (op, value, value_two) = match c.op {
                    // libseccomp compares 64 bits, the kernel reads an int argument's low
                    // 32: `arg & 0xffffffff == value` matches what the kernel sees (an
                    // ioctl number with bits above 32 is still TIOCSTI to the kernel).
                    Op::Eq => ("SCMP_CMP_MASKED_EQ", u64::from(u32::MAX), Some(c.value)),
                    Op::Ne => ("SCMP_CMP_NE", c.value, None),
                    Op::Lt => ("SCMP_CMP_LT", c.value, None),
                    Op::Le => ("SCMP_CMP_LE", c.value, None),
                    Op::Gt => ("SCMP_CMP_GT", c.value, None),
                    Op::Ge => ("SCMP_CMP_GE", c.value, None),
                    Op::MaskedEq(mask) => ("SCMP_CMP_MASKED_EQ", mask, Some(c.value)),
                };
                args.push(Arg {
                    index: u32::from(c.arg),
                    value,
                    value_two,
                    op: op.into(),
                });
            }
            syscalls.push(entry(args));
        }
    }
    Ok(SeccompProfile {
        default_action: "SCMP_ACT_ALLOW".into(),
        architectures: vec![native_arch().into()],
        syscalls,
    })
}

/// The libseccomp name of this build's architecture.
pub fn native_arch() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "SCMP_ARCH_AARCH64"
    } else {
        "SCMP_ARCH_X86_64"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn two_conditions_on_one_argument_are_refused() {
        let text = "version = 1\nmode = \"best_effort\"\n[[syscall]]\nnames = [\"personality\"]\naction = \"eperm\"\nwhen = [[{ arg = 0, op = \"ne\", value = 0 }, { arg = 0, op = \"ne\", value = 8 }]]\n";
        let profile = Profile::parse(Path::new("p.toml"), text, &|_| None).expect("parse");
        let e = export(&profile).expect_err("refused").to_string();
        assert!(e.starts_with("p.toml:3:"), "{e}");
        assert!(e.contains("runc would OR them"), "{e}");
    }

    #[test]
    fn actions_map_to_libseccomp_names() {
        let text = include_str!("../../../profiles/default.toml");
        let profile = Profile::parse(Path::new("default.toml"), text, &|_| None).expect("parse");
        let exported = export(&profile).expect("export");
        assert_eq!(exported.default_action, "SCMP_ACT_ALLOW");
        let actions: std::collections::BTreeSet<_> = exported
            .syscalls
            .iter()
            .map(|e| e.action.as_str())
            .collect();
        assert_eq!(
            actions.into_iter().collect::<Vec<_>>(),
            ["SCMP_ACT_ERRNO", "SCMP_ACT_KILL_PROCESS"]
        );
        let json = serde_json::to_value(&exported).expect("json");
        assert!(
            json["syscalls"][0].get("errnoRet").is_none()
                || json["syscalls"][0]["errnoRet"].is_u64()
        );
    }

    /// Whether an exported entry for `name` refuses a call with these arguments (as runc's
    /// libseccomp reads the entry: args AND'ed, entries OR'ed).
    fn refuses(exported: &SeccompProfile, name: &str, args: [u64; 3]) -> bool {
        exported
            .syscalls
            .iter()
            .filter(|e| e.names.iter().any(|n| n == name))
            .any(|e| {
                e.args.iter().all(|a| {
                    let v = args[a.index as usize];
                    match a.op.as_str() {
                        "SCMP_CMP_MASKED_EQ" => v & a.value == a.value_two.unwrap_or(0),
                        "SCMP_CMP_NE" => v != a.value,
                        "SCMP_CMP_LT" => v < a.value,
                        "SCMP_CMP_LE" => v <= a.value,
                        "SCMP_CMP_GT" => v > a.value,
                        "SCMP_CMP_GE" => v >= a.value,
                        other => panic!("unexpected op {other}"),
                    }
                })
            })
    }

    #[test]
    fn the_container_filter_lets_the_launcher_report_but_no_other_unix_socket() {
        let text = include_str!("../../../profiles/default.toml");
        let profile = Profile::parse(Path::new("default.toml"), text, &|_| None).expect("parse");
        let exported = export(&profile).expect("export");
        let (unix, inet, netlink) = (1, 2, 16);
        let (stream, dgram, raw, cloexec) = (1, 2, 3, 0o2000000);
        // The launcher's report socket (std's UnixStream::connect).
        assert!(!refuses(&exported, "socket", [unix, stream | cloexec, 0]));
        assert!(!refuses(&exported, "socket", [inet, stream, 0]));
        // Every other family and type stays refused in the container.
        assert!(refuses(&exported, "socket", [unix, dgram, 0]));
        assert!(refuses(&exported, "socket", [netlink, raw, 0]));
        assert!(refuses(&exported, "socket", [inet, stream, 262])); // MPTCP
        // The launcher's own filter still refuses UNIX sockets to the plugin.
        let own = baseline::of(&profile);
        assert!(own.denies(
            crate::syscalls::number("socket").expect("socket"),
            &[unix, stream, 0, 0, 0, 0]
        ));
    }
}
