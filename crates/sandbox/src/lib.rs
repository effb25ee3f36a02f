//! nexus-sandbox: confines a plugin process with Landlock and seccomp, and reports what
//! it tries that it may not.
//!
//! Reading order: [`profile`] (the TOML an operator writes, checked line by line),
//! [`access`] (Landlock: filesystem, TCP, scopes), [`baseline`] (what a profile's shape
//! implies: the socket allow-list, terminal, IPC, nested seccomp, anonymous exec),
//! [`seccomp`] (the syscall filters), [`launch`] (fork, confine, exec, then supervise like
//! tini), [`emulate`] (the listen and connect the launcher performs for the plugin),
//! [`report`] (violations to the sidecar), [`oci`] (the same filter for the kubelet).
//!
//! This is the one crate of the workspace that makes raw syscalls: `unsafe` is denied by
//! default and allowed at each site, with a `// SAFETY:` line.
pub mod access;
pub mod baseline;
pub mod emulate;
pub mod launch;
pub mod oci;
pub mod profile;
pub mod report;
pub mod seccomp;
pub mod syscalls;
// Every function here wraps a raw syscall: unsafe is allowed for this module only.
#[allow(unsafe_code)]
mod sys;

pub use launch::{Launch, LaunchError};
pub use profile::{Action, Mode, Profile, ProfileError};
