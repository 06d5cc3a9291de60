//! The OpenAI-compatible API against the real engine: models and errors in
//! OpenAI's shape, chat and completions on the wire, disconnects and queue
//! limits, the official Python SDK, stop strings and context overflow. One
//! real engine for the file (`test_harness::api`).

use orchestratord::client::read_stream;
use orchestratord::Config;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

use test_harness::api::*;
use test_harness::{get_json, wait_idle, wait_ready, STOPPED_WITHIN_TOKENS};

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
    let m: Value = get_json(&c, format!("{base}/v1/models")).await;
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
    assert!(wait_idle(&engine_url(), STOPPED_WITHIN_TOKENS).await);

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
    test_support::python_packages(&OPENAI_SDK.replace("==", "-"), &[OPENAI_SDK])
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
