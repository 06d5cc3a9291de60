//! The llama.cpp adapter: one task → one streaming `/completion` request.
//!
//! llama-server answers `stream: true` with `data: {json}` frames. A frame
//! normally carries one token (`content`, `tokens`, `tokens_predicted` = the
//! running count); a token that ends inside a UTF-8 character is held back
//! and sent with the next one, so a frame may stand for several tokens, and a
//! token held back as a possible stop-string prefix comes with empty
//! `content`. The final frame has `stop: true`, `stop_type`, `timings` and
//! empty content. So: every frame with text becomes one `token {t, i}` event
//! the moment it is read (`i` counts events), and `end.tokens_out` is the
//! engine's own `tokens_predicted`.
//!
//! Cancel (request, disconnect, deadline) drops the upstream request
//! (`runner` waits for the slot and ends the task):
//! llama-server sees the closed connection and frees its slot; we wait for
//! `/slots` to show it idle before ending the stream (a batched engine: until
//! no more slots process than the pool's other running tasks). An engine that sends
//! nothing for `stall_timeout` (alive but hung) ends the stream with
//! `ENGINE_STALLED` and is reported to its owner, which restarts it.
//!
//! Chat `messages` are rendered with the model's own template through
//! llama-server's `/apply-template` first.

use crate::events::{TaskEvent, TokenEvent};
use crate::link::EngineInfo;
use crate::tasks::{CancelReason, Task};
use crate::AppState;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use llorch_io::llama_server::Api;
use serde_json::{json, Value};
use std::time::Duration;

/// The error code of a prompt longer than the engine's context (the client's error).
pub const CONTEXT_LENGTH_EXCEEDED: &str = "CONTEXT_LENGTH_EXCEEDED";
/// The error code of a request the engine refused as the client's error (a 4xx of llama-server's).
pub const ENGINE_REFUSED: &str = "ENGINE_REFUSED";

pub(crate) enum Outcome {
    Finished(Value),
    /// The engine refused the request as the client's error (4xx): its message.
    Refused(String),
    /// The prompt does not fit the engine's context (llama-server's `exceed_context_size_error`).
    ContextExceeded(String),
    Canceled(CancelReason),
    EngineGone(String),
    /// The engine could not be connected to (the request never left): it
    /// went away before this task reached it, so nothing was generated.
    NotSent(String),
    EngineError(String),
    Stalled(String),
}

/// Tokens the engine reported so far (from `tokens_predicted`).
#[derive(Default)]
pub(crate) struct Progress {
    pub events: u64,
    pub tokens: u64,
}

/// Wait for `fut` unless the task is canceled, its deadline passes or `stall` elapses.
pub(crate) async fn guarded<T>(
    task: &Task,
    stall: Duration,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, Outcome> {
    if let Some((r, _)) = task.cancel_reason() {
        return Err(Outcome::Canceled(r));
    }
    tokio::select! {
        v = fut => Ok(v),
        _ = task.cancel_notify.notified() => Err(Outcome::Canceled(
            task.cancel_reason().map(|(r, _)| r).unwrap_or(CancelReason::Requested),
        )),
        _ = tokio::time::sleep(stall) => Err(Outcome::Stalled(format!(
            "llama-server sent nothing for {:.0}s; it is being restarted",
            stall.as_secs_f64()
        ))),
    }
}

/// Wait for `fut` unless the task is canceled or its deadline passes; when
/// nothing arrives for `stall_timeout`, ask the engine whether it is still
/// working (its `/slots` answers within the stall timeout: its loop runs, a
/// long prompt, a big embedding batch or a non-streamed answer is under way)
/// and keep waiting if so. Only an engine that no longer answers is stalled:
/// the absence of frames alone never is (an answer may have none until it ends).
pub(crate) async fn watched<T>(
    st: &AppState,
    task: &Task,
    engine: &EngineInfo,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, Outcome> {
    let stall = st.cfg.stall_timeout;
    tokio::pin!(fut);
    loop {
        match guarded(task, stall, &mut fut).await {
            Err(Outcome::Stalled(_)) => {
                let server = engine.server();
                let alive = tokio::select! {
                    r = server.slots(&st.http, stall) => r.is_ok(),
                    _ = task.cancel_notify.notified() => true,
                };
                if !alive {
                    return Err(Outcome::Stalled(format!(
                        "llama-server sent nothing for {:.0}s and did not answer /slots within {:.0}s; it is being restarted",
                        stall.as_secs_f64(),
                        stall.as_secs_f64()
                    )));
                }
            }
            other => return other,
        }
    }
}

pub(crate) async fn generate(
    st: &AppState,
    task: &Task,
    engine: &EngineInfo,
    p: &mut Progress,
) -> Outcome {
    let prompt = match prompt_text(st, task, engine).await {
        Ok(t) => t,
        Err(o) => return o,
    };
    let body = completion_body(&task.req, prompt, engine.batched);
    let resp = match open_stream(st, task, engine, &body).await {
        Ok(r) => r,
        Err(o) => return o,
    };
    let mut frames = resp.bytes_stream().eventsource();
    let mut relay = Relay::default();
    loop {
        let ev = match watched(st, task, engine, frames.next()).await {
            Ok(Some(Ok(ev))) => ev,
            Ok(Some(Err(e))) => {
                return Outcome::EngineGone(format!(
                    "the engine stream broke after {} tokens: {e}",
                    p.tokens
                ))
            }
            Ok(None) => {
                return Outcome::EngineGone(format!(
                    "the engine closed the stream after {} tokens without a final frame",
                    p.tokens
                ))
            }
            Err(o) => return o,
        };
        let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
            continue;
        };
        if let Some(err) = v.get("error") {
            return Outcome::EngineError(err.to_string());
        }
        if let Some(n) = v["tokens_predicted"].as_u64() {
            p.tokens = p.tokens.max(n);
        }
        if v["stop"].as_bool() == Some(true) {
            return relay.last(st, task, engine, p, v).await;
        }
        if let Some(o) = relay.frame(st, task, p, &v) {
            return o;
        }
    }
}

/// The prompt: the task's own, or its chat `messages` rendered with the
/// model's template by llama-server's `/apply-template`.
async fn prompt_text(st: &AppState, task: &Task, engine: &EngineInfo) -> Result<String, Outcome> {
    let m = match (&task.req.prompt, &task.req.messages) {
        (Some(p), _) => return Ok(p.clone()),
        (None, Some(m)) => m,
        (None, None) => return Err(Outcome::EngineError("empty task".into())),
    };
    let v = ask(st, task, engine, Api::ApplyTemplate, json!({"messages": m})).await?;
    Ok(v["prompt"].as_str().unwrap_or("").to_string())
}

/// The streaming `/completion` request of a task.
fn completion_body(req: &crate::tasks::TaskRequest, prompt: String, batched: bool) -> Value {
    let mut body = json!({
        "prompt": prompt,
        "n_predict": req.max_tokens,
        "temperature": req.temperature,
        "seed": req.seed,
        "stream": true,
        // Exact mode evaluates every prompt afresh (byte-identical results);
        // batched mode reuses a slot's cached prefix.
        "cache_prompt": batched,
        "ignore_eos": req.ignore_eos,
    });
    if !req.stop.is_empty() {
        body["stop"] = json!(req.stop);
    }
    if let Some(g) = &req.grammar {
        body["grammar"] = json!(g);
    }
    if let Some(t) = req.top_p {
        body["top_p"] = json!(t);
    }
    if let Some(n) = req.n_probs {
        body["n_probs"] = json!(n);
    }
    body
}

/// The completion request sent; an answer other than 2xx is the engine's
/// error (a prompt over the context named as such).
async fn open_stream(
    st: &AppState,
    task: &Task,
    engine: &EngineInfo,
    body: &Value,
) -> Result<reqwest::Response, Outcome> {
    let r = send(st, task, engine, || {
        engine.server().post(&st.http, Api::Completion).json(body)
    })
    .await?;
    if r.status().is_success() {
        return Ok(r);
    }
    let s = r.status();
    let text = r.text().await.unwrap_or_default();
    if let Some(msg) = context_exceeded(&text) {
        return Err(Outcome::ContextExceeded(msg));
    }
    Err(Outcome::EngineError(format!(
        "llama-server answered {s}: {}",
        text.chars().take(300).collect::<String>()
    )))
}

/// What the relay of one stream keeps between frames.
#[derive(Default)]
struct Relay {
    /// Text was sent (the time to first token is observed).
    sent_text: bool,
    /// Probabilities of held-back tokens travel with the next text.
    pending_probs: Vec<Value>,
    /// Ids of the tokens held back since the last text.
    held: Vec<i64>,
}

impl Relay {
    fn probs(&mut self, req: &crate::tasks::TaskRequest) -> Option<Vec<Value>> {
        req.n_probs
            .is_some()
            .then(|| std::mem::take(&mut self.pending_probs))
    }

    /// One frame before the last: its text becomes one token event (the
    /// first observed as time to first token), or its tokens are held back
    /// (a possible stop-string prefix). `Some` ends the stream: nobody
    /// listens any more.
    fn frame(
        &mut self,
        st: &AppState,
        task: &Task,
        p: &mut Progress,
        v: &Value,
    ) -> Option<Outcome> {
        if let Some(probs) = v["completion_probabilities"].as_array() {
            self.pending_probs.extend(probs.iter().cloned());
        }
        let t = v["content"].as_str().unwrap_or("");
        if t.is_empty() {
            self.held.extend(
                v["tokens"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_i64)
                    .filter(|t| *t >= 0),
            );
            return None;
        }
        self.held.clear();
        if !self.sent_text {
            self.sent_text = true;
            st.metrics
                .ttft_ms
                .observe(task.admitted_at.elapsed().as_secs_f64() * 1000.0);
        }
        let probs = self.probs(&task.req);
        if !task.send(TaskEvent::Token(TokenEvent {
            t: t.to_string(),
            i: p.events,
            probs,
        })) {
            // Nobody is listening any more (the client went away).
            task.request_cancel(CancelReason::ClientDisconnected);
            return Some(Outcome::Canceled(CancelReason::ClientDisconnected));
        }
        p.events += 1;
        None
    }

    /// The final frame. Cut by max_tokens while text was held back as a
    /// possible stop string, llama-server's stream never sends that text
    /// (its final frame is empty), though its own non-streamed answer has
    /// it: those tokens' text, from llama-server's `/detokenize`, ends the
    /// stream.
    async fn last(
        mut self,
        st: &AppState,
        task: &Task,
        engine: &EngineInfo,
        p: &mut Progress,
        v: Value,
    ) -> Outcome {
        if v["stop_type"].as_str() == Some("limit") && !self.held.is_empty() {
            let text = match detokenize(st, task, engine, &self.held).await {
                Ok(t) => t,
                Err(o) => return o,
            };
            if !text.is_empty() {
                let probs = self.probs(&task.req);
                task.send(TaskEvent::Token(TokenEvent {
                    t: text,
                    i: p.events,
                    probs,
                }));
                p.events += 1;
            }
        }
        Outcome::Finished(v)
    }
}

const SEND_ATTEMPTS: u32 = 3;

/// Send a request to the engine (guarded by cancel, deadline and stall).
///
/// A request can fail to be sent to a live engine: a pooled keep-alive
/// connection that llama-server closes at the same moment. That is not a
/// crash: if the engine still answers `/health`, send again (nothing has been
/// generated for this request yet, so nothing is repeated). Only an engine
/// that cannot be reached at all is `EngineGone`.
pub(crate) async fn send(
    st: &AppState,
    task: &Task,
    engine: &EngineInfo,
    request: impl Fn() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response, Outcome> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match guarded(task, st.cfg.stall_timeout, request().send()).await? {
            Ok(r) => return Ok(r),
            Err(e) if attempt < SEND_ATTEMPTS && engine_healthy(st, engine).await => {
                llorch_io::info!(
                    "orchestratord: sending to llama-server failed ({}); it answers /health, sending again",
                    llorch_io::http::error_chain(&e)
                );
            }
            Err(e) => {
                let msg = format!(
                    "cannot reach llama-server at {}: {}",
                    engine.url,
                    llorch_io::http::error_chain(&e)
                );
                return Err(if e.is_connect() {
                    Outcome::NotSent(msg)
                } else {
                    Outcome::EngineGone(msg)
                });
            }
        }
    }
}

pub(crate) async fn engine_healthy(st: &AppState, engine: &EngineInfo) -> bool {
    engine
        .server()
        .healthy(&st.http, Duration::from_secs(2))
        .await
}

/// llama-server's answer to a prompt over the context
/// (`{"error": {"type": "exceed_context_size_error", "n_prompt_tokens", "n_ctx"}}`),
/// as a message with the token counts.
pub(crate) fn context_exceeded(body: &str) -> Option<String> {
    let v: Value = serde_json::from_str(body).ok()?;
    let e = v.get("error").unwrap_or(&v);
    if e["type"].as_str() != Some("exceed_context_size_error") {
        return None;
    }
    Some(match (e["n_prompt_tokens"].as_u64(), e["n_ctx"].as_u64()) {
        (Some(p), Some(c)) => format!(
            "the prompt is {p} tokens; this model's context here is {c} tokens (prompt and completion together). Shorten the prompt, or serve a profile with a larger server.ctx_size"
        ),
        _ => format!(
            "the prompt does not fit the engine's context: {}",
            llorch_types::excerpt(e["message"].as_str().unwrap_or(""), 200)
        ),
    })
}

/// llama-server's text for token ids (`POST /detokenize`).
async fn detokenize(
    st: &AppState,
    task: &Task,
    engine: &EngineInfo,
    tokens: &[i64],
) -> Result<String, Outcome> {
    let v = ask(st, task, engine, Api::Detokenize, json!({"tokens": tokens})).await?;
    Ok(v["content"].as_str().unwrap_or("").to_string())
}

/// One small JSON request of a task's to the engine (guarded like the
/// stream): its JSON answer, or the engine's error naming the endpoint.
async fn ask(
    st: &AppState,
    task: &Task,
    engine: &EngineInfo,
    api: Api,
    body: Value,
) -> Result<Value, Outcome> {
    let r = send(st, task, engine, || {
        engine.server().post(&st.http, api).json(&body)
    })
    .await?;
    if !r.status().is_success() {
        return Err(Outcome::EngineError(format!(
            "{} answered {}",
            api.path(),
            r.status()
        )));
    }
    guarded(task, st.cfg.stall_timeout, r.json::<Value>())
        .await?
        .map_err(|e| Outcome::EngineError(format!("{}: {e}", api.path())))
}
