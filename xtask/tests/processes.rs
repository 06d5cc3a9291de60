//! Ownership against real processes: the `xtask` binary, real llama-server
//! engines (the default profile, shared through the workspace cache), a
//! private runtime directory per test and a pool id per test.

mod common;

use engine_runtime::run_state::RunPaths;
use llorch_io::cmd::{Cmd, Io};
use llorch_types::PoolId;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use test_support::{layout, workspace_root as root};

use common::xtask_in as xtask;

/// Live processes whose stdout is `log` (every engine of a pool writes its log there).
fn engines_writing(log: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in fs_err::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if fs_err::read_link(format!("/proc/{pid}/fd/1")).is_ok_and(|p| p == log) {
            let zombie = fs_err::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| {
                    s.rsplit_once(')')
                        .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                })
                .unwrap_or(true);
            if !zombie {
                pids.push(pid);
            }
        }
    }
    pids
}

/// `xtask serve --pool P` on a free port, once it serves: the child (stderr
/// piped, stdout drained in the background) and the orchestrator's URL.
fn serve(rt: &Path, pool: &PoolId) -> (llorch_io::cmd::KillOnDrop, String) {
    serve_with(rt, &["--pool", pool.as_str()])
}

/// `xtask serve ARGS` on a free port, once it serves.
fn serve_with(rt: &Path, args: &[&str]) -> (llorch_io::cmd::KillOnDrop, String) {
    common::serving(
        xtask(rt)
            .arg("serve")
            .args(args)
            .args(["--addr", "127.0.0.1:0"]),
        Io::Piped,
    )
}

/// Stops a pool's detached engine when the test ends, passed or not.
struct PoolDown<'a>(&'a Path, PoolId);

impl Drop for PoolDown<'_> {
    fn drop(&mut self) {
        let _ = xtask(self.0)
            .args(["engine", "down", "--pool", self.1.as_str()])
            .spawn(Io::Null, Io::Null)
            .and_then(|mut c| c.wait());
    }
}

/// How `child` exited; it must exit within `within` (`what` names it in the failure).
fn exit_within(
    child: &mut std::process::Child,
    what: &str,
    within: Duration,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `engine down --pool` succeeds and the pool's engines are gone: what it printed.
fn engine_down(rt: &Path, pool: &PoolId, log: &Path) -> String {
    let down = xtask(rt)
        .args(["engine", "down", "--pool", pool.as_str()])
        .spawn(Io::Piped, Io::Piped)
        .and_then(|c| c.wait_with_output())
        .unwrap();
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    wait_until("the engine to exit", Duration::from_secs(10), || {
        engines_writing(log).is_empty()
    });
    String::from_utf8_lossy(&down.stdout).into_owned()
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two `provision` runs started at the same moment end with one engine:
/// both exit 0, one started it and the other attached, and nothing else
/// runs for the pool. Repeated (`LLORCH_PROVISION_ROUNDS`, default 8).
#[test]
fn two_provisions_at_once_end_with_one_engine() {
    let rounds: usize = std::env::var("LLORCH_PROVISION_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let rt = tempfile::tempdir().unwrap();
    let layout = layout(rt.path());
    for round in 0..rounds {
        let pool = PoolId::parse(&format!("xt-race-{}-{round}", std::process::id())).unwrap();
        let paths = RunPaths::new(&layout, &pool);
        let _down = PoolDown(rt.path(), pool.clone());
        let spawn = || {
            xtask(rt.path())
                .args(["provision", "--pool", pool.as_str(), "--json"])
                .spawn(Io::Piped, Io::Piped)
                .unwrap()
        };
        let (a, b) = (spawn(), spawn());
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        let mut outs = Vec::new();
        for o in [&a, &b] {
            assert!(
                o.status.success(),
                "round {round}: provision failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&o.stdout)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)));
            outs.push(v);
        }
        let mut actions: Vec<&str> = outs.iter().map(|v| v["action"].as_str().unwrap()).collect();
        actions.sort();
        assert_eq!(actions, ["already_running", "started"], "round {round}");
        assert_eq!(outs[0]["pid"], outs[1]["pid"], "round {round}: one engine");
        let pid = outs[0]["pid"].as_u64().unwrap() as u32;
        assert_eq!(
            engines_writing(&paths.log),
            vec![pid],
            "round {round}: no other engine"
        );
        let down = engine_down(rt.path(), &pool, &paths.log);
        assert!(down.contains(&format!("pid {pid}")), "{down}");
        assert!(
            !paths.pid_file.exists() && !paths.handoff.exists(),
            "run files removed"
        );
        let _ = fs_err::remove_file(&paths.log);
    }
}

/// `serve` of a pool whose detached engine `provision` started (one profile
/// is a stack of one pool, and a stack attaches): tokens stream through the
/// orchestrator from that very engine; when it dies, `serve` provisions it
/// again; when `serve` stops, the detached engine keeps running until
/// `engine down`.
/// A `--json` command's document; the command must succeed.
fn json_of(cmd: Cmd) -> serde_json::Value {
    let (ok, out, err) = common::run(cmd);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn serve_attaches_to_a_provisioned_engine_revives_it_and_leaves_it_running() {
    let rt = tempfile::tempdir().unwrap();
    let layout = layout(rt.path());
    let pool = PoolId::parse(&format!("xt-attach-{}", std::process::id())).unwrap();
    let paths = RunPaths::new(&layout, &pool);
    let _down = PoolDown(rt.path(), pool.clone());
    let v = json_of(xtask(rt.path()).args(["provision", "--pool", pool.as_str(), "--json"]));
    let first = v["pid"].as_u64().unwrap() as u32;
    // `engine status` asks the running engine itself.
    let st =
        json_of(xtask(rt.path()).args(["engine", "status", "--pool", pool.as_str(), "--json"]));
    assert_eq!(st["running"], true, "{st}");
    assert_eq!(st["pid"], first, "{st}");
    assert_eq!(st["url"], v["url"], "{st}");
    assert_eq!(st["health"], 200, "{st}");
    assert_eq!(st["owner"], v["owner"], "{st}");
    assert!(st["slots_total"].as_u64().is_some_and(|n| n >= 1), "{st}");
    assert_eq!(st["slots_busy"], 0, "{st}");
    assert!(st["uptime_s"].is_u64(), "{st}");
    assert_eq!(st["fingerprint"].as_str().map(str::len), Some(64), "{st}");
    let detached = || {
        llorch_io::handoff::RunRecord::read(&paths.pid_file)
            .unwrap()
            .filter(|r| {
                r.process.is_running() && matches!(r.owner, llorch_io::handoff::Owner::Detached)
            })
            .map(|r| r.process.pid)
    };
    let (mut child, url) = serve(rt.path(), &pool);
    assert_eq!(detached(), Some(first), "serve kept the detached engine");
    assert_eq!(engines_writing(&paths.log), vec![first], "and started none");
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stream = || {
        tokio_rt.block_on(async {
            let c = llorch_io::http::async_client();
            let body = serde_json::json!({"prompt": "Hello", "max_tokens": 8});
            orchestratord::client::stream_task(&c, &url, &body, None, None).await
        })
    };
    let r = stream().unwrap();
    assert!(
        r.order_ok() && r.end.is_some() && !r.tokens.is_empty(),
        "{:?}",
        r.order
    );
    // The detached engine dies: serve starts it again through `provision`.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    wait_until(
        "the engine provisioned again",
        Duration::from_secs(120),
        || detached().is_some_and(|p| p != first) && paths.handoff.exists(),
    );
    let second = detached().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match stream() {
            Ok(r) if r.end.is_some() && !r.tokens.is_empty() => break,
            other => assert!(
                Instant::now() < deadline,
                "no tokens after the revival: {:?}",
                other.map(|r| r.order)
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // serve stops; the detached engine does not.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = exit_within(&mut child, "serve did not exit", Duration::from_secs(60));
    assert!(status.success(), "serve exited {status}");
    assert_eq!(
        detached(),
        Some(second),
        "the detached engine keeps running"
    );
    assert_eq!(engines_writing(&paths.log), vec![second]);
    let down = engine_down(rt.path(), &pool, &paths.log);
    assert!(down.contains(&format!("pid {second}")), "{down}");
    let _ = fs_err::remove_file(&paths.log);
}

/// `serve` on SIGTERM and on SIGHUP: an open stream ends with a terminal
/// event, serve exits 0, and no engine, PID file or handoff is left. While it
/// runs, a second `provision` or `engine up` for its pool attaches to the
/// running engine or is refused, naming its pid, and that engine is untouched.
#[test]
fn serve_drains_on_sigterm_and_sighup_and_refuses_a_second_owner() {
    for (sig, name) in [(libc::SIGTERM, "term"), (libc::SIGHUP, "hup")] {
        let rt = tempfile::tempdir().unwrap();
        let layout = layout(rt.path());
        let pool = PoolId::parse(&format!("xt-drain-{}-{name}", std::process::id())).unwrap();
        let paths = RunPaths::new(&layout, &pool);
        let (mut child, url) = serve(rt.path(), &pool);
        let engine_pid = {
            let r = llorch_io::handoff::RunRecord::read(&paths.pid_file)
                .unwrap()
                .expect("a run record");
            assert!(r.process.is_running());
            r.process.pid
        };
        for args in [
            vec!["provision", "--pool", pool.as_str()],
            vec!["engine", "up", "--pool", pool.as_str()],
        ] {
            // Refused, or attached to the same engine: both name its pid.
            let second = xtask(rt.path())
                .args(&args)
                .spawn(Io::Piped, Io::Piped)
                .and_then(|c| c.wait_with_output())
                .unwrap();
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&second.stdout),
                String::from_utf8_lossy(&second.stderr)
            );
            assert!(
                said.contains(&format!("pid {engine_pid}")),
                "{args:?}: {said}"
            );
            if second.status.success() {
                assert!(said.starts_with("attached"), "{args:?}: {said}");
            }
        }
        assert_eq!(engines_writing(&paths.log), vec![engine_pid], "untouched");

        let serve_pid = child.id() as i32;
        let rt_tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let r = rt_tokio.block_on(async {
            let c = llorch_io::http::async_client();
            let id = orchestratord::client::submit(
                &c,
                &url,
                &serde_json::json!({"prompt": "Count to fifty:", "max_tokens": 48, "ignore_eos": true}),
            )
            .await
            .unwrap();
            let sent = std::sync::atomic::AtomicBool::new(false);
            let on_token = |_: &str| {
                if !sent.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    unsafe { libc::kill(serve_pid, sig) };
                }
            };
            tokio::time::timeout(
                Duration::from_secs(60),
                orchestratord::client::read_stream(&c, &url, &id, Some(&on_token), None),
            )
            .await
            .expect("the stream ended")
            .unwrap()
        });
        assert!(r.order_ok(), "{name}: {:?}", r.order);
        assert!(
            r.end.is_some(),
            "{name}: the running task finishes during the drain"
        );
        let status = exit_within(
            &mut child,
            &format!("{name}: serve did not exit"),
            Duration::from_secs(60),
        );
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(status.success(), "{name}: serve exited {status}: {err}");
        wait_until("the engine to exit", Duration::from_secs(10), || {
            engines_writing(&paths.log).is_empty()
        });
        assert!(!paths.pid_file.exists(), "{name}: PID file left");
        assert!(!paths.handoff.exists(), "{name}: handoff left");
        let _ = fs_err::remove_file(&paths.log);
    }
}

/// A cache directory whose path is not UTF-8 is refused up front, by name:
/// paths below it are written into JSON and are never converted lossily.
#[test]
fn a_non_utf8_cache_directory_is_refused_by_name() {
    use std::os::unix::ffi::OsStrExt;
    let rt = tempfile::tempdir().unwrap();
    let mut bad = rt.path().as_os_str().as_bytes().to_vec();
    bad.extend_from_slice(b"/caf\xe9");
    let out = xtask(rt.path())
        .env("LLORCH_CACHE_DIR", std::ffi::OsStr::from_bytes(&bad))
        .args(["engine", "ls"])
        .spawn(Io::Piped, Io::Piped)
        .and_then(|c| c.wait_with_output())
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cache directory")
            && err.contains("not valid UTF-8")
            && err.contains("LLORCH_CACHE_DIR"),
        "{err}"
    );
    assert!(
        !Path::new(std::ffi::OsStr::from_bytes(&bad)).exists(),
        "nothing created"
    );
}

/// When the supervisor gives up (the engine keeps dying), `serve` says so on
/// its output, with the reason, and exits non-zero, leaving nothing behind.
#[test]
fn serve_exits_non_zero_when_the_engine_fails_for_good() {
    let rt = tempfile::tempdir().unwrap();
    let layout = layout(rt.path());
    let pool = PoolId::parse(&format!("xt-fail-{}", std::process::id())).unwrap();
    let paths = RunPaths::new(&layout, &pool);
    // Serving first: the failure comes after the engine was up.
    let (mut child, _url) = serve(rt.path(), &pool);
    let stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    // Kill every engine the supervisor starts until it gives up.
    let mut killed = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "serve never gave up");
        if let Ok(Some(r)) = llorch_io::handoff::RunRecord::read(&paths.pid_file) {
            if r.process.is_running() && killed.insert(r.process.pid) {
                unsafe { libc::kill(r.process.pid as i32, libc::SIGKILL) };
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = err_reader.join().unwrap();
    assert!(
        !status.success(),
        "serve exited 0 with nothing to serve: {err}"
    );
    assert!(
        err.contains("failed and will not be restarted") && err.contains("giving up"),
        "{err}"
    );
    assert!(killed.len() >= 5, "{} engines", killed.len());
    assert!(
        engines_writing(&paths.log).is_empty(),
        "an engine outlived serve"
    );
    assert!(
        !paths.pid_file.exists() && !paths.handoff.exists(),
        "run files left"
    );
    let _ = fs_err::remove_file(&paths.log);
}

/// `serve --stack` with two pools, killed with SIGKILL: no engine outlives
/// it (parent-death signal), and the next start sweeps the dead run's
/// records and serves both pools again. (A live engine of a dead supervisor
/// is stopped by the same sweep: `real_engine.rs::a_stale_or_foreign_run_record_is_cleaned_not_acted_on`.)
#[test]
fn a_stack_killed_with_sigkill_leaves_no_engine_and_the_next_start_serves_again() {
    let rt = tempfile::tempdir().unwrap();
    let layout = layout(rt.path());
    let ids: Vec<PoolId> = ["a", "b"]
        .iter()
        .map(|n| PoolId::parse(&format!("xt-stack-{n}-{}", std::process::id())).unwrap())
        .collect();
    let file = rt.path().join("stack.yaml");
    fs_err::write(
        &file,
        format!(
            "schema: 1\npools:\n  - id: {}\n    profile: cpu\n  - id: {}\n    profile: cpu\n",
            ids[0], ids[1]
        ),
    )
    .unwrap();
    let paths: Vec<RunPaths> = ids.iter().map(|p| RunPaths::new(&layout, p)).collect();
    let engines = |paths: &[RunPaths]| -> Vec<u32> {
        paths.iter().flat_map(|p| engines_writing(&p.log)).collect()
    };
    let http = llorch_io::http::blocking_client();
    let (mut child, url) = serve_with(rt.path(), &["--stack", file.to_str().unwrap()]);
    let caps: serde_json::Value = http
        .get(format!("{url}/v1/capabilities"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let states: Vec<&str> = caps["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["ready", "ready"], "{caps}");
    let first = engines(&paths);
    assert_eq!(first.len(), 2, "one engine per pool: {first:?}");
    // Read now: once `serve` is dead its records are stale, and any other
    // test starting a command meanwhile sweeps them (the run dir is the
    // shared cache's).
    let stale = llorch_io::handoff::RunRecord::read(&paths[0].pid_file)
        .unwrap()
        .expect("pool a's run record");
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    wait_until(
        "the engines to die with serve",
        Duration::from_secs(10),
        || engines(&paths).is_empty(),
    );
    // A leftover engine of that dead run (as if its parent-death signal had
    // been lost): a live process that pool a's run record names, owned by the
    // dead `serve`. The next start must stop it (identity-checked), not leave
    // it (or a sweep of another test's spawn does: the same check).
    let mut leftover = llorch_io::cmd::KillOnDrop(
        Cmd::new("sleep")
            .arg("600")
            .spawn(Io::Null, Io::Null)
            .unwrap(),
    );
    let leftover_id = llorch_io::handoff::ProcessIdentity::of(leftover.id()).unwrap();
    // Written under the pool's lock, as every writer of run files does: a
    // sweep by another test's spawn may have read the dead run's record just
    // before and would remove this one after (CI failed so once). Under the
    // lock a sweep sees either the old record or this one, whole.
    let pool_lock = llorch_io::fsx::FileLock::exclusive(&layout.pool_lock(&ids[0]), || {}).unwrap();
    fs_err::write(
        &paths[0].pid_file,
        serde_json::to_string(&llorch_io::handoff::RunRecord {
            process: leftover_id,
            ..stale
        })
        .unwrap(),
    )
    .unwrap();
    drop(pool_lock);
    // Again: the dead run's records are swept (the leftover stopped), both pools serve.
    let (mut child, url) = serve_with(rt.path(), &["--stack", file.to_str().unwrap()]);
    wait_until(
        "the next start to stop the leftover engine",
        Duration::from_secs(10),
        || leftover.try_wait().unwrap().is_some(),
    );
    let second = engines(&paths);
    assert_eq!(second.len(), 2, "{second:?}");
    assert!(second.iter().all(|p| !first.contains(p)));
    for (p, id) in paths.iter().zip(&ids) {
        let r = llorch_io::handoff::RunRecord::read(&p.pid_file)
            .unwrap()
            .expect("a run record");
        assert!(
            r.process.is_running(),
            "pool {id}: the record names the new engine"
        );
        let r: serde_json::Value = http
            .post(format!("{url}/v1/chat/completions"))
            .json(&serde_json::json!({"model": id.as_str(), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(r["model"], id.as_str(), "{r}");
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(engines(&paths).is_empty(), "an engine outlived serve");
    for p in &paths {
        assert!(!p.pid_file.exists(), "run files left");
        let _ = fs_err::remove_file(&p.log);
    }
}

/// `serve` started with SIGINT ignored (as a script's `cmd &` starts it)
/// stops on SIGINT while it is still fetching its model, with nothing stored.
#[test]
fn sigint_stops_serve_while_it_fetches_even_when_inherited_as_ignored() {
    let rt = tempfile::tempdir().unwrap();
    // A model server that accepts and never answers: the fetch waits.
    let stall = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = stall.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in stall.incoming().flatten() {
            held.push(c);
            let _ = tx.send(());
        }
    });
    let digest = "ab".repeat(32);
    let cpu = fs_err::read_to_string(root().join("requirements/cpu.yaml")).unwrap();
    let mut profile = String::new();
    for line in cpu.lines() {
        let t = line.trim_start();
        if t.starts_with("ref:") {
            profile.push_str(&format!("  ref: http://127.0.0.1:{port}/stalled.gguf\n"));
        } else if t.starts_with("sha256:") {
            profile.push_str(&format!("  sha256: {digest}\n"));
        } else if t.starts_with("pool:") {
            profile.push_str(&format!("pool: sigint-{}\n", std::process::id()));
        } else {
            profile.push_str(line);
            profile.push('\n');
        }
    }
    let path = rt.path().join("stalled.yaml");
    fs_err::write(&path, profile).unwrap();
    let xt = env!("CARGO_BIN_EXE_xtask");
    let script = format!(
        "trap '' INT; exec {xt} serve --profile {} --addr 127.0.0.1:0",
        path.display()
    );
    let mut child = llorch_io::cmd::KillOnDrop(
        Cmd::new("sh")
            .args(["-c", &script])
            .env("LLORCH_ROOT", root())
            .env("LLORCH_CACHE_DIR", root().join("cache"))
            .env("LLORCH_RUNTIME_DIR", rt.path())
            .dir(root())
            .spawn(Io::Null, Io::Null)
            .unwrap(),
    );
    rx.recv_timeout(Duration::from_secs(120))
        .expect("serve reached the model fetch");
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = exit_within(
        &mut child,
        "SIGINT did not stop serve while it fetched",
        Duration::from_secs(10),
    );
    assert!(!status.success(), "{status:?}");
    let blob = root()
        .join("cache/models-v1/blobs")
        .join(format!("sha256-{digest}"));
    assert!(!blob.exists(), "nothing half-written is stored");
}

/// `engine up --foreground` stops on SIGHUP (a closed terminal) like on
/// SIGINT and SIGTERM: through the one signal door, engine and run files gone.
#[test]
fn engine_up_foreground_stops_cleanly_on_sighup() {
    let rt = tempfile::tempdir().unwrap();
    let pool = PoolId::parse(&format!("fg-hup-{}", std::process::id())).unwrap();
    let mut child = llorch_io::cmd::KillOnDrop(
        xtask(rt.path())
            .args(["engine", "up", "--pool", pool.as_str(), "--foreground"])
            .spawn(Io::Piped, Io::Null)
            .unwrap(),
    );
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("engine up said it is ready").unwrap();
        if line.contains("ready at") {
            break;
        }
    }
    let paths = RunPaths::new(&layout(rt.path()), &pool);
    let rec = llorch_io::handoff::RunRecord::read(&paths.pid_file)
        .unwrap()
        .expect("a run record while it runs");
    let engine = rec.process.pid;
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let status = exit_within(
        &mut child,
        "SIGHUP did not stop it",
        Duration::from_secs(20),
    );
    assert!(status.success(), "{status:?}");
    wait_until("the engine is gone", Duration::from_secs(60), || {
        !rec.process.is_running()
    });
    assert!(
        !paths.pid_file.exists(),
        "run record of engine {engine} removed"
    );
}
