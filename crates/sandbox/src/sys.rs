//! Thin safe wrappers over the raw process syscalls the launcher needs: signal masks and
//! signalfd, poll, wait, kill, a SOCK_SEQPACKET pair that carries one fd, and seccomp
//! user notifications. Each `unsafe` block says why it is sound.
//!
//! The functions the child calls between fork and exec ([`unblock_all_signals`],
//! [`set_no_new_privs`], [`send_message`]) allocate nothing.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn sigset(signals: &[i32]) -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any read.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live, writable sigset_t.
    cvt(unsafe { libc::sigemptyset(&mut set) })?;
    for sig in signals {
        // SAFETY: as above; an invalid signal number is reported as EINVAL.
        cvt(unsafe { libc::sigaddset(&mut set, *sig) })?;
    }
    Ok(set)
}

/// Blocks `signals` for the calling thread (the launcher is single-threaded) and returns
/// a signalfd that reads them.
pub fn block_into_signalfd(signals: &[i32]) -> io::Result<OwnedFd> {
    let set = sigset(signals)?;
    // SAFETY: `set` is initialised; the old mask is not wanted (null).
    cvt(unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) })?;
    // SAFETY: -1 asks for a new fd; `set` is initialised and only read.
    let fd = cvt(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })?;
    // SAFETY: signalfd returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Empties the signal mask (in the child: the plugin must not inherit blocked signals).
pub fn unblock_all_signals() -> io::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live, writable sigset_t.
    cvt(unsafe { libc::sigemptyset(&mut set) })?;
    // SAFETY: `set` is initialised; the old mask is not wanted.
    cvt(unsafe { libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) })?;
    Ok(())
}

/// Restores the default action of `signals` (in the child: a launcher started with a
/// signal ignored, e.g. under `nohup`, would otherwise pass the ignored disposition on
/// through exec, and the plugin would not end on the signals the launcher forwards).
/// `sigaction` is async-signal-safe: callable between fork and exec.
pub fn default_dispositions(signals: &[i32]) -> io::Result<()> {
    for &signal in signals {
        // SAFETY: a zeroed sigaction with SIG_DFL is a valid action; the old one is not
        // wanted.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = libc::SIG_DFL;
        // SAFETY: `action` is initialised; `signal` is a catchable signal number.
        cvt(unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) })?;
    }
    Ok(())
}

/// Reads one pending signal from a non-blocking signalfd.
pub fn read_signal(fd: &OwnedFd) -> io::Result<Option<i32>> {
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: the buffer is `info`, exactly `size` writable bytes.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    if n < 0 {
        let err = io::Error::last_os_error();
        return match err.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(err),
        };
    }
    if usize::try_from(n).ok() != Some(size) {
        return Ok(None);
    }
    Ok(i32::try_from(info.ssi_signo).ok())
}

/// Waits for readiness on `fds` (ignores EINTR as "nothing ready").
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a live, writable slice of pollfd of the given length.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(err);
    }
    Ok(usize::try_from(rc).unwrap_or(0))
}

/// How a reaped process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// exit(code)
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl Exit {
    /// The shell's convention: the code, or 128 + the signal.
    pub fn as_code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

/// Reaps one exited child, any child, without blocking.
pub fn reap_one() -> io::Result<Option<(i32, Exit)>> {
    let mut status = 0;
    // SAFETY: `status` is a live, writable int.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    if pid < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ECHILD) {
            return Ok(None);
        }
        return Err(err);
    }
    if pid == 0 {
        return Ok(None);
    }
    let exit = if libc::WIFSIGNALED(status) {
        Exit::Signal(libc::WTERMSIG(status))
    } else {
        Exit::Code(libc::WEXITSTATUS(status))
    };
    Ok(Some((pid, exit)))
}

/// Sends `signal` to `pid`.
pub fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill takes no pointers.
    cvt(unsafe { libc::kill(pid, signal) }).map(|_| ())
}

/// Makes orphaned descendants of the launcher its children, so it reaps them (tini -s).
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag, no pointers.
    cvt(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }).map(|_| ())
}

/// Sets no_new_privs: exec can no longer grant privileges (setuid, file capabilities),
/// which seccomp and Landlock require of an unprivileged caller.
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes an integer flag, no pointers.
    cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }).map(|_| ())
}

/// Drops every capability: the bounding set (so exec cannot grant any back, even to
/// uid 0), the ambient set, and the effective, permitted and inheritable sets. A plugin
/// needs none; root in a container otherwise keeps CAP_SYS_ADMIN, CAP_NET_RAW and more.
/// Unprivileged callers have nothing to drop from the bounding set (EPERM is fine).
pub fn drop_capabilities() -> io::Result<()> {
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_DROP takes an integer capability number, no pointers.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc < 0 {
            match io::Error::last_os_error().raw_os_error() {
                // Past the kernel's last capability, or no CAP_SETPCAP (unprivileged).
                Some(libc::EINVAL) | Some(libc::EPERM) => break,
                _ => return Err(io::Error::last_os_error()),
            }
        }
    }
    // SAFETY: PR_CAP_AMBIENT takes integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(io::Error::last_os_error());
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
        Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
    ];
    // SAFETY: capset reads one header and, for version 3, two data structs, all live
    // locals with the kernel's layout (#[repr(C)], u32 fields).
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A connected SOCK_SEQPACKET pair, close-on-exec.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: socketpair returned two fresh fds that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

const CMSG_SPACE: usize = 64;

#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_SPACE]);

/// Sends one message, with `fd` attached (SCM_RIGHTS) if given. Allocates nothing.
pub fn send_message(socket: RawFd, bytes: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut cmsg = CmsgBuf([0; CMSG_SPACE]);
    // SAFETY: msghdr is plain data; every field used is set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        let fd_len = std::mem::size_of::<RawFd>() as u32;
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(fd_len) } as usize;
        msg.msg_control = cmsg.0.as_mut_ptr().cast();
        msg.msg_controllen = space.min(CMSG_SPACE) as _;
        // SAFETY: msg_control points to CMSG_SPACE aligned bytes, enough for one header
        // and one fd, so CMSG_FIRSTHDR returns a valid, writable header inside it.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&msg);
            if header.is_null() {
                return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
            }
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(fd_len) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<RawFd>(), fd);
        }
    }
    // SAFETY: `msg` points at live locals (`iov`, `bytes`, `cmsg`) for the whole call.
    let n = unsafe { libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message without blocking; returns its bytes and the fd it carried.
pub fn recv_message(socket: &OwnedFd, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cmsg = CmsgBuf([0; CMSG_SPACE]);
    // SAFETY: msghdr is plain data; every field used is set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_SPACE as _;
    // SAFETY: `msg` points at live, writable locals (`iov` over `buf`, `cmsg`).
    let n = unsafe {
        libc::recvmsg(
            socket.as_raw_fd(),
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut received = None;
    // SAFETY: the kernel filled msg_control/msg_controllen; the CMSG_* macros walk only
    // within that buffer, and an SCM_RIGHTS payload holds fds the kernel just installed
    // in this process for us to own.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let fd = std::ptr::read_unaligned(libc::CMSG_DATA(header).cast::<RawFd>());
                received = Some(OwnedFd::from_raw_fd(fd));
            }
            header = libc::CMSG_NXTHDR(&msg, header);
        }
    }
    Ok((usize::try_from(n).unwrap_or(0), received))
}

/// A pending seccomp user notification.
pub struct Notification {
    /// Its id, for the response.
    pub id: u64,
    /// The calling thread (the launcher's pid namespace).
    pub pid: u32,
    /// Syscall number.
    pub nr: i64,
    /// The six arguments.
    pub args: [u64; 6],
}

/// Receives one notification (blocks until one is pending; call after poll says so).
/// `Ok(None)`: the caller died before it could be read.
pub fn notification_receive(listener: &OwnedFd) -> io::Result<Option<Notification>> {
    // SAFETY: seccomp_notif is plain data and must be zeroed before RECV.
    let mut notif: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: SECCOMP_IOCTL_NOTIF_RECV writes one seccomp_notif into the live local.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_RECV as _,
            &mut notif as *mut libc::seccomp_notif,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::EINTR) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(Notification {
        id: notif.id,
        pid: notif.pid,
        nr: i64::from(notif.data.nr),
        args: notif.data.args,
    }))
}

/// Answers a notification: let the call run (`error == 0` and `proceed`), or fail it.
pub fn notification_respond(
    listener: &OwnedFd,
    id: u64,
    proceed: bool,
    error: i32,
) -> io::Result<()> {
    let resp = libc::seccomp_notif_resp {
        id,
        val: 0,
        error: if proceed { 0 } else { -error },
        flags: if proceed {
            libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32
        } else {
            0
        },
    };
    // SAFETY: SECCOMP_IOCTL_NOTIF_SEND reads one seccomp_notif_resp from the live local.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SEND as _,
            &resp as *const libc::seccomp_notif_resp,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        // ENOENT: the caller is gone (killed, or its wait was interrupted).
        if err.raw_os_error() == Some(libc::ENOENT) {
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
}

/// Starts a new session: the plugin loses its controlling terminal, so the terminal's
/// input cannot be driven from inside (TIOCSTI needs it) and terminal signals reach only
/// the launcher, which forwards them.
pub fn setsid() -> io::Result<()> {
    // SAFETY: setsid takes no arguments.
    cvt(unsafe { libc::setsid() }).map(|_| ())
}

/// Marks every descriptor from 3 up close-on-exec, except those in `keep` (sorted): they
/// are closed by the kernel at exec, while the launcher's own close-on-exec pipes keep
/// working until then. Allocates nothing.
pub fn cloexec_above_stdio(keep: &[i32]) -> io::Result<()> {
    let mut first: u32 = 3;
    let ranges = keep
        .iter()
        .filter_map(|k| u32::try_from(*k).ok())
        .map(|k| (k, k.saturating_add(1)))
        .chain(std::iter::once((u32::MAX, u32::MAX)));
    for (gap_end, next) in ranges {
        if gap_end > first {
            mark_cloexec(first, gap_end - 1)?;
        }
        first = first.max(next);
    }
    Ok(())
}

fn mark_cloexec(first: u32, last: u32) -> io::Result<()> {
    // SAFETY: close_range takes integers only.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            last,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EINVAL)) {
        return Err(err);
    }
    // Before Linux 5.11: one fcntl per possible descriptor, up to the soft limit.
    // SAFETY: rlimit is plain data written by getrlimit.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `limit` is a live, writable rlimit.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    let top = u32::try_from(limit.rlim_cur.min(1 << 20))
        .unwrap_or(1 << 20)
        .min(last.saturating_add(1));
    for fd in first..top {
        // SAFETY: F_SETFD on a number that may or may not be open: EBADF is ignored.
        unsafe { libc::fcntl(fd as i32, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}

/// A pidfd for the thread `tid` (as a seccomp notification names it): the thread itself
/// where the kernel allows it (PIDFD_THREAD, Linux 6.9), else its thread group leader.
pub fn pidfd_for_thread(tid: u32) -> io::Result<OwnedFd> {
    let open = |pid: libc::pid_t, flags: libc::c_uint| -> io::Result<OwnedFd> {
        // SAFETY: pidfd_open takes integers only.
        let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, flags) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pidfd_open returned a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
    };
    let pid = libc::pid_t::try_from(tid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    if let Ok(fd) = open(pid, libc::PIDFD_THREAD) {
        return Ok(fd);
    }
    match open(pid, 0) {
        Ok(fd) => Ok(fd),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let status = std::fs::read_to_string(format!("/proc/{tid}/status"))?;
            let tgid = status
                .lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse::<libc::pid_t>().ok())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
            open(tgid, 0)
        }
        Err(e) => Err(e),
    }
}

/// A duplicate of descriptor `fd` of the process behind `pidfd` (the same open file).
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes integers only.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_getfd returned a fresh descriptor (close-on-exec) that nothing owns.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
}

/// Whether this kernel has pidfd_getfd (Linux 5.6).
pub fn has_pidfd_getfd() -> bool {
    // SAFETY: integers only; -1 is never a pidfd, so this only tells EBADF from ENOSYS.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_getfd, -1, 0, 0) };
    rc >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS)
}

/// Whether notification `id` is still pending (its caller alive and waiting): checked
/// after reading the caller's memory, so a recycled pid is never trusted.
pub fn notification_id_valid(listener: &OwnedFd, id: u64) -> bool {
    // SAFETY: SECCOMP_IOCTL_NOTIF_ID_VALID reads one u64 from the live local.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_ID_VALID as _,
            &id as *const u64,
        )
    };
    rc == 0
}

/// Answers a notification with the result of a call the launcher made itself: `Ok(value)`
/// is returned to the caller, `Err(errno)` fails it. Never lets the caller's own call run.
pub fn notification_answer(
    listener: &OwnedFd,
    id: u64,
    result: Result<i64, i32>,
) -> io::Result<()> {
    let (val, error) = match result {
        Ok(v) => (v, 0),
        Err(errno) => (0, -errno.abs()),
    };
    let resp = libc::seccomp_notif_resp {
        id,
        val,
        error,
        flags: 0,
    };
    // SAFETY: SECCOMP_IOCTL_NOTIF_SEND reads one seccomp_notif_resp from the live local.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SEND as _,
            &resp as *const libc::seccomp_notif_resp,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOENT) {
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
}

/// A socket's (domain, type, protocol).
pub fn socket_kind(fd: &OwnedFd) -> io::Result<(i32, i32, i32)> {
    let get = |option: libc::c_int| -> io::Result<i32> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into the live int.
        cvt(unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        })?;
        Ok(value)
    };
    Ok((
        get(libc::SO_DOMAIN)?,
        get(libc::SO_TYPE)?,
        get(libc::SO_PROTOCOL)?,
    ))
}

/// A socket's local address, as raw sockaddr bytes.
pub fn local_address(fd: &OwnedFd) -> io::Result<Vec<u8>> {
    // SAFETY: sockaddr_storage is plain data.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into the live storage.
    cvt(unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    })?;
    let len = (len as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: the first `len` bytes of `storage` were written by the kernel.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&storage as *const libc::sockaddr_storage).cast::<u8>(),
            len,
        )
    };
    Ok(bytes.to_vec())
}

/// connect(2) with raw sockaddr bytes.
pub fn connect(fd: &OwnedFd, address: &[u8]) -> io::Result<()> {
    // SAFETY: sockaddr_storage is plain data; `address` is copied in, bounded by its size.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = address
        .len()
        .min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: copies `len` bytes into the storage, which holds at least that many.
    unsafe {
        std::ptr::copy_nonoverlapping(
            address.as_ptr(),
            (&mut storage as *mut libc::sockaddr_storage).cast::<u8>(),
            len,
        );
    }
    // SAFETY: `storage` is a live sockaddr of `len` meaningful bytes.
    cvt(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// listen(2).
pub fn listen(fd: &OwnedFd, backlog: i32) -> io::Result<()> {
    // SAFETY: listen takes integers only.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) }).map(|_| ())
}

/// Opens a UNIX socket's inode (O_PATH) at `path` without following any symlink in it,
/// and checks it is a socket.
pub fn open_socket_inode(path: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain data (libc marks it non-exhaustive); zeroed, then set.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads the NUL-terminated path and one open_how, both live locals.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(rc as RawFd) };
    // SAFETY: stat is plain data written by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat into the live local.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::from_raw_os_error(libc::ECONNREFUSED));
    }
    Ok(fd)
}
