//! The engine sandbox against a hostile stand-in: `sandbox-probe` started
//! exactly as an engine is (same `Sandbox`, same `pre_exec`) tries to reach
//! out, read the user's files, write outside, trace and signal its parent,
//! make namespaces and exec a shell. Every attempt must fail, in the probe
//! and in the copy it re-executes. The same probe unconfined (the control)
//! succeeds at what it tries, so the checks can fail.
//!
//! `LLORCH_REQUIRE_SANDBOX=1` (set by CI) fails the test when the kernel
//! lacks any protection instead of checking only the active ones.

use engine_runtime::sandbox::{EngineAccess, Listen, Protections, Sandbox};
use llorch_io::cmd::Cmd;
use llorch_profile::SandboxMode;
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;

struct Attempt {
    who: String,
    attempt: String,
    allowed: bool,
    detail: String,
}

struct Setup {
    probe: PathBuf,
    _secret_dir: tempfile::TempDir,
    secret: PathBuf,
    outside: tempfile::TempDir,
    listener: TcpListener,
    port: u16,
}

fn setup() -> Setup {
    let probe = PathBuf::from(env!("CARGO_BIN_EXE_sandbox-probe"));
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|h| h.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let secret_dir = tempfile::Builder::new()
        .prefix(".llorch-sandbox-test")
        .tempdir_in(&home)
        .unwrap();
    let secret = secret_dir.path().join("id_ed25519");
    fs_err::write(&secret, "a private key").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    Setup {
        probe,
        _secret_dir: secret_dir,
        secret,
        outside: tempfile::tempdir().unwrap(),
        listener,
        port,
    }
}

fn run_probe(s: &Setup, sandbox: Option<Sandbox>, extra: &[&str]) -> Vec<Attempt> {
    let connect = s.listener.local_addr().unwrap().port().to_string();
    let own = if extra.contains(&"--unix") {
        vec![]
    } else {
        vec!["--port".to_string(), s.port.to_string()]
    };
    let out = Cmd::new(&s.probe)
        .args(own)
        .args(["--connect", &connect])
        .arg("--secret")
        .arg(&s.secret)
        .arg("--write-dir")
        .arg(s.outside.path())
        .args(extra.iter().copied())
        .spawn_with(|c| {
            c.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            if let Some(sb) = sandbox {
                sb.apply_to(c);
            }
        })
        .unwrap()
        .wait_with_output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "probe failed: {}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Attempt {
                who: v["who"].as_str().unwrap().into(),
                attempt: v["attempt"].as_str().unwrap().into(),
                allowed: v["allowed"].as_bool().unwrap(),
                detail: v["detail"].as_str().unwrap().into(),
            }
        })
        .collect()
}

/// Which protection must stop each attempt (`None`: it is allowed).
fn guard(p: &Protections, attempt: &str) -> Option<bool> {
    Some(match attempt {
        "bind_own_port" | "bind_own_socket" | "exec_self" | "name_own_thread" => return None,
        // No TCP at all in a namespace of its own; Landlock allows only its one port.
        "bind_another_port" | "connect_out" => p.network || p.netns,
        // An engine on a unix socket may not even make a TCP socket.
        "tcp_socket" if p.unix_socket => p.seccomp,
        "tcp_socket" => return None,
        // Root's dedicated user cannot become root again.
        "setuid_root" => p.user.is_some(),
        "read_home_file" | "write_outside" | "exec_shell" | "name_parent" => p.filesystem,
        "signal_parent" => p.scopes,
        // ptrace: seccomp, and Landlock (ABI 1) refuses tracing outside its domain.
        "ptrace_parent" => p.seccomp || p.filesystem,
        "udp_socket" | "netlink_socket" | "unshare_user_namespace" | "io_uring" => p.seccomp,
        other => panic!("unknown attempt {other}"),
    })
}

#[test]
fn a_hostile_stand_in_engine_can_bind_its_port_and_nothing_else() {
    // The stand-in's port was free a moment ago; another process may take
    // it before the stand-in binds it: then try another port (a few times).
    let mut tries = 0;
    let (s, p, attempts) = loop {
        let s = setup();
        let access = EngineAccess {
            binary: s.probe.clone(),
            read_files: Vec::new(),
            listen: Listen::Tcp(s.port),
            mps_pipe: None,
            gpu: false,
        };
        let sandbox = Sandbox::build(SandboxMode::Auto, &access).unwrap();
        let p = sandbox.protections.clone();
        eprintln!("{}", p.summary());
        if std::env::var_os("LLORCH_REQUIRE_SANDBOX").is_some() {
            assert!(
                p.missing().is_empty(),
                "LLORCH_REQUIRE_SANDBOX is set but this kernel lacks: {:?}",
                p.missing()
            );
        }
        let attempts = run_probe(&s, Some(sandbox), &[]);
        let taken = attempts
            .iter()
            .any(|a| a.attempt == "bind_own_port" && !a.allowed && a.detail.contains("in use"));
        tries += 1;
        if !taken || tries == 5 {
            break (s, p, attempts);
        }
    };
    check(&s, &p, &attempts);
}

/// `server.listen: unix`: the stand-in may create its socket and nothing
/// else; it may bind and connect no TCP port at all (Landlock without a
/// port rule, and as root a network namespace of its own), and as root it
/// runs as the dedicated user and cannot become root again.
#[test]
fn a_hostile_stand_in_on_a_unix_socket_has_no_tcp_at_all() {
    let s = setup();
    let run = tempfile::tempdir().unwrap();
    let dir = run.path().join("pool.d");
    fs_err::create_dir(&dir).unwrap();
    let sock = dir.join("engine.sock");
    let sandbox = Sandbox::build(
        SandboxMode::Auto,
        &EngineAccess {
            binary: s.probe.clone(),
            read_files: Vec::new(),
            listen: Listen::Unix(sock.clone()),
            mps_pipe: None,
            gpu: false,
        },
    )
    .unwrap();
    let p = sandbox.protections.clone();
    eprintln!("{}", p.summary());
    assert!(p.unix_socket && p.summary().contains("unix socket, no TCP"));
    if std::env::var_os("LLORCH_REQUIRE_SANDBOX").is_some() {
        assert!(p.missing().is_empty(), "missing: {:?}", p.missing());
        // SAFETY: geteuid takes no arguments.
        if unsafe { libc::geteuid() } == 0 {
            assert!(p.netns, "root gives the engine its own network namespace");
            assert_eq!(p.user.as_deref(), Some("llama-orch"));
        }
    }
    if let Some((uid, gid)) = sandbox.runs_as() {
        use std::os::unix::fs::PermissionsExt;
        // As the engine's spawn does: the user owns its socket's directory.
        fs_err::set_permissions(run.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
    }
    let sock_arg = sock.display().to_string();
    let attempts = run_probe(&s, Some(sandbox), &["--unix", &sock_arg]);
    for a in &attempts {
        if a.attempt == "bind_own_socket" {
            assert!(
                a.allowed,
                "{} could not bind its socket: {}",
                a.who, a.detail
            );
        }
    }
    assert!(sock.exists(), "the socket is where the engine was told");
    if p.user.is_some() {
        use std::os::unix::fs::MetadataExt;
        let md = fs_err::metadata(&sock).unwrap();
        assert_ne!(md.uid(), 0, "the socket was made by the dedicated user");
    }
    check(&s, &p, &attempts);
}

/// Every attempt against the protections that must stop it; both the probe
/// and its re-executed copy reported all of them; nothing escaped.
fn check(s: &Setup, p: &Protections, attempts: &[Attempt]) {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for a in attempts {
        *seen.entry(a.who.as_str()).or_default() += 1;
        eprintln!(
            "{} {}: allowed {} ({})",
            a.who, a.attempt, a.allowed, a.detail
        );
        if a.who == "child" && a.attempt == "signal_parent" {
            continue; // its parent is the sandboxed probe: the same domain may signal
        }
        // Only the engine's own pid may write its /proc entries: a process it
        // starts (the re-executed copy) may not name its threads.
        let rule = if a.who == "child" && a.attempt == "name_own_thread" {
            Some(p.filesystem)
        } else {
            guard(p, &a.attempt)
        };
        match rule {
            None => assert!(
                a.allowed,
                "{} {}: must be allowed: {}",
                a.who, a.attempt, a.detail
            ),
            Some(true) => assert!(
                !a.allowed,
                "{} {}: the sandbox let it through: {}",
                a.who, a.attempt, a.detail
            ),
            Some(false) => eprintln!(
                "{} {}: not checked (its protection is not on this kernel)",
                a.who, a.attempt
            ),
        }
    }
    assert_eq!(seen.get("engine"), Some(&17), "every attempt reported");
    assert_eq!(
        seen.get("child"),
        Some(&16),
        "the re-executed copy reported every attempt (exec_self aside)"
    );
    assert!(
        fs_err::read_dir(s.outside.path()).unwrap().next().is_none(),
        "nothing written outside"
    );
    assert!(
        s.listener.accept().is_err(),
        "no connection reached the listener"
    );
}

/// The control: the same probe without the sandbox does what it tries, so
/// the test above fails if the sandbox is not applied.
#[test]
fn unconfined_the_same_attempts_succeed() {
    let s = setup();
    let off = Sandbox::build(
        SandboxMode::Off,
        &EngineAccess {
            binary: s.probe.clone(),
            read_files: Vec::new(),
            listen: Listen::Tcp(s.port),
            mps_pipe: None,
            gpu: false,
        },
    )
    .unwrap();
    assert!(off.protections.summary().contains("full rights"));
    let attempts = run_probe(&s, Some(off), &["--safe"]);
    for a in &attempts {
        if a.attempt == "unshare_user_namespace" || a.attempt == "io_uring" {
            continue; // the host's own policy may refuse these
        }
        if a.attempt == "setuid_root" {
            continue; // allowed only to root itself
        }
        assert!(a.allowed, "{} unconfined: {}", a.attempt, a.detail);
    }
    assert!(attempts.iter().any(|a| a.attempt == "connect_out"));
    assert!(s.outside.path().join("escaped-engine").exists());
}
