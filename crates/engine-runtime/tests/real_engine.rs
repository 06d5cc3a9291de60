//! The real `llama-server` from the default pin and the real default model:
//! built and fetched once per machine into the workspace cache (under the
//! cache locks), then shared by every test here and in the other crates.

use engine_provisioner::build::BuildOptions;
use engine_runtime::lifecycle::{self, Stopped};
use engine_runtime::run_state::RunPaths;
use engine_runtime::supervisor::{EngineState, RestartPolicy, Supervisor};
use llorch_io::handoff::{Handoff, Owner, ProcessIdentity, RunRecord};
use llorch_io::paths::Layout;
use llorch_profile::Profile;
use llorch_stack::provision;
use llorch_types::PoolId;
use std::time::Duration;

use test_support::workspace_root as repo_root;

/// The workspace cache (shared), a private runtime dir, and a pool of our own.
fn setup(pool: &str) -> (tempfile::TempDir, Layout, Profile, PoolId) {
    let rt = tempfile::tempdir().unwrap();
    let root = repo_root();
    let layout = test_support::layout(rt.path());
    let p = Profile::resolve(&root, None).unwrap();
    (rt, layout, p, PoolId::parse(pool).unwrap())
}

fn prepare(p: &Profile, pool: &PoolId, layout: &Layout) -> engine_runtime::flags::PreparedEngine {
    llorch_stack::prepare(p, pool, layout, &BuildOptions::quiet())
        .unwrap()
        .engine
}

fn supervised() -> Owner {
    Owner::Supervised {
        supervisor: ProcessIdentity::current(),
        command: "test".into(),
    }
}

fn completion(url: &str, prompt: &str, n: u32) -> String {
    let client = match llorch_io::llama_server::socket_of(url) {
        Some(sock) => llorch_io::http::unix_blocking_client(sock),
        None => llorch_io::http::blocking_client(),
    };
    let r: serde_json::Value = client
        .post(llorch_io::llama_server::http_url(url, "/completion"))
        .json(&serde_json::json!({"prompt": prompt, "n_predict": n, "temperature": 0.0, "seed": 42, "cache_prompt": false}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    r["content"].as_str().unwrap().to_string()
}

fn gone(pid: u32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
        || fs_err::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z"))
            .unwrap_or(true)
}

#[test]
fn the_default_pin_builds_once_and_is_relocatable() {
    let (_rt, layout, p, _) = setup("build-check");
    let out = engine_provisioner::build(&p, &layout, &BuildOptions::quiet()).unwrap();
    assert!(out.version.contains("commit 4df29be"), "{}", out.version);
    let again = engine_provisioner::build(&p, &layout, &BuildOptions::quiet()).unwrap();
    assert!(again.cache_hit, "the second build is a cache hit");
    assert_eq!(again.cmake_invocations, 0);
    assert!(again.duration_s < 5.0);
    // Relocatable: nothing resolves inside the build or source trees, and a copy elsewhere runs.
    let ldd = llorch_io::cmd::Cmd::new("ldd")
        .arg(&out.binary)
        .read()
        .unwrap();
    assert!(
        !ldd.contains("not found")
            && !ldd.contains("/cache/build-v1/")
            && !ldd.contains("/cache/src-v1/"),
        "{ldd}"
    );
    let moved = tempfile::tempdir().unwrap();
    let copy = moved.path().join("llama-server");
    fs_err::copy(&out.binary, &copy).unwrap();
    let (ok, v) = llorch_io::cmd::Cmd::new(&copy)
        .arg("--version")
        .read_any()
        .unwrap();
    assert!(ok);
    assert!(v.contains("4df29be"));
}

#[test]
fn spawn_ready_complete_stop_leaves_nothing() {
    let (_rt, layout, p, pool) = setup("lc-basic");
    let prep = prepare(&p, &pool, &layout);
    std::env::set_var("HF_TOKEN", "hf-secret-in-test");
    std::env::set_var("LLORCH_API_TOKEN", "orch-secret-in-test");
    let eng = lifecycle::spawn(&prep, &layout, &supervised()).unwrap();
    let pid = eng.pid();
    let environ = fs_err::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        !environ.contains("secret-in-test") && environ.contains("PATH="),
        "the engine's environment carries no secrets: {environ}"
    );
    let paths = RunPaths::new(&layout, &pool);
    assert!(paths.pid_file.is_file() && paths.handoff.is_file());
    let h = Handoff::read(&paths.handoff).unwrap().unwrap();
    assert_eq!(h.process, eng.identity);
    assert!(h.process.exe.ends_with("llama-server"));
    assert_eq!(
        RunRecord::read(&paths.pid_file).unwrap().unwrap().process,
        eng.identity
    );
    assert_eq!(h.model.digest, prep.model.digest);
    assert!(h
        .flags
        .join(" ")
        .contains("--parallel 1 --no-cont-batching --no-webui --metrics"));
    assert!(eng.metrics_ok);
    // The engine runs sandboxed (server.sandbox defaults to auto): the kernel
    // says so for the process itself, and the handoff records what is on.
    let status = fs_err::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert_eq!(
        status.contains("Seccomp:\t2"),
        eng.sandbox.seccomp,
        "seccomp filter mode iff reported: {status}"
    );
    let limits = fs_err::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max core file size") && l.contains(" 0 ")),
        "{limits}"
    );
    assert_eq!(
        h.sandbox
            .as_ref()
            .map(engine_runtime::sandbox::Protections::describe),
        Some(eng.sandbox.summary())
    );
    if std::env::var_os("LLORCH_REQUIRE_SANDBOX").is_some() {
        assert!(
            eng.sandbox.missing().is_empty(),
            "{}",
            eng.sandbox.summary()
        );
    }
    eprintln!("{} at {}", eng.sandbox.summary(), eng.url);
    // As root (CI): a unix socket in a network namespace of its own, run by
    // the dedicated user, as the kernel sees it.
    if eng.sandbox.netns {
        assert!(
            eng.url.starts_with("unix:/") && eng.port == 0,
            "{}",
            eng.url
        );
        let ns = |p: &str| fs_err::read_link(format!("/proc/{p}/ns/net")).unwrap();
        assert_ne!(
            ns(&pid.to_string()),
            ns("self"),
            "the engine's own network namespace"
        );
        let tcp = fs_err::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap();
        assert_eq!(
            tcp.lines().count(),
            1,
            "no TCP socket in its namespace: {tcp}"
        );
    }
    if let Some(user) = &eng.sandbox.user {
        let uid = engine_runtime::sandbox::isolate::EngineUser::lookup()
            .unwrap()
            .uid;
        assert_eq!(user, engine_runtime::sandbox::isolate::ENGINE_USER);
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        let ids: Vec<u32> = line
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap())
            .collect();
        assert_eq!(
            ids,
            vec![uid; 4],
            "real, effective, saved and filesystem uid: {line}"
        );
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("Groups:") && l.split_whitespace().count() == 1),
            "no supplementary groups: {status}"
        );
    }
    let text = completion(&eng.url, "The capital of France is", 8);
    assert!(!text.is_empty());
    let socket_dir = paths.socket_dir.clone();
    eng.stop();
    assert!(gone(pid), "no process left");
    assert!(!paths.pid_file.exists() && !paths.handoff.exists());
    assert!(
        !socket_dir.exists(),
        "the socket's directory is removed with the engine"
    );
}

#[test]
fn a_taken_port_moves_to_the_next_candidate() {
    let (_rt, layout, mut p, pool) = setup("lc-port");
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = blocker.local_addr().unwrap().port();
    p.file.server.port = llorch_profile::PortSpec::Number(taken);
    p.file.server.listen = llorch_profile::ListenMode::Tcp;
    let prep = prepare(&p, &pool, &layout);
    let eng = lifecycle::spawn(&prep, &layout, &supervised()).unwrap();
    assert_ne!(eng.port, taken);
    assert!(eng.url.ends_with(&format!(":{}", eng.port)));
    eng.stop();
}

#[test]
fn a_stale_or_foreign_run_record_is_cleaned_not_acted_on() {
    let (_rt, layout, _p, pool) = setup("lc-stale");
    let paths = RunPaths::new(&layout, &pool);
    paths.ensure_dirs(&layout).unwrap();
    // PID 1 exists but is another program (and another start time): never signalled.
    let foreign = ProcessIdentity {
        pid: 1,
        start_time: 12345,
        exe: "/usr/bin/llama-server".into(),
    };
    for text in [
        serde_json::to_string(&RunRecord {
            schema: 2,
            pool: pool.clone(),
            process: foreign.clone(),
            owner: Owner::Detached,
            fingerprint: "f".into(),
            port: 1,
            started_at: "x".into(),
        })
        .unwrap(),
        "{\"pid\": 1, \"llama-server\": true}".to_string(),
        "not json".to_string(),
    ] {
        fs_err::write(&paths.pid_file, &text).unwrap();
        assert!(
            engine_runtime::run_state::read_pool(&layout, &pool).is_none(),
            "{text}"
        );
        assert!(!paths.pid_file.exists(), "stale record removed");
        fs_err::write(&paths.pid_file, &text).unwrap();
        assert_eq!(
            lifecycle::stop_pool(&layout, &pool).unwrap(),
            Stopped::Nothing
        );
    }
    assert!(
        std::path::Path::new("/proc/1/stat").exists(),
        "pid 1 untouched"
    );

    // Records of other pools that nobody keeps are swept by the next spawn,
    // so one-off pools do not pile up; a live one is kept.
    let other = PoolId::parse(&format!("lc-stale-other-{}", std::process::id())).unwrap();
    let other_paths = RunPaths::new(&layout, &other);
    let record = RunRecord {
        schema: 2,
        pool: other.clone(),
        process: foreign.clone(),
        owner: Owner::Detached,
        fingerprint: "f".into(),
        port: 1,
        started_at: "x".into(),
    };
    fs_err::write(
        &other_paths.pid_file,
        serde_json::to_string(&record).unwrap(),
    )
    .unwrap();
    let p = llorch_profile::Profile::resolve(&layout.root, None).unwrap();
    let prep = prepare(&p, &pool, &layout);
    let eng = lifecycle::spawn(&prep, &layout, &supervised()).unwrap();
    assert!(
        !other_paths.pid_file.exists(),
        "the stale record of another pool was swept"
    );
    assert!(paths.pid_file.exists(), "the live one stays");
    eng.stop();
}

#[test]
fn run_state_is_never_written_through_a_symlink_and_errors_name_the_path() {
    let (rt, _layout, p, pool) = setup("lc-link");
    let cache = rt.path().join("cache");
    fs_err::create_dir_all(&cache).unwrap();
    let outside = tempfile::tempdir().unwrap();
    fs_err::os::unix::fs::symlink(outside.path(), cache.join("run")).unwrap();
    let layout = Layout::at(repo_root(), cache.clone(), rt.path().join("runtime"));
    let prep = prepare(
        &p,
        &pool,
        &Layout::at(repo_root(), repo_root().join("cache"), rt.path().join("x")),
    );
    let e = lifecycle::spawn(&prep, &layout, &supervised())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&cache.join("run").display().to_string()) && e.contains("symlink"),
        "{e}"
    );
    assert_eq!(
        fs_err::read_dir(outside.path()).unwrap().count(),
        0,
        "nothing written outside"
    );
}

#[test]
fn an_engine_bound_off_loopback_gets_a_private_api_key() {
    use std::os::unix::fs::PermissionsExt;
    let (_rt, layout, mut p, pool) = setup("lc-key");
    p.file.server.host = "0.0.0.0".into();
    let prep = prepare(&p, &pool, &layout);
    let eng = lifecycle::spawn(&prep, &layout, &supervised()).unwrap();
    let paths = RunPaths::new(&layout, &pool);
    let mode = fs_err::metadata(&paths.api_key)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let key = fs_err::read_to_string(&paths.api_key).unwrap();
    let h = Handoff::read(&paths.handoff).unwrap().unwrap();
    assert_eq!(h.api_key().unwrap().as_deref(), Some(key.trim()));
    let cmdline = fs_err::read(format!("/proc/{}/cmdline", eng.pid())).unwrap();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(key.trim()),
        "the key is not on the command line"
    );
    let c = llorch_io::http::probe_client();
    let slots = |k: Option<&str>| {
        let mut r = c.get(format!("{}/slots", eng.url));
        if let Some(k) = k {
            r = r.bearer_auth(k);
        }
        r.send().unwrap().status().as_u16()
    };
    assert_eq!(slots(None), 401);
    assert_eq!(slots(Some(key.trim())), 200);
    eng.stop();
    assert!(!paths.api_key.exists());
}

#[test]
fn provision_is_idempotent_and_restarts_on_a_flag_change_without_rebuilding() {
    let (_rt, layout, mut p, pool) = setup("lc-prov");
    let first = provision(&p, &pool, &layout, &BuildOptions::quiet()).unwrap();
    assert_eq!(first.action, "started");
    let second = provision(&p, &pool, &layout, &BuildOptions::quiet()).unwrap();
    assert_eq!(second.action, "already_running");
    assert_eq!(second.pid, first.pid);
    p.file.server.ctx_size = 1024;
    let third = provision(&p, &pool, &layout, &BuildOptions::quiet()).unwrap();
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
    // A supervisor cannot take a pool a detached engine keeps.
    let e = Supervisor::start(
        prepare(&p, &pool, &layout),
        layout.clone(),
        RestartPolicy::default(),
        "test",
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(
        e.contains(&third.pid.to_string()) && e.contains("engine down --pool lc-prov"),
        "{e}"
    );
    assert_eq!(
        lifecycle::stop_pool(&layout, &pool).unwrap(),
        Stopped::Engine(third.pid)
    );
    assert!(gone(third.pid));
}

#[test]
fn a_killed_engine_is_restarted_by_its_supervisor_and_stays_deterministic() {
    let (_rt, layout, p, pool) = setup("lc-super");
    let prep = prepare(&p, &pool, &layout);
    let policy = RestartPolicy {
        initial_backoff: Duration::from_millis(100),
        ..Default::default()
    };
    let sup = Supervisor::start(prep.clone(), layout.clone(), policy, "test").unwrap();
    let url = sup.wait_ready(Duration::from_secs(60)).unwrap();
    let pid = match sup.state() {
        EngineState::Ready { pid, .. } => pid,
        s => panic!("{s:?}"),
    };
    let prompt = "Once upon a time";
    let a = completion(&url, prompt, 24);
    let b = completion(&url, prompt, 24);
    assert_eq!(a, b, "same prompt, same tokens");
    // One engine per pool, whoever asks: a second supervisor, a provision and a down are refused.
    let e = Supervisor::start(prep, layout.clone(), RestartPolicy::default(), "test")
        .err()
        .expect("second supervisor refused")
        .to_string();
    assert!(e.contains(&pid.to_string()), "{e}");
    let e = lifecycle::stop_pool(&layout, &pool)
        .unwrap_err()
        .to_string();
    assert!(e.contains("supervised by `test`"), "{e}");
    let mut changed = p.clone();
    changed.file.server.ctx_size = 1024;
    let e = provision(&changed, &pool, &layout, &BuildOptions::quiet())
        .unwrap_err()
        .to_string();
    assert!(e.contains("already has an engine"), "{e}");
    let same = provision(&p, &pool, &layout, &BuildOptions::quiet()).unwrap();
    assert_eq!(
        (same.action.as_str(), same.pid),
        ("already_running", pid),
        "attached"
    );
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
    // A hung engine (SIGSTOP) reported as stalled is killed and restarted.
    unsafe { libc::kill(pid2 as i32, libc::SIGSTOP) };
    sup.state_handle().request_restart();
    let st = sup.wait_for(
        Duration::from_secs(60),
        |s| matches!(s, EngineState::Ready { pid: p3, .. } if *p3 != pid2),
    );
    assert!(matches!(st, EngineState::Ready { .. }), "{st:?}");
    assert!(gone(pid2), "the hung engine was killed");
    let pid3 = match st {
        EngineState::Ready { pid, .. } => pid,
        _ => unreachable!(),
    };
    sup.stop();
    assert!(gone(pid3), "the engine dies with its supervisor");
    assert!(
        engine_runtime::run_state::read_pool(&layout, &pool).is_none(),
        "no run files left"
    );
}

#[test]
fn a_supervisor_keeps_its_pool_while_it_waits_to_restart_a_crashed_engine() {
    let (_rt, layout, p, pool) = setup("lc-window");
    let prep = prepare(&p, &pool, &layout);
    // A long backoff: the window in which `provision` used to start a second engine.
    let policy = RestartPolicy {
        initial_backoff: Duration::from_secs(3),
        ..Default::default()
    };
    let sup = Supervisor::start(prep, layout.clone(), policy, "test").unwrap();
    sup.wait_ready(Duration::from_secs(60)).unwrap();
    let pid = match sup.state() {
        EngineState::Ready { pid, .. } => pid,
        s => panic!("{s:?}"),
    };
    // SAFETY: kill(2) on our supervised engine.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let s = sup.wait_for(Duration::from_secs(10), |s| {
        matches!(s, EngineState::Restarting { .. })
    });
    assert!(matches!(s, EngineState::Restarting { .. }), "{s:?}");
    // The pool is still ours: provision refuses it, naming this supervisor.
    let e = match provision(&p, &pool, &layout, &BuildOptions::quiet()) {
        Ok(o) => panic!("provision started a second engine: pid {}", o.pid),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains(&std::process::id().to_string()),
        "names the supervisor: {e}"
    );
    let paths = RunPaths::new(&layout, &pool);
    assert!(
        !paths.handoff.exists(),
        "nobody attaches to the dead engine"
    );
    // The supervisor restarts it; the run record names the new engine, and only it runs.
    sup.wait_for(
        Duration::from_secs(60),
        |s| matches!(s, EngineState::Ready { pid: p2, .. } if *p2 != pid),
    );
    let EngineState::Ready { pid: new, .. } = sup.state() else {
        panic!("{:?}", sup.state())
    };
    let rec = RunRecord::read(&paths.pid_file).unwrap().unwrap();
    assert_eq!(rec.process.pid, new);
    assert!(gone(pid));
    sup.stop();
    assert!(gone(new));
    assert!(!paths.pid_file.exists());
}
