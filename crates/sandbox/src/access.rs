//! Landlock: the profile's filesystem, TCP and scope grants as a ruleset, and what this
//! kernel's Landlock ABI can enforce of them.
//!
//! The ruleset handles every right the running ABI knows (capped at ABI 7, what the
//! profile format models), so anything not granted is denied. The ABI decides what is
//! enforceable: filesystem rules need ABI 3 to cover truncation, TCP rules ABI 4, scopes
//! ABI 6. [`Enforcement`] says, per feature, whether it is enforced here; `required`
//! profiles refuse to start when any is not.

use std::path::Path;

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath,
    PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};

use crate::profile::{Filesystem, Profile};

/// The newest ABI whose rights the profile format models.
const MODELLED_ABI: i32 = 7;

/// The Landlock ABI of the running kernel (0: no Landlock).
#[allow(unsafe_code)]
pub fn kernel_abi() -> i32 {
    // SAFETY: with LANDLOCK_CREATE_RULESET_VERSION and a null attribute pointer of size 0
    // the kernel only returns the ABI version; nothing is read or written.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    i32::try_from(rc).unwrap_or(0).max(0)
}

fn abi_of(version: i32) -> ABI {
    match version.min(MODELLED_ABI) {
        i32::MIN..=0 => ABI::Unsupported,
        1 => ABI::V1,
        2 => ABI::V2,
        3 => ABI::V3,
        4 => ABI::V4,
        5 => ABI::V5,
        6 => ABI::V6,
        _ => ABI::V7,
    }
}

/// One feature of the profile and whether this kernel enforces it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Feature {
    /// Short name (`filesystem`, `tcp`, `scopes`, `sockets`, `seccomp`, ...).
    pub name: &'static str,
    /// Enforced, not enforceable here, or left open by the profile.
    pub state: State,
    /// What is or is not enforced, and what ABI or kernel would.
    pub detail: String,
}

/// Whether a feature holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum State {
    /// This kernel enforces it.
    Enforced,
    /// The profile asks for it and this kernel cannot enforce it: `required` refuses to
    /// start, `best_effort` starts and says so.
    NotEnforced,
    /// The profile itself leaves it open (no table, or an opt-in).
    Unconfined,
}

impl State {
    /// The word `--check` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Enforced => "enforced",
            State::NotEnforced => "NOT enforced",
            State::Unconfined => "unconfined",
        }
    }
}

impl Feature {
    /// A feature the profile asks for: enforced or not, on this kernel.
    pub fn new(name: &'static str, enforced: bool, detail: String) -> Feature {
        Feature {
            name,
            state: if enforced {
                State::Enforced
            } else {
                State::NotEnforced
            },
            detail,
        }
    }

    /// Something the profile leaves open.
    pub fn unconfined(name: &'static str, detail: String) -> Feature {
        Feature {
            name,
            state: State::Unconfined,
            detail,
        }
    }

    /// Enforced on this kernel.
    pub fn enforced(&self) -> bool {
        self.state == State::Enforced
    }
}

/// What the profile asks for against what the kernel enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enforcement {
    /// The Landlock ABI found (0: none).
    pub landlock_abi: i32,
    /// One entry per feature the profile uses.
    pub features: Vec<Feature>,
}

impl Enforcement {
    /// The features the profile asks for that this kernel does not enforce.
    pub fn missing(&self) -> impl Iterator<Item = &Feature> {
        self.features
            .iter()
            .filter(|f| f.state == State::NotEnforced)
    }
}

/// The Landlock part of the enforcement plan for `profile` on ABI `abi`.
pub fn plan(profile: &Profile, abi: i32) -> Vec<Feature> {
    let mut features = Vec::new();
    match &profile.filesystem {
        Some(fs) => {
            let grants = fs.read.len() + fs.write.len() + fs.execute.len();
            features.push(filesystem_feature(abi, grants));
        }
        None => features.push(Feature::unconfined(
            "filesystem",
            "no [filesystem] table: every file its uid can reach (and pathname UNIX sockets)"
                .into(),
        )),
    }
    if let Some(net) = &profile.network {
        features.push(Feature::new(
            "tcp",
            abi >= 4,
            if abi >= 4 {
                format!(
                    "TCP connect only to ports {:?}, bind only {:?}",
                    net.connect_tcp, net.bind_tcp
                )
            } else {
                format!(
                    "Landlock ABI {abi} cannot restrict TCP (ABI 4, Linux 6.7): connect and bind are unrestricted"
                )
            },
        ));
    }
    let scopes = &profile.scopes;
    let asked: Vec<&str> = [
        (scopes.signal, "signals"),
        (scopes.abstract_unix_socket, "abstract UNIX sockets"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, what)| *what)
    .collect();
    if !asked.is_empty() {
        features.push(Feature::new(
            "scopes",
            abi >= 6,
            if abi >= 6 {
                format!("{} confined to the sandbox", asked.join(" and "))
            } else {
                format!(
                    "Landlock ABI {abi} has no scopes (ABI 6, Linux 6.12): the plugin can reach {} outside the sandbox (the launcher among them); set them false in [scope] to accept that",
                    asked.join(" and ")
                )
            },
        ));
    }
    if asked.len() < 2 {
        features.push(Feature::unconfined(
            "scopes",
            format!(
                "{} outside the sandbox reachable ([scope] turns it off)",
                if asked.is_empty() {
                    "signals and abstract UNIX sockets"
                } else if scopes.signal {
                    "abstract UNIX sockets"
                } else {
                    "signals"
                }
            ),
        ));
    }
    features
}

/// Whether the profile asks Landlock for anything (then `required` checks the ruleset).
pub fn uses_landlock(profile: &Profile) -> bool {
    profile.filesystem.is_some()
        || profile.network.is_some()
        || profile.scopes.signal
        || profile.scopes.abstract_unix_socket
}

fn filesystem_feature(abi: i32, grants: usize) -> Feature {
    Feature::new(
        "filesystem",
        abi >= 3,
        match abi {
            0 => "Landlock is not available: the plugin can read and write every file its uid can"
                .into(),
            1 | 2 => format!(
                "Landlock ABI {abi}: read/write/execute rules enforced, but truncate is not restricted (ABI 3, Linux 6.2)"
            ),
            _ => format!(
                "{grants} path grants; everything else denied (read, write, execute, truncate{})",
                if abi >= 5 { ", device ioctl" } else { "" }
            ),
        },
    )
}

const READ: &[AccessFs] = &[AccessFs::ReadFile, AccessFs::ReadDir];
const EXECUTE: &[AccessFs] = &[AccessFs::ReadFile, AccessFs::ReadDir, AccessFs::Execute];
/// Write grants everything but execute, device nodes and device ioctls.
const WRITE: &[AccessFs] = &[
    AccessFs::ReadFile,
    AccessFs::ReadDir,
    AccessFs::WriteFile,
    AccessFs::RemoveDir,
    AccessFs::RemoveFile,
    AccessFs::MakeDir,
    AccessFs::MakeReg,
    AccessFs::MakeSock,
    AccessFs::MakeFifo,
    AccessFs::MakeSym,
    AccessFs::Refer,
    AccessFs::Truncate,
];

fn flags(list: &[AccessFs]) -> BitFlags<AccessFs> {
    list.iter().fold(BitFlags::EMPTY, |acc, a| acc | *a)
}

/// Builds the ruleset and restricts the calling thread (sets no_new_privs too).
///
/// Runs in the child between fork and exec: paths like `/proc/self` then resolve to the
/// plugin's own process. `command` is the plugin executable, always granted read+execute.
pub fn restrict(profile: &Profile, abi: i32, command: &Path) -> Result<RulesetStatus, String> {
    let abi = abi_of(abi);
    let net = profile.network.is_some() && abi as i32 >= 4;
    let scopes = (profile.scopes.signal || profile.scopes.abstract_unix_socket) && abi as i32 >= 6;
    if abi == ABI::Unsupported || (profile.filesystem.is_none() && !net && !scopes) {
        return Ok(RulesetStatus::NotEnforced);
    }
    let mut ruleset = Ruleset::default().set_compatibility(CompatLevel::BestEffort);
    let handled_fs = if profile.filesystem.is_some() {
        AccessFs::from_all(abi)
    } else {
        BitFlags::EMPTY
    };
    if !handled_fs.is_empty() {
        ruleset = ruleset
            .handle_access(handled_fs)
            .map_err(|e| format!("Landlock: {e}"))?;
    }
    if net {
        ruleset = ruleset
            .handle_access(AccessNet::from_all(abi))
            .map_err(|e| format!("Landlock: {e}"))?;
    }
    if scopes {
        if profile.scopes.signal {
            ruleset = ruleset
                .scope(Scope::Signal)
                .map_err(|e| format!("Landlock: {e}"))?;
        }
        if profile.scopes.abstract_unix_socket {
            ruleset = ruleset
                .scope(Scope::AbstractUnixSocket)
                .map_err(|e| format!("Landlock: {e}"))?;
        }
    }
    let mut created = ruleset.create().map_err(|e| format!("Landlock: {e}"))?;
    let empty = Filesystem::default();
    let fs = profile.filesystem.as_ref().unwrap_or(&empty);
    let grants = fs
        .read
        .iter()
        .map(|g| (g.path.as_path(), g.line, READ))
        .chain(fs.write.iter().map(|g| (g.path.as_path(), g.line, WRITE)))
        .chain(
            fs.execute
                .iter()
                .map(|g| (g.path.as_path(), g.line, EXECUTE)),
        )
        .chain(std::iter::once((
            command,
            0,
            &[AccessFs::ReadFile, AccessFs::Execute][..],
        )))
        .filter(|_| !handled_fs.is_empty());
    for (path, line, access) in grants {
        let fd = PathFd::new(path).map_err(|e| {
            format!(
                "{}:{line}: cannot open {} for a Landlock rule: {e}",
                profile.source.display(),
                path.display()
            )
        })?;
        let mut access = flags(access) & handled_fs;
        if !path.is_dir() {
            access &= AccessFs::from_file(abi);
        }
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| format!("Landlock rule for {}: {e}", path.display()))?;
    }
    if let Some(net) = &profile.network
        && abi as i32 >= 4
    {
        for port in &net.connect_tcp {
            created = created
                .add_rule(NetPort::new(*port, AccessNet::ConnectTcp))
                .map_err(|e| format!("Landlock TCP rule for port {port}: {e}"))?;
        }
        for port in &net.bind_tcp {
            created = created
                .add_rule(NetPort::new(*port, AccessNet::BindTcp))
                .map_err(|e| format!("Landlock TCP rule for port {port}: {e}"))?;
        }
    }
    let status = created
        .restrict_self()
        .map_err(|e| format!("Landlock: {e}"))?;
    Ok(status.ruleset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_mapping_caps_at_the_modelled_abi() {
        assert_eq!(abi_of(0), ABI::Unsupported);
        assert_eq!(abi_of(4), ABI::V4);
        assert_eq!(abi_of(12), ABI::V7);
    }

    #[test]
    fn the_plan_says_what_each_abi_cannot_enforce() {
        let text = include_str!("../../../profiles/default.toml");
        let profile = Profile::parse(std::path::Path::new("default.toml"), text, &|_| None)
            .expect("default profile");
        let missing = |abi| -> Vec<&'static str> {
            plan(&profile, abi)
                .into_iter()
                .filter(|f| f.state == State::NotEnforced)
                .map(|f| f.name)
                .collect()
        };
        assert_eq!(missing(0), ["filesystem", "tcp", "scopes"]);
        assert_eq!(missing(2), ["filesystem", "tcp", "scopes"]);
        assert_eq!(missing(3), ["tcp", "scopes"]);
        assert_eq!(missing(5), ["scopes"]);
        assert!(missing(6).is_empty());
        assert!(missing(7).is_empty());
    }

    #[test]
    fn write_never_grants_execute_or_device_nodes() {
        let w = flags(WRITE);
        assert!(!w.contains(AccessFs::Execute));
        assert!(!w.contains(AccessFs::MakeChar));
        assert!(!w.contains(AccessFs::MakeBlock));
        assert!(!w.contains(AccessFs::IoctlDev));
    }
}
