//! Requests that used to take the engine down for everyone, be answered as
//! another request, or come back as a 5xx that is the client's fault
//! (issue 31), against real engines of the default model: a generation
//! pool and an embedding pool (loaded on demand).

use llorch_profile::stack::Stack as StackSpec;
use llorch_stack::{start_pools, PoolsOptions, Stack};
use orchestratord::Config;
use serde_json::{json, Value};
use std::time::Duration;
use test_support::workspace_root as root;

/// Engines of two tests at once would share the 2 cores; one at a time.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn start(dir: &std::path::Path) -> (Stack, String, String) {
    let gen = format!("hr-{}", std::process::id());
    let emb = format!("hr-emb-{}", std::process::id());
    let f = dir.join("stack.yaml");
    fs_err::write(
        &f,
        format!("schema: 1\npools:\n  - id: {gen}\n    profile: cpu\n  - id: {emb}\n    profile: cpu-embed\n    load: lazy\n"),
    )
    .unwrap();
    let spec = StackSpec::load(&f, &root()).unwrap();
    let stack = start_pools(
        &spec,
        &test_support::layout(&dir.join("rt")),
        Config {
            addr: "127.0.0.1:0".parse().unwrap(),
            stall_timeout: Duration::from_secs(3),
            ..Default::default()
        },
        &PoolsOptions {
            report: llorch_io::report::Reporter::QUIET,
            ..Default::default()
        },
        "hostile request tests",
    )
    .await
    .unwrap();
    (stack, gen, emb)
}

async fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = llorch_io::http::async_client()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        s,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn post_raw(base: &str, path: &str, body: String) -> (u16, Value) {
    let r = llorch_io::http::async_client()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// The OpenAI error's `param` (or Anthropic's message), for the assertion text.
fn param(v: &Value) -> String {
    v["error"]["param"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_bodies_are_the_clients_400_and_never_reach_the_engine_as_something_else() {
    let _t = TURN.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (stack, gen, emb) = start(dir.path()).await;
    let base = stack.orchestrator_url();
    let chat = |extra: Value| {
        let mut b =
            json!({"model": gen, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    // Engine-internal fields are refused, never relayed (a pinned slot
    // stalled another client; n_predict overrode max_tokens).
    for (f, v) in [
        ("id_slot", json!(0)),
        ("n_predict", json!(300)),
        ("cache_prompt", json!(true)),
    ] {
        let (s, e) = post(&base, "/v1/chat/completions", &chat(json!({f: v}))).await;
        assert_eq!((s, param(&e).as_str()), (400, f), "{e}");
        let (s, _) = post(
            &base,
            "/v1/completions",
            &json!({"model": gen, "prompt": "Hi", f: v}),
        )
        .await;
        assert_eq!(s, 400, "{f} on completions");
    }
    // A llama-server field on no deny-list (an allow-list per API): each
    // endpoint refuses what its table does not name, by name. `n_probs`
    // changes the answer's shape, `embd_normalize` the vectors.
    for (path, body, f) in [
        (
            "/v1/chat/completions",
            chat(json!({"n_probs": 3})),
            "n_probs",
        ),
        (
            "/v1/completions",
            json!({"model": gen, "prompt": "Hi", "input_extra": []}),
            "input_extra",
        ),
        (
            "/v1/responses",
            json!({"model": gen, "input": "Hi", "return_progress": true}),
            "return_progress",
        ),
        (
            "/v1/messages",
            json!({"model": gen, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}], "min_p": 0.5}),
            "min_p",
        ),
        (
            "/v1/embeddings",
            json!({"model": emb, "input": "Hi", "embd_normalize": -1}),
            "embd_normalize",
        ),
    ] {
        let (s, e) = post(&base, path, &body).await;
        assert_eq!(s, 400, "{f} on {path}: {e}");
        let said = e.to_string();
        assert!(
            said.contains(f) && said.contains(path),
            "{f} on {path}: {e}"
        );
    }
    // A body nested deeper than the parser reads is a 400, never a task.
    let deep = format!(
        "{{\"model\":\"{gen}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hi\"}}],\"tools\":{}1{},\"audio\":1}}",
        "[".repeat(200),
        "]".repeat(200)
    );
    let (s, e) = post_raw(&base, "/v1/chat/completions", deep).await;
    assert_eq!(s, 400, "{e}");
    // A deep or non-object tool schema, a malformed response_format, a
    // malformed tool history: 400 naming the field.
    let mut schema = json!({"type": "string"});
    for _ in 0..40 {
        schema = json!({"type": "object", "properties": {"a": schema}});
    }
    let tool = |params: Value| json!([{"type": "function", "function": {"name": "f", "parameters": params}}]);
    for (extra, field) in [
        (
            json!({"tools": tool(schema.clone()), "tool_choice": "required"}),
            "tools[0].function.parameters",
        ),
        (
            json!({"tools": tool(json!({"type": "string"})), "tool_choice": "required"}),
            "tools[0].function.parameters",
        ),
        (
            json!({"tools": tool(json!({"enum": [1, 2]})), "tool_choice": "required"}),
            "tools[0].function.parameters",
        ),
        (json!({"response_format": "json_object"}), "response_format"),
        (json!({"response_format": {}}), "response_format.type"),
        (
            json!({"response_format": {"type": "json_schema"}}),
            "response_format.json_schema",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": 5}}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}),
            "response_format.json_schema.schema",
        ),
    ] {
        let (s, e) = post(&base, "/v1/chat/completions", &chat(extra.clone())).await;
        assert_eq!((s, param(&e)), (400, field.to_string()), "{extra}: {e}");
    }
    let history = json!({"model": gen, "max_tokens": 4, "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": null, "tool_calls": "f()"},
        {"role": "tool", "tool_call_id": "c1", "content": "x"}]});
    let (s, e) = post(&base, "/v1/chat/completions", &history).await;
    assert_eq!(
        (s, param(&e).as_str()),
        (400, "messages[1].tool_calls"),
        "{e}"
    );
    let history = json!({"model": gen, "max_tokens": 4, "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"arguments": "{}"}}]}]});
    let (s, e) = post(&base, "/v1/chat/completions", &history).await;
    assert_eq!(s, 400, "{e}");
    // Structured output on completions is refused; json_object on chat is enforced.
    let (s, e) = post(
        &base,
        "/v1/completions",
        &json!({"model": gen, "prompt": "Hi", "max_tokens": 4,
        "response_format": {"type": "json_object"}}),
    )
    .await;
    assert_eq!((s, param(&e).as_str()), (400, "response_format"), "{e}");
    let (s, v) = post(
        &base,
        "/v1/chat/completions",
        &chat(json!({"max_tokens": 48,
        "messages": [{"role": "user", "content": "Describe a cat."}],
        "response_format": {"type": "json_object"}})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    if v["choices"][0]["finish_reason"] == "stop" {
        let parsed: Value =
            serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {content}"));
        assert!(parsed.is_object(), "{content}");
    } else {
        assert!(content.trim_start().starts_with('{'), "{content}");
    }
    // Anthropic: an image, a text block without text, a system that is not
    // text: the client's 400 in Anthropic's shape; a wrong method is typed so too.
    let msg = |content: Value, extra: Value| {
        let mut b = json!({"model": gen, "max_tokens": 4, "messages": [{"role": "user", "content": content}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for body in [
        msg(
            json!([{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]),
            json!({}),
        ),
        msg(json!([{"type": "text"}]), json!({})),
        msg(json!("Hi"), json!({"system": 5})),
    ] {
        let (s, e) = post(&base, "/v1/messages", &body).await;
        assert_eq!(s, 400, "{body}: {e}");
        assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
    }
    let r = llorch_io::http::async_client()
        .get(format!("{base}/v1/messages"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
    // Embeddings: token ids that are not ids, an input over the context.
    for input in [json!([1.5, 2]), json!([1e30]), json!([[3, -1]])] {
        let (s, e) = post(
            &base,
            "/v1/embeddings",
            &json!({"model": emb, "input": input}),
        )
        .await;
        assert_eq!((s, param(&e).as_str()), (400, "input"), "{input}: {e}");
    }
    let long = "word ".repeat(6000);
    let (s, e) = post(
        &base,
        "/v1/embeddings",
        &json!({"model": emb, "input": long}),
    )
    .await;
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["error"]["code"], "context_length_exceeded", "{e}");
    stack.stop(Duration::from_secs(5)).await;
}

/// A client that hangs up on a non-streamed, forwarded request (the answer
/// comes in one piece at its end) stops the engine's work: the engine ends
/// the generation early, instead of running to `max_tokens` while the
/// orchestrator counts it canceled and hands the slot on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hang_up_on_a_non_streamed_forwarded_request_stops_the_engine() {
    use tokio::io::AsyncWriteExt;
    let _t = TURN.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (stack, gen, _) = start(dir.path()).await;
    let base = stack.orchestrator_url();
    let max = 1500;
    let body =
        json!({"model": gen, "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": max, "ignore_eos": true, "response_format": {"type": "text"}})
        .to_string();
    let addr = base.trim_start_matches("http://").to_string();
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    sock.write_all(
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
            .as_bytes(),
    )
    .await
    .unwrap();
    // The task runs (the orchestrator says so: woken the moment its worker
    // takes it) and the engine has it: its slot processing (1,500 tokens
    // leave it busy far longer than one look). Only then the hang-up, or it
    // could come before the request ever reached the engine.
    let st = stack.server.state.clone();
    assert!(
        st.wait_until(test_harness::HANG, |s| s.running() == 1)
            .await,
        "the request never started"
    );
    let engine = stack.engine().unwrap().url;
    test_harness::first_slot_becomes(&engine, true, || {
        (st.running() != 1).then(|| "the task ended before the engine took it".to_string())
    })
    .await;
    drop(sock);
    // The orchestrator ends the task canceled once the engine's slot is idle.
    assert!(
        st.wait_until(test_harness::HANG, |s| s.metrics.canceled.get() == 1
            && s.running() == 0)
            .await,
        "the hang-up was never seen"
    );
    // The engine's own word: its slot idle, and fewer tokens decoded than
    // were asked for. A busy machine only makes this slower.
    let slots = test_harness::first_slot_becomes(&engine, false, || None).await;
    let decoded = slots[0]["next_token"][0]["n_decoded"]
        .as_u64()
        .or_else(|| slots[0]["next_token"]["n_decoded"].as_u64())
        .unwrap_or_else(|| panic!("n_decoded in {slots}"));
    assert_eq!(slots[0]["is_processing"], false, "{slots}");
    assert!(
        decoded < max,
        "the engine generated all {decoded} tokens nobody read: {slots}"
    );
    stack.stop(Duration::from_secs(5)).await;
}
