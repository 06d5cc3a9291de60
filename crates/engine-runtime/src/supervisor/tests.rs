//! The restart policy, pure, and the supervisor against stand-in engines
//! (no llama.cpp).

use super::*;

fn policy() -> RestartPolicy {
    RestartPolicy {
        initial_backoff: Duration::from_millis(500),
        max_backoff: Duration::from_secs(4),
        healthy_reset: Duration::from_secs(60),
        max_crashes: 5,
        window: Duration::from_secs(300),
    }
}

fn restart(attempt: u32, ms: u64) -> AfterExit {
    AfterExit::Restart {
        attempt,
        after: Duration::from_millis(ms),
    }
}

#[test]
fn backoff_doubles_to_its_maximum_and_the_fifth_crash_in_the_window_gives_up() {
    let mut c = Crashes::new(policy());
    let t0 = Instant::now();
    let s = Duration::from_secs;
    assert_eq!(c.on_exit(t0, Duration::ZERO), restart(1, 500));
    assert_eq!(c.on_exit(t0 + s(1), s(1)), restart(2, 1000));
    assert_eq!(c.on_exit(t0 + s(2), s(1)), restart(3, 2000));
    assert_eq!(c.on_exit(t0 + s(3), s(1)), restart(4, 4000));
    assert_eq!(c.on_exit(t0 + s(4), s(1)), AfterExit::GiveUp { crashes: 5 });
}

#[test]
fn crashes_outside_the_window_are_forgotten_and_a_long_healthy_run_resets_the_backoff() {
    let s = Duration::from_secs;
    let t0 = Instant::now();
    // Four crashes, then one more only after the window: not a give-up.
    let mut c = Crashes::new(policy());
    for i in 0..4 {
        assert!(matches!(
            c.on_exit(t0 + s(i), s(1)),
            AfterExit::Restart { .. }
        ));
    }
    assert!(matches!(
        c.on_exit(t0 + s(301), s(1)),
        AfterExit::Restart { .. }
    ));
    // The backoff kept growing (capped); a healthy minute resets it and the count.
    assert_eq!(c.on_exit(t0 + s(302), s(1)), restart(6, 4000));
    assert_eq!(c.on_exit(t0 + s(400), s(60)), restart(7, 500));
    for i in 0..3 {
        assert!(matches!(
            c.on_exit(t0 + s(401 + i), s(1)),
            AfterExit::Restart { .. }
        ));
    }
    assert_eq!(
        c.on_exit(t0 + s(405), s(1)),
        AfterExit::GiveUp { crashes: 5 }
    );
}

/// A stand-in engine that says something on stderr and exits at once.
fn crasher(dir: &std::path::Path) -> PreparedEngine {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("llama-server");
    fs_err::write(
        &bin,
        "#!/bin/sh\necho boom: stand-in engine exits >&2\nexit 3\n",
    )
    .unwrap();
    fs_err::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    fs_err::write(dir.join("m.gguf"), b"GGUF").unwrap();
    PreparedEngine {
        binary: bin,
        model: llorch_io::handoff::EngineModel {
            reference: "file:m.gguf".into(),
            path: dir.join("m.gguf"),
            digest: "0".repeat(64),
            metadata: serde_json::json!({}),
        },
        flags: Vec::new(),
        env: Vec::new(),
        pool_id: llorch_types::PoolId::parse("standin").unwrap(),
        replica_id: "r0".into(),
        fingerprint: "f".repeat(64),
        host: "127.0.0.1".into(),
        ports: vec![0],
        ready_timeout_s: 600,
        // The stand-in is a script: its interpreter is no engine's to run.
        sandbox: llorch_profile::SandboxMode::Off,
        listen: llorch_profile::ListenMode::Tcp,
        gpu: false,
        engine_version: "stand-in".into(),
    }
}

#[test]
fn a_stand_in_that_keeps_crashing_is_restarted_with_backoff_then_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let layout = Layout::at(root.clone(), root.join("cache"), root.join("rt"));
    let policy = RestartPolicy {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(4),
        healthy_reset: Duration::from_secs(60),
        max_crashes: 3,
        window: Duration::from_secs(3600),
    };
    let sup = Supervisor::start(crasher(dir.path()), layout.clone(), policy, "test").unwrap();
    // Waited on the state, not on time: the bound only ends a hang.
    let end = sup.wait_for(Duration::from_secs(600), |s| {
        matches!(s, EngineState::Failed { .. })
    });
    let EngineState::Failed { reason } = end else {
        panic!("never gave up: {end:?}");
    };
    assert!(reason.contains("crashed 3 times"), "{reason}");
    assert!(
        reason.contains("boom: stand-in engine exits"),
        "the log's tail: {reason}"
    );
    assert_eq!(
        sup.restarts(),
        2,
        "two restarts, then the third crash gives up"
    );
    assert!(matches!(
        sup.wait_ready(Duration::from_secs(1)),
        Err(NotReady::Failed(_))
    ));
    // Given up: the pool is free again (no run record left behind).
    assert!(
        crate::run_state::read_pool(&layout, &llorch_types::PoolId::parse("standin").unwrap())
            .is_none()
    );
    sup.stop();
}

/// A stand-in engine that serves 200 on every GET (its `/health`) on
/// the `--port` it is given, until it is killed.
const SERVER: &str = r#"#!/bin/sh
while [ $# -gt 0 ]; do [ "$1" = --port ] && PORT=$2; shift; done
exec python3 -c '
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
' "$PORT"
"#;

#[test]
fn a_stand_in_killed_while_serving_is_restarted_and_ready_again() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut prep = crasher(dir.path());
    fs_err::write(&prep.binary, SERVER).unwrap();
    fs_err::set_permissions(&prep.binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    prep.pool_id = llorch_types::PoolId::parse("standin-served").unwrap();
    let root = dir.path().to_path_buf();
    let layout = Layout::at(root.clone(), root.join("cache"), root.join("rt"));
    let policy = RestartPolicy {
        initial_backoff: Duration::from_millis(1),
        ..RestartPolicy::default()
    };
    let sup = Supervisor::start(prep, layout, policy, "test").unwrap();
    let ready =
        |s: &EngineState| matches!(s, EngineState::Ready { .. } | EngineState::Failed { .. });
    let EngineState::Ready { pid: first, .. } = sup.wait_for(Duration::from_secs(600), ready)
    else {
        panic!("the stand-in never served: {:?}", sup.state());
    };
    // SAFETY: kill(2) on the stand-in this supervisor started and has not reaped.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    let again = sup.wait_for(Duration::from_secs(600), |s| {
        matches!(s, EngineState::Ready { pid, .. } if *pid != first)
            || matches!(s, EngineState::Failed { .. })
    });
    let EngineState::Ready { pid: second, .. } = again else {
        panic!("not ready again: {again:?}");
    };
    assert_eq!(sup.restarts(), 1);
    sup.stop();
    // Stopped: the restarted stand-in is gone too (reaped by its supervisor;
    // a process that reused its pid since runs something else).
    let cmdline = fs_err::read(format!("/proc/{second}/cmdline")).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains("serve_forever"),
        "the stand-in {second} outlived its supervisor"
    );
}
