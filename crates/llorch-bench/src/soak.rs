//! `cargo xtask bench soak`: many OpenAI streaming clients against a
//! batched pool.
//!
//! It sends many concurrent streaming clients (short and long requests,
//! 10 % disconnecting mid-stream) at a batched pool and checks that every
//! admitted stream ended with exactly one terminal frame, every refusal was a
//! 429, and nothing (tasks, file descriptors) is left afterwards.

use crate::load::{load_stack, start};
use crate::Ctx;
use anyhow::{Context, Result};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use llorch_profile::{ConcurrencyKeys, Count, Mode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// How one soak client's stream ended.
#[derive(Debug, PartialEq)]
enum Ending {
    /// Exactly one finish frame, then `[DONE]`.
    Done,
    /// 429 with a Retry-After.
    Refused,
    /// It hung up after the first chunks (on purpose).
    Disconnected,
    Bad(String),
}

async fn soak_client(http: &reqwest::Client, url: &str, body: Value, disconnect: bool) -> Ending {
    let r = match http.post(url).json(&body).send().await {
        Ok(r) => r,
        Err(e) => return Ending::Bad(llorch_io::http::error_chain(&e)),
    };
    match r.status().as_u16() {
        200 => {}
        429 if r.headers().contains_key("retry-after") => return Ending::Refused,
        s => return Ending::Bad(format!("status {s}")),
    }
    let mut events = r.bytes_stream().eventsource();
    let (mut finishes, mut chunks, mut done) = (0, 0, false);
    while let Some(ev) = events.next().await {
        let Ok(ev) = ev else {
            return Ending::Bad("stream broke".into());
        };
        if done {
            return Ending::Bad("a frame after [DONE]".into());
        }
        if ev.data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(&ev.data).unwrap_or_default();
        if v.get("error").is_some() {
            finishes += 1;
        }
        if v["choices"][0]["finish_reason"].is_string() {
            finishes += 1;
        }
        chunks += 1;
        if disconnect && chunks == 2 {
            return Ending::Disconnected;
        }
    }
    match (finishes, done) {
        (1, true) => Ending::Done,
        _ => Ending::Bad(format!("{finishes} terminal frames, [DONE] {done}")),
    }
}

fn open_fds() -> usize {
    fs_err::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

pub fn bench_soak(
    ctx: &Ctx,
    profile: Option<&str>,
    clients: usize,
    slots: u32,
    queue_capacity: usize,
) -> Result<Value> {
    // Every client holds a socket on each side of the loopback.
    // SAFETY: plain getrlimit/setrlimit on this process.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
    let keys = ConcurrencyKeys {
        mode: Some(Mode::Batched),
        slots: Some(Count::Fixed(slots)),
        replicas: Some(Count::Fixed(1)),
        affinity: None,
    };
    let (stack, _) = load_stack(ctx, profile, keys, &[], None, &[], "soak")?;
    let rt = crate::runtime()?;
    rt.block_on(async {
        let ps = start(ctx, &stack, queue_capacity, "cargo xtask bench soak").await?;
        let url = format!("{}/v1/completions", ps.orchestrator_url());
        let pool = stack.pools[0].id.to_string();
        let http = llorch_io::http::async_client();
        let (fds_before, rss_before) = (open_fds(), crate::rss_kib());
        let tasks_before = tokio::runtime::Handle::current().metrics().num_alive_tasks();
        let t0 = Instant::now();
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_before));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    peak.fetch_max(crate::rss_kib(), std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let endings = futures_util::future::join_all((0..clients).map(|i| {
            let long = i % 2 == 1;
            let body = json!({"model": pool, "stream": true, "prompt": format!("Soak client {i}: tell a story."),
                "max_tokens": if long { 48 } else { 4 }, "ignore_eos": true, "seed": i});
            let (http, url) = (&http, &url);
            async move { soak_client(http, url, body, i % 10 == 0).await }
        }))
        .await;
        let wall = t0.elapsed().as_secs_f64();
        sampler.abort();
        // Everything drains: no task queued or running in the orchestrator.
        let st = ps.server.state.clone();
        let drained = Instant::now();
        while st.pools.iter().any(|p| !p.is_idle()) {
            anyhow::ensure!(drained.elapsed() < Duration::from_secs(120), "tasks still queued or running 120 s after the last client");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(http);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (fds_after, rss_after) = (open_fds(), crate::rss_kib());
        let tasks_after = tokio::runtime::Handle::current().metrics().num_alive_tasks();
        let count = |e: &Ending| endings.iter().filter(|x| *x == e).count();
        let bad: Vec<String> = endings
            .iter()
            .filter_map(|e| match e {
                Ending::Bad(m) => Some(m.clone()),
                _ => None,
            })
            .take(5)
            .collect();
        let live_tasks = st.tasks.lock().unwrap().len();
        ps.stop(Duration::from_secs(5)).await;
        let out = json!({
            "clients": clients,
            "slots": slots,
            "queue_capacity": queue_capacity,
            "wall_s": wall,
            "completed_with_one_terminal": count(&Ending::Done),
            "refused_429": count(&Ending::Refused),
            "disconnected_mid_stream": count(&Ending::Disconnected),
            "bad": endings.len() - count(&Ending::Done) - count(&Ending::Refused) - count(&Ending::Disconnected),
            "bad_examples": bad,
            "open_fds_before_after": [fds_before, fds_after],
            "runtime_tasks_before_after": [tasks_before, tasks_after],
            "tasks_retained_after": live_tasks,
            "rss_kib_before_peak_after": [rss_before, peak.load(std::sync::atomic::Ordering::Relaxed), rss_after],
        });
        anyhow::ensure!(out["bad"] == 0, "soak: some streams did not end right: {out}");
        anyhow::ensure!(fds_after <= fds_before + 2, "soak: file descriptors left: {fds_before} before, {fds_after} after");
        Ok(out)
    })
    .context("bench soak")
}
