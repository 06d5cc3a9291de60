//! The task API (`/v1/tasks`) against the real engine (the default
//! profile's llama-server and model, shared through the workspace cache):
//! event order, cancel, disconnects, admission and errors, deadlines, text
//! cut inside characters, random sequences, web-page defenses. Faults of
//! the engine are `api_faults.rs`, the OpenAI API `openai_api.rs`; one
//! engine per file (`test_harness::api`).

use orchestratord::client::{read_stream, stream_task};
use orchestratord::{Config, EngineInfo};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

use test_harness::api::*;
use test_harness::{get_json, slots_idle, wait_idle, HANG, STOPPED_WITHIN_TOKENS};

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
    let caps: Value = get_json(&c, format!("{base}/v1/capabilities")).await;
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
    // Wait until A runs, so B waits in the queue (woken by the state's
    // change notifications; the bound only stops a hang).
    assert!(srv.state.wait_until(HANG, |s| s.running() > 0).await);
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
    assert!(wait_idle(&engine_url(), STOPPED_WITHIN_TOKENS).await);
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
        wait_idle(&engine_url(), STOPPED_WITHIN_TOKENS).await,
        "slot still busy after the client left"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
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
        e.link(),
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
    assert!(srv.state.wait_until(HANG, |s| s.running() > 0).await);
    let b = submit(
        &c,
        &base,
        json!({"prompt": "Hi", "max_tokens": 4, "deadline_ms": 300}),
    )
    .await;
    let bid = b["task_id"].as_str().unwrap();
    let rb = tokio::time::timeout(HANG, read_stream(&c, &base, bid, None, None))
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
    assert!(wait_idle(&engine_url(), STOPPED_WITHIN_TOKENS).await);
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
        let st = srv.state.clone();
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
                let st = st.clone();
                let read = |c: reqwest::Client, base: String, id: String| async move {
                    // A stream ends when its task does; on a busy machine that
                    // can take long (64 tasks may be ahead of it). What must not
                    // happen is that nothing ends anywhere: fail only when no
                    // task of the server has ended for a whole minute.
                    let fut = read_stream(&c, &base, &id, None, None);
                    tokio::pin!(fut);
                    let ended = |st: &orchestratord::AppState| {
                        st.metrics.completed.get()
                            + st.metrics.canceled.get()
                            + st.metrics.failed.get()
                    };
                    let (mut seen, mut since) = (ended(&st), Instant::now());
                    let r = loop {
                        match tokio::time::timeout(Duration::from_secs(5), &mut fut).await {
                            Ok(r) => break r.unwrap(),
                            Err(_) => {
                                let now = ended(&st);
                                if now != seen {
                                    (seen, since) = (now, Instant::now());
                                }
                                assert!(
                                    since.elapsed() < Duration::from_secs(60),
                                    "stream of {id} never ended, and no task of the server ended for 60 s"
                                );
                            }
                        }
                    };
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
    assert!(wait_idle(&engine_url(), STOPPED_WITHIN_TOKENS).await);
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
