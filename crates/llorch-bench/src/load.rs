//! `cargo xtask bench load`: many OpenAI streaming clients at once (`bench
//! soak`, the long run, is [`crate::soak`]).
//!
//! `load` starts one pool of the profile (exact with `--replicas K`, or
//! `--mode batched --slots N`) and, for each client count, alternates in
//! every run: the clients through the orchestrator, and the same clients
//! straight against the same engine processes (llama-server's own
//! `/v1/completions`, clients spread round robin over the replicas, the same
//! flags, prompts, seeds and `cache_prompt` setting). It reports aggregate
//! tokens/s, time to first token p50/p99, inter-token p99, fairness (the
//! slowest client's tokens/s over the median client's), errors, and the
//! ratio orchestrator / direct with its spread.

use crate::{median, pct, spread, Ctx};
use anyhow::{Context, Result};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use llorch_profile::stack::{LoadPolicy, Stack, StackPool};
use llorch_profile::{Concurrency, ConcurrencyKeys, Mode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// What one streamed request saw.
#[derive(Default)]
struct Req {
    ttft_ms: f64,
    gaps_ms: Vec<f64>,
    tokens: u64,
    /// Seconds from the request to its last token.
    elapsed_s: f64,
    error: Option<String>,
}

/// One streamed OpenAI completion; content chunks are tokens (one per frame).
async fn stream_one(http: &reqwest::Client, url: &str, body: &Value) -> Req {
    let t0 = Instant::now();
    let mut out = Req::default();
    let r = match http.post(url).json(body).send().await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            out.error = Some(format!("status {}", r.status()));
            return out;
        }
        Err(e) => {
            out.error = Some(llorch_io::http::error_chain(&e));
            return out;
        }
    };
    let mut events = r.bytes_stream().eventsource();
    let mut last: Option<Instant> = None;
    while let Some(ev) = events.next().await {
        let Ok(ev) = ev else {
            out.error = Some("stream broke".into());
            return out;
        };
        if ev.data == "[DONE]" {
            break;
        }
        let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
            continue;
        };
        if v.get("error").is_some() {
            out.error = Some(v["error"].to_string());
            return out;
        }
        if v["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            let now = Instant::now();
            match last {
                None => out.ttft_ms = (now - t0).as_secs_f64() * 1000.0,
                Some(l) => out.gaps_ms.push((now - l).as_secs_f64() * 1000.0),
            }
            last = Some(now);
            out.tokens += 1;
            out.elapsed_s = (now - t0).as_secs_f64();
        }
    }
    out
}

/// Aggregate figures of one wave of `clients` concurrent requests.
pub(crate) struct Wave {
    pub tok_per_s: f64,
    pub ttft: Vec<f64>,
    pub gaps: Vec<f64>,
    /// The slowest client's tokens/s over the median client's (1: all served alike).
    pub fairness: f64,
    pub errors: usize,
}

/// The slowest client's tokens/s over the median client's, of the clients
/// that ended without error (NaN with none).
fn fairness(reqs: &[Req]) -> f64 {
    let mut rates: Vec<f64> = reqs
        .iter()
        .filter(|r| r.error.is_none() && r.elapsed_s > 0.0)
        .map(|r| r.tokens as f64 / r.elapsed_s)
        .collect();
    if rates.is_empty() {
        return f64::NAN;
    }
    let slowest = rates.iter().copied().fold(f64::INFINITY, f64::min);
    slowest / median(&mut rates)
}

/// `clients` streams to `/v1/completions` of the targets in turn (each a
/// base URL: the orchestrator's, or an engine's, `unix:` ones too) with its body.
pub(crate) async fn wave(
    http: &reqwest::Client,
    targets: &[(String, Value)],
    clients: usize,
    max_tokens: u32,
) -> Wave {
    let t0 = Instant::now();
    let reqs = futures_util::future::join_all((0..clients).map(|i| {
        let (url, base) = &targets[i % targets.len()];
        let mut body = base.clone();
        body["prompt"] = json!(format!(
            "Client {i} asks: write a long story about a lighthouse keeper."
        ));
        body["seed"] = json!(1000 + i);
        body["max_tokens"] = json!(max_tokens);
        let client = llorch_io::llama_server::client_for(url, http);
        let url = llorch_io::llama_server::http_url(url, "/v1/completions");
        async move { stream_one(&client, &url, &body).await }
    }))
    .await;
    let wall = t0.elapsed().as_secs_f64();
    let tokens: u64 = reqs.iter().map(|r| r.tokens).sum();
    Wave {
        tok_per_s: tokens as f64 / wall,
        ttft: reqs
            .iter()
            .filter(|r| r.error.is_none())
            .map(|r| r.ttft_ms)
            .collect(),
        gaps: reqs.iter().flat_map(|r| r.gaps_ms.clone()).collect(),
        fairness: fairness(&reqs),
        errors: reqs.iter().filter(|r| r.error.is_some()).count(),
    }
}

/// What one side gave over the runs of one client count.
#[derive(Default)]
struct Side {
    tok_per_s: Vec<f64>,
    /// The orchestrator's tokens/s over this side's, run by run.
    ratio: Vec<f64>,
    ttft: Vec<f64>,
    gaps: Vec<f64>,
    fairness: Vec<f64>,
    errors: usize,
}

impl Side {
    fn add(&mut self, w: Wave) {
        self.tok_per_s.push(w.tok_per_s);
        self.ttft.extend(w.ttft);
        self.gaps.extend(w.gaps);
        self.fairness.push(w.fairness);
        self.errors += w.errors;
    }

    fn tok_per_s_median(&self) -> f64 {
        median(&mut self.tok_per_s.clone())
    }

    fn fairness_median(&self) -> f64 {
        median(&mut self.fairness.clone())
    }
}

/// Where the clients go: through the orchestrator, straight to the same
/// engines, and (with `--vs-defaults`, else empty) to llama-server started
/// with its defaults.
struct Paths<'a> {
    via: &'a [(String, Value)],
    direct: &'a [(String, Value)],
    plain: &'a [(String, Value)],
}

/// One client count: warm every path at this width, then `a.runs` runs
/// alternating which side goes first; the row and the peak RSS seen.
async fn measure_width(
    http: &reqwest::Client,
    p: &Paths<'_>,
    n: usize,
    a: &LoadArgs<'_>,
) -> (Value, u64) {
    // The engines' first batches of a new size are slower (CUDA graphs,
    // kernels), and the side that met them first lost (measured on an H100:
    // one run 0.33, the next 0.89, with only a 2-client warm-up).
    wave(http, p.via, n, 16).await;
    wave(http, p.direct, n, 16).await;
    if !p.plain.is_empty() {
        wave(http, p.plain, n, 16).await;
    }
    let (mut v, mut d, mut dflt) = (Side::default(), Side::default(), Side::default());
    let mut peak = 0;
    for run in 0..a.runs {
        // llama-server's defaults first in odd runs, last in even ones.
        let mut plain_w = None;
        if run % 2 == 1 && !p.plain.is_empty() {
            plain_w = Some(wave(http, p.plain, n, a.max_tokens).await);
        }
        let (vw, dw) = if run % 2 == 0 {
            let vw = wave(http, p.via, n, a.max_tokens).await;
            (vw, wave(http, p.direct, n, a.max_tokens).await)
        } else {
            let dw = wave(http, p.direct, n, a.max_tokens).await;
            (wave(http, p.via, n, a.max_tokens).await, dw)
        };
        if run % 2 == 0 && !p.plain.is_empty() {
            plain_w = Some(wave(http, p.plain, n, a.max_tokens).await);
        }
        peak = peak.max(crate::rss_kib());
        if let Some(pw) = plain_w {
            dflt.ratio.push(vw.tok_per_s / pw.tok_per_s);
            dflt.add(pw);
        }
        d.ratio.push(vw.tok_per_s / dw.tok_per_s);
        v.add(vw);
        d.add(dw);
    }
    (row(n, &v, &d, (!p.plain.is_empty()).then_some(&dflt)), peak)
}

/// One client count's JSON row, printed as it is made.
fn row(n: usize, v: &Side, d: &Side, dflt: Option<&Side>) -> Value {
    let mut row = json!({
        "clients": n,
        "ratio_orchestrator_over_direct_median": median(&mut d.ratio.clone()),
        "ratio_spread": spread(&d.ratio),
        "tok_per_s_orchestrator_median": v.tok_per_s_median(),
        "tok_per_s_direct_median": d.tok_per_s_median(),
        "ttft_ms_p50_orchestrator": pct(&v.ttft, 0.5),
        "ttft_ms_p50_direct": pct(&d.ttft, 0.5),
        "ttft_overhead_ms_p50": pct(&v.ttft, 0.5) - pct(&d.ttft, 0.5),
        "ttft_ms_p99_orchestrator": pct(&v.ttft, 0.99),
        "ttft_ms_p99_direct": pct(&d.ttft, 0.99),
        "inter_token_ms_p99_orchestrator": pct(&v.gaps, 0.99),
        "inter_token_ms_p99_direct": pct(&d.gaps, 0.99),
        "fairness_orchestrator_median": v.fairness_median(),
        "fairness_direct_median": d.fairness_median(),
        "errors_orchestrator": v.errors,
        "errors_direct": d.errors,
    });
    if let Some(x) = dflt {
        row["tok_per_s_defaults_median"] = json!(x.tok_per_s_median());
        row["ratio_orchestrator_over_defaults_median"] = json!(median(&mut x.ratio.clone()));
        row["ratio_over_defaults_spread"] = json!(spread(&x.ratio));
        row["ttft_ms_p99_defaults"] = json!(pct(&x.ttft, 0.99));
        row["fairness_defaults_median"] = json!(x.fairness_median());
        row["errors_defaults"] = json!(x.errors);
        llorch_io::info!(
            "{n:>4} clients: llama-server with its defaults {:.0} tok/s, orchestrator / defaults {:.2} ({}), TTFT p99 {:.1} ms, fairness {:.2}, errors {}",
            x.tok_per_s_median(),
            median(&mut x.ratio.clone()),
            spread(&x.ratio),
            pct(&x.ttft, 0.99),
            x.fairness_median(),
            x.errors
        );
    }
    llorch_io::info!(
        "{n:>4} clients: {:.0} vs {:.0} tok/s (orchestrator / direct {:.3}, {}), TTFT p50 {:.1} vs {:.1} ms, p99 {:.1} vs {:.1} ms, fairness {:.2} vs {:.2}, errors {}/{}",
        v.tok_per_s_median(),
        d.tok_per_s_median(),
        median(&mut d.ratio.clone()),
        spread(&d.ratio),
        pct(&v.ttft, 0.5),
        pct(&d.ttft, 0.5),
        pct(&v.ttft, 0.99),
        pct(&d.ttft, 0.99),
        v.fairness_median(),
        d.fairness_median(),
        v.errors,
        d.errors,
    );
    row
}

/// The profile's one pool, its concurrency replaced by the flags.
pub(crate) fn load_stack(
    ctx: &Ctx,
    profile: Option<&str>,
    keys: ConcurrencyKeys,
    devices: &[u32],
    threads: Option<u32>,
    extra_args: &[&str],
    tag: &str,
) -> Result<(Stack, Concurrency)> {
    let mut p = ctx.profile(profile)?;
    if let Some(t) = threads {
        p.file.server.threads = t;
    }
    p.file
        .server
        .extra_args
        .extend(extra_args.iter().map(|a| a.to_string()));
    let c = keys
        .over(p.file.server.concurrency_keys())
        .resolve()
        .map_err(|(k, m)| anyhow::anyhow!("--{k}: {m}"))?;
    p.file.server.set_concurrency(c);
    let id = llorch_types::PoolId::parse(&format!(
        "{}-{tag}",
        p.pool().as_str().chars().take(50).collect::<String>()
    ))?;
    let cuda = p.file.engine.backend == llorch_profile::Backend::Cuda;
    let (replica_devices, warning) =
        llorch_profile::stack::place_replicas(&id, &c, cuda, devices, None)
            .map_err(|(_, m)| anyhow::anyhow!(m))?;
    if let Some(w) = warning {
        llorch_io::warn!("warning: {w}");
    }
    let stack = Stack {
        max_loaded: None,
        pools: vec![StackPool {
            id,
            profile: p,
            load: LoadPolicy::Eager,
            idle_unload_s: None,
            keep_loaded: false,
            devices: devices.to_vec(),
            memory_mib: None,
            concurrency: c,
            replica_devices,
        }],
        warnings: Vec::new(),
    };
    Ok((stack, c))
}

/// The stack's pool behind an orchestrator on a free loopback port.
pub(crate) async fn start(
    ctx: &Ctx,
    stack: &Stack,
    queue_capacity: usize,
    command: &str,
) -> Result<llorch_stack::Stack> {
    let cfg = orchestratord::Config {
        addr: "127.0.0.1:0".parse().unwrap(),
        queue_capacity,
        ..Default::default()
    };
    let opts = llorch_stack::PoolsOptions {
        report: llorch_io::report::Reporter::QUIET,
        ..Default::default()
    };
    Ok(llorch_stack::start_pools(stack, &ctx.layout, cfg, &opts, command).await?)
}

pub struct LoadArgs<'a> {
    pub profile: Option<&'a str>,
    pub clients: &'a [usize],
    pub keys: ConcurrencyKeys,
    pub devices: &'a [u32],
    pub runs: usize,
    pub max_tokens: u32,
    /// Replaces the profile's server.threads (replicas sharing a CPU: cores / replicas).
    pub threads: Option<u32>,
    /// Also measure, in every run, the same llama-server binary and model
    /// started with its own defaults (`-m MODEL --host --port`, nothing else).
    pub vs_defaults: bool,
}

/// The pool's llama-server and model started with nothing but `-m`,
/// `--host` and `--port`: what a user gets who runs it by hand with its
/// defaults (at this pin: 4 slots, unified KV, all layers on the GPU that
/// fit, flash attention auto). Killed when dropped.
fn start_defaults(
    ctx: &Ctx,
    stack: &Stack,
) -> Result<(llorch_io::cmd::KillOnDrop, String, std::path::PathBuf)> {
    let pool = &stack.pools[0];
    let prep = llorch_stack::prepare(
        &pool.profile,
        &pool.id,
        &ctx.layout,
        &engine_provisioner::build::BuildOptions::quiet(),
    )?
    .engine;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = ctx
        .layout
        .run_dir()
        .join(format!("bench-defaults-{port}.log"));
    let mut child = llorch_io::cmd::KillOnDrop(
        llorch_io::cmd::Cmd::new(&prep.binary)
            .arg("-m")
            .arg(&prep.model.path)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .spawn(
                llorch_io::cmd::Io::Null,
                llorch_io::cmd::Io::File(fs_err::File::create(&log)?.into_parts().0),
            )
            .with_context(|| format!("starting {}", prep.binary.display()))?,
    );
    let url = format!("http://127.0.0.1:{port}");
    // Ready as the lifecycle waits for an engine: `/health` 200, an early
    // exit or the profile's ready timeout named with the log's tail.
    engine_runtime::lifecycle::wait_ready(
        &mut child,
        &url,
        Duration::from_secs(pool.profile.file.server.ready_timeout_s),
        &log,
    )
    .context("llama-server with its defaults")?;
    llorch_io::info!(
        "llama-server with its defaults: {url} (log {})",
        log.display()
    );
    Ok((child, url, log))
}

pub fn bench_load(ctx: &Ctx, a: &LoadArgs) -> Result<Value> {
    let (stack, c) = load_stack(ctx, a.profile, a.keys, a.devices, a.threads, &[], "load")?;
    let defaults = match a.vs_defaults {
        true => Some(start_defaults(ctx, &stack)?),
        false => None,
    };
    let rt = crate::runtime()?;
    rt.block_on(async {
        let ps = start(ctx, &stack, 4096, "cargo xtask bench load").await?;
        // What `auto` chose, and why (the stack starts quiet).
        let engines = &ps.server.state.pools;
        if let Some(why) = engines.first().and_then(|p| p.auto.clone()) {
            llorch_io::info!(
                "auto: {} engine(s) x {} slot(s): {why}",
                engines.len(),
                engines[0].slots
            );
        }
        let orch = ps.orchestrator_url();
        let pool = stack.pools[0].id.to_string();
        let engines: Vec<String> = ps
            .server
            .state
            .members(&stack.pools[0].id)
            .iter()
            .map(|m| match m.link_state() {
                orchestratord::LinkState::Ready(e) => Ok(e.url),
                s => Err(anyhow::anyhow!("replica {} is {s:?}", m.replica)),
            })
            .collect::<Result<_>>()?;
        let body = json!({"model": pool, "stream": true, "temperature": 0, "ignore_eos": true});
        // llama-server straight: the same prompt-cache setting the orchestrator sends.
        let mut direct_body = body.clone();
        direct_body["cache_prompt"] = json!(c.mode == Mode::Batched);
        let via = vec![(orch.clone(), body.clone())];
        let direct: Vec<(String, Value)> = engines
            .iter()
            .map(|e| (e.clone(), direct_body.clone()))
            .collect();
        // llama-server's defaults: its own settings, the body a plain client sends.
        let plain: Vec<(String, Value)> = defaults
            .iter()
            .map(|(_, url, _)| (url.clone(), body.clone()))
            .collect();
        let http = llorch_io::http::async_client();
        let rss_before = crate::rss_kib();
        // Warm-up on every path.
        wave(&http, &via, 2, 8).await;
        wave(&http, &direct, 2, 8).await;
        if !plain.is_empty() {
            wave(&http, &plain, 2, 8).await;
        }
        let mut rows = Vec::new();
        let mut peak_rss = rss_before;
        let paths = Paths {
            via: &via,
            direct: &direct,
            plain: &plain,
        };
        for &n in a.clients {
            let (row, peak) = measure_width(&http, &paths, n, a).await;
            peak_rss = peak_rss.max(peak);
            rows.push(row);
        }
        ps.stop(Duration::from_secs(5)).await;
        if let Some((child, _, log)) = defaults {
            drop(child);
            let _ = fs_err::remove_file(log);
        }
        anyhow::Ok(json!({
            "vs_defaults": a.vs_defaults,
            "mode": c.mode.as_str(),
            "slots": c.slots,
            "replicas": c.replicas,
            "runs": a.runs,
            "max_tokens": a.max_tokens,
            "threads": stack.pools[0].profile.file.server.threads,
            "rows": rows,
            "process_rss_kib_before": rss_before,
            "process_rss_kib_peak": peak_rss,
        }))
    })
}
