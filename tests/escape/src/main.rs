//! nexus-escape-probe: a test plugin that tries one escape per run, for the sandbox
//! escape suite (tests/tests/sandbox.rs).
//!
//! `nexus-escape-probe ESCAPE [ARGS]` prints `blocked <what>: <error>` and exits 3 when
//! the sandbox stopped it, prints `ESCAPED <what>` and exits 42 when it got through. A
//! process killed by the sandbox prints nothing after the attempt.
//!
//! `nexus-escape-probe --allowed ESCAPE [ARGS]` is the same attempt made where the profile
//! permits it: `ok <what>` and exit 0 when it works, `FAILED <what>: <error>` and exit 1.
//!
//! `behave` is the well-behaved plugin: it reads, writes and connects where it is allowed
//! and exits with the code it is given. A few commands (`shm-create`, `mq-create`,
//! `tty-harness`, ...) are harness helpers the tests run *outside* the sandbox to set up
//! what the sandboxed probe then attacks.

use std::ffi::CString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;

const BLOCKED: u8 = 3;
const ESCAPED: u8 = 42;
const USAGE: u8 = 64;

/// How the outcome of an attempt is worded: an escape attempt or a permitted action.
#[derive(Clone, Copy)]
enum Mode {
    Escape,
    Allowed,
}

fn outcome(mode: Mode, what: &str, result: std::io::Result<()>) -> ExitCode {
    match (mode, result) {
        (Mode::Escape, Ok(())) => {
            println!("ESCAPED {what}");
            ExitCode::from(ESCAPED)
        }
        (Mode::Escape, Err(e)) => {
            println!("blocked {what}: {e}");
            ExitCode::from(BLOCKED)
        }
        (Mode::Allowed, Ok(())) => {
            println!("ok {what}");
            ExitCode::SUCCESS
        }
        (Mode::Allowed, Err(e)) => {
            println!("FAILED {what}: {e}");
            ExitCode::from(1)
        }
    }
}

fn check(rc: libc::c_long) -> std::io::Result<libc::c_long> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn ok(rc: libc::c_long) -> std::io::Result<()> {
    check(rc).map(|_| ())
}

#[allow(unsafe_code)]
fn raw_syscall(
    nr: libc::c_long,
    a: libc::c_long,
    b: libc::c_long,
    c: libc::c_long,
) -> libc::c_long {
    // SAFETY: every call site passes integer arguments or pointers to live locals of the
    // size the syscall expects; the probe exists to make these calls.
    unsafe { libc::syscall(nr, a, b, c, 0, 0, 0) }
}

#[allow(unsafe_code)]
fn raw_syscall6(nr: libc::c_long, args: [libc::c_long; 6]) -> libc::c_long {
    // SAFETY: as `raw_syscall`: integers or pointers to live locals of the right size.
    unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]) }
}

/// A socket descriptor owned by the probe (closed on drop).
#[allow(unsafe_code)]
fn socket(domain: i32, ty: i32, protocol: i32) -> std::io::Result<OwnedFd> {
    let fd = check(raw_syscall(
        libc::SYS_socket,
        domain as _,
        ty as _,
        protocol as _,
    ))?;
    // SAFETY: socket returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn sockaddr_in(port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn sockaddr_in6_mapped(port: u16) -> libc::sockaddr_in6 {
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12..].copy_from_slice(&[127, 0, 0, 1]);
    libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: port.to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr { s6_addr: addr },
        sin6_scope_id: 0,
    }
}

fn sockaddr_un(path: &[u8]) -> (libc::sockaddr_un, u32) {
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    for (d, s) in addr.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + path.len().min(108);
    (addr, len as u32)
}

fn connect<T>(fd: &OwnedFd, addr: &T, len: u32) -> std::io::Result<()> {
    ok(raw_syscall(
        libc::SYS_connect,
        fd.as_raw_fd() as _,
        (addr as *const T) as _,
        len as _,
    ))
}

fn listen(fd: &OwnedFd) -> std::io::Result<()> {
    ok(raw_syscall(libc::SYS_listen, fd.as_raw_fd() as _, 16, 0))
}

fn bind<T>(fd: &OwnedFd, addr: &T) -> std::io::Result<()> {
    ok(raw_syscall(
        libc::SYS_bind,
        fd.as_raw_fd() as _,
        (addr as *const T) as _,
        std::mem::size_of::<T>() as _,
    ))
}

/// The local port of a bound socket.
fn local_port(fd: &OwnedFd) -> std::io::Result<u16> {
    let mut addr = sockaddr_in(0);
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    ok(raw_syscall(
        libc::SYS_getsockname,
        fd.as_raw_fd() as _,
        (&mut addr as *mut libc::sockaddr_in) as _,
        (&mut len as *mut libc::socklen_t) as _,
    ))?;
    Ok(u16::from_be(addr.sin_port))
}

/// Connects `fd` (a TCP-like stream socket) to 127.0.0.1:`port` and checks the peer
/// answers, as the echo listeners of the tests do.
fn talk(fd: OwnedFd) -> std::io::Result<()> {
    let mut stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    stream.write_all(b"hello")?;
    let mut buf = [0u8; 2];
    stream.read_exact(&mut buf)?;
    Ok(())
}

fn port_arg(s: &str) -> u16 {
    s.parse::<u16>().unwrap_or(1)
}

fn number(s: &str) -> libc::c_long {
    if let Some(hex) = s.strip_prefix("0x") {
        libc::c_long::from_str_radix(hex, 16).unwrap_or(-1)
    } else {
        s.parse::<libc::c_long>().unwrap_or(-1)
    }
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mode = if args.first().map(String::as_str) == Some("--allowed") {
        args.remove(0);
        Mode::Allowed
    } else {
        Mode::Escape
    };
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    // Flush before any attempt that may kill us.
    let announce = |what: &str| {
        println!("trying {what}");
        let _ = std::io::stdout().flush();
    };
    let escape = arg(0);
    announce(&escape);
    let out = |what: &str, result: std::io::Result<()>| outcome(mode, what, result);
    match escape.as_str() {
        "read" => out("read", std::fs::read(arg(1)).map(|_| ())),
        "write" => out("write", std::fs::write(arg(1), b"pwned")),
        "exec" => {
            // `exec PATH [ARGS]`: escaped only if the program ran and succeeded.
            let rest: Vec<&str> = match args.get(2..) {
                Some(rest) if !rest.is_empty() => rest.iter().map(String::as_str).collect(),
                _ => vec!["-c", "true"],
            };
            out(
                "exec",
                std::process::Command::new(arg(1))
                    .args(rest)
                    .status()
                    .and_then(|status| {
                        if status.success() {
                            Ok(())
                        } else {
                            Err(std::io::Error::other(format!(
                                "{status} (os error {})",
                                libc::EACCES
                            )))
                        }
                    }),
            )
        }
        "connect" => out(
            "connect",
            TcpStream::connect(("127.0.0.1", port_arg(&arg(1)))).map(|_| ()),
        ),
        "bind" => out(
            "bind",
            std::net::TcpListener::bind("127.0.0.1:0").map(|_| ()),
        ),
        "ptrace" => out(
            "ptrace",
            ok(raw_syscall(
                libc::SYS_ptrace,
                libc::PTRACE_TRACEME as _,
                0,
                0,
            )),
        ),
        "mount" => {
            let dir = std::env::temp_dir();
            let source = c"none";
            let fstype = c"tmpfs";
            let target = CString::new(dir.to_string_lossy().as_bytes()).unwrap_or_default();
            out(
                "mount",
                ok(raw_syscall(
                    libc::SYS_mount,
                    source.as_ptr() as _,
                    target.as_ptr() as _,
                    fstype.as_ptr() as _,
                )),
            )
        }
        "unshare-user" => out(
            "unshare(CLONE_NEWUSER)",
            ok(raw_syscall(
                libc::SYS_unshare,
                libc::CLONE_NEWUSER as _,
                0,
                0,
            )),
        ),
        "unshare-net" => out(
            "unshare(CLONE_NEWNET)",
            ok(raw_syscall(
                libc::SYS_unshare,
                libc::CLONE_NEWNET as _,
                0,
                0,
            )),
        ),
        "io-uring" => {
            let mut params = [0u8; 120]; // struct io_uring_params
            out(
                "io_uring_setup",
                ok(raw_syscall(
                    libc::SYS_io_uring_setup,
                    4,
                    params.as_mut_ptr() as _,
                    0,
                )),
            )
        }
        "raw-socket" => out(
            "socket(AF_INET, SOCK_RAW)",
            socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
            .map(|_| ()),
        ),
        "packet-socket" => out(
            "socket(AF_PACKET)",
            socket(libc::AF_PACKET, libc::SOCK_RAW, 0).map(|_| ()),
        ),
        "udp-socket" => out(
            "socket(AF_INET, SOCK_DGRAM)",
            std::net::UdpSocket::bind("127.0.0.1:0").map(|_| ()),
        ),
        // `socket DOMAIN TYPE PROTOCOL` (numbers, 0x for hex): escaped if the kernel gave
        // a socket of that kind.
        "socket" => out(
            &format!("socket({}, {}, {})", arg(1), arg(2), arg(3)),
            ok(raw_syscall(
                libc::SYS_socket,
                number(&arg(1)),
                number(&arg(2)),
                number(&arg(3)),
            )),
        ),
        // `socketpair DOMAIN TYPE`.
        "socketpair" => {
            let mut fds = [0i32; 2];
            out(
                &format!("socketpair({}, {})", arg(1), arg(2)),
                ok(raw_syscall6(
                    libc::SYS_socketpair,
                    [
                        number(&arg(1)),
                        number(&arg(2)),
                        0,
                        fds.as_mut_ptr() as _,
                        0,
                        0,
                    ],
                )),
            )
        }
        // MPTCP (protocol 262) is plain TCP on the wire but not IPPROTO_TCP to Landlock.
        "mptcp" => out(
            "MPTCP connect",
            socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_MPTCP).and_then(|fd| {
                connect(
                    &fd,
                    &sockaddr_in(port_arg(&arg(1))),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )?;
                talk(fd)
            }),
        ),
        "mptcp6" => out(
            "MPTCP over AF_INET6 connect",
            socket(libc::AF_INET6, libc::SOCK_STREAM, libc::IPPROTO_MPTCP).and_then(|fd| {
                connect(
                    &fd,
                    &sockaddr_in6_mapped(port_arg(&arg(1))),
                    std::mem::size_of::<libc::sockaddr_in6>() as u32,
                )?;
                talk(fd)
            }),
        ),
        // The type carries SOCK_NONBLOCK | SOCK_CLOEXEC: a filter comparing the whole
        // argument with SOCK_STREAM would not see a stream socket.
        "mptcp-flags" => out(
            "MPTCP (SOCK_STREAM|SOCK_NONBLOCK|SOCK_CLOEXEC) connect",
            socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::IPPROTO_MPTCP,
            )
            .and_then(|fd| {
                ok(raw_syscall(
                    libc::SYS_fcntl,
                    fd.as_raw_fd() as _,
                    libc::F_SETFL as _,
                    0,
                ))?;
                connect(
                    &fd,
                    &sockaddr_in(port_arg(&arg(1))),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )?;
                talk(fd)
            }),
        ),
        "mptcp-listen" => out(
            "MPTCP bind + listen",
            socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_MPTCP).and_then(|fd| {
                bind(&fd, &sockaddr_in(0))?;
                listen(&fd)?;
                println!("listening on port {}", local_port(&fd)?);
                Ok(())
            }),
        ),
        // TCP Fast Open: sendto(MSG_FASTOPEN) connects without connect(2).
        "tcp-fastopen" => out(
            "TCP Fast Open sendto",
            socket(libc::AF_INET, libc::SOCK_STREAM, 0).and_then(|fd| {
                let addr = sockaddr_in(port_arg(&arg(1)));
                check(raw_syscall6(
                    libc::SYS_sendto,
                    [
                        fd.as_raw_fd() as _,
                        b"hello".as_ptr() as _,
                        5,
                        libc::MSG_FASTOPEN as _,
                        (&addr as *const libc::sockaddr_in) as _,
                        std::mem::size_of::<libc::sockaddr_in>() as _,
                    ],
                ))?;
                let mut stream = TcpStream::from(fd);
                stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
                let mut buf = [0u8; 2];
                stream.read_exact(&mut buf)
            }),
        ),
        // listen(2) on a socket that was never bound: the kernel binds an ephemeral port
        // itself, without the bind hook Landlock checks.
        "listen-unbound" => out(
            "listen without bind",
            socket(libc::AF_INET, libc::SOCK_STREAM, 0).and_then(|fd| {
                listen(&fd)?;
                println!("listening on port {}", local_port(&fd)?);
                Ok(())
            }),
        ),
        // connect (to anything), disconnect, then listen: the ephemeral port is released.
        "listen-after-disconnect" => out(
            "listen after connect + AF_UNSPEC disconnect",
            socket(libc::AF_INET, libc::SOCK_STREAM, 0).and_then(|fd| {
                let _ = connect(
                    &fd,
                    &sockaddr_in(port_arg(&arg(1))),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                );
                let unspec = libc::sockaddr {
                    sa_family: libc::AF_UNSPEC as libc::sa_family_t,
                    sa_data: [0; 14],
                };
                let _ = connect(&fd, &unspec, std::mem::size_of::<libc::sockaddr>() as u32);
                listen(&fd)?;
                println!("listening on port {}", local_port(&fd)?);
                Ok(())
            }),
        ),
        // bind 127.0.0.1:PORT and listen.
        "serve" => out(
            &format!("bind + listen on port {}", arg(1)),
            socket(libc::AF_INET, libc::SOCK_STREAM, 0).and_then(|fd| {
                bind(&fd, &sockaddr_in(port_arg(&arg(1))))?;
                listen(&fd)
            }),
        ),
        // A pathname UNIX socket outside the plugin's grants (e.g. a container runtime's).
        "unix-connect" => out(
            &format!("connect to UNIX socket {}", arg(1)),
            (|| {
                let mut stream = std::os::unix::net::UnixStream::connect(arg(1))?;
                stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
                stream.write_all(b"hello")?;
                let mut buf = [0u8; 2];
                stream.read_exact(&mut buf)
            })(),
        ),
        // The granted path swapped for a symlink to another socket (the plugin may write
        // the folder it is in).
        "unix-swap" => out(
            &format!("connect to {} after making it a link to {}", arg(1), arg(2)),
            (|| {
                let _ = std::fs::remove_file(arg(1));
                std::os::unix::fs::symlink(arg(2), arg(1))?;
                let mut stream = std::os::unix::net::UnixStream::connect(arg(1))?;
                stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
                stream.write_all(b"hello")?;
                let mut buf = [0u8; 2];
                stream.read_exact(&mut buf)
            })(),
        ),
        // `unix-race PORT PATH`: connect(fd, addr) while another thread swaps both the
        // descriptor (a TCP or a UNIX socket) and the address (TCP PORT or UNIX PATH): a
        // supervisor that checked, then let the call continue, would connect a UNIX socket
        // to PATH some of the time.
        "unix-race" => out(
            &format!("race the connect check to reach {}", arg(2)),
            unix_race(port_arg(&arg(1)), &arg(2)),
        ),
        "unix-seqpacket" => out(
            &format!("SOCK_SEQPACKET connect to {}", arg(1)),
            socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0).and_then(|fd| {
                let (addr, len) = sockaddr_un(arg(1).as_bytes());
                connect(&fd, &addr, len)
            }),
        ),
        // A UNIX datagram carries its destination in sendto, not connect.
        "unix-dgram" => out(
            &format!("sendto UNIX datagram socket {}", arg(1)),
            std::os::unix::net::UnixDatagram::unbound()
                .and_then(|s| s.send_to(b"hello", arg(1)).map(|_| ())),
        ),
        "socketpair-dgram-sendto" => {
            let mut fds = [0i32; 2];
            out(
                &format!("socketpair(AF_UNIX, SOCK_DGRAM) sendto {}", arg(1)),
                ok(raw_syscall6(
                    libc::SYS_socketpair,
                    [
                        libc::AF_UNIX as _,
                        libc::SOCK_DGRAM as _,
                        0,
                        fds.as_mut_ptr() as _,
                        0,
                        0,
                    ],
                ))
                .and_then(|()| {
                    let (addr, len) = sockaddr_un(arg(1).as_bytes());
                    ok(raw_syscall6(
                        libc::SYS_sendto,
                        [
                            fds[0] as _,
                            b"hello".as_ptr() as _,
                            5,
                            0,
                            (&addr as *const libc::sockaddr_un) as _,
                            len as _,
                        ],
                    ))
                }),
            )
        }
        "abstract-connect" => out(
            &format!("connect to abstract UNIX socket @{}", arg(1)),
            (|| {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(arg(1))?;
                std::os::unix::net::UnixStream::connect_addr(&addr).map(|_| ())
            })(),
        ),
        // socketpair(AF_UNIX, SOCK_STREAM): a self-pipe, as asyncio makes one.
        "self-pipe" => out(
            "socketpair(AF_UNIX, SOCK_STREAM) round trip",
            std::os::unix::net::UnixStream::pair().and_then(|(mut a, mut b)| {
                a.write_all(b"x")?;
                let mut buf = [0u8; 1];
                b.read_exact(&mut buf)
            }),
        ),
        // Keystrokes pushed into the terminal on stdin: the shell reads them after we exit.
        "tiocsti" => out(
            "ioctl(0, TIOCSTI)",
            arg(1)
                .bytes()
                .chain(std::iter::once(b'\n'))
                .try_for_each(|c| {
                    ok(raw_syscall(
                        libc::SYS_ioctl,
                        0,
                        libc::TIOCSTI as _,
                        (&c as *const u8) as _,
                    ))
                }),
        ),
        // The same with bits above 32 in the command: the kernel truncates it to 32 bits.
        "tiocsti-high-bits" => out(
            "ioctl(0, TIOCSTI | 1 << 32)",
            arg(1)
                .bytes()
                .chain(std::iter::once(b'\n'))
                .try_for_each(|c| {
                    ok(raw_syscall(
                        libc::SYS_ioctl,
                        0,
                        (1 << 32) | libc::TIOCSTI as libc::c_long,
                        (&c as *const u8) as _,
                    ))
                }),
        ),
        // TIOCLINUX subcode 3 pastes the console selection as input.
        "tioclinux" => {
            let subcode = [3u8; 1];
            out(
                "ioctl(0, TIOCLINUX, TIOCL_PASTESEL)",
                ok(raw_syscall(
                    libc::SYS_ioctl,
                    0,
                    libc::TIOCLINUX as _,
                    subcode.as_ptr() as _,
                )),
            )
        }
        "tiocsctty" => out(
            "ioctl(0, TIOCSCTTY)",
            ok(raw_syscall(libc::SYS_ioctl, 0, libc::TIOCSCTTY as _, 1)),
        ),
        // A controlling terminal: escaped if /proc/self/stat's tty_nr is not 0.
        "ctty" => out(
            "controlling terminal",
            std::fs::read_to_string("/proc/self/stat").and_then(|stat| {
                let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
                let tty: i64 = after
                    .split_whitespace()
                    .nth(4)
                    .and_then(|f| f.parse().ok())
                    .unwrap_or(-1);
                if tty == 0 {
                    Err(std::io::Error::other("tty_nr 0 (os error 25)"))
                } else {
                    println!("tty_nr {tty}");
                    Ok(())
                }
            }),
        ),
        // A descriptor the caller left open: read it directly (not by path).
        "read-fd" => {
            let mut buf = [0u8; 64];
            out(
                &format!("read inherited fd {}", arg(1)),
                check(raw_syscall(
                    libc::SYS_read,
                    number(&arg(1)),
                    buf.as_mut_ptr() as _,
                    buf.len() as _,
                ))
                .map(|n| println!("read {n} bytes")),
            )
        }
        "shm-read" => out(
            &format!("shmat segment {}", arg(1)),
            shm_read(number(&arg(1)) as i32).and_then(|text| {
                println!("read {text:?}");
                if text.starts_with("nexus-shm-secret") {
                    Ok(())
                } else {
                    Err(std::io::Error::other("unexpected contents"))
                }
            }),
        ),
        "msgget" => out(
            "msgget(IPC_PRIVATE)",
            check(raw_syscall(
                libc::SYS_msgget,
                libc::IPC_PRIVATE as _,
                (libc::IPC_CREAT | 0o600) as _,
                0,
            ))
            .map(|id| {
                let _ = raw_syscall(libc::SYS_msgctl, id, libc::IPC_RMID as _, 0);
            }),
        ),
        "semget" => out(
            "semget(IPC_PRIVATE)",
            check(raw_syscall(
                libc::SYS_semget,
                libc::IPC_PRIVATE as _,
                1,
                (libc::IPC_CREAT | 0o600) as _,
            ))
            .map(|id| {
                let _ = raw_syscall(libc::SYS_semctl, id, 0, libc::IPC_RMID as _);
            }),
        ),
        "mq-open" => out(
            &format!("mq_open({})", arg(1)),
            CString::new(arg(1))
                .map_err(std::io::Error::other)
                .and_then(|name| {
                    ok(raw_syscall6(
                        libc::SYS_mq_open,
                        [name.as_ptr() as _, libc::O_RDWR as _, 0, 0, 0, 0],
                    ))
                }),
        ),
        // Own seccomp filters that answer ptrace themselves, so the launcher's kill rule
        // never fires: escaped if ptrace returns at all.
        "mask-kill" => mask_kill(mode, Installer::Seccomp, libc::SECCOMP_RET_USER_NOTIF),
        "mask-kill-errno" => mask_kill(
            mode,
            Installer::Seccomp,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ),
        "mask-kill-prctl" => mask_kill(mode, Installer::Prctl, libc::SECCOMP_RET_USER_NOTIF),
        "memfd-exec" => out(
            "execveat(memfd, AT_EMPTY_PATH)",
            memfd_exec(MemfdExec::Execveat),
        ),
        "memfd-proc-exec" => out("execve(/proc/self/fd/<memfd>)", memfd_exec(MemfdExec::Proc)),
        "memfd-noexec-exec" => out(
            "execveat(MFD_NOEXEC_SEAL memfd)",
            memfd_exec(MemfdExec::NoexecSeal),
        ),
        "memfd-noexec-proc-exec" => out(
            "execve(/proc/self/fd/<MFD_NOEXEC_SEAL memfd>)",
            memfd_exec(MemfdExec::NoexecSealProc),
        ),
        // The launcher holds the seccomp listener: with it the plugin could answer its own
        // kill rules. Take any descriptor of the parent with pidfd_getfd.
        "steal-fds" => out("pidfd_getfd on the launcher", steal_parent_fds()),
        "memfd-noexec" => out(
            "memfd_create(MFD_NOEXEC_SEAL)",
            ok(raw_syscall(
                libc::SYS_memfd_create,
                c"scratch".as_ptr() as _,
                (libc::MFD_CLOEXEC | libc::MFD_NOEXEC_SEAL) as _,
                0,
            )),
        ),
        "tmpfile-exec" => out(
            &format!("execveat(O_TMPFILE in {}, AT_EMPTY_PATH)", arg(1)),
            tmpfile_exec(&arg(1)),
        ),
        "file-exec" => out(
            &format!("execve(a copy of itself in {})", arg(1)),
            file_exec(&arg(1)),
        ),
        // What an executed copy of the probe runs: proves the exec happened.
        "marker" => {
            println!("ESCAPED {} (a new program ran)", arg(1));
            ExitCode::from(ESCAPED)
        }
        #[cfg(target_arch = "x86_64")]
        "socketcall-i386" => out("int 0x80 socketcall(SYS_SOCKET)", socketcall_i386()),
        "bpf" => {
            let mut attr = [0u8; 128];
            out(
                "bpf",
                ok(raw_syscall(libc::SYS_bpf, 0, attr.as_mut_ptr() as _, 128)),
            )
        }
        "kill-parent" => out(
            "kill(launcher)",
            ok(raw_syscall(
                libc::SYS_kill,
                std::os::unix::process::parent_id() as _,
                libc::SIGKILL as _,
                0,
            )),
        ),
        #[cfg(target_arch = "x86_64")]
        "x32-ptrace" => out(
            "x32 ptrace",
            ok(raw_syscall(
                0x4000_0000 | 521,
                libc::PTRACE_TRACEME as _,
                0,
                0,
            )),
        ),
        "caps" => {
            // Any effective or bounding capability left is an escape route for root.
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .map(|v| u64::from_str_radix(v, 16).unwrap_or(u64::MAX))
                    .unwrap_or(u64::MAX)
            };
            let (eff, bnd) = (field("CapEff:"), field("CapBnd:"));
            out(
                "capabilities",
                if eff != 0 || bnd != 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::from_raw_os_error(libc::EPERM))
                },
            )
        }
        "getcpu" => {
            let mut cpu = 0u32;
            let result = check(raw_syscall(
                libc::SYS_getcpu,
                (&mut cpu as *mut u32) as _,
                0,
                0,
            ));
            println!("getcpu: {result:?}");
            ExitCode::SUCCESS
        }
        "behave" => behave(&arg(1), &arg(2), &arg(3), &arg(4)),
        "wait" => {
            // Runs until a signal ends it.
            println!("ready");
            let _ = std::io::stdout().flush();
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        // ---- harness helpers, run by the tests outside the sandbox ----
        "shm-create" => match shm_create() {
            Ok(id) => {
                println!("{id}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("shm-create: {e}");
                ExitCode::from(1)
            }
        },
        "shm-remove" => {
            let _ = raw_syscall(libc::SYS_shmctl, number(&arg(1)), libc::IPC_RMID as _, 0);
            ExitCode::SUCCESS
        }
        "mq-create" => match CString::new(arg(1)) {
            Ok(name) => {
                let rc = raw_syscall6(
                    libc::SYS_mq_open,
                    [
                        name.as_ptr() as _,
                        (libc::O_RDWR | libc::O_CREAT) as _,
                        0o600,
                        0,
                        0,
                        0,
                    ],
                );
                if rc < 0 {
                    eprintln!("mq-create: {}", std::io::Error::last_os_error());
                    return ExitCode::from(1);
                }
                ExitCode::SUCCESS
            }
            Err(_) => ExitCode::from(USAGE),
        },
        "mq-remove" => {
            if let Ok(name) = CString::new(arg(1)) {
                let _ = raw_syscall(libc::SYS_mq_unlink, name.as_ptr() as _, 0, 0);
            }
            ExitCode::SUCCESS
        }
        "tty-harness" => tty_harness(args.get(1..).unwrap_or_default()),
        _ => {
            eprintln!("usage: nexus-escape-probe [--allowed] ESCAPE [ARGS] (see the source)");
            ExitCode::from(USAGE)
        }
    }
}

/// See `unix-race` in `main`.
#[allow(unsafe_code)]
fn unix_race(port: u16, path: &str) -> std::io::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    // The address buffer both threads share: rewritten in place by the flipper.
    #[repr(C)]
    struct Shared {
        bytes: std::cell::UnsafeCell<[u8; 112]>,
    }
    // SAFETY: the data race on `bytes` is the point of the probe; it is plain bytes.
    unsafe impl Sync for Shared {}
    let tcp = sockaddr_in(port);
    let (unix, unix_len) = sockaddr_un(path.as_bytes());
    let as_bytes = |p: *const u8, n: usize| {
        // SAFETY: reads `n` bytes of a live local sockaddr.
        unsafe { std::slice::from_raw_parts(p, n) }.to_vec()
    };
    let tcp_bytes = as_bytes((&tcp as *const libc::sockaddr_in).cast(), 16);
    let unix_bytes = as_bytes(
        (&unix as *const libc::sockaddr_un).cast(),
        unix_len as usize,
    );
    let shared = Arc::new(Shared {
        bytes: std::cell::UnsafeCell::new([0; 112]),
    });
    let target = 200; // the descriptor number both threads fight over
    let stop = Arc::new(AtomicBool::new(false));
    let flips = Arc::new(AtomicUsize::new(0));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut attempts = 0usize;
    let mut escaped = false;
    while std::time::Instant::now() < deadline && !escaped {
        let u = socket(libc::AF_UNIX, libc::SOCK_STREAM, 0)?;
        let t = socket(libc::AF_INET, libc::SOCK_STREAM, 0)?;
        let (uf, tf) = (u.as_raw_fd(), t.as_raw_fd());
        let flipper = {
            let (shared, stop, flips) = (shared.clone(), stop.clone(), flips.clone());
            let (tcp_bytes, unix_bytes) = (tcp_bytes.clone(), unix_bytes.clone());
            std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let (fd, bytes) = if i.is_multiple_of(2) {
                        (uf, &unix_bytes)
                    } else {
                        (tf, &tcp_bytes)
                    };
                    // SAFETY: writes at most 112 bytes into the shared buffer; dup2 takes
                    // integers.
                    unsafe {
                        let dst = (*shared.bytes.get()).as_mut_ptr();
                        std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len());
                        libc::dup2(fd, target);
                    }
                    i += 1;
                    flips.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        for _ in 0..20 {
            attempts += 1;
            raw_syscall(
                libc::SYS_connect,
                target as _,
                shared.bytes.get() as _,
                unix_len.max(16) as _,
            );
        }
        stop.store(true, Ordering::Relaxed);
        let _ = flipper.join();
        stop.store(false, Ordering::Relaxed);
        // Whatever the timing, a UNIX socket with a peer got connected somewhere.
        let mut peer = sockaddr_un(b"").0;
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        let rc = raw_syscall(
            libc::SYS_getpeername,
            uf as _,
            (&mut peer as *mut libc::sockaddr_un) as _,
            (&mut len as *mut libc::socklen_t) as _,
        );
        escaped = rc == 0;
    }
    println!(
        "{attempts} connects, {} swaps",
        flips.load(Ordering::Relaxed)
    );
    if escaped {
        Ok(())
    } else {
        Err(std::io::Error::other(
            "no UNIX socket got connected (os error 13)",
        ))
    }
}

/// A SysV shared memory segment holding a secret (what another process in the pod made).
#[allow(unsafe_code)]
fn shm_create() -> std::io::Result<i64> {
    let id = check(raw_syscall(
        libc::SYS_shmget,
        libc::IPC_PRIVATE as _,
        4096,
        (libc::IPC_CREAT | 0o600) as _,
    ))?;
    let addr = raw_syscall(libc::SYS_shmat, id, 0, 0);
    if addr == -1 {
        return Err(std::io::Error::last_os_error());
    }
    let secret = b"nexus-shm-secret\0";
    // SAFETY: shmat mapped at least 4096 writable bytes at `addr`.
    unsafe { std::ptr::copy_nonoverlapping(secret.as_ptr(), addr as *mut u8, secret.len()) };
    raw_syscall(libc::SYS_shmdt, addr, 0, 0);
    Ok(id)
}

#[allow(unsafe_code)]
fn shm_read(id: i32) -> std::io::Result<String> {
    let addr = raw_syscall(libc::SYS_shmat, id as _, 0, libc::SHM_RDONLY as _);
    if addr == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: shmat mapped the segment (at least one page) readable at `addr`; the secret
    // is NUL-terminated within it.
    let text = unsafe { std::ffi::CStr::from_ptr(addr as *const libc::c_char) }
        .to_string_lossy()
        .into_owned();
    raw_syscall(libc::SYS_shmdt, addr, 0, 0);
    Ok(text)
}

#[derive(Clone, Copy)]
enum Installer {
    Seccomp,
    Prctl,
}

/// Installs a filter of the probe's own that returns `ret` for ptrace, then calls ptrace.
fn mask_kill(mode: Mode, installer: Installer, ret: u32) -> ExitCode {
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let filter = [
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: libc::SYS_ptrace as u32,
        },
        stmt(libc::BPF_RET | libc::BPF_K, ret),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // Unsandboxed (the control), no_new_privs is not set yet.
    let _ = raw_syscall(libc::SYS_prctl, libc::PR_SET_NO_NEW_PRIVS as _, 1, 0);
    let installed = match installer {
        Installer::Seccomp => ok(raw_syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER as _,
            0,
            (&prog as *const libc::sock_fprog) as _,
        )),
        Installer::Prctl => ok(raw_syscall(
            libc::SYS_prctl,
            libc::PR_SET_SECCOMP as _,
            libc::SECCOMP_MODE_FILTER as _,
            (&prog as *const libc::sock_fprog) as _,
        )),
    };
    println!("own filter: {installed:?}");
    let _ = std::io::stdout().flush();
    // A kill rule on ptrace ends the probe here; returning at all means it was masked.
    let result = ok(raw_syscall(
        libc::SYS_ptrace,
        libc::PTRACE_TRACEME as _,
        0,
        0,
    ));
    outcome(
        mode,
        &format!("own seccomp filter masked the ptrace kill (ptrace: {result:?})"),
        installed,
    )
}

#[derive(Clone, Copy, PartialEq)]
enum MemfdExec {
    Execveat,
    Proc,
    NoexecSeal,
    NoexecSealProc,
}

fn steal_parent_fds() -> std::io::Result<()> {
    let pidfd = check(raw_syscall(
        libc::SYS_pidfd_open,
        std::os::unix::process::parent_id() as _,
        0,
        0,
    ))?;
    let mut last = std::io::Error::from_raw_os_error(libc::EBADF);
    for fd in 0..64 {
        match check(raw_syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0)) {
            Ok(_) => {
                println!("took the launcher's descriptor {fd}");
                return Ok(());
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// argv/envp for running a copy of the probe as `marker WHAT`.
struct Argv {
    _strings: Vec<CString>,
    ptrs: Vec<*const libc::c_char>,
    env: [*const libc::c_char; 1],
}

fn marker_argv(what: &str) -> Argv {
    let strings = vec![
        CString::new("nexus-escape-probe").unwrap_or_default(),
        CString::new("marker").unwrap_or_default(),
        CString::new(what).unwrap_or_default(),
    ];
    let mut ptrs: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    Argv {
        _strings: strings,
        ptrs,
        env: [std::ptr::null()],
    }
}

/// Copies this very binary (readable: the command always is) into `fd`.
fn copy_self(fd: &OwnedFd) -> std::io::Result<()> {
    let image = std::fs::read("/proc/self/exe")?;
    let mut file = std::fs::File::from(fd.try_clone()?);
    file.write_all(&image)
}

#[allow(unsafe_code)]
fn memfd_exec(kind: MemfdExec) -> std::io::Result<()> {
    let flags = match kind {
        MemfdExec::Execveat => libc::MFD_CLOEXEC,
        MemfdExec::Proc => 0,
        MemfdExec::NoexecSeal => libc::MFD_CLOEXEC | libc::MFD_NOEXEC_SEAL,
        MemfdExec::NoexecSealProc => libc::MFD_NOEXEC_SEAL,
    };
    let fd = check(raw_syscall(
        libc::SYS_memfd_create,
        c"payload".as_ptr() as _,
        flags as _,
        0,
    ))?;
    // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    copy_self(&fd)?;
    let argv = marker_argv("memfd exec");
    if matches!(kind, MemfdExec::Proc | MemfdExec::NoexecSealProc) {
        let path = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default();
        return ok(raw_syscall(
            libc::SYS_execve,
            path.as_ptr() as _,
            argv.ptrs.as_ptr() as _,
            argv.env.as_ptr() as _,
        ));
    }
    ok(raw_syscall6(
        libc::SYS_execveat,
        [
            fd.as_raw_fd() as _,
            c"".as_ptr() as _,
            argv.ptrs.as_ptr() as _,
            argv.env.as_ptr() as _,
            libc::AT_EMPTY_PATH as _,
            0,
        ],
    ))
}

#[allow(unsafe_code)]
fn tmpfile_exec(dir: &str) -> std::io::Result<()> {
    let dir = CString::new(dir).map_err(std::io::Error::other)?;
    let fd = check(raw_syscall(
        libc::SYS_openat,
        libc::AT_FDCWD as _,
        dir.as_ptr() as _,
        (libc::O_TMPFILE | libc::O_RDWR) as _,
    ))?;
    // SAFETY: openat returned a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    copy_self(&fd)?;
    ok(raw_syscall(libc::SYS_fchmod, fd.as_raw_fd() as _, 0o755, 0))?;
    let argv = marker_argv("O_TMPFILE exec");
    ok(raw_syscall6(
        libc::SYS_execveat,
        [
            fd.as_raw_fd() as _,
            c"".as_ptr() as _,
            argv.ptrs.as_ptr() as _,
            argv.env.as_ptr() as _,
            libc::AT_EMPTY_PATH as _,
            0,
        ],
    ))
}

fn file_exec(dir: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::path::Path::new(dir).join("copy");
    std::fs::write(&path, std::fs::read("/proc/self/exe")?)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    let path = CString::new(path.to_string_lossy().as_bytes()).map_err(std::io::Error::other)?;
    let argv = marker_argv("written file exec");
    ok(raw_syscall(
        libc::SYS_execve,
        path.as_ptr() as _,
        argv.ptrs.as_ptr() as _,
        argv.env.as_ptr() as _,
    ))
}

/// The i386 ABI's socketcall(SYS_SOCKET, {AF_INET, SOCK_STREAM, IPPROTO_MPTCP}) through
/// `int 0x80`, arguments in memory below 4 GiB as the 32-bit ABI needs.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn socketcall_i386() -> std::io::Result<()> {
    let page = raw_syscall6(
        libc::SYS_mmap,
        [
            0,
            4096,
            (libc::PROT_READ | libc::PROT_WRITE) as _,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT) as _,
            -1,
            0,
        ],
    );
    if page == -1 {
        return Err(std::io::Error::last_os_error());
    }
    let args = page as *mut u32;
    // SAFETY: `page` is a fresh private mapping of 4096 writable bytes.
    unsafe {
        *args = libc::AF_INET as u32;
        *args.add(1) = libc::SOCK_STREAM as u32;
        *args.add(2) = libc::IPPROTO_MPTCP as u32;
    }
    let ret: u32;
    // SAFETY: int 0x80 with eax = 102 (i386 socketcall), ebx = 1 (SYS_SOCKET), ecx = the
    // argument array mapped above; rbx is saved and restored around it (LLVM reserves it).
    unsafe {
        std::arch::asm!(
            "push rbx",
            "mov ebx, 1",
            "int 0x80",
            "pop rbx",
            inlateout("eax") 102u32 => ret,
            in("ecx") page as u32,
        );
    }
    let ret = ret as i32;
    if ret < 0 {
        return Err(std::io::Error::from_raw_os_error(-ret));
    }
    Ok(())
}

/// `tty-harness CMD ARGS...`: runs CMD on a new pseudo-terminal that is its controlling
/// terminal (as a login shell's), then prints what is waiting in the terminal's input
/// queue: `tty input: "..."` (what a shell would read and run after CMD exits).
#[allow(unsafe_code)]
fn tty_harness(command: &[String]) -> ExitCode {
    let Some((program, rest)) = command.split_first() else {
        return ExitCode::from(USAGE);
    };
    let (mut master, mut slave) = (0i32, 0i32);
    // SAFETY: openpty writes two descriptors; the name, termios and winsize are optional.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        eprintln!("openpty: {}", std::io::Error::last_os_error());
        return ExitCode::from(1);
    }
    // SAFETY: openpty returned two fresh descriptors that nothing else owns.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let slave_fd = slave.as_raw_fd();
    let mut command = std::process::Command::new(program);
    command
        .args(rest)
        .stdin(std::process::Stdio::from(slave.try_clone().expect("dup")));
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid and ioctl are async-signal-safe and allocate nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 || libc::ioctl(slave_fd, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let status = match command.status() {
        Ok(status) => status,
        Err(e) => {
            eprintln!("tty-harness: {e}");
            return ExitCode::from(1);
        }
    };
    // Read the terminal's input queue as the shell would, without waiting.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(slave.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut file = std::fs::File::from(slave);
    let mut input = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok(n) = file.read(&mut buf) {
        if n == 0 {
            break;
        }
        input.extend_from_slice(&buf[..n]);
    }
    drop(master);
    println!("tty input: {:?}", String::from_utf8_lossy(&input));
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    println!("child exit: {code}");
    ExitCode::from(u8::try_from(code).unwrap_or(255))
}

/// Reads `file`, writes in `dir`, talks to `port`, starts a thread; exits with `code`.
fn behave(file: &str, dir: &str, port: &str, code: &str) -> ExitCode {
    let step = |what: &str, r: std::io::Result<()>| -> bool {
        match r {
            Ok(()) => {
                println!("ok {what}");
                true
            }
            Err(e) => {
                println!("FAILED {what}: {e}");
                false
            }
        }
    };
    let mut fine = step("read", std::fs::read(file).map(|_| ()));
    fine &= step(
        "write",
        std::fs::write(std::path::Path::new(dir).join("out.txt"), b"result"),
    );
    fine &= step(
        "connect",
        (|| {
            let mut stream = TcpStream::connect(("127.0.0.1", port_arg(port)))?;
            stream.write_all(b"hello")?;
            let mut buf = [0u8; 2];
            stream.read_exact(&mut buf)?;
            Ok(())
        })(),
    );
    fine &= step(
        "thread",
        std::thread::spawn(|| 6 * 7)
            .join()
            .map(|_| ())
            .map_err(|_| std::io::Error::other("thread panicked")),
    );
    fine &= step(
        "self-pipe",
        std::os::unix::net::UnixStream::pair().and_then(|(mut a, mut b)| {
            a.write_all(b"x")?;
            let mut buf = [0u8; 1];
            b.read_exact(&mut buf)
        }),
    );
    if !fine {
        return ExitCode::from(1);
    }
    ExitCode::from(code.parse::<u8>().unwrap_or(0))
}
