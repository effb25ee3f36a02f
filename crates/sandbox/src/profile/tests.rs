use super::*;

fn parse(text: &str) -> Result<Profile, ProfileError> {
    Profile::parse(Path::new("p.toml"), text, &|name| match name {
        "PORT" => Some("15001".into()),
        "WORK" => Some("/tmp".into()),
        _ => None,
    })
}

fn err(text: &str) -> String {
    parse(text).expect_err("must be refused").to_string()
}

const HEAD: &str = "version = 1\nmode = \"required\"\n";

#[test]
fn default_profile_parses() {
    let text = include_str!("../../../../profiles/default.toml");
    let p = Profile::parse(Path::new("default.toml"), text, &|_| None).expect("default");
    assert_eq!(p.mode, Mode::Required);
    assert_eq!(
        p.network.as_ref().map(|n| n.connect_tcp.clone()),
        Some(vec![15001])
    );
    let kill: Vec<&str> = p
        .syscalls
        .iter()
        .filter(|r| r.action == Action::Kill)
        .flat_map(|r| r.syscalls.iter().map(|(n, _)| n.as_str()))
        .collect();
    for name in [
        "ptrace",
        "bpf",
        "init_module",
        "kexec_load",
        "perf_event_open",
    ] {
        assert!(kill.contains(&name), "{name} is not a kill rule");
    }
    // socket(AF_PACKET, ...) is killed; socket(AF_INET, SOCK_STREAM) is not.
    let nr = libc::SYS_socket;
    assert!(p.rule_for(Action::Kill, nr, &[17, 3, 0, 0, 0, 0]).is_some());
    assert!(
        p.rule_for(Action::Kill, nr, &[2, 3 | 0x80000, 0, 0, 0, 0])
            .is_some()
    );
    assert!(p.rule_for(Action::Kill, nr, &[2, 1, 0, 0, 0, 0]).is_none());
    assert!(p.rule_for(Action::Eperm, nr, &[2, 2, 0, 0, 0, 0]).is_some());
    // clone with CLONE_NEWUSER is refused, a thread's clone is not.
    let clone = libc::SYS_clone;
    assert!(
        p.rule_for(Action::Eperm, clone, &[0x1000_0000 | 17, 0, 0, 0, 0, 0])
            .is_some()
    );
    assert!(
        p.rule_for(Action::Eperm, clone, &[0x003d_0f00, 0, 0, 0, 0, 0])
            .is_none()
    );
}

#[test]
fn expansion_and_ports() {
    let p = parse(&format!(
        "{HEAD}[filesystem]\nwrite = [\"${{WORK}}\"]\nread = [{{ path = \"${{UNSET}}\", optional = true }}]\n[network]\nconnect_tcp = [\"${{PORT}}\", 80, \"${{NOPE:-8080}}\"]\n"
    ))
    .expect("parse");
    let fs = p.filesystem.expect("filesystem");
    assert_eq!(fs.write[0].path, PathBuf::from("/tmp"));
    assert_eq!(fs.skipped.len(), 1);
    assert_eq!(p.network.expect("net").connect_tcp, vec![15001, 80, 8080]);
}

#[test]
fn unknown_syscall_is_refused_with_its_line() {
    let e = err(&format!(
        "{HEAD}\n[[syscall]]\nnames = [\"ptrace\", \"ptrac\"]\naction = \"kill\"\n"
    ));
    assert!(e.starts_with("p.toml:5:"), "{e}");
    assert!(e.contains("unknown syscall \"ptrac\""), "{e}");
    assert!(e.contains("did you mean \"ptrace\""), "{e}");
}

#[test]
fn missing_path_is_refused_with_its_line() {
    let e = err(&format!(
        "{HEAD}[filesystem]\nread = [\n  \"/usr\",\n  \"/no/such/dir\",\n]\n"
    ));
    assert!(e.starts_with("p.toml:6:"), "{e}");
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn unset_variable_is_refused() {
    let e = err(&format!("{HEAD}[filesystem]\nread = [\"${{NOPE}}\"]\n"));
    assert!(e.contains("NOPE is not set"), "{e}");
}

#[test]
fn contradictory_rules_are_refused() {
    let e = err(&format!(
        "{HEAD}[[syscall]]\nnames = [\"mount\"]\naction = \"kill\"\n\n[[syscall]]\nnames = [\"mount\"]\naction = \"eperm\"\n"
    ));
    assert!(e.starts_with("p.toml:7:"), "{e}");
    assert!(e.contains("contradictory"), "{e}");
    let e = err(&format!(
        "{HEAD}[[syscall]]\nnames = [\"socket\"]\naction = \"kill\"\n\n[[syscall]]\nnames = [\"socket\"]\naction = \"eperm\"\nwhen = [[{{ arg = 0, value = 2 }}]]\n"
    ));
    assert!(e.contains("contradicts"), "{e}");
}

#[test]
fn launch_path_syscalls_cannot_be_filtered() {
    let e = err(&format!(
        "{HEAD}[[syscall]]\nnames = [\"execve\"]\naction = \"kill\"\n"
    ));
    assert!(e.contains("could never start"), "{e}");
}

#[test]
fn bad_fields_are_refused() {
    assert!(err(&format!("{HEAD}colour = 1\n")).contains("unknown field"));
    assert!(err("version = 1\nmode = \"lax\"\n").contains("unknown mode"));
    assert!(err("version = 2\nmode = \"required\"\n").contains("version"));
    let e = err(&format!(
        "{HEAD}[[syscall]]\nnames = [\"socket\"]\naction = \"kill\"\nwhen = [[{{ arg = 7, value = 1 }}]]\n"
    ));
    assert!(e.contains("arguments 0 to 5"), "{e}");
    let e = err(&format!(
        "{HEAD}[[syscall]]\nnames = [\"socket\"]\naction = \"kill\"\nwhen = [[{{ arg = 0, value = \"AF_BOGUS\" }}]]\n"
    ));
    assert!(e.contains("unknown constant"), "{e}");
    let e = err(&format!("{HEAD}[network]\nconnect_tcp = [70000]\n"));
    assert!(e.contains("not a TCP port"), "{e}");
}

#[test]
fn conditions_compare_the_low_32_bits() {
    let c = Condition {
        arg: 0,
        op: Op::MaskedEq(0xf),
        value: 3,
    };
    assert!(c.matches(&[0xffff_ffff_0000_0803, 0, 0, 0, 0, 0]));
    assert!(!c.matches(&[1, 0, 0, 0, 0, 0]));
}

#[test]
fn every_shipped_profile_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../profiles");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("profiles/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).expect("read");
            Profile::parse_with(&path, &text, &|_| None, true)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 2);
}
