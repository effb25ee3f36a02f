//! The calls the launcher makes *for* the plugin: `listen`, and `connect` when the profile
//! grants UNIX socket paths.
//!
//! A seccomp filter sees a call's numbers, not the socket behind a descriptor nor the
//! address a pointer names, so these calls go to the launcher by seccomp user
//! notification. Answering with `SECCOMP_USER_NOTIF_FLAG_CONTINUE` after a check would be
//! unsound: the kernel re-reads both when the call continues, and another thread of the
//! plugin can change them in between (swap the descriptor with `dup2`, rewrite the
//! address). So the launcher never continues these calls. It takes its own duplicate of
//! the plugin's socket (`pidfd_getfd`: the same open file), copies the address out of the
//! plugin's memory once, checks *its* copies, performs the call itself on the duplicate,
//! and answers with the result. What is checked is exactly what is done.
//!
//! - `listen`: only a socket already bound, by a `bind` Landlock allowed, to a port
//!   (TCP) or to a pathname (UNIX). An unbound socket would be bound by the kernel to an
//!   ephemeral port, which no bind rule checks.
//! - `connect` (only supervised when `unix_connect` lists paths): a UNIX socket only to a
//!   listed path, opened by the launcher without following symlinks (so the plugin cannot
//!   swap the path for a link to another socket) and connected through
//!   `/proc/self/fd/N`; TCP only to a `connect_tcp` port (the same rule Landlock applies,
//!   which the launcher's own connect is not subject to); abstract and unnamed UNIX
//!   addresses never.
//!
//! Limits: the peer of a connect made here sees the launcher's pid in `SO_PEERCRED`
//! (same uid and gid as the plugin); a plugin that makes itself non-dumpable
//! (`PR_SET_DUMPABLE 0`) cannot be read by an unprivileged launcher, and its calls are
//! refused.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;

use crate::baseline::Supervised;
use crate::profile::Profile;
use crate::sys::{self, Notification};

/// Connects the launcher performs at once; beyond this a connect is refused with EAGAIN
/// (each runs on its own thread, since a blocking connect may take minutes).
pub const MAX_PENDING_CONNECTS: usize = 64;

/// What to do with a supervised call.
#[derive(Debug)]
pub enum Decision {
    /// Fail it with `errno`; `why` is reported.
    Refuse {
        /// The errno the caller gets.
        errno: i32,
        /// Why, for the launcher's log.
        why: String,
    },
    /// `listen(socket, backlog)` on the plugin's socket.
    Listen {
        /// The launcher's duplicate of the plugin's socket.
        socket: OwnedFd,
        /// The backlog the plugin asked for.
        backlog: i32,
    },
    /// `connect(socket, address)` on the plugin's socket.
    Connect {
        /// The launcher's duplicate of the plugin's socket.
        socket: OwnedFd,
        /// The address to connect to (checked).
        address: Vec<u8>,
        /// For a UNIX path: the socket inode, opened without symlinks, that `address`
        /// (`/proc/self/fd/N`) names; held until the connect is done.
        target: Option<OwnedFd>,
        /// What is connected to, for messages.
        shown: String,
    },
}

fn refuse(errno: i32, why: impl Into<String>) -> Decision {
    Decision::Refuse {
        errno,
        why: why.into(),
    }
}

/// Decides a supervised call. Never lets the plugin's own call run.
pub fn decide(
    profile: &Profile,
    listener: &OwnedFd,
    call: Supervised,
    notif: &Notification,
) -> Decision {
    let fd = notif.args[0] as i32;
    let pidfd = match sys::pidfd_for_thread(notif.pid) {
        Ok(p) => p,
        Err(e) => return refuse(libc::EPERM, format!("cannot open the caller: {e}")),
    };
    // The pidfd now pins the caller; if the notification is gone, so may be the caller.
    if !sys::notification_id_valid(listener, notif.id) {
        return refuse(libc::EINTR, "the caller is gone");
    }
    let socket = match sys::pidfd_getfd(&pidfd, fd) {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => {
            return refuse(libc::EBADF, format!("descriptor {fd} is not open"));
        }
        Err(e) => {
            return refuse(
                libc::EPERM,
                format!("cannot take the caller's descriptor {fd}: {e}"),
            );
        }
    };
    let kind = match sys::socket_kind(&socket) {
        Ok(k) => k,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
            return refuse(libc::ENOTSOCK, format!("descriptor {fd} is not a socket"));
        }
        Err(e) => return refuse(libc::EPERM, format!("descriptor {fd}: {e}")),
    };
    match call {
        Supervised::Listen => decide_listen(socket, kind, notif.args[1] as i32),
        Supervised::Connect => {
            let address = match read_address(listener, notif) {
                Ok(a) => a,
                Err(d) => return d,
            };
            decide_connect(profile, socket, kind, address)
        }
    }
}

/// Copies the sockaddr argument out of the caller's memory, once.
fn read_address(listener: &OwnedFd, notif: &Notification) -> Result<Vec<u8>, Decision> {
    let len = notif.args[2] as u32 as usize;
    if len > std::mem::size_of::<libc::sockaddr_storage>() {
        return Err(refuse(libc::EINVAL, "address longer than a sockaddr"));
    }
    let mut buf = vec![0u8; len];
    let read = std::fs::File::open(format!("/proc/{}/mem", notif.pid))
        .and_then(|mem| mem.read_exact_at(&mut buf, notif.args[1]));
    if let Err(e) = read {
        return Err(refuse(
            libc::EFAULT,
            format!("cannot read the caller's address: {e}"),
        ));
    }
    // The memory read was of the process that made this call, not of a recycled pid.
    if !sys::notification_id_valid(listener, notif.id) {
        return Err(refuse(libc::EINTR, "the caller is gone"));
    }
    Ok(buf)
}

fn decide_listen(socket: OwnedFd, (domain, _, _): (i32, i32, i32), backlog: i32) -> Decision {
    let local = match sys::local_address(&socket) {
        Ok(a) => a,
        Err(e) => return refuse(libc::EPERM, format!("getsockname: {e}")),
    };
    let bound = match domain {
        libc::AF_INET | libc::AF_INET6 => port_of(&local).is_some_and(|p| p != 0),
        // A pathname, not abstract (first byte NUL) nor unnamed.
        libc::AF_UNIX => local.get(2).is_some_and(|b| *b != 0),
        // Other kinds (UDP) fail in the kernel as they would anyway.
        _ => true,
    };
    if !bound {
        return refuse(
            libc::EACCES,
            "listen on a socket that is not bound to an allowed port or path (the kernel would bind an ephemeral port that no rule checks)",
        );
    }
    Decision::Listen { socket, backlog }
}

/// The port of an AF_INET/AF_INET6 sockaddr.
fn port_of(address: &[u8]) -> Option<u16> {
    let family = address.get(..2).map(|f| u16::from_ne_bytes([f[0], f[1]]))?;
    let min = match i32::from(family) {
        libc::AF_INET => std::mem::size_of::<libc::sockaddr_in>(),
        libc::AF_INET6 => std::mem::size_of::<libc::sockaddr_in6>(),
        _ => return None,
    };
    if address.len() < min {
        return None;
    }
    Some(u16::from_be_bytes([address[2], address[3]]))
}

fn decide_connect(
    profile: &Profile,
    socket: OwnedFd,
    (domain, ty, _): (i32, i32, i32),
    address: Vec<u8>,
) -> Decision {
    let Some(net) = &profile.network else {
        return refuse(libc::EPERM, "no [network] table");
    };
    let family = address
        .get(..2)
        .map(|f| i32::from(u16::from_ne_bytes([f[0], f[1]])));
    match domain {
        libc::AF_INET | libc::AF_INET6 => {
            if family == Some(libc::AF_UNSPEC) || (ty == libc::SOCK_DGRAM && net.unrestricted_udp) {
                // A disconnect; or UDP, which the profile leaves unrestricted.
                let shown = "AF_UNSPEC or UDP".into();
                return Decision::Connect {
                    socket,
                    address,
                    target: None,
                    shown,
                };
            }
            match port_of(&address) {
                Some(port) if net.connect_tcp.contains(&port) => Decision::Connect {
                    socket,
                    address,
                    target: None,
                    shown: format!("TCP port {port}"),
                },
                Some(port) => refuse(
                    libc::EACCES,
                    format!("TCP port {port} is not in connect_tcp"),
                ),
                None => refuse(libc::EAFNOSUPPORT, "not an AF_INET/AF_INET6 address"),
            }
        }
        libc::AF_UNIX => decide_unix(profile, socket, &address, family),
        _ => refuse(libc::EPERM, format!("socket family {domain}")),
    }
}

fn decide_unix(
    profile: &Profile,
    socket: OwnedFd,
    address: &[u8],
    family: Option<i32>,
) -> Decision {
    if family != Some(libc::AF_UNIX) {
        return refuse(libc::EINVAL, "not an AF_UNIX address");
    }
    let raw = &address[2..];
    let path = match raw.iter().position(|b| *b == 0) {
        Some(0) => return refuse(libc::EACCES, "abstract UNIX sockets are never granted"),
        Some(end) => &raw[..end],
        None => raw,
    };
    if path.is_empty() {
        return refuse(libc::EINVAL, "an unnamed UNIX address");
    }
    let shown = String::from_utf8_lossy(path).into_owned();
    let grants = profile.network.iter().flat_map(|n| n.unix_connect.iter());
    let Some(grant) = grants.into_iter().find(|g| {
        g.path.as_os_str().as_bytes() == path || g.resolved.as_os_str().as_bytes() == path
    }) else {
        return refuse(
            libc::EACCES,
            format!("UNIX socket {shown} is not in unix_connect"),
        );
    };
    let target = match sys::open_socket_inode(&grant.resolved) {
        Ok(t) => t,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return refuse(
                libc::EACCES,
                format!(
                    "{} has a symlink in it now (it had none at launch)",
                    grant.resolved.display()
                ),
            );
        }
        Err(e) => {
            return refuse(
                e.raw_os_error().unwrap_or(libc::ECONNREFUSED),
                format!("{}: {e}", grant.resolved.display()),
            );
        }
    };
    let via = format!("/proc/self/fd/{}", target.as_raw_fd());
    let mut address = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
    address.extend_from_slice(via.as_bytes());
    address.push(0);
    Decision::Connect {
        socket,
        address,
        target: Some(target),
        shown: format!("UNIX socket {shown}"),
    }
}

/// Performs a decided call; the value or errno to answer with.
pub fn perform(decision: Decision) -> Result<i64, i32> {
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(libc::EIO);
    match decision {
        Decision::Refuse { errno, .. } => Err(errno),
        Decision::Listen { socket, backlog } => {
            sys::listen(&socket, backlog).map(|()| 0).map_err(errno)
        }
        Decision::Connect {
            socket,
            address,
            target,
            ..
        } => {
            let result = sys::connect(&socket, &address).map(|()| 0).map_err(errno);
            drop(target);
            result
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_inet_addresses_only() {
        let v4 = [2u16.to_ne_bytes().to_vec(), vec![0x3a, 0x99], vec![0; 12]].concat();
        assert_eq!(port_of(&v4), Some(15001));
        assert_eq!(port_of(&v4[..8]), None, "short");
        let unix = [1u16.to_ne_bytes().to_vec(), b"/x".to_vec()].concat();
        assert_eq!(port_of(&unix), None);
    }
}
