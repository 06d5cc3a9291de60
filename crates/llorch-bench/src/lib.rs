//! The measurements behind `cargo xtask bench`: side by side on this
//! machine, several alternating runs, median and spread, returned as JSON
//! for the CLI to print. Nothing here asserts a time: the figures go into
//! notes and docs/bench.md. (Out of the CLI crate: `xtask` parses the
//! arguments and prints; this crate measures.)
//!
//! * [`single`]: `bench model` (hashing, download), `provision`, `stream`.
//! * [`build`]: `bench build` (cold vs hand-run CMake, cache hits, `--incremental`).
//! * [`openai`]: `bench openai` (the OpenAI API vs llama-server's own).
//! * [`load`]: `bench load` and `bench soak` (many clients at once).
//! * [`pools`]: `bench pools` (lazy load, swap, two pools at once).
//! * [`fleet`]: `bench fleet` (a registry pull vs a cold build).
//! * [`sandbox`]: `bench sandbox` (an engine sandboxed vs unconfined).

pub mod build;
pub mod fleet;
pub mod load;
pub mod openai;
pub mod pools;
pub mod sandbox;
pub mod single;
pub mod soak;
pub mod tune;

use anyhow::{bail, Context, Result};
use llorch_io::cmd::Cmd;
use llorch_io::llama_server::{all_idle, Api, LlamaServer};
use serde_json::json;
use std::time::{Duration, Instant};

/// Where a bench runs: the workspace and cache it measures in.
pub struct Ctx {
    pub layout: llorch_io::paths::Layout,
}

impl Ctx {
    pub fn new(layout: llorch_io::paths::Layout) -> Ctx {
        Ctx { layout }
    }

    /// The profile `name` (the workspace default when `None`).
    pub fn profile(&self, name: Option<&str>) -> Result<llorch_profile::Profile> {
        Ok(llorch_profile::Profile::resolve(&self.layout.root, name)?)
    }
}

/// A bench's own pool (`<pool>-bench`): never the engine a user
/// provisioned for this profile.
pub fn bench_pool(p: &llorch_profile::Profile) -> Result<llorch_types::PoolId> {
    let stem: String = p.pool().as_str().chars().take(58).collect();
    Ok(llorch_types::PoolId::parse(&format!("{stem}-bench"))?)
}

/// The runtime a bench drives its servers and clients on.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// `lo..hi` of a sample.
pub fn spread(v: &[f64]) -> String {
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
    format!("{lo:.3}..{hi:.3}")
}

/// What one event of a streamed answer is, to [`time_pieces`].
pub enum Piece {
    /// One piece of generated text.
    Text,
    /// Anything else (an empty delta, the final stats).
    Other,
    /// The end of the stream.
    Done,
}

/// Time a streamed (SSE) answer whose request was sent at `sent`: (ms to
/// the first text piece, pieces/s after it, pieces). `piece` classifies
/// each event's data.
pub async fn time_pieces(
    sent: Instant,
    url: &str,
    r: reqwest::Response,
    mut piece: impl FnMut(&str) -> Result<Piece>,
) -> Result<(f64, f64, u64)> {
    use eventsource_stream::Eventsource;
    use futures_util::StreamExt;
    if !r.status().is_success() {
        let s = r.status();
        bail!("{url} answered {s}: {}", r.text().await.unwrap_or_default());
    }
    let mut events = r.bytes_stream().eventsource();
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    let mut n = 0u64;
    while let Some(ev) = events.next().await {
        match piece(&ev?.data)? {
            Piece::Done => break,
            Piece::Other => {}
            Piece::Text => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
                n += 1;
            }
        }
    }
    let (f, l) = (first.context("no text in the stream")?, last.unwrap());
    Ok((
        (f - sent).as_secs_f64() * 1000.0,
        (n as f64 - 1.0) / (l - f).as_secs_f64(),
        n,
    ))
}

/// One streaming `/completion` straight from llama-server (no prompt-cache
/// reuse, `ignore_eos`): (ms to the first token, decode tokens/s after it).
pub async fn direct_completion(
    http: &reqwest::Client,
    engine: &str,
    prompt: &str,
    max_tokens: u32,
) -> Result<(f64, f64)> {
    let t = Instant::now();
    let r = LlamaServer::new(engine, None)
        .post(http, Api::Completion)
        .json(&json!({"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0, "seed": 42, "stream": true, "cache_prompt": false, "ignore_eos": true}))
        .send()
        .await?;
    // Every event is a token but the last, which carries `"stop": true`.
    let (ttft, rate, _) = time_pieces(t, engine, r, |data| {
        Ok(if data.contains("\"stop\":true") {
            Piece::Other
        } else {
            Piece::Text
        })
    })
    .await?;
    Ok((ttft, rate))
}

/// The median (the mean of the two middle values of an even sample); NaN
/// when empty. Sorts `v` (NaN last, never a panic).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The nearest-rank percentile `p` (0..=1) of a sample; NaN when empty.
pub fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p.clamp(0.0, 1.0)).round() as usize]
}

pub fn time_cmd(cmd: &Cmd) -> Result<f64> {
    let t = Instant::now();
    let out = cmd
        .spawn(llorch_io::cmd::Io::Null, llorch_io::cmd::Io::Null)?
        .wait()?;
    if !out.success() {
        bail!("`{cmd}` failed ({out})");
    }
    Ok(t.elapsed().as_secs_f64())
}

/// This process's resident memory (VmRSS), in KiB.
pub fn rss_kib() -> u64 {
    fs_err::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Poll llama-server's `/slots` (every millisecond) until no slot is processing.
pub async fn slots_idle(http: &reqwest::Client, engine: &str) -> Result<()> {
    let server = LlamaServer::new(engine, None);
    loop {
        let slots = server.slots(http, Duration::from_secs(5)).await?;
        if all_idle(&slots) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_percentile_and_spread_of_a_sample() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
        assert_eq!(median(&mut [1.0, f64::NAN, 0.0]), 1.0);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(&v, 0.5), 51.0);
        assert_eq!(pct(&v, 0.99), 99.0);
        assert_eq!(pct(&v, 1.0), 100.0);
        assert_eq!(pct(&v, 7.0), 100.0);
        assert!(pct(&[], 0.5).is_nan());
        assert_eq!(spread(&[2.0, 0.5, 1.25]), "0.500..2.000");
    }
}
