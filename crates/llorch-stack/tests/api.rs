//! The v1 API against the real engine (the default profile's llama-server
//! and model, shared through the workspace cache). One supervised engine
//! serves the whole file; tests take turns (it has one slot) and each starts
//! its own orchestrator.

use engine_provisioner::build::BuildOptions;
use engine_runtime::supervisor::{EngineState, RestartPolicy, Supervisor};
use llorch_io::handoff::PoolId;
use llorch_stack::SupervisorLink;
use orchestratord::client::{read_stream, stream_task};
use orchestratord::{Config, EngineInfo};
use serde_json::{json, Value};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod common;
use common::{slots_idle, wait_idle, wait_ready, Engine};

static ENGINE: OnceLock<Engine> = OnceLock::new();

/// This process's pool: two test runs at once must not share one (one engine per pool).
fn pool() -> String {
    format!("api-tests-{}", std::process::id())
}
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn engine() -> &'static Engine {
    ENGINE.get_or_init(|| Engine::start(None, &pool(), "api"))
}

fn engine_url() -> String {
    engine().url()
}

async fn orchestrator(mut cfg: Config) -> orchestratord::Server {
    let e = engine();
    cfg.health_interval = Duration::from_millis(50);
    if cfg.addr.port() == 8080 {
        cfg.addr = "127.0.0.1:0".parse().unwrap();
    }
    let srv = orchestratord::start(
        cfg,
        Box::new(SupervisorLink {
            base: e.base.clone(),
            state: e.sup.state_handle(),
        }),
    )
    .await
    .unwrap();
    wait_ready(&format!("http://{}", srv.addr)).await;
    srv
}

async fn status(req: reqwest::RequestBuilder) -> u16 {
    req.send().await.unwrap().status().as_u16()
}

const LONG: &str = "Count from one to one thousand, one number per line:\n";

async fn submit(c: &reqwest::Client, base: &str, body: Value) -> Value {
    let r = c
        .post(format!("{base}/v1/tasks"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_order_with_contiguous_indices() {
    let _t = TURN.lock().await;
    let srv = orchestrator(Config::default()).await;
    let base = format!("http://{}", srv.addr);
    let c = llorch_io::http::async_client();
    let r = stream_task(
        &c,
        &base,
        &json!({"prompt": "The three primary colors are", "max_tokens": 16}),
        None,
        None,
    )
    .await
    .unwrap();
    assert!(r.order_ok(), "{:?}", r.order);
    assert!(r.indices_ok());
    let end = r.end.as_ref().unwrap();
    assert!(end.tokens_out as usize >= r.tokens.len() && end.tokens_out > 0);
    assert!(!end.canceled);
    assert!(!r.text.is_empty());
    let chat = stream_task(
        &c,
        &base,
        &json!({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}),
        None,
        None,
    )
    .await
    .unwrap();
    assert!(chat.order_ok() && chat.indices_ok(), "{:?}", chat.order);
    let caps: Value = c
        .get(format!("{base}/v1/capabilities"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(caps["engine"], "llamacpp");
    assert_eq!(caps["pool"], pool());
    assert_eq!(caps["ctx_max"], 8192);
    assert!(caps["model"]["digest"]
        .as_str()
        .unwrap()
        .starts_with("b179c952"));
    let m = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("llorch_tasks_admitted_total 2"), "{m}");
    assert!(m.contains("llorch_time_to_first_token_ms_count 2"), "{m}");
    srv.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_running_task_frees_the_slot() {
    let _t = TURN.lock().await;
    let srv = orchestrator(Config::default()).await;
    let base = format!("http://{}", srv.addr);
    let c = llorch_io::http::async_client();
    let r = stream_task(
        &c,
        &base,
        &json!({"prompt": LONG, "max_tokens": 2000, "ignore_eos": true}),
        None,
        Some(1),
    )
    .await
    .unwrap();
    let end = r.end.as_ref().unwrap();
    assert!(end.canceled, "{end:?}");
    assert_eq!(end.slot_idle, Some(true));
    assert!(
        r.tokens.len() < 200,
        "stopped promptly: {} tokens",
        r.tokens.len()
    );
    assert!(slots_idle(&engine_url()).await);
    let m = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("llorch_tasks_canceled_total 1")
            && m.contains("llorch_cancel_latency_ms_count 1"),
        "{m}"
    );
    srv.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_queued_task_removes_it_and_429_when_full() {
    let _t = TURN.lock().await;
    let srv = orchestrator(Config {
        queue_capacity: 1,
        ..Default::default()
    })
    .await;
    let base = format!("http://{}", srv.addr);
    let c = llorch_io::http::async_client();
    let a = submit(
        &c,
        &base,
        json!({"prompt": LONG, "max_tokens": 2000, "ignore_eos": true}),
    )
    .await;
    // Wait until A runs, so B waits in the queue.
    let deadline = Instant::now() + Duration::from_secs(10);
    while srv.state.pools[0]
        .running
        .load(std::sync::atomic::Ordering::SeqCst)
        == 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let b = submit(&c, &base, json!({"prompt": "Hi", "max_tokens": 4})).await;
    assert_eq!(b["queue_position"], 1);
    let full = c
        .post(format!("{base}/v1/tasks"))
        .json(&json!({"prompt": "Hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(full.status(), 429);
    assert!(full.headers().get("retry-after").is_some());
    let bid = b["task_id"].as_str().unwrap();
    assert_eq!(
        status(
            c.post(format!("{base}/v1/tasks/{bid}/cancel"))
                .header("content-type", "application/json")
        )
        .await,
        204
    );
    let rb = read_stream(&c, &base, bid, None, None).await.unwrap();
    assert_eq!(rb.order, vec!["end"], "a queued task never starts");
    assert!(rb.canceled());
    let aid = a["task_id"].as_str().unwrap();
    assert_eq!(
        status(
            c.post(format!("{base}/v1/tasks/{aid}/cancel"))
                .header("content-type", "application/json")
        )
        .await,
        204
    );
    let ra = read_stream(&c, &base, aid, None, None).await.unwrap();
    assert!(ra.canceled());
    assert!(wait_idle(&engine_url(), Duration::from_secs(2)).await);
    srv.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_frees_the_slot() {
    let _t = TURN.lock().await;
    let srv = orchestrator(Config::default()).await;
    let base = format!("http://{}", srv.addr);
    let c = llorch_io::http::async_client();
    let t = submit(
        &c,
        &base,
        json!({"prompt": LONG, "max_tokens": 2000, "ignore_eos": true}),
    )
    .await;
    let id = t["task_id"].as_str().unwrap();
    {
        use futures_util::StreamExt;
        let resp = c
            .get(format!("{base}/v1/tasks/{id}/stream"))
            .send()
            .await
            .unwrap();
        let mut s = resp.bytes_stream();
        let mut seen = String::new();
        while !seen.contains("event: token") {
            seen.push_str(&String::from_utf8_lossy(&s.next().await.unwrap().unwrap()));
        }
        // Dropping the stream closes the connection.
    }
    assert!(
        wait_idle(&engine_url(), Duration::from_secs(3)).await,
        "slot still busy after the client left"
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let m = c
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if m.contains("llorch_tasks_canceled_total 1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "disconnect not counted as cancel: {m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_unknown_and_bad_requests() {
    let _t = TURN.lock().await;
    // No engine behind this one: 503.
    let none = orchestratord::start(
        Config {
            addr: "127.0.0.1:0".parse().unwrap(),
            health_interval: Duration::from_millis(20),
            ..Default::default()
        },
        Box::new(|| None::<EngineInfo>),
    )
    .await
    .unwrap();
    let nb = format!("http://{}", none.addr);
    let c = llorch_io::http::async_client();
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(status(c.get(format!("{nb}/readyz"))).await, 503);
    assert_eq!(status(c.get(format!("{nb}/healthz"))).await, 200);
    let r = c
        .post(format!("{nb}/v1/tasks"))
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    none.shutdown(Duration::from_millis(10)).await;

    let srv = orchestrator(Config {
        max_prompt_chars: 100,
        max_body_bytes: 4096,
        ..Default::default()
    })
    .await;
    let base = format!("http://{}", srv.addr);
    assert_eq!(
        status(c.get(format!("{base}/v1/tasks/nope/stream"))).await,
        404
    );
    assert_eq!(
        status(
            c.post(format!("{base}/v1/tasks/nope/cancel"))
                .header("content-type", "application/json")
        )
        .await,
        404
    );
    for (body, field) in [
        ("{not json", "body"),
        ("{}", "prompt"),
        (r#"{"prompt": 3}"#, "prompt"),
        (r#"{"prompt": "x", "max_tokens": 0}"#, "max_tokens"),
        (r#"{"prompt": "x", "max_tokens": 100000}"#, "max_tokens"),
        (r#"{"prompt": "x", "temperature": 5}"#, "temperature"),
        (r#"{"prompt": "x", "seed": -1}"#, "seed"),
        (r#"{"prompt": "x", "bogus": 1}"#, "bogus"),
        (
            r#"{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}"#,
            "messages",
        ),
        (r#"{"messages": [{"role": "user"}]}"#, "messages[0]"),
        (r#"{"prompt": "x", "task_id": "../x"}"#, "task_id"),
        // The same limits table as the OpenAI endpoints: roles are checked here too.
        (
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]}"#,
            "messages[1].role",
        ),
        (
            r#"{"prompt": "x", "stop": ["1","2","3","4","5","6","7","8","9"]}"#,
            "stop",
        ),
        (r#"{"prompt": "x", "pool": ""}"#, "pool"),
        (r#"{"prompt": "x", "pool": "a\u0000b"}"#, "pool"),
        // One JSON object and nothing after it.
        (r#"{"prompt": "x"}xyz"#, "body"),
        (r#"{"prompt": "x"} {"prompt": "y"}"#, "body"),
    ] {
        let r = c
            .post(format!("{base}/v1/tasks"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["field"], field, "{body}: {v}");
    }
    // A task may name its pool: only the one served here (any name that is
    // no pool id nor model name is 404, quoted shortly).
    for name in ["elsewhere", "../../x", "Upper", &"z".repeat(256)] {
        let r = c
            .post(format!("{base}/v1/tasks"))
            .json(&json!({"prompt": "x", "max_tokens": 1, "pool": name}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "POOL_NOT_FOUND", "{v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains(&pool()) && m.len() < 400, "{m}");
    }
    // The model's name routes like the pool id (README: a pool id or a model name).
    let r = c
        .post(format!("{base}/v1/tasks"))
        .json(&json!({"prompt": "x", "max_tokens": 1, "pool": "SmolLM2-135M-Instruct.Q4_1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["pool"], pool().as_str(), "{v}");
    // Trailing bytes after the JSON are refused on the OpenAI endpoints too.
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let r = c
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(r#"{"model": "x", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}xyz"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path}");
    }
    let ok = stream_task(
        &c,
        &base,
        &json!({"prompt": "x", "max_tokens": 1, "pool": pool()}),
        None,
        None,
    )
    .await
    .unwrap();
    assert!(ok.order_ok(), "{:?}", ok.order);
    let long = json!({"prompt": "x".repeat(101)});
    let r = c
        .post(format!("{base}/v1/tasks"))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let huge = json!({"prompt": "x".repeat(10_000)});
    let r = c
        .post(format!("{base}/v1/tasks"))
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "body over the limit");
    srv.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_bind_requires_a_token() {
    let _t = TURN.lock().await;
    let e = engine();
    let open = orchestratord::start(
        Config {
            addr: "0.0.0.0:0".parse().unwrap(),
            ..Default::default()
        },
        Box::new(SupervisorLink {
            base: e.base.clone(),
            state: e.sup.state_handle(),
        }),
    )
    .await;
    let err = open.err().expect("refused without a token").to_string();
    assert!(
        err.contains("API token") && err.contains("LLORCH_API_TOKEN"),
        "{err}"
    );

    let srv = orchestrator(Config {
        addr: "0.0.0.0:0".parse().unwrap(),
        api_token: Some("s3cret-token".into()),
        ..Default::default()
    })
    .await;
    let base = format!("http://127.0.0.1:{}", srv.addr.port());
    let c = llorch_io::http::async_client();
    let body = json!({"prompt": "Hi", "max_tokens": 2});
    assert_eq!(
        status(c.post(format!("{base}/v1/tasks")).json(&body)).await,
        401
    );
    assert_eq!(
        status(
            c.post(format!("{base}/v1/tasks"))
                .bearer_auth("wrong")
                .json(&body)
        )
        .await,
        401
    );
    assert_eq!(status(c.get(format!("{base}/metrics"))).await, 401);
    assert_eq!(status(c.get(format!("{base}/healthz"))).await, 200);
    let r = c
        .post(format!("{base}/v1/tasks"))
        .bearer_auth("s3cret-token")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    let s = c
        .get(format!("{base}/v1/tasks/{id}/stream"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(s.status(), 200);
    let _ = s.text().await;
    srv.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_killed_mid_stream_gives_an_error_then_recovers() {
    let _t = TURN.lock().await;
    let srv = orchestrator(Config::default()).await;
    let base = format!("http://{}", srv.addr);
    let c = llorch_io::http::async_client();
    let pid = match engine().sup.state() {
        EngineState::Ready { pid, .. } => pid,
        s => panic!("{s:?}"),
    };
    let t = submit(
        &c,
        &base,
        json!({"prompt": LONG, "max_tokens": 2000, "ignore_eos": true}),
    )
    .await;
    let id = t["task_id"].as_str().unwrap().to_string();
    // Kill the engine as soon as the first token has arrived.
    let killed = std::sync::atomic::AtomicBool::new(false);
    let kill = |_: &str| {
        if !killed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    };
    let r = read_stream(&c, &base, &id, Some(&kill), None)
        .await
        .unwrap();
    assert!(killed.load(std::sync::atomic::Ordering::SeqCst));
    let err = r.error.expect("an error event");
    assert_eq!(err.code, "ENGINE_CRASHED", "{err:?}");
    assert!(err.retriable);
    assert_eq!(r.order.last().map(String::as_str), Some("error"));
    // The supervisor restarts the engine; the next task succeeds.
    wait_ready(&base).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = stream_task(
            &c,
            &base,
            &json!({"prompt": "Hello", "max_tokens": 4}),
            None,
            None,
        )
        .await;
        if let Ok(r) = ok {
            if r.order_ok() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    srv.shutdown(Duration::from_secs(1)).await;
}

fn engine_pid() -> u32 {
    match engine().sup.state() {
        EngineState::Ready { pid, .. } => pid,
        s => panic!("engine not ready: {s:?}"),
    }
}

/// A hung engine (SIGSTOP) ends the stream with ENGINE_STALLED, `/readyz`
/// says not ready, the supervisor kills and restarts it, and the next task
/// succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_engine_stalls_the_stream_and_is_restarted() {
    let _t = TURN.lock().await;
    let srv = orchestrator(Config {
        stall_timeout: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let base = format!("http://{}", srv.addr);
    let c = llorch_io::http::async_client();
    let pid = engine_pid();
    let t = submit(
        &c,
        &base,
        json!({"prompt": LONG, "max_tokens": 2000, "ignore_eos": true}),
    )
    .await;
    let id = t["task_id"].as_str().unwrap().to_string();
    let stopped = std::sync::atomic::AtomicBool::new(false);
    let stop = |_: &str| {
        if !stopped.swap(true, std::sync::atomic::Ordering::SeqCst) {
            unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        }
    };
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        read_stream(&c, &base, &id, Some(&stop), None),
    )
    .await
    .expect("the stream ended")
    .unwrap();
    let err = r.error.expect("an error event");
    assert_eq!(err.code, "ENGINE_STALLED", "{err:?}");
    assert!(err.retriable);
    assert_eq!(r.order.last().map(String::as_str), Some("error"));
    // Not ready from the moment the stall is reported until a new engine is up.
    assert_eq!(status(c.get(format!("{base}/readyz"))).await, 503);
    wait_ready(&base).await;
    let new_pid = engine_pid();
    assert_ne!(new_pid, pid, "the hung engine was replaced");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true),
        "the hung engine is gone"
    );
    let ok = stream_task(
        &c,
        &base,
        &json!({"prompt": "Hello", "max_tokens": 4}),
        None,
        None,
    )
    .await
    .unwrap();
    assert!(ok.order_ok() && ok.end.is_some(), "{:?}", ok.order);
    srv.shutdown(Duration::from_secs(1)).await;
}

/// `deadline_ms` counts from admission: a task that waits in the queue past
/// its deadline ends there, without ever starting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_holds_while_queued() {
    let _t = TURN.lock().await;
    let srv = orchestrator(Config::default()).await;
    let base = format!("http://{}", srv.addr);
    let c = llorch_io::http::async_client();
    let a = submit(
        &c,
        &base,
        json!({"prompt": LONG, "max_tokens": 2000, "ignore_eos": true}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while srv.state.pools[0]
        .running
        .load(std::sync::atomic::Ordering::SeqCst)
        == 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let b = submit(
        &c,
        &base,
        json!({"prompt": "Hi", "max_tokens": 4, "deadline_ms": 300}),
    )
    .await;
    let bid = b["task_id"].as_str().unwrap();
    let rb = tokio::time::timeout(
        Duration::from_secs(30),
        read_stream(&c, &base, bid, None, None),
    )
    .await
    .expect("the queued task ended at its deadline")
    .unwrap();
    assert_eq!(rb.order, vec!["end"], "it never started");
    let end = rb.end.unwrap();
    assert!(end.canceled && end.stop_reason == "deadline", "{end:?}");
    assert!(end.queue_wait_ms >= 300, "{end:?}");
    assert!(
        srv.state.pools[0]
            .running
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1,
        "A is still running"
    );
    // A deadline that passes while decoding ends the running task too.
    let aid = a["task_id"].as_str().unwrap();
    c.post(format!("{base}/v1/tasks/{aid}/cancel"))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    let ra = read_stream(&c, &base, aid, None, None).await.unwrap();
    assert!(ra.canceled());
    let d = stream_task(
        &c,
        &base,
        &json!({"prompt": LONG, "max_tokens": 2000, "ignore_eos": true, "deadline_ms": 1500}),
        None,
        None,
    )
    .await
    .unwrap();
    assert!(d.order_ok(), "{:?}", d.order);
    let end = d.end.unwrap();
    assert!(end.canceled && end.stop_reason == "deadline", "{end:?}");
    assert!(end.tokens_out < 2000);
    assert!(wait_idle(&engine_url(), Duration::from_secs(3)).await);
    srv.shutdown(Duration::from_secs(1)).await;
}

/// Multi-byte text (CJK and an emoji, forced by a grammar so the output does
/// not depend on the model's taste): every cut by `max_tokens`, including
/// cuts inside a character, gives a contiguous, valid stream whose text
/// equals llama-server's own answer up to its last whole character, and
/// whose `tokens_out` is the engine's count, not the number of frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_byte_text_and_cuts_inside_a_character() {
    let _t = TURN.lock().await;
    let srv = orchestrator(Config::default()).await;
    let base = format!("http://{}", srv.addr);
    let c = llorch_io::http::async_client();
    const PATTERN: &str = "猫😀日本";
    let grammar = format!("root ::= (\"{PATTERN}\")+");
    let prompt = "Write cats and smiles:";
    let mut frames_fewer_than_tokens = false;
    let mut cut_inside = false;
    for max_tokens in 1..=14u32 {
        let r = stream_task(
            &c,
            &base,
            &json!({"prompt": prompt, "max_tokens": max_tokens, "grammar": grammar}),
            None,
            None,
        )
        .await
        .unwrap();
        assert!(
            r.order_ok() && r.indices_ok(),
            "{max_tokens}: {:?}",
            r.order
        );
        let end = r.end.as_ref().unwrap();
        assert_eq!(end.tokens_out, max_tokens as u64, "{max_tokens}: {end:?}");
        assert!((r.tokens.len() as u64) <= end.tokens_out);
        if (r.tokens.len() as u64) < end.tokens_out {
            frames_fewer_than_tokens = true;
        }
        let cycle = PATTERN.repeat(max_tokens as usize + 1);
        assert!(
            cycle.starts_with(&r.text),
            "{max_tokens}: {:?} is not a prefix of the forced text",
            r.text
        );
        // llama-server's own answer to the same request, not streamed.
        let own: Value = c
            .post(format!("{}/completion", engine_url()))
            .json(
                &json!({"prompt": prompt, "n_predict": max_tokens, "grammar": grammar,
                          "temperature": 0, "seed": 0, "cache_prompt": false}),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(own["tokens_predicted"], json!(max_tokens));
        // Non-streamed, llama-server renders a cut-off character as U+FFFD;
        // streamed, it holds the partial bytes back and never sends them.
        // The stream carries only whole characters.
        let own = own["content"].as_str().unwrap();
        let whole = own.trim_end_matches('\u{FFFD}');
        if whole.len() != own.len() {
            cut_inside = true;
        }
        assert_eq!(
            whole, r.text,
            "{max_tokens}: streamed text differs from the engine's"
        );
    }
    assert!(cut_inside, "some max_tokens cuts inside a character");
    assert!(
        frames_fewer_than_tokens,
        "some cut holds back a partial character (one frame for several tokens)"
    );
    srv.shutdown(Duration::from_secs(1)).await;
}

/// When the supervisor gives up, the pool says `failed` for good: the API
/// answers 503 ENGINE_FAILED with the reason, not "try again".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_engine_gives_503_engine_failed_with_the_reason() {
    let _t = TURN.lock().await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap();
    let rt = tempfile::tempdir().unwrap();
    let layout = llorch_io::paths::Layout::at(root.clone(), root.join("cache"), rt.path().into());
    let p = llorch_profile::Profile::resolve(&root, None).unwrap();
    let pool = PoolId::parse(&format!("api-failed-{}", std::process::id())).unwrap();
    let prep = llorch_stack::prepare(&p, &pool, &layout, &BuildOptions::quiet())
        .unwrap()
        .engine;
    let base_info = llorch_stack::engine_info(&prep);
    let policy = RestartPolicy {
        initial_backoff: Duration::from_millis(50),
        max_crashes: 1,
        ..Default::default()
    };
    let sup = Supervisor::start(prep, layout, policy, "api tests (failed)").unwrap();
    sup.wait_ready(Duration::from_secs(120)).unwrap();
    let srv = orchestratord::start(
        Config {
            addr: "127.0.0.1:0".parse().unwrap(),
            health_interval: Duration::from_millis(50),
            ..Default::default()
        },
        Box::new(SupervisorLink {
            base: base_info,
            state: sup.state_handle(),
        }),
    )
    .await
    .unwrap();
    let base = format!("http://{}", srv.addr);
    wait_ready(&base).await;
    let pid = match sup.state() {
        EngineState::Ready { pid, .. } => pid,
        s => panic!("{s:?}"),
    };
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let c = llorch_io::http::async_client();
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let r = c
            .post(format!("{base}/v1/tasks"))
            .json(&json!({"prompt": "Hi", "max_tokens": 2}))
            .send()
            .await
            .unwrap();
        let code = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or_default();
        if v["error"]["code"] == "ENGINE_FAILED" {
            assert_eq!(code, 503);
            break v;
        }
        assert!(Instant::now() < deadline, "never failed: {code} {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("giving up") && msg.contains("last lines"),
        "{msg}"
    );
    assert_ne!(body["error"]["retriable"], json!(true), "{body}");
    let caps: Value = c
        .get(format!("{base}/v1/capabilities"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(caps["state"], "failed");
    assert!(caps["failed_reason"]
        .as_str()
        .unwrap()
        .contains("giving up"));
    // It stays failed: nobody restarts it behind the API's back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status(c.get(format!("{base}/readyz"))).await, 503);
    srv.shutdown(Duration::from_secs(1)).await;
    sup.stop();
}

/// Thousands of create / cancel / disconnect / abandon sequences at random
/// moments, from several clients at once: every stream that is read ends
/// with exactly one terminal event, and every task leaves memory once its
/// retention has passed. The seed is printed (set LLORCH_FUZZ_SEED to replay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_create_cancel_disconnect_sequences_all_end_and_are_reaped() {
    use futures_util::StreamExt;
    use rand::{Rng, SeedableRng};
    let _t = TURN.lock().await;
    let srv = orchestrator(Config {
        queue_capacity: 64,
        retention: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let base = format!("http://{}", srv.addr);
    let seed: u64 = std::env::var("LLORCH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let sequences: usize = std::env::var("LLORCH_FUZZ_SEQUENCES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    eprintln!("fuzz seed {seed} ({sequences} sequences)");
    const CLIENTS: usize = 8;
    let mut joins = Vec::new();
    for k in 0..CLIENTS {
        let base = base.clone();
        let n = sequences / CLIENTS;
        joins.push(tokio::spawn(async move {
            let c = llorch_io::http::async_client();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(k as u64));
            let mut counts = [0usize; 7];
            for _ in 0..n {
                let prompt = ["Hi", "One, two,", "The sky is"][rng.random_range(0..3)];
                let mut body = json!({
                    "prompt": prompt,
                    "max_tokens": rng.random_range(1..=6),
                });
                if rng.random_bool(0.15) {
                    body["deadline_ms"] = json!(rng.random_range(1..150));
                }
                let r = c
                    .post(format!("{base}/v1/tasks"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                if r.status() == 429 {
                    counts[6] += 1;
                    tokio::time::sleep(Duration::from_millis(rng.random_range(1..20))).await;
                    continue;
                }
                assert_eq!(r.status(), 202);
                let id = r.json::<Value>().await.unwrap()["task_id"]
                    .as_str()
                    .unwrap()
                    .to_string();
                let action = rng.random_range(0..6);
                counts[action] += 1;
                let cancel = |c: reqwest::Client, base: String, id: String| async move {
                    let s = c
                        .post(format!("{base}/v1/tasks/{id}/cancel"))
                        .header("content-type", "application/json")
                        .send()
                        .await
                        .unwrap()
                        .status();
                    assert!(s == 204 || s == 404, "cancel {id}: {s}");
                };
                let read = |c: reqwest::Client, base: String, id: String| async move {
                    let r = tokio::time::timeout(
                        Duration::from_secs(60),
                        read_stream(&c, &base, &id, None, None),
                    )
                    .await
                    .unwrap_or_else(|_| panic!("stream of {id} never ended"))
                    .unwrap();
                    let terminal = r
                        .order
                        .iter()
                        .filter(|e| *e == "end" || *e == "error")
                        .count();
                    assert_eq!(terminal, 1, "{id}: {:?}", r.order);
                    assert!(
                        r.order_ok() || r.order == ["end"] || r.order == ["error"],
                        "{id}: {:?}",
                        r.order
                    );
                    assert!(r.indices_ok(), "{id}");
                    r
                };
                match action {
                    // Read to the end.
                    0 => {
                        let r = read(c.clone(), base.clone(), id).await;
                        if let Some(e) = &r.error {
                            panic!("unexpected error: {e:?}");
                        }
                    }
                    // Cancel after a random pause, then read.
                    1 => {
                        tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
                        cancel(c.clone(), base.clone(), id.clone()).await;
                        read(c.clone(), base.clone(), id).await;
                    }
                    // Cancel while the stream is being read.
                    2 => {
                        let pause = Duration::from_millis(rng.random_range(0..30));
                        let (c2, b2, i2) = (c.clone(), base.clone(), id.clone());
                        let canceller = tokio::spawn(async move {
                            tokio::time::sleep(pause).await;
                            cancel(c2, b2, i2).await;
                        });
                        read(c.clone(), base.clone(), id).await;
                        canceller.await.unwrap();
                    }
                    // Open the stream and disconnect after a few chunks.
                    3 => {
                        let resp = c
                            .get(format!("{base}/v1/tasks/{id}/stream"))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(resp.status(), 200);
                        let mut s = resp.bytes_stream();
                        for _ in 0..rng.random_range(0..3) {
                            if s.next().await.is_none() {
                                break;
                            }
                        }
                    }
                    // Cancel and never read.
                    4 => cancel(c.clone(), base.clone(), id).await,
                    // Abandon: never read, never cancel.
                    _ => {}
                }
            }
            counts
        }));
    }
    let mut totals = [0usize; 7];
    for j in joins {
        for (t, n) in totals.iter_mut().zip(j.await.unwrap()) {
            *t += n;
        }
    }
    eprintln!("read {}, cancel+read {}, cancel-while-reading {}, disconnect {}, cancel-only {}, abandon {}, 429 {}",
        totals[0], totals[1], totals[2], totals[3], totals[4], totals[5], totals[6]);
    // Every task ends and is dropped once its retention has passed.
    let st = srv.state.clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = st.tasks.lock().unwrap().len();
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} tasks still in memory long after their retention"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(st.pools[0].queue.is_empty());
    assert_eq!(
        st.pools[0]
            .running
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert!(wait_idle(&engine_url(), Duration::from_secs(5)).await);
    let m = llorch_io::http::async_client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = |name: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing: {m}"))
    };
    let admitted = count("llorch_tasks_admitted_total ");
    let ended = count("llorch_tasks_completed_total ")
        + count("llorch_tasks_canceled_total ")
        + count("llorch_tasks_failed_total ");
    assert_eq!(
        admitted as usize,
        (sequences / CLIENTS) * CLIENTS - totals[6]
    );
    assert_eq!(admitted, ended, "every admitted task ended once: {m}");
    srv.shutdown(Duration::from_secs(1)).await;
}

/// What a web page could send is refused: a foreign `Host` (DNS rebinding)
/// gets 403, a state-changing request that is not `application/json` gets
/// 415, no CORS header is ever sent, and a client that never finishes its
/// request head is disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_pages_cannot_drive_the_api_and_slow_heads_are_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _t = TURN.lock().await;
    let srv = orchestrator(Config {
        allowed_hosts: vec!["llm.lan".into()],
        header_read_timeout: Duration::from_millis(500),
        ..Default::default()
    })
    .await;
    let port = srv.addr.port();
    let base = format!("http://{}", srv.addr);
    let c = llorch_io::http::async_client();
    let body = json!({"prompt": "Hi", "max_tokens": 1});
    for host in [
        "evil.example",
        "evil.example:80",
        "127.0.0.1.evil.example",
        "[::2]",
    ] {
        for req in [
            c.get(format!("{base}/v1/capabilities")),
            c.post(format!("{base}/v1/tasks")).json(&body),
        ] {
            let r = req.header("host", host).send().await.unwrap();
            assert_eq!(r.status(), 403, "{host}");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["code"], "HOST_NOT_ALLOWED", "{host}: {v}");
        }
    }
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "LOCALHOST".into(),
        "llm.lan".into(),
        format!("llm.lan:{port}"),
    ] {
        let r = c
            .get(format!("{base}/v1/capabilities"))
            .header("host", &host)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{host}");
    }
    // A cross-origin "simple" request cannot carry application/json.
    for (ct, payload) in [
        ("text/plain", body.to_string()),
        ("application/x-www-form-urlencoded", "prompt=Hi".into()),
        ("multipart/form-data; boundary=x", "--x--".into()),
    ] {
        let r = c
            .post(format!("{base}/v1/tasks"))
            .header("content-type", ct)
            .header("origin", "http://evil.example")
            .body(payload)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 415, "{ct}");
        assert!(r.headers().get("access-control-allow-origin").is_none());
    }
    let r = c
        .post(format!("{base}/v1/tasks/whatever/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415, "cancel without a JSON content type");
    let r = c
        .post(format!("{base}/v1/tasks"))
        .header("content-type", "application/json; charset=utf-8")
        .header("origin", "http://evil.example")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    // A slow head: the connection is closed at the header timeout.
    let mut tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "a half-sent request head held the connection");
    srv.shutdown(Duration::from_secs(1)).await;
}

// ------------------------------------------------------------ OpenAI API

/// The `data:` payloads of an SSE body, in order.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| {
            let d: Vec<&str> = ev
                .lines()
                .filter_map(|l| l.strip_prefix("data:").map(|d| d.trim_start()))
                .collect();
            (!d.is_empty()).then(|| d.join("\n"))
        })
        .collect()
}

async fn post_json(c: &reqwest::Client, url: String, body: Value) -> reqwest::Response {
    c.post(url).json(&body).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_models_and_errors_in_openai_shape() {
    let _t = TURN.lock().await;
    let srv = orchestrator(Config::default()).await;
    let base = format!("http://{}", srv.addr);
    let c = llorch_io::http::async_client();
    let m: Value = c
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["object"], "list");
    let ids: Vec<&str> = m["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [pool().as_str(), "SmolLM2-135M-Instruct.Q4_1"], "{m}");
    assert_eq!(m["data"][0]["object"], "model");
    let chat = |extra: Value| {
        let mut b = json!({"model": pool(), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for (body, status, param) in [
        (chat(json!({"model": "gpt-4o"})), 404, "model"),
        (chat(json!({"n": 2})), 400, "n"),
        (chat(json!({"max_tokens": 0})), 400, "max_tokens"),
        (
            chat(json!({"max_completion_tokens": 100000})),
            400,
            "max_completion_tokens",
        ),
        (chat(json!({"temperature": 3})), 400, "temperature"),
        (chat(json!({"messages": []})), 400, "messages"),
        (
            chat(json!({"messages": [{"role": "wizard", "content": "x"}]})),
            400,
            "messages[0].role",
        ),
        (
            chat(json!({"logprobs": true, "top_logprobs": 50})),
            400,
            "top_logprobs",
        ),
        (
            json!({"messages": [{"role": "user", "content": "Hi"}]}),
            400,
            "model",
        ),
    ] {
        let r = post_json(&c, format!("{base}/v1/chat/completions"), body.clone()).await;
        assert_eq!(r.status(), status, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let r = c
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Unknown fields are ignored, as OpenAI clients expect.
    let r = post_json(
        &c,
        format!("{base}/v1/chat/completions"),
        chat(json!({"frequency_penalty": 0, "user": "me"})),
    )
    .await;
    assert_eq!(r.status(), 200);
    srv.shutdown(Duration::from_secs(1)).await;
}

/// The wire format, field by field, and every token from llama.cpp: the
/// streamed content equals the non-streamed content and llama-server's own
/// `/v1/chat/completions` answer for the same messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_and_completions_wire_format() {
    let _t = TURN.lock().await;
    let srv = orchestrator(Config::default()).await;
    let base = format!("http://{}", srv.addr);
    let c = llorch_io::http::async_client();
    let messages = json!([{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name three colors."}]);
    let body = json!({"model": pool(), "messages": messages, "max_tokens": 24, "seed": 7});
    let full: Value = post_json(&c, format!("{base}/v1/chat/completions"), body.clone())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(full["object"], "chat.completion", "{full}");
    assert!(full["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(full["system_fingerprint"]
        .as_str()
        .unwrap()
        .starts_with("fp_"));
    assert_eq!(full["model"], pool());
    let choice = &full["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().unwrap().to_string();
    assert!(!content.is_empty());
    assert!(matches!(
        choice["finish_reason"].as_str(),
        Some("stop" | "length")
    ));
    let u = &full["usage"];
    assert!(u["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    // llama-server's own answer.
    let own: Value = post_json(
        &c,
        format!("{}/v1/chat/completions", engine_url()),
        json!({"messages": messages, "max_tokens": 24, "seed": 7, "temperature": 0}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(
        own["choices"][0]["message"]["content"].as_str().unwrap(),
        content,
        "same as llama-server's own"
    );
    assert_eq!(own["usage"]["completion_tokens"], u["completion_tokens"]);

    // Streaming, with usage.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let r = post_json(&c, format!("{base}/v1/chat/completions"), sbody).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let data = sse_data(&r.text().await.unwrap());
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    for ch in &chunks {
        assert_eq!(ch["object"], "chat.completion.chunk", "{ch}");
        assert_eq!(ch["id"], id);
        assert_eq!(ch["model"], pool());
        assert!(ch["created"].as_u64().is_some());
        assert!(ch["system_fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("fp_"));
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], full["usage"]);
    let fin = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(fin["finish_reason"], choice["finish_reason"]);
    assert_eq!(fin["delta"], json!({}));
    let streamed: String = chunks[..chunks.len() - 2]
        .iter()
        .map(|ch| {
            let c = &ch["choices"][0];
            assert!(c["finish_reason"].is_null());
            c["delta"]["content"].as_str().unwrap_or("").to_string()
        })
        .collect();
    assert_eq!(streamed, content, "streamed = non-streamed");

    // Text completion, with logprobs, streamed and not.
    let tb = json!({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "The sky is", "max_tokens": 6, "logprobs": 2});
    let t: Value = post_json(&c, format!("{base}/v1/completions"), tb.clone())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(t["object"], "text_completion", "{t}");
    assert_eq!(t["choices"][0]["finish_reason"], "length");
    assert_eq!(t["usage"]["completion_tokens"], 6);
    let lp = &t["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 6, "{lp}");
    assert!(lp["token_logprobs"][0].as_f64().unwrap() <= 0.0);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    let mut ts = tb.clone();
    ts["stream"] = json!(true);
    let data = sse_data(
        &post_json(&c, format!("{base}/v1/completions"), ts)
            .await
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let text: String = data[..data.len() - 1]
        .iter()
        .map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            assert_eq!(v["object"], "text_completion");
            v["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(text, t["choices"][0]["text"].as_str().unwrap());

    // Chat logprobs.
    let mut lb = body.clone();
    lb["logprobs"] = json!(true);
    lb["top_logprobs"] = json!(3);
    let l: Value = post_json(&c, format!("{base}/v1/chat/completions"), lb)
        .await
        .json()
        .await
        .unwrap();
    let entries = l["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        entries.len() as u64,
        l["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        entries[0]["top_logprobs"].as_array().unwrap().len(),
        3,
        "{}",
        entries[0]
    );
    assert_eq!(
        l["choices"][0]["message"]["content"].as_str().unwrap(),
        content,
        "logprobs change nothing"
    );
    srv.shutdown(Duration::from_secs(1)).await;
}

/// A client that leaves a stream frees the slot; a full queue is 429 with
/// Retry-After; an engine that dies mid-stream gives one error frame and
/// no `[DONE]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_disconnect_queue_full_and_error_frames() {
    use futures_util::StreamExt;
    let _t = TURN.lock().await;
    let srv = orchestrator(Config {
        queue_capacity: 1,
        ..Default::default()
    })
    .await;
    let base = format!("http://{}", srv.addr);
    let c = llorch_io::http::async_client();
    let long = json!({"model": pool(), "prompt": LONG, "max_tokens": 2000, "stream": true});
    let r = post_json(&c, format!("{base}/v1/completions"), long.clone()).await;
    let mut s = r.bytes_stream();
    let mut seen = String::new();
    while sse_data(&seen).len() < 3 {
        seen.push_str(&String::from_utf8_lossy(&s.next().await.unwrap().unwrap()));
    }
    // Queue: one running (above), one waiting, then full.
    let waiting = submit(&c, &base, json!({"prompt": "Hi", "max_tokens": 2})).await;
    let full = post_json(
        &c,
        format!("{base}/v1/chat/completions"),
        json!({"model": pool(), "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(full.status(), 429);
    assert!(full.headers().get("retry-after").is_some());
    let v: Value = full.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
    let t0 = Instant::now();
    drop(s);
    let rw = read_stream(&c, &base, waiting["task_id"].as_str().unwrap(), None, None)
        .await
        .unwrap();
    assert!(
        rw.order_ok(),
        "the waiting task ran after the disconnect: {:?}",
        rw.order
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(wait_idle(&engine_url(), Duration::from_secs(3)).await);

    // The engine dies mid-stream: one error frame, then the end.
    let pid = engine_pid();
    let r = post_json(&c, format!("{base}/v1/chat/completions"), json!({"model": pool(), "messages": [{"role": "user", "content": LONG}], "max_tokens": 2000, "stream": true})).await;
    let mut s = r.bytes_stream();
    let mut body = String::new();
    let mut killed = false;
    while let Some(b) = s.next().await {
        body.push_str(&String::from_utf8_lossy(&b.unwrap()));
        if !killed && sse_data(&body).len() >= 3 {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            killed = true;
        }
    }
    let data = sse_data(&body);
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "ENGINE_CRASHED", "{last}");
    assert_eq!(last["error"]["type"], "server_error");
    assert!(!data.iter().any(|d| d == "[DONE]"));
    wait_ready(&base).await;
    srv.shutdown(Duration::from_secs(1)).await;
}

/// The `openai` package the Python SDK test uses (pinned).
const OPENAI_SDK: &str = "openai==1.109.1";

fn openai_sdk_dir() -> std::path::PathBuf {
    common::python_packages(&OPENAI_SDK.replace("==", "-"), &[OPENAI_SDK])
}

/// The official OpenAI Python client drives the orchestrator: models, chat
/// (plain, same seed twice, streamed with usage), completions, errors as the
/// SDK's exception types, and closing a stream early frees the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk() {
    let sdk = tokio::task::spawn_blocking(openai_sdk_dir).await.unwrap();
    let _t = TURN.lock().await;
    let srv = orchestrator(Config::default()).await;
    let base = format!("http://{}", srv.addr);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_sdk.py");
    let out = tokio::task::spawn_blocking(move || {
        llorch_io::cmd::Cmd::new("python3")
            .arg(&script)
            .env("PYTHONPATH", &sdk)
            .env("LLORCH_BASE_URL", &base)
            .env("LLORCH_MODEL", pool())
            .env("LLORCH_ENGINE_URL", engine_url())
            .read_any()
            .unwrap()
    })
    .await
    .unwrap();
    // The script's stdout and stderr together.
    let (ok, output) = out;
    eprintln!("{output}");
    assert!(
        ok && output.lines().any(|l| l == "all ok"),
        "the OpenAI SDK test failed:\n{output}"
    );
    srv.shutdown(Duration::from_secs(1)).await;
}

/// Reliability round 3: a stop string's held-back tail is not lost when
/// generation ends by length; a prompt over the context is the client's 400
/// (`context_length_exceeded`, with the token counts), streamed or not; the
/// framework's own 404, 405 and 413 come in the API's error shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_tails_context_overflow_and_framework_errors() {
    let _t = TURN.lock().await;
    let srv = orchestrator(Config {
        max_body_bytes: 64 * 1024,
        ..Default::default()
    })
    .await;
    let base = format!("http://{}", srv.addr);
    let c = llorch_io::http::async_client();
    // llama-server holds " Apple\n" back as a possible "\n\n" when max_tokens
    // cuts it; its own non-streamed answer keeps the "\n", and so must ours.
    let prompt = "My shopping list:\n1. Banana\n2.";
    for n in [2u32, 6] {
        let direct: Value = c
            .post(format!("{}/completion", engine_url()))
            .json(&json!({"prompt": prompt, "n_predict": n, "temperature": 0.0, "seed": 42, "cache_prompt": false, "stop": ["\n\n"]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let want = direct["content"].as_str().unwrap();
        assert!(want.ends_with('\n'), "the case this test is for: {want:?}");
        for stream in [false, true] {
            let body = json!({"model": pool(), "prompt": prompt, "max_tokens": n, "stop": ["\n\n"], "stream": stream});
            let r = post_json(&c, format!("{base}/v1/completions"), body).await;
            assert_eq!(r.status(), 200);
            let text = if stream {
                sse_data(&r.text().await.unwrap())
                    .iter()
                    .filter(|d| *d != "[DONE]")
                    .map(|d| {
                        serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"]
                            .as_str()
                            .unwrap_or("")
                            .to_string()
                    })
                    .collect::<String>()
            } else {
                let v: Value = r.json().await.unwrap();
                v["choices"][0]["text"].as_str().unwrap().to_string()
            };
            assert_eq!(text, want, "max_tokens {n}, stream {stream}");
        }
    }
    // A prompt longer than the context (2048 tokens here).
    let long = "apple banana cherry ".repeat(1200);
    for (path, body) in [
        (
            "/v1/completions",
            json!({"model": pool(), "prompt": long, "max_tokens": 4}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": pool(), "messages": [{"role": "user", "content": long}], "max_tokens": 4}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": pool(), "messages": [{"role": "user", "content": long}], "max_tokens": 4, "stream": true}),
        ),
    ] {
        let r = post_json(&c, format!("{base}{path}"), body).await;
        assert_eq!(r.status(), 400, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains("tokens") && m.contains("2048"), "{m}");
    }
    // The framework's own answers, in the API's shape.
    let r = c.get(format!("{base}/v1/tasks")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.headers().contains_key("allow"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "METHOD_NOT_ALLOWED", "{v}");
    let r = c
        .get(format!("{base}/v1/nothing-here"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "NOT_FOUND", "{v}");
    for path in ["/v1/tasks", "/v1/chat/completions"] {
        let r = c
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(vec![b' '; 128 * 1024])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "BODY_TOO_LARGE", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    }
    srv.shutdown(Duration::from_secs(1)).await;
}
