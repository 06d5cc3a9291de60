//! The haiku proof, shared by `cargo xtask haiku` and this crate's test.
//!
//! From a profile: build (or reuse) the engine, fetch the model, run the
//! engine under a supervisor and the orchestrator in front of it, then
//! stream a haiku and check that it is real:
//! 1. events arrive as `started → token+ → end`, indices contiguous from 0;
//! 2. the concatenated tokens equal the text llama-server returns for the
//!    same prompt asked directly (non-streaming);
//! 3. the engine's `llamacpp:tokens_predicted_total` grew by `tokens_out`;
//! 4. the same prompt again gives identical text (deterministic profile);
//! 5. another nonce gives different text;
//! 6. a long generation canceled after its first token ends with
//!    `canceled: true` and `/slots` shows the slot idle.
//!
//! Whether the minute word appears is reported, and asserted only where the
//! profile says the model can follow it (`haiku.require_minute_word`).

pub mod client;

use anyhow::{bail, Context, Result};
use client::{stream_task, StreamResult};
use engine_provisioner::build::BuildOptions;
use engine_provisioner::supervisor::{EngineState, RestartPolicy, Supervisor};
use engine_provisioner::Profile;
use llorch_io::paths::Layout;
use orchestratord::{Config, EngineInfo};
use serde::Serialize;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[derive(Debug, Serialize, Clone)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct HaikuReport {
    pub passed: bool,
    pub profile: String,
    pub text: String,
    pub prompt: String,
    pub minute_word: String,
    pub minute_word_present: bool,
    pub minute_word_required: bool,
    pub nonce: String,
    pub tokens_out: u64,
    pub decode_ms: f64,
    pub time_to_first_token_ms: f64,
    pub engine_url: String,
    pub orchestrator_url: String,
    pub engine_version: String,
    pub fingerprint: String,
    pub model_ref: String,
    pub model_digest: String,
    pub checks: Vec<Check>,
    pub finished_at: String,
}

const ONES: [&str; 20] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
];
const TENS: [&str; 6] = ["", "", "twenty", "thirty", "forty", "fifty"];

/// 0..=59 in words ("forty-two").
pub fn minute_in_words(m: u32) -> String {
    if m < 20 {
        ONES[m as usize].to_string()
    } else if m.is_multiple_of(10) {
        TENS[(m / 10) as usize].to_string()
    } else {
        format!("{}-{}", TENS[(m / 10) as usize], ONES[(m % 10) as usize])
    }
}

pub fn haiku_messages(minute_word: &str, nonce: &str) -> Value {
    json!([{"role": "user", "content": format!(
        "Write a haiku (three short lines) about the minute {minute_word}. Inspiration code: {nonce}."
    )}])
}

/// A nonce that changes on every run.
pub fn new_nonce() -> String {
    let seed = format!(
        "{:?}-{}-{}",
        Instant::now(),
        std::process::id(),
        llorch_io::now_rfc3339()
    );
    llorch_io::digest::sha256_bytes(seed.as_bytes())[..8].to_string()
}

fn current_minute() -> u32 {
    ((llorch_io::unix_now() / 60) % 60) as u32
}

/// Everything the proof runs against: a supervised engine and an orchestrator.
pub struct Stack {
    pub supervisor: Supervisor,
    pub server: orchestratord::Server,
    pub engine_url: String,
    pub fingerprint: String,
    pub engine_version: String,
    pub model_ref: String,
    pub model_digest: String,
}

impl Stack {
    pub fn orchestrator_url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    pub async fn stop(self) {
        self.server.shutdown(Duration::from_secs(5)).await;
        tokio::task::spawn_blocking(move || self.supervisor.stop())
            .await
            .ok();
    }
}

/// Build, fetch, supervise the engine, start the orchestrator on `addr`.
pub async fn start_stack(
    profile: &Profile,
    layout: &Layout,
    cfg: Config,
    quiet: bool,
) -> Result<Stack> {
    let (profile2, layout2) = (profile.clone(), layout.clone());
    let (prep, _built) = tokio::task::spawn_blocking(move || {
        engine_provisioner::provision::prepare(
            &profile2,
            &layout2,
            &BuildOptions {
                quiet,
                ..Default::default()
            },
        )
    })
    .await??;
    let info_base = engine_info(&prep);
    let (fingerprint, model_ref, model_digest, engine_version) = (
        prep.fingerprint.clone(),
        prep.model.reference.clone(),
        prep.model.digest.clone(),
        prep.engine_version.clone(),
    );
    let timeout = Duration::from_secs(prep.ready_timeout_s + 10);
    let layout3 = layout.clone();
    let sup = tokio::task::spawn_blocking(move || {
        engine_provisioner::lifecycle::stop_pool(&layout3, &prep.pool_id);
        Supervisor::start(prep, layout3, RestartPolicy::default())
    })
    .await?;
    let engine_url =
        tokio::task::block_in_place(|| sup.wait_ready(timeout)).map_err(anyhow::Error::msg)?;
    let link = SupervisorLink {
        base: info_base,
        state: sup.state_handle(),
    };
    let server = orchestratord::start(cfg, Box::new(link)).await?;
    // Wait until the orchestrator has seen the engine healthy.
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client
            .get(format!("http://{}/readyz", server.addr))
            .send()
            .await;
        if r.map(|r| r.status().is_success()).unwrap_or(false) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the orchestrator did not see the engine ready");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Stack {
        supervisor: sup,
        server,
        engine_url,
        fingerprint,
        engine_version,
        model_ref,
        model_digest,
    })
}

/// What the orchestrator reports about a prepared engine (its URL is filled in once it runs).
pub fn engine_info(prep: &engine_provisioner::lifecycle::PreparedEngine) -> EngineInfo {
    EngineInfo {
        url: String::new(),
        engine: "llamacpp".into(),
        engine_version: prep.engine_version.clone(),
        model_ref: prep.model.reference.clone(),
        model_digest: prep.model.digest.clone(),
        ctx_max: prep.model.metadata["ctx_max"].as_u64(),
        slots: 1,
    }
}

/// Points the orchestrator at wherever the supervisor's engine is now.
pub struct SupervisorLink {
    pub base: EngineInfo,
    pub state: engine_provisioner::supervisor::StateHandle,
}

impl orchestratord::EngineLink for SupervisorLink {
    fn current(&self) -> Option<EngineInfo> {
        match self.state.get() {
            EngineState::Ready { url, .. } => Some(EngineInfo {
                url,
                ..self.base.clone()
            }),
            _ => None,
        }
    }
}

async fn engine_tokens_predicted(http: &reqwest::Client, engine: &str) -> Result<u64> {
    let text = http
        .get(format!("{engine}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix("llamacpp:tokens_predicted_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .context("llama-server /metrics has no llamacpp:tokens_predicted_total")
}

/// The text llama-server gives for the same chat, asked directly (no streaming, no orchestrator).
async fn direct_text(
    http: &reqwest::Client,
    engine: &str,
    messages: &Value,
    max_tokens: u32,
    seed: u64,
) -> Result<String> {
    let p: Value = http
        .post(format!("{engine}/apply-template"))
        .json(&json!({"messages": messages}))
        .send()
        .await?
        .json()
        .await?;
    let r: Value = http
        .post(format!("{engine}/completion"))
        .json(&json!({"prompt": p["prompt"], "n_predict": max_tokens, "temperature": 0.0, "seed": seed, "stream": false, "cache_prompt": false}))
        .send()
        .await?
        .json()
        .await?;
    Ok(r["content"].as_str().unwrap_or("").to_string())
}

fn check(checks: &mut Vec<Check>, name: &str, ok: bool, detail: impl Into<String>) {
    checks.push(Check {
        name: name.into(),
        ok,
        detail: detail.into(),
    });
}

/// Run the whole proof. `on_token` sees the first haiku's tokens live.
pub async fn run(
    profile: &Profile,
    layout: &Layout,
    quiet: bool,
    on_token: &(dyn Fn(&str) + Sync),
) -> Result<HaikuReport> {
    let stack = start_stack(
        profile,
        layout,
        Config {
            addr: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        },
        quiet,
    )
    .await?;
    let res = prove(profile, &stack, on_token).await;
    stack.stop().await;
    let report = res?;
    let dir = layout.runtime.join("haiku");
    std::fs::create_dir_all(&dir)?;
    llorch_io::fsx::write_atomic(
        &dir.join("last.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(report)
}

pub async fn prove(
    profile: &Profile,
    stack: &Stack,
    on_token: &(dyn Fn(&str) + Sync),
) -> Result<HaikuReport> {
    let http = reqwest::Client::new();
    let orch = stack.orchestrator_url();
    let engine = &stack.engine_url;
    let max_tokens = profile.file.haiku.max_tokens.unwrap_or(48);
    let seed = profile.file.server.seed;
    let minute_word = minute_in_words(current_minute());
    let nonce = new_nonce();
    let messages = haiku_messages(&minute_word, &nonce);
    let body =
        json!({"messages": messages, "max_tokens": max_tokens, "seed": seed, "temperature": 0.0});
    let mut checks = Vec::new();

    let before = engine_tokens_predicted(&http, engine).await?;
    let first: StreamResult = stream_task(&http, &orch, &body, Some(on_token), None).await?;
    let after = engine_tokens_predicted(&http, engine).await?;
    check(
        &mut checks,
        "event order started → token+ → end",
        first.order_ok(),
        first.order.join(" "),
    );
    check(
        &mut checks,
        "token indices contiguous from 0",
        first.indices_ok(),
        format!("{} tokens", first.tokens.len()),
    );
    let tokens_out = first.end["tokens_out"].as_u64().unwrap_or(0);
    check(
        &mut checks,
        "engine tokens_predicted_total grew by tokens_out",
        after - before == tokens_out && tokens_out > 0,
        format!(
            "{before} → {after} (+{}), tokens_out {tokens_out}",
            after - before
        ),
    );
    check(
        &mut checks,
        "one token event per generated token",
        first.tokens.len() as u64 == tokens_out,
        format!("{} events, tokens_out {tokens_out}", first.tokens.len()),
    );
    let direct = direct_text(&http, engine, &messages, max_tokens, seed).await?;
    check(
        &mut checks,
        "concatenated tokens equal llama-server's own text",
        first.text == direct,
        format!("{:?} vs {:?}", first.text, direct),
    );

    let second = stream_task(&http, &orch, &body, None, None).await?;
    check(
        &mut checks,
        "same prompt again gives identical text",
        second.text == first.text,
        format!("{:?}", second.text),
    );

    let other_nonce = new_nonce();
    let other_body = json!({"messages": haiku_messages(&minute_word, &other_nonce), "max_tokens": max_tokens, "seed": seed, "temperature": 0.0});
    let third = stream_task(&http, &orch, &other_body, None, None).await?;
    check(
        &mut checks,
        "another nonce gives different text",
        third.text != first.text,
        format!("nonce {other_nonce}: {:?}", third.text),
    );

    let long = json!({"prompt": "Count from one to one thousand, one number per line:\n", "max_tokens": 2048, "ignore_eos": true});
    let canceled = stream_task(&http, &orch, &long, None, Some(1)).await?;
    let slots: Value = http
        .get(format!("{engine}/slots"))
        .send()
        .await?
        .json()
        .await?;
    let idle = slots.as_array().is_some_and(|a| {
        a.iter()
            .all(|s| s["is_processing"].as_bool() == Some(false))
    });
    check(
        &mut checks,
        "cancel after the first token ends canceled and frees the slot",
        canceled.end["canceled"].as_bool() == Some(true) && idle && canceled.tokens.len() < 2048,
        format!(
            "end {} after {} tokens; /slots idle: {idle}",
            canceled.end,
            canceled.tokens.len()
        ),
    );

    let present = first.text.to_lowercase().contains(&minute_word);
    let required = profile.file.haiku.require_minute_word;
    if required {
        check(
            &mut checks,
            "the minute word appears",
            present,
            minute_word.clone(),
        );
    }
    let passed = checks.iter().all(|c| c.ok);
    Ok(HaikuReport {
        passed,
        profile: profile.name.clone(),
        text: first.text.clone(),
        prompt: messages[0]["content"].as_str().unwrap_or("").to_string(),
        minute_word,
        minute_word_present: present,
        minute_word_required: required,
        nonce,
        tokens_out,
        decode_ms: first.end["decode_ms"].as_f64().unwrap_or(0.0),
        time_to_first_token_ms: first.ttft_ms,
        engine_url: engine.clone(),
        orchestrator_url: orch,
        engine_version: stack.engine_version.clone(),
        fingerprint: stack.fingerprint.clone(),
        model_ref: stack.model_ref.clone(),
        model_digest: stack.model_digest.clone(),
        checks,
        finished_at: llorch_io::now_rfc3339(),
    })
}
