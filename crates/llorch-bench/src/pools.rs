//! `cargo xtask bench pools`: the cost of many pools, side by side in one run.
//!
//! * Lazy load: request → first token on an unloaded pool, minus that
//!   engine's own spawn → ready (its supervisor measures it): the
//!   orchestrator's overhead of loading on demand (with the prompt's own
//!   processing, shown beside it as the warm TTFT of the same request).
//! * Swap: with `max_loaded: 1`, request → first token on pool b while pool a
//!   is loaded (unload a + load b), against a cold start of a (nothing
//!   loaded), alternating in every run.
//! * With `--devices D0,D1` (or `--throughput`): two pools streaming at once,
//!   aggregate decode tokens/s through the orchestrator vs the same two
//!   engines launched by hand (same binary, model, flags and devices) vs one
//!   pool alone, alternating in every run.

use crate::{median, spread, Ctx};
use anyhow::{bail, Context, Result};
use llorch_io::cmd::Cmd;
use llorch_io::llama_server::LlamaServer;
use llorch_profile::stack::{LoadPolicy, Stack, StackPool};
use llorch_types::PoolId;
use orchestratord::client::stream_task;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const PROMPT: &str = "Write a long story about a lighthouse keeper:\n";

fn pool_id(base: &PoolId, tag: &str) -> Result<PoolId> {
    Ok(PoolId::parse(&format!(
        "{}-{tag}",
        base.as_str().chars().take(50).collect::<String>()
    ))?)
}

fn cfg() -> orchestratord::Config {
    orchestratord::Config {
        addr: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    }
}

/// The stack of a bench's pools, started quietly.
async fn start(stack: &Stack, ctx: &Ctx) -> Result<llorch_stack::Stack> {
    let opts = llorch_stack::PoolsOptions {
        report: llorch_io::report::Reporter::QUIET,
        ..Default::default()
    };
    Ok(
        llorch_stack::start_pools(stack, &ctx.layout, cfg(), &opts, "cargo xtask bench pools")
            .await?,
    )
}

pub fn bench_pools(
    ctx: &Ctx,
    profile: Option<&str>,
    runs: usize,
    max_tokens: u32,
    devices: &[u32],
    throughput: bool,
) -> Result<Value> {
    let p = ctx.profile(profile)?;
    if !devices.is_empty() && devices.len() != 2 {
        bail!("--devices takes two GPU indexes, one per pool (e.g. 0,1)");
    }
    let rt = crate::runtime()?;
    let mut out = serde_json::Map::new();
    let pool =
        |tag: &str, load: LoadPolicy, idle: Option<u64>, dev: Option<u32>| -> Result<StackPool> {
            Ok(StackPool {
                id: pool_id(p.pool(), tag)?,
                profile: p.clone(),
                load,
                idle_unload_s: idle,
                keep_loaded: false,
                devices: dev.into_iter().collect(),
                memory_mib: None,
                concurrency: Default::default(),
                replica_devices: Vec::new(),
            })
        };
    let (d0, d1) = (devices.first().copied(), devices.get(1).copied());
    // 1 + 2: lazy load and swap, one stack: two lazy pools, max_loaded 1, idle unload 1 s.
    let stack = Stack {
        max_loaded: Some(1),
        pools: vec![
            pool("lazy-a", LoadPolicy::Lazy, Some(1), d0)?,
            pool("lazy-b", LoadPolicy::Lazy, Some(1), d1.or(d0))?,
        ],
        warnings: Vec::new(),
    };
    let (a, b) = (stack.pools[0].id.clone(), stack.pools[1].id.clone());
    let r = rt.block_on(async {
        let ps = start(&stack, ctx).await?;
        let base = ps.orchestrator_url();
        let http = llorch_io::http::async_client();
        let req = |pool: &PoolId| json!({"prompt": PROMPT, "max_tokens": 1, "pool": pool.as_str()});
        let mut asked = Vec::new();
        let mut call = Vec::new();
        let (mut overhead, mut cold, mut swap, mut ready, mut warm, mut ratio) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for _ in 0..runs {
            // Nothing loaded (idle unload of 1 s).
            let t0 = Instant::now();
            while ps
                .server
                .state
                .pools
                .iter()
                .any(|p| p.state(false) != "unloaded")
            {
                if t0.elapsed() > Duration::from_secs(60) {
                    bail!("pools did not unload when idle");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let c = stream_task(&http, &base, &req(&a), None, None).await?;
            let ready_a = ps
                .link(a.as_str())
                .and_then(|l| l.ready_ms())
                .context("a is not ready")? as f64;
            call.push(
                ps.server.state.pools[0]
                    .last_load_call_ms
                    .load(std::sync::atomic::Ordering::Relaxed) as f64,
            );
            asked.push(
                ps.server.state.pools[0]
                    .last_load_ms
                    .load(std::sync::atomic::Ordering::Relaxed) as f64,
            );
            // The same request once more, warm: its prompt processing and first token.
            let w = stream_task(&http, &base, &req(&a), None, None).await?;
            // b while a is loaded: unload a, load b.
            let s = stream_task(&http, &base, &req(&b), None, None).await?;
            for r in [&c, &w, &s] {
                if r.error.is_some() || r.tokens.is_empty() {
                    bail!("a bench request failed: {:?}", r.error);
                }
            }
            overhead.push(c.ttft_from_submit_ms - ready_a);
            cold.push(c.ttft_from_submit_ms);
            swap.push(s.ttft_from_submit_ms);
            ratio.push(s.ttft_from_submit_ms / c.ttft_from_submit_ms);
            ready.push(ready_a);
            warm.push(w.ttft_from_submit_ms);
        }
        ps.stop(Duration::from_secs(5)).await;
        anyhow::Ok(json!({
            "lazy_first_token_minus_spawn_to_ready_ms_median": median(&mut overhead.clone()),
            "lazy_first_token_minus_spawn_to_ready_ms_spread": spread(&overhead),
            "lazy_first_token_ms_median": median(&mut cold.clone()),
            "engine_spawn_to_ready_ms_median": median(&mut ready),
            "load_asked_to_pool_ready_ms_median": median(&mut asked),
            "load_call_ms_median (memory probe + start)": median(&mut call),
            "warm_first_token_ms_median (prompt + 1 token)": median(&mut warm),
            "swap_first_token_ms_median": median(&mut swap),
            "ratio_swap_over_cold_start_median": median(&mut ratio.clone()),
            "ratio_swap_over_cold_start_spread": spread(&ratio),
        }))
    })?;
    out.extend(r.as_object().unwrap().clone());
    if !devices.is_empty() || throughput {
        let r = rt.block_on(aggregate(ctx, &pool, d0, d1, runs, max_tokens))?;
        out.extend(r.as_object().unwrap().clone());
    }
    out.insert("runs".into(), json!(runs));
    out.insert("max_tokens".into(), json!(max_tokens));
    out.insert("devices".into(), json!(devices));
    Ok(Value::Object(out))
}

/// Decode tokens/s of one streaming `/completion` straight from llama-server.
async fn direct_decode(http: &reqwest::Client, url: &str, max_tokens: u32) -> Result<f64> {
    Ok(crate::direct_completion(http, url, PROMPT, max_tokens)
        .await?
        .1)
}

/// Decode tokens/s of one task through the orchestrator.
async fn via_decode(
    http: &reqwest::Client,
    base: &str,
    pool: &PoolId,
    max_tokens: u32,
) -> Result<f64> {
    let body = json!({"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": true, "pool": pool.as_str()});
    let r = stream_task(http, base, &body, None, None).await?;
    if r.error.is_some() || r.tokens.len() < 2 {
        bail!("a bench task failed: {:?}", r.error);
    }
    Ok((r.tokens.len() as f64 - 1.0) / (r.decode_ms / 1000.0))
}

type PoolFn<'a> = dyn Fn(&str, LoadPolicy, Option<u64>, Option<u32>) -> Result<StackPool> + 'a;

async fn aggregate(
    ctx: &Ctx,
    pool: &PoolFn<'_>,
    d0: Option<u32>,
    d1: Option<u32>,
    runs: usize,
    max_tokens: u32,
) -> Result<Value> {
    let stack = Stack {
        max_loaded: None,
        pools: vec![
            pool("pair-a", LoadPolicy::Eager, None, d0)?,
            pool("pair-b", LoadPolicy::Eager, None, d1)?,
        ],
        warnings: Vec::new(),
    };
    let (a, b) = (stack.pools[0].id.clone(), stack.pools[1].id.clone());
    let ps = start(&stack, ctx).await?;
    let base = ps.orchestrator_url();
    let http = llorch_io::http::async_client();
    // The same two engines by hand: same binary, model, flags and GPU.
    let mut hand = Vec::new();
    for id in [&a, &b] {
        let prep = ps.link(id.as_str()).unwrap().prepared().clone();
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut c = Cmd::new(&prep.binary)
            .arg("-m")
            .arg(&prep.model.path)
            .args(["--port", &port.to_string()])
            .args(&prep.flags);
        for (k, v) in &prep.env {
            c = c.env(k, v);
        }
        let child = llorch_io::cmd::KillOnDrop(
            c.spawn(llorch_io::cmd::Io::Null, llorch_io::cmd::Io::Null)?,
        );
        let url = format!("http://127.0.0.1:{port}");
        let t0 = Instant::now();
        while !LlamaServer::new(url.as_str(), None)
            .healthy(&http, Duration::from_secs(2))
            .await
        {
            if t0.elapsed() > Duration::from_secs(prep.ready_timeout_s) {
                bail!("the hand-launched engine at {url} did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        hand.push((child, url));
    }
    // Warm-up everything once.
    via_decode(&http, &base, &a, 16).await?;
    via_decode(&http, &base, &b, 16).await?;
    direct_decode(&http, &hand[0].1, 16).await?;
    direct_decode(&http, &hand[1].1, 16).await?;
    let (mut pair_via, mut pair_hand, mut single, mut r_hand, mut r_single) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (x, y) = tokio::join!(
            via_decode(&http, &base, &a, max_tokens),
            via_decode(&http, &base, &b, max_tokens)
        );
        let via = x? + y?;
        let (x, y) = tokio::join!(
            direct_decode(&http, &hand[0].1, max_tokens),
            direct_decode(&http, &hand[1].1, max_tokens)
        );
        let by_hand = x? + y?;
        let one = via_decode(&http, &base, &a, max_tokens).await?;
        pair_via.push(via);
        pair_hand.push(by_hand);
        single.push(one);
        r_hand.push(via / by_hand);
        r_single.push(via / one);
    }
    drop(hand);
    ps.stop(Duration::from_secs(5)).await;
    Ok(json!({
        "two_pools_aggregate_decode_tok_s_median": median(&mut pair_via),
        "two_hand_engines_aggregate_decode_tok_s_median": median(&mut pair_hand),
        "one_pool_decode_tok_s_median": median(&mut single),
        "ratio_two_pools_over_two_hand_engines_median": median(&mut r_hand.clone()),
        "ratio_two_pools_over_two_hand_engines_spread": spread(&r_hand),
        "ratio_two_pools_over_one_pool_median": median(&mut r_single.clone()),
        "ratio_two_pools_over_one_pool_spread": spread(&r_single),
    }))
}
