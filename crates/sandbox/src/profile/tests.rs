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

// best_effort: a required profile must confine something (see
// `a_required_profile_that_confines_nothing_is_refused`); these tests are about the rest.
const HEAD: &str = "version = 1\nmode = \"best_effort\"\n";

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
    // UDP is refused by the socket allow-list the [network] table implies.
    let implied = crate::baseline::of(&p);
    assert!(implied.denies(nr, &[2, 2, 0, 0, 0, 0]));
    assert!(!implied.denies(nr, &[2, 1 | 0x80000, 0, 0, 0, 0]));
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

#[test]
fn a_required_profile_that_confines_nothing_is_refused() {
    let e = err(
        "version = 1\nmode = \"required\"\n\n[[syscall]]\nnames = [\"ptrace\"]\naction = \"kill\"\n",
    );
    assert!(e.starts_with("p.toml:2:"), "{e}");
    assert!(e.contains("confines nothing"), "{e}");
    assert!(e.contains("[filesystem]"), "{e}");
    // Either table is confinement enough; best_effort is accepted (and warned about at
    // launch).
    parse("version = 1\nmode = \"required\"\n[network]\n").expect("network only");
    parse("version = 1\nmode = \"required\"\n[filesystem]\n").expect("filesystem only");
    parse("version = 1\nmode = \"best_effort\"\n").expect("best_effort");
}

#[test]
fn process_and_network_options() {
    let p = parse(&format!(
        "{HEAD}[network]\nunrestricted_udp = true\n[process]\nkeep_fds = [5, 3]\nsysv_ipc = true\n"
    ))
    .expect("parse");
    assert_eq!(p.process.keep_fds, [3, 5]);
    assert!(p.process.sysv_ipc && !p.process.danger_nested_seccomp);
    assert!(p.network.as_ref().is_some_and(|n| n.unrestricted_udp));
    // Scopes are on unless a profile turns them off.
    assert!(p.scopes.signal && p.scopes.abstract_unix_socket);
    let off = parse(&format!("{HEAD}[scope]\nsignal = false\n")).expect("parse");
    assert!(!off.scopes.signal && off.scopes.abstract_unix_socket);

    let e = err(&format!("{HEAD}[process]\nkeep_fds = [\n  3,\n  2,\n]\n"));
    assert!(e.starts_with("p.toml:6:"), "{e}");
    assert!(e.contains("always inherited"), "{e}");
    assert!(err(&format!("{HEAD}[process]\nkeep_fds = [4, 4]\n")).contains("twice"));
    assert!(err(&format!("{HEAD}[process]\nexec = true\n")).contains("unknown field"));
}

#[test]
fn unix_connect_paths_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let real = dir.path().join("real");
    std::fs::create_dir(&real).expect("dir");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let via_link = link.join("app.sock");
    let p = parse(&format!(
        "{HEAD}[network]\nunix_connect = [{:?}, {{ path = \"/no/such/dir/x.sock\", optional = true }}]\n",
        via_link.display().to_string()
    ))
    .expect("parse");
    let grants = &p.network.expect("network").unix_connect;
    assert_eq!(grants.len(), 1, "the optional absent one is skipped");
    assert_eq!(grants[0].path, via_link);
    // The folder's symlink is resolved at launch: the launcher opens that path.
    let canonical = std::fs::canonicalize(&real).expect("canonical");
    assert_eq!(grants[0].resolved, canonical.join("app.sock"));
    assert_eq!(grants[0].line, 4);

    for (path, expected) in [
        ("relative.sock", "plain absolute path"),
        ("/run/../etc/x.sock", "plain absolute path"),
        (
            "/no/such/dir/x.sock",
            "its folder /no/such/dir cannot be resolved",
        ),
    ] {
        let e = err(&format!("{HEAD}[network]\nunix_connect = [{path:?}]\n"));
        assert!(e.starts_with("p.toml:4:"), "{e}");
        assert!(e.contains(expected), "{path}: {e}");
    }
    let long = format!("/tmp/{}", "x".repeat(120));
    assert!(err(&format!("{HEAD}[network]\nunix_connect = [{long:?}]\n")).contains("107 bytes"));
}

#[test]
fn seccomp_itself_cannot_be_ruled() {
    let e = err(&format!(
        "{HEAD}[[syscall]]\nnames = [\"seccomp\"]\naction = \"eperm\"\n"
    ));
    assert!(e.contains("could never start"), "{e}");
}
