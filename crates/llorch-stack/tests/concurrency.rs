//! Many clients at once, against real engines of the default profile:
//! exact replicas give every client the one-engine answer bit for bit, a
//! batched engine keeps each client's text its own and reuses its prompt
//! cache, a killed replica ends only its own streams, `affinity: prefix`
//! keeps a shared prefix on one replica within its bound, and a full queue
//! answers 429 with a Retry-After from the observed service rate.

use llorch_profile::stack::Stack as StackSpec;
use llorch_stack::{start_pools, PoolsOptions, Stack};
use orchestratord::client::{read_stream, stream_task};
use orchestratord::Config;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

use test_support::workspace_root as root;

/// Engines of two tests at once would share the 2 cores and time out; one at a time.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn id(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

async fn start(test: &str, yaml: &str, queue_capacity: Option<usize>) -> Stack {
    start_with(test, yaml, queue_capacity, None).await
}

/// [`start`], with `auto`'s tune tables read from `tune_dir`.
async fn start_with(
    test: &str,
    yaml: &str,
    queue_capacity: Option<usize>,
    tune_dir: Option<std::path::PathBuf>,
) -> Stack {
    let dir = std::env::temp_dir().join(format!("llorch-conc-{test}-{}", std::process::id()));
    let _ = fs_err::remove_dir_all(&dir);
    fs_err::create_dir_all(&dir).unwrap();
    let text = yaml
        .replace("{a}", &id(&format!("{test}-a")))
        .replace("{b}", &id(&format!("{test}-b")));
    fs_err::write(dir.join("stack.yaml"), text).unwrap();
    let root = root();
    let layout = test_support::layout(&dir.join("runtime"));
    let stack = StackSpec::load(&dir.join("stack.yaml"), &root).unwrap();
    let mut cfg = Config {
        addr: "127.0.0.1:0".parse().unwrap(),
        health_interval: Duration::from_millis(50),
        ..Default::default()
    };
    if let Some(c) = queue_capacity {
        cfg.queue_capacity = c;
    }
    start_pools(
        &stack,
        &layout,
        cfg,
        &PoolsOptions {
            report: llorch_io::report::Reporter::QUIET,
            tune_dir,
            ..Default::default()
        },
        "concurrency tests",
    )
    .await
    .unwrap()
}

fn http() -> reqwest::Client {
    llorch_io::http::async_client()
}

async fn caps(base: &str) -> Value {
    http()
        .get(format!("{base}/v1/capabilities"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn pool_caps(caps: &Value, pool: &str) -> Value {
    caps["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == pool)
        .unwrap_or_else(|| panic!("pool {pool} in {caps}"))
        .clone()
}

/// An OpenAI completion with log-probabilities: (text, logprobs).
async fn completion(base: &str, model: &str, prompt: &str, n: u32) -> (String, Value) {
    let r = http()
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": model, "prompt": prompt, "max_tokens": n, "logprobs": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    (
        v["choices"][0]["text"].as_str().unwrap().to_string(),
        v["choices"][0]["logprobs"].clone(),
    )
}

/// Submit a task; returns its id and the replica it went to.
async fn submit(base: &str, body: &Value) -> (String, u64) {
    let r = http()
        .post(format!("{base}/v1/tasks"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let v: Value = r.json().await.unwrap();
    (
        v["task_id"].as_str().unwrap().to_string(),
        v["replica"].as_u64().unwrap(),
    )
}

const PROMPTS: [&str; 16] = [
    "The capital of France is",
    "Once upon a time, a small dog",
    "List three fruits:",
    "The best way to learn Rust is",
    "Water boils at",
    "My favourite colour is",
    "In the year 2050, cities will",
    "A haiku about snow:",
    "The moon is",
    "Dear diary, today I",
    "Three reasons to exercise:",
    "The recipe for pancakes needs",
    "Cats and dogs are",
    "The ocean is deep because",
    "A good night's sleep",
    "Mountains are formed when",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_clients_on_two_exact_replicas_get_the_one_engine_answer_bit_for_bit() {
    let _t = TURN.lock().await;
    let ps = start(
        "exact",
        "schema: 1\npools:\n  - id: {a}\n    profile: cpu\n    replicas: 2\n  - id: {b}\n    profile: cpu\n",
        None,
    )
    .await;
    let base = ps.orchestrator_url();
    let (a, b) = (id("exact-a"), id("exact-b"));
    let c = caps(&base).await;
    let pa = pool_caps(&c, &a);
    assert_eq!(pa["mode"], "exact");
    assert_eq!(pa["deterministic"], true);
    assert_eq!(pa["capacity"], 2);
    assert_eq!(pa["replicas"].as_array().unwrap().len(), 2);
    assert_eq!(pa["replicas"][1]["run_id"], format!("{a}.r1"));
    // The same system_fingerprint as a one-engine pool of the same profile.
    assert_eq!(
        pa["system_fingerprint"],
        pool_caps(&c, &b)["system_fingerprint"]
    );
    // Concurrently on the two replicas...
    let got =
        futures_util::future::join_all(PROMPTS.iter().map(|p| completion(&base, &a, p, 12))).await;
    // ...then one at a time on the one-engine pool.
    for (i, p) in PROMPTS.iter().enumerate() {
        let want = completion(&base, &b, p, 12).await;
        assert_eq!(got[i], want, "prompt {i} `{p}`");
    }
    let c = caps(&base).await;
    for r in pool_caps(&c, &a)["replicas"].as_array().unwrap() {
        assert!(
            r["tokens_out"].as_u64().unwrap() > 0,
            "every replica served: {r}"
        );
    }
    // Sixteen long tasks arriving at once are spread 8 and 8: each admission
    // sees every earlier one's task (none of them can end meanwhile: each
    // runs 400 tokens). Then they are canceled.
    let long =
        json!({"prompt": "Count: one, two,", "max_tokens": 400, "ignore_eos": true, "pool": a});
    let subs = futures_util::future::join_all((0..16).map(|_| submit(&base, &long))).await;
    let on_zero = subs.iter().filter(|(_, r)| *r == 0).count();
    assert_eq!(
        on_zero,
        8,
        "{:?}",
        subs.iter().map(|s| s.1).collect::<Vec<_>>()
    );
    for (task, _) in &subs {
        orchestratord::client::cancel(&http(), &base, task)
            .await
            .unwrap();
    }
    for (task, _) in &subs {
        let r = read_stream(&http(), &base, task, None, None).await.unwrap();
        assert!(r.canceled(), "{task}: {:?}", r.end);
    }
    let models: Value = http()
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entry = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == a)
        .unwrap();
    assert_eq!(entry["mode"], "exact");
    for r in entry["replicas"].as_array().unwrap() {
        assert!(r["tokens_out"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["state"], "ready", "{r}");
    }
    let m = http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains(&format!(
            "llorch_replica_tokens_out{{pool=\"{a}\",replica=\"1\"}}"
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!("llorch_pool_capacity{{pool=\"{a}\"}} 2")),
        "{m}"
    );
    ps.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batched_engine_keeps_each_clients_text_its_own_and_reuses_its_prompt_cache() {
    let _t = TURN.lock().await;
    let ps = start(
        "batched",
        "schema: 1\npools:\n  - id: {a}\n    profile: cpu\n    mode: batched\n    slots: 4\n",
        None,
    )
    .await;
    let base = ps.orchestrator_url();
    let a = id("batched-a");
    let pa = pool_caps(&caps(&base).await, &a);
    assert_eq!(pa["mode"], "batched");
    assert_eq!(pa["deterministic"], false);
    assert_eq!(pa["slots"], 4);
    // Each client's grammar forces its own tag first: a stream that carried
    // another client's text would show another tag.
    let tasks = (0..16).map(|i| {
        let base = base.clone();
        let a = a.clone();
        async move {
            let tag = format!("client{i:02}:");
            let body = json!({"prompt": PROMPTS[i], "max_tokens": 10, "pool": a,
                "grammar": format!("root ::= \"{tag}\" [a-z ]+")});
            let r = stream_task(&http(), &base, &body, None, None)
                .await
                .unwrap();
            (tag, r)
        }
    });
    let results = futures_util::future::join_all(tasks).await;
    let mut peak_running = 0;
    for (tag, r) in &results {
        assert!(r.order_ok() && r.indices_ok(), "{:?}", r.order);
        assert!(r.error.is_none(), "{:?}", r.error);
        assert!(r.text.starts_with(tag.as_str()), "{tag} got `{}`", r.text);
        assert_eq!(
            r.text.matches("client").count(),
            1,
            "{tag} got `{}`",
            r.text
        );
        peak_running = peak_running.max(r.started.as_ref().unwrap().queue_position);
    }
    assert!(peak_running >= 4, "16 clients queued behind 4 slots");
    // A long shared prefix, twice: the second evaluates only what is new.
    let long: String = (0..60).map(|i| format!("item {i}, ")).collect();
    let mut evaluated = Vec::new();
    for _ in 0..2 {
        let body = json!({"prompt": long, "max_tokens": 4, "pool": a});
        let r = stream_task(&http(), &base, &body, None, None)
            .await
            .unwrap();
        let end = r.end.unwrap();
        evaluated.push((end.prompt_tokens, end.prompt_evaluated));
    }
    assert!(evaluated[0].0 > 100, "{evaluated:?}");
    assert!(
        evaluated[1].1 < evaluated[0].1 / 4,
        "the repeated prompt came from the cache: {evaluated:?}"
    );
    // A cancel frees the task's own slot, while another task runs beside it.
    let beside = {
        let (base, a) = (base.clone(), a.clone());
        tokio::spawn(async move {
            let body = json!({"prompt": "Count: one, two,", "max_tokens": 200, "ignore_eos": true, "pool": a});
            stream_task(&http(), &base, &body, None, None)
                .await
                .unwrap()
        })
    };
    let body =
        json!({"prompt": "Count: one, two,", "max_tokens": 400, "ignore_eos": true, "pool": a});
    let r = stream_task(&http(), &base, &body, None, Some(2))
        .await
        .unwrap();
    let end = r.end.expect("an end event");
    assert!(end.canceled, "{end:?}");
    assert_eq!(end.slot_idle, Some(true), "its slot was freed: {end:?}");
    let b = beside.await.unwrap();
    assert!(b.error.is_none() && b.tokens_out() == 200, "{:?}", b.error);
    ps.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_replica_ends_only_its_own_streams_and_restarts() {
    let _t = TURN.lock().await;
    // One slot each: streams 0 and 1 run, 2 and 3 wait (2 on replica 0,
    // which runs it once it is back).
    kill_replica_zero("kill", "", 400, &[0, 1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batched_pool_of_two_engines_serves_through_both_and_a_killed_one_ends_only_its_streams()
{
    let _t = TURN.lock().await;
    // Two slots each: all four streams run, two on each engine.
    kill_replica_zero(
        "bkill",
        "    mode: batched\n    slots: 2\n",
        200,
        &[0, 1, 2, 3],
    )
    .await;
}

/// Four long streams on a pool of two replicas (the fewest-loaded rule puts
/// two on each); once the `running` ones have their first token, replica 0's
/// engine is killed: its running streams end `ENGINE_CRASHED`, every other
/// one gets all its tokens, replica 1's engine is untouched, and replica 0
/// comes back and serves again.
async fn kill_replica_zero(test: &str, extra: &str, n: u64, running: &[usize]) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let ps = start(
        test,
        &format!("schema: 1\npools:\n  - id: {{a}}\n    profile: cpu\n    replicas: 2\n{extra}"),
        None,
    )
    .await;
    let base = ps.orchestrator_url();
    let a = id(&format!("{test}-a"));
    let mut subs = Vec::new();
    for _ in 0..4 {
        let body =
            json!({"prompt": "Count: one, two,", "max_tokens": n, "ignore_eos": true, "pool": a});
        subs.push(submit(&base, &body).await);
    }
    let on: Vec<u64> = subs.iter().map(|(_, r)| *r).collect();
    assert_eq!(on, [0, 1, 0, 1]);
    // Each reader says once: its first token came, or its stream ended without one.
    let (said, mut heard) = tokio::sync::mpsc::unbounded_channel::<()>();
    let readers: Vec<_> = subs
        .iter()
        .map(|(id, _)| {
            let (base, id, said) = (base.clone(), id.clone(), said.clone());
            tokio::spawn(async move {
                let first = AtomicBool::new(true);
                let seen = |_: &str| {
                    if first.swap(false, Ordering::SeqCst) {
                        let _ = said.send(());
                    }
                };
                let r = read_stream(&http(), &base, &id, Some(&seen), None).await;
                if first.load(Ordering::SeqCst) {
                    let _ = said.send(());
                }
                r
            })
        })
        .collect();
    drop(said);
    // An event, not a time: the running streams each have a token (or one
    // ended early, which the checks below report).
    for _ in 0..running.len() {
        heard
            .recv()
            .await
            .expect("every reader ended before the running streams began");
    }
    let victim = ps.link(&a).unwrap().engine_pid().unwrap();
    let other = ps.link(&format!("{a}.r1")).unwrap().engine_pid().unwrap();
    // SAFETY: kill(2) on replica 0's engine, a child of this process.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    for (i, h) in readers.into_iter().enumerate() {
        let r = h.await.unwrap().unwrap();
        assert!(r.order_ok(), "{:?}", r.order);
        if on[i] == 0 && running.contains(&i) {
            let e = r
                .error
                .as_ref()
                .unwrap_or_else(|| panic!("stream {i}: {:?}", r.end));
            assert_eq!(e.code, "ENGINE_CRASHED");
        } else {
            // On replica 1, or waiting on replica 0 (it runs once replica 0 is back).
            assert!(r.error.is_none(), "stream {i}: {:?}", r.error);
            assert_eq!(r.tokens_out(), n);
        }
    }
    assert_eq!(
        ps.link(&format!("{a}.r1")).unwrap().engine_pid(),
        Some(other)
    );
    // Replica 0 comes back and serves again.
    let t0 = Instant::now();
    loop {
        let r = &pool_caps(&caps(&base).await, &a)["replicas"][0];
        if r["state"] == "ready" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "replica 0 is {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (id0, on0) = submit(&base, &json!({"prompt": "Hi", "max_tokens": 4, "pool": a})).await;
    assert_eq!(on0, 0);
    let r = read_stream(&http(), &base, &id0, None, None).await.unwrap();
    assert!(r.error.is_none() && r.tokens_out() == 4, "{:?}", r.error);
    assert_ne!(ps.link(&a).unwrap().engine_pid(), Some(victim));
    ps.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefix_affinity_keeps_a_prefix_on_one_replica_within_its_bound_and_a_full_queue_says_when_to_retry(
) {
    let _t = TURN.lock().await;
    let ps = start(
        "affinity",
        "schema: 1\npools:\n  - id: {a}\n    profile: cpu\n    replicas: 2\n    affinity: prefix\n",
        Some(4),
    )
    .await;
    let base = ps.orchestrator_url();
    let a = id("affinity-a");
    assert_eq!(pool_caps(&caps(&base).await, &a)["affinity"], "prefix");
    let long = |n: u32| json!({"prompt": "You are a helpful assistant. Answer briefly.", "max_tokens": n, "ignore_eos": true, "pool": a});
    // Idle pool: the same prefix goes to the same replica every time.
    let mut home = None;
    for _ in 0..3 {
        let (id, r) = submit(&base, &long(2)).await;
        assert_eq!(*home.get_or_insert(r), r, "a repeated prefix moved");
        read_stream(&http(), &base, &id, None, None).await.unwrap();
    }
    let home = home.unwrap();
    // Busy: two tasks stay within the bound at home (ceil(1.25 * 2 / 2) = 2);
    // the third would be over it and goes to the other replica.
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(submit(&base, &long(200)).await);
    }
    let on: Vec<u64> = subs.iter().map(|(_, r)| *r).collect();
    assert_eq!(on, [home, home, 1 - home]);
    // Queue capacity 4 over the pool: two run and one waits; three more wait, then 429.
    for _ in 0..3 {
        subs.push(submit(&base, &long(200)).await);
    }
    let r = http()
        .post(format!("{base}/v1/tasks"))
        .json(&long(200))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3600).contains(&retry), "{retry}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "QUEUE_FULL");
    for (id, _) in &subs {
        orchestratord::client::cancel(&http(), &base, id)
            .await
            .unwrap();
    }
    ps.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slots_auto_fits_the_machine_then_follows_a_recorded_tune_table_and_ignores_a_tampered_one()
{
    use llorch_stack::{auto, auto_table};
    let _t = TURN.lock().await;
    let yaml = "schema: 1\npools:\n  - id: {a}\n    profile: cpu\n    mode: batched\n    slots: auto\n    replicas: auto\n";
    let a = id("auto-a");
    // Tables of this test's own (never the user's cache).
    let tables = tempfile::tempdir().unwrap();
    let dir = Some(tables.path().to_path_buf());
    // No table: one engine, one slot per core.
    let ps = start_with("auto", yaml, None, dir.clone()).await;
    let base = ps.orchestrator_url();
    let dev = auto::measure_device(false, &[], &Default::default()).unwrap();
    let p = pool_caps(&caps(&base).await, &a);
    assert_eq!(p["slots"], dev.cores.min(auto::MAX_AUTO_SLOTS), "{p}");
    assert_eq!(p["replicas"].as_array().unwrap().len(), 1, "{p}");
    assert!(p["auto"].as_str().unwrap().contains("no tune table"), "{p}");
    let fp = p["fingerprint"].as_str().unwrap().to_string();
    let md = p["model"]["digest"].as_str().unwrap().to_string();
    ps.stop(Duration::from_secs(5)).await;
    // A table recorded for this engine, model and device chooses (3 slots,
    // which no rule without it would give here).
    let path = auto_table::table_path(tables.path(), &fp, &md, &dev);
    let row = |slots, replicas, tok_per_s| auto_table::TuneRow {
        slots,
        replicas,
        args: Vec::new(),
        clients: 4,
        tok_per_s,
        ttft_ms_p99: 100.0,
        fairness: 1.0,
    };
    // The best row was measured with larger batches: the engine gets them.
    let batched_2048: Vec<String> = ["--batch-size", "2048", "--ubatch-size", "2048"]
        .map(String::from)
        .to_vec();
    let table = auto_table::TuneTable::new(
        &fp,
        &md,
        &dev,
        16,
        vec![
            auto_table::TuneRow {
                args: batched_2048.clone(),
                ..row(3, 1, 90.0)
            },
            row(1, 2, 40.0),
        ],
    );
    auto_table::write_table(&path, &table).unwrap();
    let ps = start_with("auto", yaml, None, dir.clone()).await;
    let p = pool_caps(&caps(&ps.orchestrator_url()).await, &a);
    assert_eq!(p["slots"], 3, "{p}");
    assert!(
        p["auto"]
            .as_str()
            .unwrap()
            .contains("measured by bench tune"),
        "{p}"
    );
    assert!(
        p["auto"].as_str().unwrap().contains("flags `batch-2048`"),
        "{p}"
    );
    // The engine runs with the slots chosen (`--parallel 3`) and the flags measured.
    let base = &ps.link(&a).unwrap().base;
    assert_eq!(base.slots, 3);
    assert!(
        base.flags.windows(4).any(|w| w == batched_2048.as_slice()),
        "{:?}",
        base.flags
    );
    ps.stop(Duration::from_secs(5)).await;
    // The same table edited by hand is not trusted.
    let mut edited = table.clone();
    edited.rows[0].slots = 5;
    auto_table::write_table(&path, &edited).unwrap();
    let ps = start_with("auto", yaml, None, dir.clone()).await;
    let p = pool_caps(&caps(&ps.orchestrator_url()).await, &a);
    assert_eq!(p["slots"], dev.cores.min(auto::MAX_AUTO_SLOTS), "{p}");
    ps.stop(Duration::from_secs(5)).await;
}
