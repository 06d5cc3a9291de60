//! The haiku proof, a library: `cargo xtask haiku` and `pin bump` call
//! [`cli()`], the e2e tests (`tests/e2e-haiku`) call [`run`], and the
//! standalone `llorch-haiku` binary there (for GPU hosts without a Rust
//! toolchain) calls [`cli()`] too.
//!
//! From a profile: build (or reuse) the engine, fetch the model, run the
//! engine under a supervisor with the orchestrator in front of it (under
//! its own pool id, `<pool>-haiku`, so an engine the user provisioned for the
//! profile is never touched), then stream a haiku and check that it is real:
//!
//! 1. events arrive as `started → token+ → end`, indices contiguous from 0;
//! 2. the engine's `llamacpp:tokens_predicted_total` grew by `end.tokens_out`,
//!    and `tokens_out` equals llama-server's own `tokens_predicted` for the
//!    same request asked directly;
//! 3. the concatenated tokens equal the text llama-server returns for the same
//!    request asked directly (non-streaming, no orchestrator);
//! 4. the same request again gives identical text (deterministic profile);
//! 5. the prompt reaches the model: see [`first_position_logprobs`];
//! 6. the text is a haiku: three non-empty lines, ended by the engine itself
//!    (a GBNF grammar in the request, so streamed text, `tokens_out` and the
//!    engine's counters agree);
//! 7. a long generation canceled after its first token ends with
//!    `canceled: true` and `/slots` shows the slot idle.
//!
//! Reported, not asserted: whether another nonce changed the text (at
//! temperature 0 a 135M model often writes the same haiku for a different
//! nonce), and whether the minute word appears.

pub mod cli;

pub use cli::{cli, cli_running, Output};

use anyhow::{Context, Result};
use llorch_io::llama_server::{all_idle, Api, LlamaServer};
use llorch_io::paths::Layout;
use llorch_profile::Profile;
use llorch_stack::Stack;
use llorch_types::PoolId;
use orchestratord::client::{stream_task, StreamResult};
use orchestratord::Config;
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
    pub pool: String,
    pub text: String,
    pub prompt: String,
    pub minute_word: String,
    pub minute_word_present: bool,
    pub minute_word_required: bool,
    pub nonce: String,
    pub other_nonce_text_differs: bool,
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
    let m = m % 60;
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

/// Three non-empty lines of printable ASCII, at most 40 characters each,
/// separated by single newlines (no blank line: a haiku is exactly three
/// lines); then only end-of-sequence is allowed, so the
/// engine itself ends the haiku after its third line. ASCII and the length
/// bound make every line at most 40 tokens: the haiku always fits
/// [`HAIKU_MAX_TOKENS`], it can never be cut by the token limit.
pub const HAIKU_GRAMMAR: &str = r#"root ::= line nl line nl line "\n"?
nl ::= "\n"
line ::= [!-~] [ -~]{0,39}
"#;
pub const HAIKU_MAX_TOKENS: u32 = 160;

/// A nonce that changes on every run.
pub fn new_nonce() -> String {
    format!("{:08x}", rand_u32())
}

fn rand_u32() -> u32 {
    let seed = format!(
        "{:?}-{}-{}",
        Instant::now(),
        std::process::id(),
        llorch_io::now_rfc3339()
    );
    u32::from_str_radix(&llorch_io::digest::sha256_bytes(seed.as_bytes())[..8], 16).unwrap_or(0)
}

fn current_minute() -> u32 {
    ((llorch_io::unix_now() / 60) % 60) as u32
}

/// The pool the proof runs under: never the profile's own, which `provision` may hold.
pub fn proof_pool(pool: &PoolId) -> PoolId {
    let base: String = pool.as_str().chars().take(58).collect();
    PoolId::parse(&format!("{base}-haiku")).expect("a pool id plus -haiku is a pool id")
}

/// What the proof runs against: an orchestrator, and the engine behind it
/// (asked directly to compare), with what the profile says about seeds and
/// the minute word.
pub struct Target {
    pub orchestrator: String,
    pub engine: orchestratord::EngineInfo,
    /// Sent as `Authorization: Bearer` to an orchestrator bound off loopback.
    pub token: Option<String>,
    pub profile: String,
    pub seed: u64,
    pub require_minute_word: bool,
}

impl Target {
    /// The stack's first pool, as a profile configures it.
    pub fn of_stack(profile: &Profile, stack: &Stack) -> Result<Target> {
        Ok(Target {
            orchestrator: stack.orchestrator_url(),
            engine: stack.engine()?,
            token: None,
            profile: profile.name.clone(),
            seed: profile.file.server.seed,
            require_minute_word: profile.file.haiku.require_minute_word,
        })
    }

    /// An orchestrator someone else runs (an unpacked container image) and
    /// the engine its handoff file names.
    pub fn running(
        orchestrator: &str,
        handoff: &std::path::Path,
        token: Option<String>,
    ) -> Result<Target> {
        let h = llorch_io::handoff::Handoff::read(handoff)?
            .with_context(|| format!("no handoff at {}", handoff.display()))?;
        Ok(Target {
            orchestrator: orchestrator.trim_end_matches('/').to_string(),
            engine: orchestratord::EngineInfo::from_handoff(&h)?,
            token,
            profile: format!("(running: {})", h.pool_id),
            seed: Config::default().default_seed,
            require_minute_word: false,
        })
    }
}

/// Run the whole proof. `on_token` sees the first haiku's tokens live.
pub async fn run(
    profile: &Profile,
    pool: &PoolId,
    layout: &Layout,
    report: llorch_io::report::Reporter,
    on_token: &(dyn Fn(&str) + Sync),
) -> Result<HaikuReport> {
    let pool = proof_pool(pool);
    let stack = llorch_stack::start_stack(
        profile,
        &pool,
        layout,
        Config {
            addr: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        },
        report,
        "cargo xtask haiku",
    )
    .await?;
    let res = match Target::of_stack(profile, &stack) {
        Ok(t) => prove(&t, on_token).await,
        Err(e) => Err(e),
    };
    stack.stop(Duration::from_secs(5)).await;
    let report = res?;
    let dir = layout.runtime.join("haiku");
    layout.ensure_private_dir(&dir)?;
    llorch_io::fsx::write_atomic(
        &dir.join("last.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(report)
}

/// Talks to the engine directly (no orchestrator), with its key if it has one.
struct Direct {
    http: reqwest::Client,
    server: LlamaServer,
}

impl Direct {
    fn new(http: &reqwest::Client, url: &str, key: Option<&str>) -> Direct {
        Direct {
            http: http.clone(),
            server: LlamaServer::new(url, key.map(str::to_string)),
        }
    }

    async fn post(&self, api: Api, body: &Value) -> Result<Value> {
        let r = self.server.post(&self.http, api).json(body).send().await?;
        let status = r.status();
        let v: Value = r.json().await?;
        anyhow::ensure!(
            status.is_success(),
            "llama-server {} answered {status}: {v}",
            api.path()
        );
        Ok(v)
    }

    async fn tokens_predicted_total(&self) -> Result<u64> {
        let v = self
            .server
            .metric(&self.http, "llamacpp:tokens_predicted_total")
            .await?;
        Ok(v as u64)
    }

    async fn render(&self, messages: &Value) -> Result<String> {
        let p = self
            .post(Api::ApplyTemplate, &json!({"messages": messages}))
            .await?;
        p["prompt"]
            .as_str()
            .map(String::from)
            .context("apply-template gave no prompt")
    }

    /// The same request as the task, non-streaming: (text, tokens_predicted).
    async fn complete(&self, messages: &Value, seed: u64) -> Result<(String, u64)> {
        let prompt = self.render(messages).await?;
        let r = self
            .post(
                Api::Completion,
                &json!({"prompt": prompt, "n_predict": HAIKU_MAX_TOKENS, "temperature": 0.0, "seed": seed,
                        "stream": false, "cache_prompt": false, "grammar": HAIKU_GRAMMAR}),
            )
            .await?;
        Ok((
            r["content"].as_str().unwrap_or("").to_string(),
            r["tokens_predicted"].as_u64().unwrap_or(0),
        ))
    }
}

/// The top log-probabilities llama-server computes for the first generated
/// position of the rendered prompt: `(token id, logprob)` pairs.
///
/// Why this proves the prompt reaches the model, and cannot fail by chance:
/// asked twice for the same prompt (`cache_prompt: false`, so nothing is
/// reused), the deterministic profile gives bit-identical numbers; asked for
/// a prompt that differs only in its nonce, the model computes a different
/// hidden state at that position, so the distribution differs (we require a
/// different top-k token set, or a largest |Δ logprob| of at least
/// [`LOGPROB_TOLERANCE`], far above float noise and far below the
/// differences a changed prompt makes). Canned text has no distribution, and
/// a distribution that ignored the prompt would be identical for both nonces.
/// Unlike comparing generated text, this does not depend on the model
/// choosing different words.
pub async fn first_position_logprobs(
    http: &reqwest::Client,
    engine: &str,
    key: Option<&str>,
    messages: &Value,
) -> Result<Vec<(i64, f64)>> {
    let d = Direct::new(http, engine, key);
    let prompt = d.render(messages).await?;
    let r = d
        .post(
            Api::Completion,
            &json!({"prompt": prompt, "n_predict": 1, "n_probs": 10, "temperature": 0.0,
                    "stream": false, "cache_prompt": false}),
        )
        .await?;
    let top = r["completion_probabilities"][0]["top_logprobs"]
        .as_array()
        .context("llama-server returned no top_logprobs for the first position")?;
    top.iter()
        .map(|t| {
            Ok((
                t["id"].as_i64().context("top_logprobs entry without id")?,
                t["logprob"]
                    .as_f64()
                    .context("top_logprobs entry without logprob")?,
            ))
        })
        .collect()
}

pub const LOGPROB_TOLERANCE: f64 = 1e-4;

/// Largest |Δ logprob| over tokens both lists hold, and whether the token sets differ.
pub fn compare_logprobs(a: &[(i64, f64)], b: &[(i64, f64)]) -> (f64, bool) {
    let ids = |v: &[(i64, f64)]| {
        let mut s: Vec<i64> = v.iter().map(|x| x.0).collect();
        s.sort();
        s
    };
    let sets_differ = ids(a) != ids(b);
    let max = a
        .iter()
        .filter_map(|(id, la)| {
            b.iter()
                .find(|(j, _)| j == id)
                .map(|(_, lb)| (la - lb).abs())
        })
        .fold(0.0f64, f64::max);
    (max, sets_differ)
}

fn check(checks: &mut Vec<Check>, name: &str, ok: bool, detail: impl Into<String>) {
    checks.push(Check {
        name: name.into(),
        ok,
        detail: detail.into(),
    });
}

/// The lines of a text (without its final newline), blank ones included:
/// a haiku is exactly three of them, none blank.
pub fn haiku_lines(text: &str) -> Vec<&str> {
    text.trim_end_matches('\n').split('\n').collect()
}

/// Exactly three lines, none of them blank.
pub fn is_three_lines(text: &str) -> bool {
    let lines = haiku_lines(text);
    lines.len() == 3 && lines.iter().all(|l| !l.trim().is_empty())
}

pub async fn prove(target: &Target, on_token: &(dyn Fn(&str) + Sync)) -> Result<HaikuReport> {
    let http = llorch_io::http::async_client_with_token(target.token.as_deref());
    let direct_http = llorch_io::http::async_client();
    let orch = target.orchestrator.clone();
    let info = target.engine.clone();
    let engine = &info.url;
    let direct = Direct::new(&direct_http, engine, info.api_key.as_deref());
    let seed = target.seed;
    let minute_word = minute_in_words(current_minute());
    let nonce = new_nonce();
    let messages = haiku_messages(&minute_word, &nonce);
    let body = json!({"messages": messages, "max_tokens": HAIKU_MAX_TOKENS, "seed": seed,
                      "temperature": 0.0, "grammar": HAIKU_GRAMMAR});
    let mut checks = Vec::new();

    let before = direct.tokens_predicted_total().await?;
    let first: StreamResult = stream_task(&http, &orch, &body, Some(on_token), None).await?;
    let after = direct.tokens_predicted_total().await?;
    let tokens_out = first.tokens_out();
    check(
        &mut checks,
        "event order started → token+ → end",
        first.order_ok() && first.end.is_some() && !first.tokens.is_empty(),
        first.order.join(" "),
    );
    check(
        &mut checks,
        "token indices contiguous from 0",
        first.indices_ok(),
        format!("{} token events", first.tokens.len()),
    );
    // A restarted engine resets its counters: that is a failed check, never an underflow.
    let grew = after.checked_sub(before);
    check(
        &mut checks,
        "engine tokens_predicted_total grew by tokens_out",
        grew == Some(tokens_out) && tokens_out > 0,
        match grew {
            Some(g) => format!("{before} → {after} (+{g}), tokens_out {tokens_out}"),
            None => format!("{before} → {after}: the counter went down (engine restarted?)"),
        },
    );
    let (direct_text, direct_tokens) = direct.complete(&messages, seed).await?;
    check(
        &mut checks,
        "tokens_out equals llama-server's tokens_predicted for the same request",
        direct_tokens == tokens_out && first.tokens.len() as u64 <= tokens_out,
        format!(
            "tokens_out {tokens_out}, direct {direct_tokens}, {} events",
            first.tokens.len()
        ),
    );
    check(
        &mut checks,
        "concatenated tokens equal llama-server's own text",
        first.text == direct_text,
        format!("{:?} vs {:?}", first.text, direct_text),
    );
    let lines = haiku_lines(&first.text);
    let stop_reason = first
        .end
        .as_ref()
        .map(|e| e.stop_reason.clone())
        .unwrap_or_default();
    check(
        &mut checks,
        "a haiku: exactly three lines, none blank, ended by the engine",
        is_three_lines(&first.text) && stop_reason == "eos",
        format!("{} lines, stop_reason {stop_reason}", lines.len()),
    );

    let second = stream_task(&http, &orch, &body, None, None).await?;
    check(
        &mut checks,
        "same request again gives identical text",
        second.text == first.text && second.tokens_out() == tokens_out,
        format!("{:?}", second.text),
    );

    let other_nonce = loop {
        let n = new_nonce();
        if n != nonce {
            break n;
        }
    };
    let other_messages = haiku_messages(&minute_word, &other_nonce);
    let a =
        first_position_logprobs(&direct_http, engine, info.api_key.as_deref(), &messages).await?;
    let a2 =
        first_position_logprobs(&direct_http, engine, info.api_key.as_deref(), &messages).await?;
    let b = first_position_logprobs(
        &direct_http,
        engine,
        info.api_key.as_deref(),
        &other_messages,
    )
    .await?;
    let (max_delta, sets_differ) = compare_logprobs(&a, &b);
    check(
        &mut checks,
        "the prompt reaches the model: first-position logprobs identical for the same nonce, different for another",
        !a.is_empty() && a == a2 && (sets_differ || max_delta >= LOGPROB_TOLERANCE),
        format!(
            "same nonce: {}; nonce {nonce} vs {other_nonce}: max |Δ logprob| {max_delta:.6}, top-{} sets differ: {sets_differ}",
            if a == a2 { "bit-identical" } else { "DIFFERENT" },
            a.len()
        ),
    );
    let other_body = json!({"messages": other_messages, "max_tokens": HAIKU_MAX_TOKENS, "seed": seed,
                            "temperature": 0.0, "grammar": HAIKU_GRAMMAR});
    let third = stream_task(&http, &orch, &other_body, None, None).await?;
    let other_nonce_text_differs = third.text != first.text;

    let long = json!({"prompt": "Count from one to one thousand, one number per line:\n", "max_tokens": 2048, "ignore_eos": true});
    let canceled = stream_task(&http, &orch, &long, None, Some(1)).await?;
    let slots = direct
        .server
        .slots(&direct_http, Duration::from_secs(5))
        .await?;
    let idle = all_idle(&slots);
    check(
        &mut checks,
        "cancel after the first token ends canceled and frees the slot",
        canceled.canceled() && idle && canceled.tokens.len() < 2048,
        format!(
            "end {:?} after {} tokens; /slots idle: {idle}",
            canceled.end,
            canceled.tokens.len()
        ),
    );

    let present = first.text.to_lowercase().contains(&minute_word);
    let required = target.require_minute_word;
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
        profile: target.profile.clone(),
        pool: info.pool.clone(),
        text: first.text.clone(),
        prompt: messages[0]["content"].as_str().unwrap_or("").to_string(),
        minute_word,
        minute_word_present: present,
        minute_word_required: required,
        nonce,
        other_nonce_text_differs,
        tokens_out,
        decode_ms: first.end.as_ref().map(|e| e.decode_ms).unwrap_or(0.0),
        time_to_first_token_ms: first.ttft_ms,
        engine_url: engine.clone(),
        orchestrator_url: orch,
        engine_version: info.engine_version.clone(),
        fingerprint: info.fingerprint.clone(),
        model_ref: info.model_ref.clone(),
        model_digest: info.model_digest.clone(),
        checks,
        finished_at: llorch_io::now_rfc3339(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprob_comparison() {
        let a = vec![(1, -0.5), (2, -1.0)];
        assert_eq!(compare_logprobs(&a, &a), (0.0, false));
        let (d, s) = compare_logprobs(&a, &[(1, -0.6), (2, -1.0)]);
        assert!((d - 0.1).abs() < 1e-9 && !s);
        assert!(compare_logprobs(&a, &[(1, -0.5), (3, -1.0)]).1);
    }

    #[test]
    fn a_haiku_is_exactly_three_lines_none_blank() {
        assert!(is_three_lines("a\nb\nc"));
        assert!(is_three_lines("a\nb\nc\n"));
        assert!(!is_three_lines("a\nb\n\nc"), "a blank line between");
        assert!(!is_three_lines("a\nb"));
        assert!(!is_three_lines("a\nb\nc\nd"));
        assert!(!is_three_lines("a\n \nc"));
        // The grammar allows one newline between lines, never two.
        assert!(
            HAIKU_GRAMMAR.contains("nl ::= \"\\n\"\n"),
            "{HAIKU_GRAMMAR}"
        );
    }

    #[test]
    fn minutes_in_words() {
        assert_eq!(minute_in_words(0), "zero");
        assert_eq!(minute_in_words(42), "forty-two");
        assert_eq!(minute_in_words(50), "fifty");
        assert_eq!(minute_in_words(61), "one");
    }
}
