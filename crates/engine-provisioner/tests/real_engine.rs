//! The real `llama-server` from the default pin and the real default model:
//! built and fetched once per machine into the workspace cache (under the
//! cache locks), then shared by every test here and in the other crates.

mod support;

use engine_provisioner::build::BuildOptions;
use engine_provisioner::lifecycle::{self, Attach, RunPaths};
use engine_provisioner::provision;
use engine_provisioner::supervisor::{EngineState, RestartPolicy, Supervisor};
use engine_provisioner::Profile;
use llorch_io::paths::Layout;
use std::time::Duration;
use support::repo_root;

/// The workspace cache (shared), a private runtime dir, and a pool of our own.
fn setup(pool: &str) -> (tempfile::TempDir, Layout, Profile) {
    let rt = tempfile::tempdir().unwrap();
    let root = repo_root();
    let layout = Layout::at(root.clone(), root.join("cache"), rt.path().to_path_buf());
    let mut p = Profile::resolve(&root, None).unwrap();
    p.file.pool = pool.into();
    (rt, layout, p)
}

fn completion(url: &str, prompt: &str, n: u32) -> String {
    let r: serde_json::Value = reqwest::blocking::Client::new()
        .post(format!("{url}/completion"))
        .json(&serde_json::json!({"prompt": prompt, "n_predict": n, "temperature": 0.0, "seed": 42, "cache_prompt": false}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    r["content"].as_str().unwrap().to_string()
}

fn gone(pid: u32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
        || std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z"))
            .unwrap_or(true)
}

#[test]
fn the_default_pin_builds_once_and_is_relocatable() {
    let (_rt, layout, p) = setup("build-check");
    let out = engine_provisioner::build(&p, &layout, &BuildOptions::quiet()).unwrap();
    assert!(out.version.contains("commit 4df29be"), "{}", out.version);
    let again = engine_provisioner::build(&p, &layout, &BuildOptions::quiet()).unwrap();
    assert!(again.cache_hit, "the second build is a cache hit");
    assert_eq!(again.cmake_invocations, 0);
    assert!(again.duration_s < 5.0);
    // Relocatable: nothing resolves inside the build or source trees, and a copy elsewhere runs.
    let ldd = std::process::Command::new("ldd")
        .arg(&out.binary)
        .output()
        .unwrap();
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    assert!(
        !ldd.contains("not found")
            && !ldd.contains("/cache/build-v1/")
            && !ldd.contains("/cache/src-v1/"),
        "{ldd}"
    );
    let moved = tempfile::tempdir().unwrap();
    let copy = moved.path().join("llama-server");
    std::fs::copy(&out.binary, &copy).unwrap();
    let v = std::process::Command::new(&copy)
        .arg("--version")
        .output()
        .unwrap();
    assert!(v.status.success());
    assert!(String::from_utf8_lossy(&v.stderr).contains("4df29be"));
}

#[test]
fn spawn_ready_complete_stop_leaves_nothing() {
    let (_rt, layout, p) = setup("lc-basic");
    let (prep, _) = provision::prepare(&p, &layout, &BuildOptions::quiet()).unwrap();
    let eng = lifecycle::spawn(&prep, &layout, Attach::Supervised).unwrap();
    let pid = eng.pid;
    let paths = RunPaths::new(&layout, "lc-basic");
    assert!(paths.pid_file.is_file() && paths.handoff.is_file());
    let h = lifecycle::Handoff::read(&paths.handoff).unwrap();
    assert_eq!(h.pid, pid);
    assert_eq!(h.model.digest, prep.model.digest);
    assert!(h
        .flags
        .join(" ")
        .contains("--parallel 1 --no-cont-batching --no-webui --metrics"));
    assert!(eng.metrics_ok);
    let text = completion(&eng.url, "The capital of France is", 8);
    assert!(!text.is_empty());
    eng.stop();
    assert!(gone(pid), "no process left");
    assert!(!paths.pid_file.exists() && !paths.handoff.exists());
}

#[test]
fn a_taken_port_moves_to_the_next_candidate() {
    let (_rt, layout, mut p) = setup("lc-port");
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = blocker.local_addr().unwrap().port();
    p.file.server.port = engine_provisioner::profile::PortSpec::Number(taken);
    let (prep, _) = provision::prepare(&p, &layout, &BuildOptions::quiet()).unwrap();
    let eng = lifecycle::spawn(&prep, &layout, Attach::Supervised).unwrap();
    assert_ne!(eng.port, taken);
    assert!(eng.url.ends_with(&format!(":{}", eng.port)));
    eng.stop();
}

#[test]
fn a_stale_pid_file_is_cleaned_not_acted_on() {
    let (_rt, layout, _p) = setup("lc-stale");
    let paths = RunPaths::new(&layout, "lc-stale");
    std::fs::create_dir_all(paths.pid_file.parent().unwrap()).unwrap();
    // PID 1 exists but is not llama-server; a dead PID does not exist.
    for pid in [1u32, 999_999] {
        std::fs::write(
            &paths.pid_file,
            format!("{{\"pid\":{pid},\"started_at\":\"x\",\"fingerprint\":\"f\",\"port\":1}}"),
        )
        .unwrap();
        assert!(lifecycle::check_pid_file(&paths).is_none());
        assert!(!paths.pid_file.exists(), "stale PID file removed");
        assert!(
            lifecycle::stop_pool(&layout, "lc-stale").is_none(),
            "nothing is signalled"
        );
    }
}

#[test]
fn provision_is_idempotent_and_restarts_on_a_flag_change_without_rebuilding() {
    let (_rt, layout, mut p) = setup("lc-prov");
    let first = provision::provision(&p, &layout, &BuildOptions::quiet()).unwrap();
    assert_eq!(first.action, "started");
    let second = provision::provision(&p, &layout, &BuildOptions::quiet()).unwrap();
    assert_eq!(second.action, "already_running");
    assert_eq!(second.pid, first.pid);
    p.file.server.ctx_size = 1024;
    let third = provision::provision(&p, &layout, &BuildOptions::quiet()).unwrap();
    assert_eq!(third.action, "restarted");
    assert!(third.build_cache_hit, "a server flag never rebuilds");
    assert!(
        third
            .changes
            .iter()
            .any(|c| c.contains("--ctx-size") || c.contains("1024")),
        "{:?}",
        third.changes
    );
    assert_ne!(third.pid, first.pid);
    assert!(gone(first.pid));
    lifecycle::stop_pool(&layout, "lc-prov");
    assert!(gone(third.pid));
}

#[test]
fn a_killed_engine_is_restarted_by_its_supervisor_and_stays_deterministic() {
    let (_rt, layout, p) = setup("lc-super");
    let (prep, _) = provision::prepare(&p, &layout, &BuildOptions::quiet()).unwrap();
    let policy = RestartPolicy {
        initial_backoff: Duration::from_millis(100),
        ..Default::default()
    };
    let sup = Supervisor::start(prep, layout.clone(), policy);
    let url = sup.wait_ready(Duration::from_secs(60)).unwrap();
    let pid = match sup.state() {
        EngineState::Ready { pid, .. } => pid,
        s => panic!("{s:?}"),
    };
    let prompt = "Once upon a time";
    let a = completion(&url, prompt, 24);
    let b = completion(&url, prompt, 24);
    assert_eq!(a, b, "same prompt, same tokens");
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let st = sup.wait_for(
        Duration::from_secs(60),
        |s| matches!(s, EngineState::Ready { pid: p2, .. } if *p2 != pid),
    );
    let EngineState::Ready {
        url: url2,
        pid: pid2,
        ..
    } = st
    else {
        panic!("not restarted: {st:?}")
    };
    assert!(sup.restarts() >= 1);
    assert_eq!(
        completion(&url2, prompt, 24),
        a,
        "identical tokens after a restart"
    );
    sup.stop();
    assert!(gone(pid2), "the engine dies with its supervisor");
}
