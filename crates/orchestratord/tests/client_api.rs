//! The API real clients send, against real engines: the default profile's
//! chat engine and the `cpu-embed` profile's embedding engine (the same
//! cached llama-server build and model). Each forwarded endpoint answers
//! what llama-server answers when asked directly; forced tool calls hold;
//! a pool serves only its kind; streams free the slot on disconnect; a full
//! queue is a 429 in each API's own shape; the official `openai` and
//! `anthropic` SDKs and `langchain-openai` drive it.

use futures_util::StreamExt;
use llorch_types::PoolId;
use orchestratord::{Config, PoolSpec, SchedulerConfig};
use serde_json::{json, Value};
use std::sync::OnceLock;
use std::time::Duration;

use test_harness::{get_json, slots_idle, wait_idle, wait_ready, Engine, STOPPED_WITHIN_TOKENS};

static CHAT: OnceLock<Engine> = OnceLock::new();
static EMBED: OnceLock<Engine> = OnceLock::new();
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// This process's pools (two test runs at once must not share one).
fn chat_pool() -> String {
    format!("capi-{}", std::process::id())
}
fn embed_pool() -> String {
    format!("capi-embed-{}", std::process::id())
}

fn chat() -> &'static Engine {
    CHAT.get_or_init(|| Engine::start(None, &chat_pool(), "capi"))
}
fn embed() -> &'static Engine {
    EMBED.get_or_init(|| Engine::start(Some("cpu-embed"), &embed_pool(), "capi"))
}

fn url(e: &Engine) -> String {
    e.url()
}

fn spec(e: &Engine) -> PoolSpec {
    let mut s = PoolSpec::new(PoolId::parse(&e.base.pool).unwrap(), e.link());
    s.engine = Some(e.base.clone());
    s
}

async fn orchestrator(mut cfg: Config) -> (orchestratord::Server, String) {
    let (c, e) = tokio::task::spawn_blocking(|| (chat(), embed()))
        .await
        .unwrap();
    cfg.health_interval = Duration::from_millis(50);
    cfg.addr = "127.0.0.1:0".parse().unwrap();
    let srv = orchestratord::start_pools(cfg, vec![spec(c), spec(e)], SchedulerConfig::default())
        .await
        .unwrap();
    let base = format!("http://{}", srv.addr);
    wait_ready(&base).await;
    (srv, base)
}

async fn post(url: String, body: &Value) -> (u16, Value) {
    let r = llorch_io::http::async_client()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        s,
        serde_json::from_str(&text).unwrap_or(json!({"raw": text})),
    )
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
         "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                        "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    ])
}

fn ask() -> Value {
    json!([{"role": "user", "content": "What is the weather in Paris, in celsius?"}])
}

/// The same request to the orchestrator and to llama-server directly gives
/// the same answer: structured output, tools with `auto`, a completions
/// field the task path does not serve, Anthropic Messages, Responses,
/// embeddings (bit for bit, twice, of the model's width).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_endpoint_answers_as_llama_server_does() {
    let _t = TURN.lock().await;
    let (srv, base) = orchestrator(Config::default()).await;
    let (direct, direct_embed) = (url(chat()), url(embed()));
    let (cp, ep) = (chat_pool(), embed_pool());
    // The orchestrator's deterministic defaults, written out for the direct request.
    let fixed = |mut b: Value| {
        b["temperature"] = json!(0.0);
        b["seed"] = json!(42);
        b
    };
    let person = json!({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                        "required": ["name", "age"], "additionalProperties": false});
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/v1/chat/completions",
            fixed(
                json!({"messages": [{"role": "user", "content": "Describe a person as JSON."}], "max_tokens": 60,
                   "response_format": {"type": "json_schema", "json_schema": {"name": "p", "strict": true, "schema": person}}}),
            ),
            "/choices/0/message/content",
        ),
        (
            "/v1/chat/completions",
            fixed(
                json!({"messages": ask(), "tools": weather_tools(), "tool_choice": "auto", "max_tokens": 24}),
            ),
            "/choices/0/message",
        ),
        (
            // Tool turns in the history: an assistant call and its result.
            "/v1/chat/completions",
            fixed(
                json!({"tools": weather_tools(), "max_tokens": 24, "messages": [
                {"role": "user", "content": "What is the weather in Paris, in celsius?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]}),
            ),
            "/choices/0/message",
        ),
        (
            "/v1/completions",
            fixed(
                json!({"prompt": "The capital of France is", "max_tokens": 16, "frequency_penalty": 0.5}),
            ),
            "/choices/0/text",
        ),
        (
            "/v1/messages",
            json!({"max_tokens": 24, "temperature": 0.0, "system": "Be brief.", "messages": [{"role": "user", "content": "Say hello."}]}),
            "/content",
        ),
        (
            "/v1/responses",
            fixed(
                json!({"input": "Say hello.", "instructions": "Be brief.", "max_output_tokens": 16}),
            ),
            "/output/0/content/0/text",
        ),
    ];
    for (path, body, answer) in cases {
        let mut ours = body.clone();
        ours["model"] = json!(cp);
        let (s, o) = post(format!("{base}{path}"), &ours).await;
        assert_eq!(s, 200, "{path}: {o}");
        let (s, d) = post(format!("{direct}{path}"), &body).await;
        assert_eq!(s, 200, "{path} direct: {d}");
        let (a, b) = (o.pointer(answer), d.pointer(answer));
        assert!(a.is_some() && a == b, "{path}: {a:?} vs direct {b:?}");
        assert_eq!(o["model"], json!(cp), "{path} names the pool's model");
    }
    // Embeddings: vectors equal to llama-server's, the same twice, n_embd wide.
    let body = json!({"input": ["the cat sat", "on the mat"]});
    let mut ours = body.clone();
    ours["model"] = json!(ep);
    let (s, o1) = post(format!("{base}/v1/embeddings"), &ours).await;
    assert_eq!(s, 200, "{o1}");
    let (_, o2) = post(format!("{base}/v1/embeddings"), &ours).await;
    let (_, d) = post(format!("{direct_embed}/v1/embeddings"), &body).await;
    let vecs = |v: &Value| -> Vec<Value> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["embedding"].clone())
            .collect()
    };
    assert_eq!(vecs(&o1), vecs(&d));
    assert_eq!(vecs(&o1), vecs(&o2));
    let models: Value = get_json(
        &llorch_io::http::async_client(),
        format!("{direct_embed}/v1/models"),
    )
    .await;
    let n_embd = models["data"][0]["meta"]["n_embd"].as_u64().unwrap();
    assert_eq!(vecs(&o1)[0].as_array().unwrap().len() as u64, n_embd);
    assert_eq!(o1["usage"]["prompt_tokens"], d["usage"]["prompt_tokens"]);
    // base64: the same floats.
    ours["encoding_format"] = json!("base64");
    let (s, b) = post(format!("{base}/v1/embeddings"), &ours).await;
    assert_eq!(s, 200, "{b}");
    assert!(b["data"][0]["embedding"].is_string());
    srv.shutdown(Duration::from_secs(1)).await;
}

/// A forced call holds with a model whose template knows no tools: the
/// named function and `required` over two tools give a call whose arguments
/// have the schema's required keys; streamed, the deltas reassemble to the
/// same call. Anthropic's forced tool is a `tool_use` block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_tool_calls_hold_streamed_or_not() {
    let _t = TURN.lock().await;
    let (srv, base) = orchestrator(Config::default()).await;
    let cp = chat_pool();
    for choice in [
        json!({"type": "function", "function": {"name": "get_weather"}}),
        json!("required"),
    ] {
        let body = json!({"model": cp, "messages": ask(), "tools": weather_tools(), "tool_choice": choice, "max_tokens": 80});
        let (s, v) = post(format!("{base}/v1/chat/completions"), &body).await;
        assert_eq!(s, 200, "{v}");
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{v}");
        assert!(c["message"]["content"].is_null());
        let call = &c["message"]["tool_calls"][0];
        let name = call["function"]["name"].as_str().unwrap().to_string();
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        let required: &[&str] = if name == "get_weather" {
            &["city", "unit"]
        } else {
            &["city"]
        };
        for k in required {
            assert!(args[k].is_string(), "{name}: {k} missing in {args}");
        }
        if name == "get_weather" {
            assert!(["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()));
        }
        // Streamed: the same call from the deltas.
        let mut sb = body.clone();
        sb["stream"] = json!(true);
        let r = llorch_io::http::async_client()
            .post(format!("{base}/v1/chat/completions"))
            .json(&sb)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        let (mut sname, mut sargs, mut finish) = (String::new(), String::new(), String::new());
        for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if line == "[DONE]" {
                continue;
            }
            let ch: Value = serde_json::from_str(line).unwrap();
            for tc in ch["choices"][0]["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                sname.push_str(tc["function"]["name"].as_str().unwrap_or(""));
                sargs.push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
            }
            if let Some(f) = ch["choices"][0]["finish_reason"].as_str() {
                finish = f.into();
            }
        }
        assert_eq!(
            (sname.as_str(), sargs.as_str()),
            (
                name.as_str(),
                call["function"]["arguments"].as_str().unwrap()
            )
        );
        assert_eq!(finish, "tool_calls");
        assert!(text.trim_end().ends_with("data: [DONE]"));
    }
    // Anthropic: a forced tool is a tool_use block, plain and streamed.
    let body = json!({"model": cp, "max_tokens": 80, "messages": ask(),
        "tools": [{"name": "get_weather", "description": "The weather", "input_schema": weather_tools()[0]["function"]["parameters"]}],
        "tool_choice": {"type": "tool", "name": "get_weather"}});
    let (s, v) = post(format!("{base}/v1/messages"), &body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["stop_reason"], "tool_use");
    assert_eq!(v["content"][0]["type"], "tool_use");
    assert!(v["content"][0]["input"]["city"].is_string(), "{v}");
    srv.shutdown(Duration::from_secs(1)).await;
}

/// A pool serves its kind only; fields no pool can honour are a 400 that
/// names them; ignored fields are accepted; `/v1/messages` answers in
/// Anthropic's error shape and takes `x-api-key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_serve_their_kind_and_errors_come_in_each_apis_shape() {
    let _t = TURN.lock().await;
    let (srv, base) = orchestrator(Config {
        api_token: Some("s3cret".into()),
        ..Default::default()
    })
    .await;
    let (cp, ep) = (chat_pool(), embed_pool());
    let c = llorch_io::http::async_client();
    let send = |path: &str, body: Value| {
        c.post(format!("{base}{path}"))
            .bearer_auth("s3cret")
            .json(&body)
            .send()
    };
    let expect = |r: reqwest::Response, status: u16| async move {
        assert_eq!(r.status().as_u16(), status);
        r.json::<Value>().await.unwrap()
    };
    let chat_body = json!({"model": ep, "messages": [{"role": "user", "content": "hi"}]});
    let v = expect(send("/v1/chat/completions", chat_body).await.unwrap(), 400).await;
    assert_eq!(v["error"]["param"], "model");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains(&format!("pool `{ep}` serves embeddings")), "{m}");
    let v = expect(
        send("/v1/embeddings", json!({"model": cp, "input": "x"}))
            .await
            .unwrap(),
        400,
    )
    .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("serves generation"),
        "{v}"
    );
    let v = expect(
        send(
            "/v1/rerank",
            json!({"model": ep, "query": "q", "documents": ["d"]}),
        )
        .await
        .unwrap(),
        400,
    )
    .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("pooling: rank"),
        "{v}"
    );
    let v = expect(
        send("/v1/tasks", json!({"pool": ep, "prompt": "x"}))
            .await
            .unwrap(),
        400,
    )
    .await;
    assert_eq!(v["error"]["param"], "pool");
    for (field, body) in [
        (
            "audio",
            json!({"model": cp, "messages": ask(), "audio": {"voice": "x"}}),
        ),
        (
            "n",
            json!({"model": cp, "messages": ask(), "n": 2, "tools": weather_tools()}),
        ),
        (
            "tool_choice",
            json!({"model": cp, "messages": ask(), "tools": weather_tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
        ),
        (
            "tools[0].type",
            json!({"model": cp, "messages": ask(), "tools": [{"type": "retrieval"}]}),
        ),
        (
            "max_tokens",
            json!({"model": cp, "messages": ask(), "max_tokens": 0, "presence_penalty": 0.1}),
        ),
    ] {
        let v = expect(send("/v1/chat/completions", body).await.unwrap(), 400).await;
        assert_eq!(v["error"]["param"], field, "{v}");
    }
    let v = expect(
        send(
            "/v1/embeddings",
            json!({"model": ep, "input": "x", "dimensions": 8}),
        )
        .await
        .unwrap(),
        400,
    )
    .await;
    assert_eq!(v["error"]["param"], "dimensions");
    // Ignored fields are accepted.
    let v = expect(
        send("/v1/chat/completions", json!({"model": cp, "messages": ask(), "max_tokens": 4, "user": "u1", "store": false, "metadata": {"a": "b"}})).await.unwrap(),
        200,
    )
    .await;
    assert!(v["choices"][0]["message"]["content"].is_string());
    // Anthropic: x-api-key, and errors in its shape.
    let anth = |body: Value, key: &str| {
        c.post(format!("{base}/v1/messages"))
            .header("x-api-key", key)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
    };
    let ok = json!({"model": cp, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
    let v = expect(anth(ok.clone(), "s3cret").await.unwrap(), 200).await;
    assert_eq!(v["type"], "message");
    for (body, key, status, kind) in [
        (ok.clone(), "wrong", 401, "authentication_error"),
        (
            json!({"model": "nope", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}),
            "s3cret",
            404,
            "not_found_error",
        ),
        (
            json!({"model": cp, "messages": [{"role": "user", "content": "x"}]}),
            "s3cret",
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": cp, "max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}),
            "s3cret",
            400,
            "invalid_request_error",
        ),
    ] {
        let v = expect(anth(body, key).await.unwrap(), status).await;
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], kind, "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // The framework's own 413 is in Anthropic's shape there too.
    let big = json!({"model": cp, "max_tokens": 4, "messages": [{"role": "user", "content": "x".repeat(2 << 20)}]});
    let v = expect(anth(big, "s3cret").await.unwrap(), 413).await;
    assert_eq!(v["error"]["type"], "request_too_large");
    // Capabilities and models say what each pool serves.
    let caps: Value = c
        .get(format!("{base}/v1/capabilities"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let serves: Vec<(String, String)> = caps["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_string(),
                p["serves"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        serves,
        vec![
            (cp.clone(), "generation".into()),
            (ep.clone(), "embeddings".into())
        ]
    );
    let models: Value = c
        .get(format!("{base}/v1/models"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let e = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == json!(ep))
        .unwrap();
    assert_eq!(e["endpoints"], json!(["/v1/embeddings"]));
    srv.shutdown(Duration::from_secs(1)).await;
}

/// Closing any streamed endpoint frees the engine's slot; with the slot
/// busy and the queue full, each API answers 429 in its own shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_free_the_slot_and_a_full_queue_is_429_in_each_shape() {
    let _t = TURN.lock().await;
    let (srv, base) = orchestrator(Config {
        queue_capacity: 1,
        ..Default::default()
    })
    .await;
    let cp = chat_pool();
    let engine = url(chat());
    // Generation that lasts: 1,500 tokens (end-of-sequence ignored where the
    // API takes it; the default model repeats the word to the limit anyway).
    let long = "Repeat the word hello five hundred times.";
    let streams = [
        (
            "/v1/chat/completions",
            json!({"model": cp, "stream": true, "max_tokens": 1500, "ignore_eos": true,
            "presence_penalty": 0.0, "messages": [{"role": "user", "content": long}]}),
        ),
        (
            "/v1/messages",
            json!({"model": cp, "stream": true, "max_tokens": 1500, "messages": [{"role": "user", "content": long}]}),
        ),
        (
            "/v1/responses",
            json!({"model": cp, "stream": true, "max_output_tokens": 1500, "ignore_eos": true, "input": long}),
        ),
    ];
    let c = llorch_io::http::async_client();
    for (path, body) in &streams {
        let r = c
            .post(format!("{base}{path}"))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let mut s = r.bytes_stream();
        let mut got = String::new();
        while got.matches("data:").count() < 4 {
            got.push_str(&String::from_utf8_lossy(&s.next().await.unwrap().unwrap()));
        }
        assert!(
            !slots_idle(&engine).await,
            "{path}: the engine is generating"
        );
        drop(s);
        assert!(
            wait_idle(&engine, STOPPED_WITHIN_TOKENS).await,
            "{path}: slot still busy after disconnect"
        );
    }
    // One running, one queued (capacity 1): the next is 429 in each shape.
    let hold = |body: Value| {
        let c = c.clone();
        let base = base.clone();
        tokio::spawn(async move {
            let r = c
                .post(format!("{base}/v1/chat/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            let mut s = r.bytes_stream();
            while s.next().await.is_some() {}
        })
    };
    // The task path, 1,500 tokens whatever the model says: about 10 s here.
    let busy = json!({"model": cp, "stream": true, "max_tokens": 1500, "ignore_eos": true,
                      "messages": [{"role": "user", "content": long}]});
    // The canceled streams' tasks end once their slot is idle: wait for
    // that, or the first hold would queue behind one and the second be refused.
    // Each wait is woken by the state's change notifications; the bound
    // only stops a hang.
    let st = srv.state.clone();
    assert!(
        st.wait_until(test_harness::HANG, |s| s.running() == 0)
            .await,
        "canceled tasks still running"
    );
    let running = hold(busy.clone());
    assert!(
        st.wait_until(test_harness::HANG, |s| s.running() >= 1)
            .await
    );
    let queued = hold(busy);
    assert!(
        st.wait_until(test_harness::HANG, |s| !s.pools[0].queue.is_empty())
            .await
    );
    for (path, body) in &streams {
        let (s, v) = post(format!("{base}{path}"), body).await;
        assert_eq!(s, 429, "{path}: {v}");
        if *path == "/v1/messages" {
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
        } else {
            assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
            assert_eq!(v["error"]["code"], "QUEUE_FULL");
        }
    }
    running.abort();
    queued.abort();
    assert!(wait_idle(&engine, STOPPED_WITHIN_TOKENS).await);
    srv.shutdown(Duration::from_secs(1)).await;
}

/// The Python clients (pinned): openai, anthropic, langchain-openai, and
/// jsonschema to validate tool arguments and structured output.
const SDKS: &[&str] = &[
    "openai==1.109.1",
    "anthropic==0.69.0",
    "langchain-openai==0.3.35",
    "jsonschema==4.25.1",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_clients_drive_every_endpoint() {
    let sdk = tokio::task::spawn_blocking(|| test_support::python_packages("client-sdks", SDKS))
        .await
        .unwrap();
    let _t = TURN.lock().await;
    let (srv, base) = orchestrator(Config::default()).await;
    let models: Value = llorch_io::http::async_client()
        .get(format!("{}/v1/models", url(embed())))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let n_embd = models["data"][0]["meta"]["n_embd"].as_u64().unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/client_sdks.py");
    let out = tokio::task::spawn_blocking(move || {
        llorch_io::cmd::Cmd::new("python3")
            .arg(&script)
            .env("PYTHONPATH", &sdk)
            .env("LLORCH_BASE_URL", &base)
            .env("LLORCH_MODEL", chat_pool())
            .env("LLORCH_EMBED_MODEL", embed_pool())
            .env("LLORCH_N_EMBD", n_embd.to_string())
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
        "the client SDK script failed:\n{output}"
    );
    srv.shutdown(Duration::from_secs(1)).await;
}
