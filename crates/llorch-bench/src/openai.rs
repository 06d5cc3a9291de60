//! `bench openai`: the orchestrator's OpenAI-compatible API against
//! llama-server's own endpoints, side by side in one run (alternating,
//! several runs, median and spread): streamed chat, a forced tool call
//! (streamed `tool_calls` deltas vs the same constrained request asked
//! directly), embeddings throughput (inputs/s), and disconnect → slot idle.

use crate::{median, pct, slots_idle, spread, time_pieces, Ctx, Piece};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// What one streamed answer's text pieces are: chat content, or a tool call's argument deltas.
#[derive(Clone, Copy)]
enum Pieces {
    Content,
    ToolArguments,
}

/// One streamed chat completion: (time to the first text piece in ms,
/// decode pieces/s after the first, pieces).
async fn openai_stream(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
    pieces: Pieces,
) -> Result<(f64, f64, u64)> {
    let t = Instant::now();
    let r = http.post(url).json(body).send().await?;
    time_pieces(t, url, r, |data| {
        if data == "[DONE]" {
            return Ok(Piece::Done);
        }
        let v: Value = serde_json::from_str(data)?;
        let d = &v["choices"][0]["delta"];
        let piece = match pieces {
            Pieces::Content => d["content"].as_str(),
            Pieces::ToolArguments => d["tool_calls"][0]["function"]["arguments"].as_str(),
        };
        Ok(if piece.is_some_and(|c| !c.is_empty()) {
            Piece::Text
        } else {
            Piece::Other
        })
    })
    .await
}

/// Alternate direct and orchestrator streams `runs` times (after a warm-up
/// of each), to `path` of each side's base URL (an engine's may be `unix:`).
async fn side_by_side(
    http: &reqwest::Client,
    path: &str,
    direct: (&str, &Value, Pieces),
    via: (&str, &Value, Pieces),
    runs: usize,
) -> Result<Value> {
    use llorch_io::llama_server::{client_for, http_url};
    let (dh, vh) = (client_for(direct.0, http), client_for(via.0, http));
    let (du, vu) = (http_url(direct.0, path), http_url(via.0, path));
    let direct = (du.as_str(), direct.1, direct.2);
    let via = (vu.as_str(), via.1, via.2);
    let (dh, vh) = (&dh, &vh);
    openai_stream(dh, direct.0, direct.1, direct.2).await?;
    openai_stream(vh, via.0, via.1, via.2).await?;
    let (mut ratio, mut ttft_over, mut tps_via, mut tps_direct) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut pieces = (0, 0);
    for _ in 0..runs {
        let (td, rd, nd) = openai_stream(dh, direct.0, direct.1, direct.2).await?;
        let (tv, rv, nv) = openai_stream(vh, via.0, via.1, via.2).await?;
        pieces = (nd, nv);
        tps_direct.push(rd);
        tps_via.push(rv);
        ratio.push(rv / rd);
        ttft_over.push(tv - td);
    }
    Ok(json!({
        "decode_ratio_orchestrator_over_direct_median": median(&mut ratio.clone()),
        "decode_ratio_spread": spread(&ratio),
        "decode_tok_per_s_direct_median": median(&mut tps_direct),
        "decode_tok_per_s_orchestrator_median": median(&mut tps_via),
        "ttft_overhead_ms_p50": pct(&ttft_over, 0.5),
        "ttft_overhead_ms_spread": spread(&ttft_over),
        "pieces_direct_orchestrator": [pieces.0, pieces.1],
    }))
}

pub fn bench_openai(
    ctx: &Ctx,
    profile: Option<&str>,
    runs: usize,
    max_tokens: u32,
) -> Result<Value> {
    use futures_util::StreamExt;
    let p = ctx.profile(profile)?;
    let rt = crate::runtime()?;
    rt.block_on(async {
        let cfg = orchestratord::Config { addr: "127.0.0.1:0".parse().unwrap(), ..Default::default() };
        let stem: String = p.pool().as_str().chars().take(52).collect();
        let pool = crate::bench_pool(&p)?;
        let stack = llorch_stack::start_stack(&p, &pool, &ctx.layout, cfg.clone(), llorch_io::report::Reporter::QUIET, "cargo xtask bench openai").await?;
        let orch = stack.orchestrator_url();
        let engine = stack.engine()?.url;
        let http = llorch_io::http::async_client();
        let chat_path = "/v1/chat/completions";
        let orch_chat = format!("{orch}{chat_path}");
        let messages = json!([{"role": "user", "content": "Write a long story about a lighthouse keeper."}]);
        let body = json!({"model": pool.as_str(), "messages": messages, "max_tokens": max_tokens, "temperature": 0, "seed": 42, "stream": true});
        // The same work on both sides: exact engines never reuse the prompt cache.
        let mut direct_body = body.clone();
        direct_body["cache_prompt"] = json!(false);
        let chat = side_by_side(&http, chat_path, (&engine, &direct_body, Pieces::Content), (&orch, &body, Pieces::Content), runs).await?;
        // A forced tool call whose argument is long text: the orchestrator's
        // tool_calls deltas vs the constrained request it sends, asked directly.
        let tools = json!([{"type": "function", "function": {"name": "write_story", "description": "Write a story",
            "parameters": {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}}}]);
        let mut tool_body = body.clone();
        tool_body["tools"] = tools.clone();
        tool_body["tool_choice"] = json!({"type": "function", "function": {"name": "write_story"}});
        let parsed = orchestratord::tools::read_tools(&tools).map_err(|e| anyhow::anyhow!(e.message))?;
        let forced = orchestratord::tools::Forced::of(&orchestratord::tools::Choice::Named("write_story".into()), &parsed)
            .context("a named tool forces a call")?;
        let mut direct_tool = direct_body.as_object().cloned().unwrap_or_default();
        forced.apply(&mut direct_tool);
        let direct_tool = Value::Object(direct_tool);
        // A model that cannot run a grammar (a synthetic model's vocabulary:
        // llama-server answers 400 "Failed to initialize samplers") skips this case.
        let tool_call = match side_by_side(&http, chat_path, (&engine, &direct_tool, Pieces::Content), (&orch, &tool_body, Pieces::ToolArguments), runs).await {
            Ok(v) => v,
            Err(e) => json!({"skipped": format!("{e:#}")}),
        };
        // Disconnect mid-stream → the engine's slot idle.
        let mut idle_ms = Vec::new();
        for _ in 0..runs.max(10) {
            let mut b = body.clone();
            b["max_tokens"] = json!(1000);
            let r = http.post(&orch_chat).json(&b).send().await?;
            let mut s = r.bytes_stream();
            let mut seen = String::new();
            while seen.matches("data:").count() < 3 {
                seen.push_str(&String::from_utf8_lossy(&s.next().await.context("stream ended early")??));
            }
            let t = Instant::now();
            drop(s);
            slots_idle(&http, &engine).await?;
            idle_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        stack.stop(Duration::from_secs(5)).await;
        // Embeddings: the same profile as an embedding pool; 256 short documents in requests of 16.
        let mut pe = p.clone();
        pe.file.server.embeddings = true;
        let epool = llorch_types::PoolId::parse(&format!("{stem}-embed"))?;
        let stack = llorch_stack::start_stack(&pe, &epool, &ctx.layout, cfg, llorch_io::report::Reporter::QUIET, "cargo xtask bench openai").await?;
        let (orch_e, engine_e) = (stack.orchestrator_url(), stack.engine()?.url);
        let docs: Vec<String> = (0..256).map(|i| format!("Document {i}: the lighthouse keeper wrote entry number {i} in the log.")).collect();
        let embed_all = |base: String, model: Option<String>| {
            let http = llorch_io::llama_server::client_for(&base, &http);
            let url = llorch_io::llama_server::http_url(&base, "/v1/embeddings");
            let docs = docs.clone();
            async move {
                let t = Instant::now();
                for chunk in docs.chunks(16) {
                    let mut b = json!({"input": chunk});
                    if let Some(m) = &model {
                        b["model"] = json!(m);
                    }
                    let r = http.post(&url).json(&b).send().await?;
                    anyhow::ensure!(r.status().is_success(), "{url} answered {}", r.status());
                    let v: Value = r.json().await?;
                    anyhow::ensure!(v["data"].as_array().map(Vec::len) == Some(chunk.len()), "{url}: wrong count");
                }
                anyhow::Ok(docs.len() as f64 / t.elapsed().as_secs_f64())
            }
        };
        embed_all(engine_e.clone(), None).await?;
        embed_all(orch_e.clone(), Some(epool.to_string())).await?;
        let (mut eratio, mut ed, mut ev) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let d = embed_all(engine_e.clone(), None).await?;
            let v = embed_all(orch_e.clone(), Some(epool.to_string())).await?;
            ed.push(d);
            ev.push(v);
            eratio.push(v / d);
        }
        stack.stop(Duration::from_secs(5)).await;
        anyhow::Ok(json!({
            "chat": chat,
            "tool_call": tool_call,
            "embeddings": {
                "inputs_per_s_ratio_orchestrator_over_direct_median": median(&mut eratio.clone()),
                "inputs_per_s_ratio_spread": spread(&eratio),
                "inputs_per_s_direct_median": median(&mut ed),
                "inputs_per_s_orchestrator_median": median(&mut ev),
                "documents": docs.len(),
                "per_request": 16,
            },
            "disconnect_to_slot_idle_ms_p50": pct(&idle_ms, 0.5),
            "disconnect_to_slot_idle_ms_p99": pct(&idle_ms, 0.99),
            "runs": runs,
            "max_tokens": max_tokens,
        }))
    })
}
