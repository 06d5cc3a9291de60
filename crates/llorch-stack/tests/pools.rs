//! Many pools behind one orchestrator, against real engines: two pools of
//! the default profile's build and model under two pool ids. Each test has
//! its own pool ids (with this process id) and its own orchestrator.

use llorch_io::paths::Layout;
use llorch_profile::stack::Stack as StackSpec;
use llorch_stack::{start_pools, PoolsOptions, Stack};
use orchestratord::client::stream_task;
use orchestratord::Config;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use test_support::workspace_root as root;

/// Engines of two tests at once would share the 2 cores and time out; one at a time.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn id(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// A stack file in a fresh directory; `{a}` and `{b}` are pool ids.
fn stack(test: &str, yaml: &str) -> (StackSpec, Layout) {
    let dir = std::env::temp_dir().join(format!("llorch-pools-{test}-{}", std::process::id()));
    let _ = fs_err::remove_dir_all(&dir);
    fs_err::create_dir_all(&dir).unwrap();
    // `profile: ./sandbox-off.yaml`: the default profile with the sandbox off.
    let cpu = fs_err::read_to_string(root().join("requirements/cpu.yaml")).unwrap();
    let off = cpu.replace(
        "  ready_timeout_s: 120\n",
        "  ready_timeout_s: 120\n  sandbox: off\n",
    );
    assert_ne!(off, cpu, "requirements/cpu.yaml changed shape");
    fs_err::write(dir.join("sandbox-off.yaml"), off).unwrap();
    let text = yaml
        .replace("{a}", &id(&format!("{test}-a")))
        .replace("{b}", &id(&format!("{test}-b")));
    fs_err::write(dir.join("stack.yaml"), text).unwrap();
    let root = root();
    let layout = test_support::layout(&dir.join("runtime"));
    (
        StackSpec::load(&dir.join("stack.yaml"), &root).unwrap(),
        layout,
    )
}

async fn start(test: &str, yaml: &str) -> Stack {
    let (s, layout) = stack(test, yaml);
    let cfg = Config {
        addr: "127.0.0.1:0".parse().unwrap(),
        health_interval: Duration::from_millis(50),
        ..Default::default()
    };
    start_pools(
        &s,
        &layout,
        cfg,
        &PoolsOptions {
            report: llorch_io::report::Reporter::QUIET,
            ..Default::default()
        },
        "pools tests",
    )
    .await
    .unwrap()
}

fn alive(pid: u32) -> bool {
    fs_err::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

async fn get(base: &str, path: &str) -> Value {
    llorch_io::http::async_client()
        .get(format!("{base}{path}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn pool_state(caps: &Value, pool: &str) -> String {
    caps["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == pool)
        .unwrap_or_else(|| panic!("pool {pool} in {caps}"))["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A short task on `pool` through `/v1/tasks`; panics unless it ends normally.
async fn task(base: &str, pool: &str, max_tokens: u32) -> orchestratord::client::StreamResult {
    let c = llorch_io::http::async_client();
    let body = json!({"prompt": "Count: one, two,", "max_tokens": max_tokens, "ignore_eos": true, "pool": pool});
    let r = stream_task(&c, base, &body, None, None).await.unwrap();
    assert!(r.order_ok(), "{:?}", r.order);
    assert!(r.error.is_none(), "pool {pool}: {:?}", r.error);
    assert_eq!(r.tokens_out(), max_tokens as u64);
    r
}

/// A chat completion naming `model`; returns the status and body.
async fn chat(base: &str, model: &str) -> (u16, Value) {
    let r = llorch_io::http::async_client()
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn wait_state(base: &str, pool: &str, want: &str, within: Duration) {
    let t0 = Instant::now();
    loop {
        let caps = get(base, "/v1/capabilities").await;
        if pool_state(&caps, pool) == want {
            return;
        }
        assert!(
            t0.elapsed() < within,
            "pool {pool} is {} after {within:?}, not {want}",
            pool_state(&caps, pool)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routing_by_model_and_pool_and_a_lazy_pool_loads_at_its_first_request() {
    let _t = TURN.lock().await;
    let ps = start(
        "route",
        "schema: 1\npools:\n  - id: {a}\n    profile: cpu\n  - id: {b}\n    profile: cpu\n    load: lazy\n",
    )
    .await;
    let (a, b) = (id("route-a"), id("route-b"));
    let base = ps.orchestrator_url();
    // Listed with their states; b has no engine process before its first request.
    let caps = get(&base, "/v1/capabilities").await;
    assert_eq!(pool_state(&caps, &a), "ready");
    assert_eq!(pool_state(&caps, &b), "unloaded");
    assert!(ps.link(&b).unwrap().engine_pid().is_none());
    assert!(!pid_file(&b).exists(), "no run record for an unloaded pool");
    let models = get(&base, "/v1/models").await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    let alias = "SmolLM2-135M-Instruct.Q4_1";
    assert_eq!(ids, [a.as_str(), b.as_str(), alias], "{models}");
    assert_eq!(models["data"][1]["state"], "unloaded");
    // By pool id through both APIs, and the alias routes to the first pool.
    let ra = task(&base, &a, 3).await;
    assert!(ra.end.is_some());
    let (s, body) = chat(&base, alias).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        pool_state(&get(&base, "/v1/capabilities").await, &b),
        "unloaded"
    );
    // The first request to b loads it and is answered.
    let (s, body) = chat(&base, &b).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["model"], b.as_str());
    let pid_b = ps.link(&b).unwrap().engine_pid().expect("b loaded");
    assert!(alive(pid_b));
    assert_ne!(Some(pid_b), ps.link(&a).unwrap().engine_pid());
    task(&base, &b, 2).await;
    // Unknown names: 404 in each API's error shape.
    let (s, body) = chat(&base, "no-such-model").await;
    assert_eq!(s, 404);
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(body["error"]["param"], "model");
    let r = llorch_io::http::async_client()
        .post(format!("{base}/v1/tasks"))
        .json(&json!({"prompt": "x", "pool": "no-such-pool"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "POOL_NOT_FOUND");
    assert!(v["error"]["message"].as_str().unwrap().contains(&a), "{v}");
    // Per-pool metrics.
    let m = llorch_io::http::async_client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains(&format!("llorch_pool_loaded{{pool=\"{b}\"}} 1")),
        "{m}"
    );
    assert!(
        m.contains(&format!("llorch_pool_loads{{pool=\"{b}\"}} 1")),
        "{m}"
    );
    assert!(
        m.contains(&format!("llorch_pool_queue_depth{{pool=\"{a}\"}} 0")),
        "{m}"
    );
    ps.stop(Duration::from_secs(5)).await;
    assert!(!alive(pid_b), "the engine stops with the stack");
}

/// `/proc/<pid>/status` says whether the process runs with no_new_privs and a seccomp filter.
fn confined(pid: u32) -> (bool, bool) {
    let status = fs_err::read_to_string(format!("/proc/{pid}/status")).unwrap();
    (
        status.contains("NoNewPrivs:\t1"),
        status.contains("Seccomp:\t2"),
    )
}

/// The sandbox is on by default and reported per pool; `sandbox: off` in a
/// profile starts that pool's engine unconfined and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_pools_sandbox_is_applied_and_reported_and_off_means_off() {
    let _t = TURN.lock().await;
    let ps = start(
        "sandbox",
        "schema: 1\npools:\n  - id: {a}\n    profile: cpu\n  - id: {b}\n    profile: ./sandbox-off.yaml\n",
    )
    .await;
    let (a, b) = (id("sandbox-a"), id("sandbox-b"));
    let caps = get(&ps.orchestrator_url(), "/v1/capabilities").await;
    let sandbox = |pool: &str| -> Value {
        caps["pools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == pool)
            .unwrap()["sandbox"]
            .clone()
    };
    let (sa, sb) = (sandbox(&a), sandbox(&b));
    assert_eq!(sa["mode"], "auto", "{caps}");
    assert_eq!(sb["mode"], "off", "{caps}");
    assert_eq!(sb["seccomp"], false);
    assert_eq!(sb["filesystem"], false);
    let pid_a = ps.link(&a).unwrap().engine_pid().unwrap();
    let pid_b = ps.link(&b).unwrap().engine_pid().unwrap();
    assert_eq!(
        confined(pid_a),
        (true, sa["seccomp"] == true),
        "pool a's engine runs as reported: {sa}"
    );
    assert_eq!(confined(pid_b), (false, false), "sandbox: off is off");
    if std::env::var_os("LLORCH_REQUIRE_SANDBOX").is_some() {
        for k in ["filesystem", "network", "ioctl", "scopes", "seccomp"] {
            assert_eq!(sa[k], true, "{k}: {sa}");
        }
    }
    // Both serve.
    for pool in [&a, &b] {
        let (s, body) = chat(&ps.orchestrator_url(), pool).await;
        assert_eq!(s, 200, "{body}");
    }
    ps.stop(Duration::from_secs(5)).await;
}

/// The run record of a pool (run files live in the cache).
fn pid_file(pool: &str) -> PathBuf {
    let layout = test_support::layout(&std::env::temp_dir());
    let pool = llorch_types::PoolId::parse(pool).unwrap();
    engine_runtime::run_state::RunPaths::new(&layout, &pool).pid_file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_queued_while_a_pool_loads_all_succeed_with_one_load() {
    let _t = TURN.lock().await;
    let ps = start(
        "queue",
        "schema: 1\npools:\n  - id: {a}\n    profile: cpu\n    load: lazy\n",
    )
    .await;
    let a = id("queue-a");
    let base = ps.orchestrator_url();
    let mut joins = Vec::new();
    for _ in 0..6 {
        let (base, a) = (base.clone(), a.clone());
        joins.push(tokio::spawn(async move { task(&base, &a, 2).await }));
    }
    for j in joins {
        let r = j.await.unwrap();
        assert!(r.end.is_some());
    }
    let caps = get(&base, "/v1/capabilities").await;
    let p = &caps["pools"][0];
    assert_eq!(p["loads"], 1, "{caps}");
    assert_eq!(p["state"], "ready");
    assert!(p["last_load_ms"].as_u64().unwrap() > 0);
    ps.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_pool_is_unloaded_and_the_next_request_loads_it_again() {
    let _t = TURN.lock().await;
    let ps = start(
        "idle",
        "schema: 1\npools:\n  - id: {a}\n    profile: cpu\n    idle_unload_s: 1\n",
    )
    .await;
    let a = id("idle-a");
    let base = ps.orchestrator_url();
    let first = ps
        .link(&a)
        .unwrap()
        .engine_pid()
        .expect("eager pool loaded");
    task(&base, &a, 2).await;
    wait_state(&base, &a, "unloaded", Duration::from_secs(60)).await;
    let t0 = Instant::now();
    while alive(first) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "engine {first} still runs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = task(&base, &a, 2).await;
    assert!(r.end.is_some());
    let second = ps.link(&a).unwrap().engine_pid().expect("loaded again");
    assert_ne!(first, second);
    let caps = get(&base, "/v1/capabilities").await;
    assert_eq!(caps["pools"][0]["unloads"], 1, "{caps}");
    assert_eq!(caps["pools"][0]["loads"], 1, "{caps}");
    ps.stop(Duration::from_secs(5)).await;
    assert!(!alive(second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_loaded_one_swaps_pools_without_failing_a_request() {
    let _t = TURN.lock().await;
    let ps = start(
        "swap",
        "schema: 1\nmax_loaded: 1\npools:\n  - id: {a}\n    profile: cpu\n    load: lazy\n  - id: {b}\n    profile: cpu\n    load: lazy\n",
    )
    .await;
    let (a, b) = (id("swap-a"), id("swap-b"));
    let base = ps.orchestrator_url();
    // Watch: never two engines at once.
    let st = ps.server.state.clone();
    let most = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (most, done) = (most.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                let n = st
                    .pools
                    .iter()
                    .filter(|p| {
                        !matches!(
                            p.link_state(),
                            orchestratord::LinkState::Unloaded
                                | orchestratord::LinkState::Failed(_)
                        )
                    })
                    .count();
                most.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // Alternating, then both at once (one waits for the other's unload).
    for p in [&a, &b, &a, &b] {
        task(&base, p, 2).await;
    }
    let (ja, jb) = {
        let (b1, b2, a1, b1p) = (base.clone(), base.clone(), a.clone(), b.clone());
        (
            tokio::spawn(async move { task(&b1, &a1, 2).await }),
            tokio::spawn(async move { task(&b2, &b1p, 2).await }),
        )
    };
    ja.await.unwrap();
    jb.await.unwrap();
    done.store(true, Ordering::SeqCst);
    watcher.await.unwrap();
    assert_eq!(most.load(Ordering::SeqCst), 1, "two engines ran at once");
    let caps = get(&base, "/v1/capabilities").await;
    let loads: u64 = caps["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["loads"].as_u64().unwrap())
        .sum();
    assert!(loads >= 5, "every switch is a load: {caps}");
    ps.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_one_pools_engine_mid_stream_leaves_the_other_pools_stream_untouched() {
    let _t = TURN.lock().await;
    let ps = start(
        "kill",
        "schema: 1\npools:\n  - id: {a}\n    profile: cpu\n  - id: {b}\n    profile: cpu\n",
    )
    .await;
    let (a, b) = (id("kill-a"), id("kill-b"));
    let base = ps.orchestrator_url();
    let pid_a = ps.link(&a).unwrap().engine_pid().unwrap();
    let pid_b = ps.link(&b).unwrap().engine_pid().unwrap();
    let c = llorch_io::http::async_client();
    let long =
        |p: &str| json!({"prompt": "Count:", "max_tokens": 120, "ignore_eos": true, "pool": p});
    let (c1, base1, body_b) = (c.clone(), base.clone(), long(&b));
    let jb = tokio::spawn(async move { stream_task(&c1, &base1, &body_b, None, None).await });
    let killed = Arc::new(AtomicBool::new(false));
    let k2 = killed.clone();
    let on_token = move |_: &str| {
        if !k2.swap(true, Ordering::SeqCst) {
            // SAFETY: kill(2) on the engine of pool a, a child of this process.
            unsafe { libc::kill(pid_a as i32, libc::SIGKILL) };
        }
    };
    let ra = stream_task(&c, &base, &long(&a), Some(&on_token), None)
        .await
        .unwrap();
    assert!(killed.load(Ordering::SeqCst));
    assert!(ra.order_ok(), "{:?}", ra.order);
    let err = ra.error.expect("a's stream ends with an error");
    assert_eq!(err.code, "ENGINE_CRASHED", "{err:?}");
    assert!(err.retriable);
    let rb = jb.await.unwrap().unwrap();
    assert!(rb.error.is_none(), "{:?}", rb.error);
    assert_eq!(rb.tokens_out(), 120);
    assert!(rb.indices_ok());
    assert_eq!(ps.link(&b).unwrap().engine_pid(), Some(pid_b));
    // a is restarted by its supervisor and serves again.
    wait_state(&base, &a, "ready", Duration::from_secs(60)).await;
    task(&base, &a, 2).await;
    ps.stop(Duration::from_secs(5)).await;
}

#[test]
fn hostile_stack_files_are_refused_by_key() {
    let dir = std::env::temp_dir().join(format!("llorch-stack-bad-{}", std::process::id()));
    fs_err::create_dir_all(&dir).unwrap();
    let root = root();
    for (yaml, key) in [
        ("schema: 1\npools: []\n", "pools"),
        ("schema: 2\npools:\n  - {id: a, profile: cpu}\n", "schema"),
        (
            "schema: 1\nmax_loaded: 0\npools:\n  - {id: a, profile: cpu}\n",
            "max_loaded",
        ),
        (
            "schema: 1\npools:\n  - {id: a, profile: cpu}\n  - {id: a, profile: cpu}\n",
            "listed twice",
        ),
        (
            "schema: 1\npools:\n  - {id: a, profile: cpu, devices: [0]}\n",
            "CPU engine",
        ),
        (
            "schema: 1\npools:\n  - {id: a, profile: cpu, idle_unload_s: 99999999}\n",
            "idle_unload_s",
        ),
        (
            "schema: 1\npools:\n  - {id: a, profile: cpu, colour: red}\n",
            "colour",
        ),
        ("schema: 1\npools:\n  - {id: ../x, profile: cpu}\n", "pool"),
        (
            "schema: 1\npools:\n  - {id: a, profile: no-such-profile}\n",
            "no-such-profile",
        ),
    ] {
        fs_err::write(dir.join("s.yaml"), yaml).unwrap();
        let e = StackSpec::load(&dir.join("s.yaml"), &root)
            .expect_err(yaml)
            .to_string();
        assert!(e.contains(key), "{yaml}: {e}");
    }
}
