//! nexus-escape-probe: a test plugin that tries one escape per run, for the sandbox
//! escape suite (tests/tests/sandbox.rs).
//!
//! `nexus-escape-probe ESCAPE [ARGS]` prints `blocked <what>: <error>` and exits 3 when
//! the sandbox stopped it, prints `ESCAPED <what>` and exits 42 when it got through. A
//! process killed by the sandbox prints nothing after the attempt. `behave` is the
//! well-behaved plugin: it reads, writes and connects where it is allowed and exits with
//! the code it is given.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;

const BLOCKED: u8 = 3;
const ESCAPED: u8 = 42;
const USAGE: u8 = 64;

fn outcome(what: &str, result: std::io::Result<()>) -> ExitCode {
    match result {
        Ok(()) => {
            println!("ESCAPED {what}");
            ExitCode::from(ESCAPED)
        }
        Err(e) => {
            println!("blocked {what}: {e}");
            ExitCode::from(BLOCKED)
        }
    }
}

fn check(rc: libc::c_long) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
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
    unsafe { libc::syscall(nr, a, b, c, 0, 0) }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    // Flush before any attempt that may kill us.
    let announce = |what: &str| {
        println!("trying {what}");
        let _ = std::io::stdout().flush();
    };
    let escape = arg(0);
    announce(&escape);
    match escape.as_str() {
        "read" => outcome("read", std::fs::read(arg(1)).map(|_| ())),
        "write" => outcome("write", std::fs::write(arg(1), b"pwned")),
        "exec" => {
            // `exec PATH [ARGS]`: escaped only if the program ran and succeeded.
            let rest: Vec<&str> = match args.get(2..) {
                Some(rest) if !rest.is_empty() => rest.iter().map(String::as_str).collect(),
                _ => vec!["-c", "true"],
            };
            outcome(
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
        "connect" => outcome(
            "connect",
            TcpStream::connect(("127.0.0.1", arg(1).parse::<u16>().unwrap_or(1))).map(|_| ()),
        ),
        "bind" => outcome(
            "bind",
            std::net::TcpListener::bind("127.0.0.1:0").map(|_| ()),
        ),
        "ptrace" => outcome(
            "ptrace",
            check(raw_syscall(
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
            let target =
                std::ffi::CString::new(dir.to_string_lossy().as_bytes()).unwrap_or_default();
            outcome(
                "mount",
                check(raw_syscall(
                    libc::SYS_mount,
                    source.as_ptr() as _,
                    target.as_ptr() as _,
                    fstype.as_ptr() as _,
                )),
            )
        }
        "unshare-user" => outcome(
            "unshare(CLONE_NEWUSER)",
            check(raw_syscall(
                libc::SYS_unshare,
                libc::CLONE_NEWUSER as _,
                0,
                0,
            )),
        ),
        "unshare-net" => outcome(
            "unshare(CLONE_NEWNET)",
            check(raw_syscall(
                libc::SYS_unshare,
                libc::CLONE_NEWNET as _,
                0,
                0,
            )),
        ),
        "io-uring" => {
            let mut params = [0u8; 120]; // struct io_uring_params
            outcome(
                "io_uring_setup",
                check(raw_syscall(
                    libc::SYS_io_uring_setup,
                    4,
                    params.as_mut_ptr() as _,
                    0,
                )),
            )
        }
        "raw-socket" => outcome(
            "socket(AF_INET, SOCK_RAW)",
            check(raw_syscall(
                libc::SYS_socket,
                libc::AF_INET as _,
                (libc::SOCK_RAW | libc::SOCK_CLOEXEC) as _,
                libc::IPPROTO_ICMP as _,
            )),
        ),
        "packet-socket" => outcome(
            "socket(AF_PACKET)",
            check(raw_syscall(
                libc::SYS_socket,
                libc::AF_PACKET as _,
                libc::SOCK_RAW as _,
                0,
            )),
        ),
        "udp-socket" => outcome(
            "socket(AF_INET, SOCK_DGRAM)",
            std::net::UdpSocket::bind("127.0.0.1:0").map(|_| ()),
        ),
        "bpf" => {
            let mut attr = [0u8; 128];
            outcome(
                "bpf",
                check(raw_syscall(libc::SYS_bpf, 0, attr.as_mut_ptr() as _, 128)),
            )
        }
        "kill-parent" => outcome(
            "kill(launcher)",
            check(raw_syscall(
                libc::SYS_kill,
                std::os::unix::process::parent_id() as _,
                libc::SIGKILL as _,
                0,
            )),
        ),
        #[cfg(target_arch = "x86_64")]
        "x32-ptrace" => outcome(
            "x32 ptrace",
            check(raw_syscall(
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
            outcome(
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
        _ => {
            eprintln!("usage: nexus-escape-probe ESCAPE [ARGS] (see the source for the list)");
            ExitCode::from(USAGE)
        }
    }
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
            let mut stream = TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap_or(1)))?;
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
    if !fine {
        return ExitCode::from(1);
    }
    ExitCode::from(code.parse::<u8>().unwrap_or(0))
}
