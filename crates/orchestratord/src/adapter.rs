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
//! Cancel (request, disconnect, deadline) drops the upstream request:
//! llama-server sees the closed connection and frees its slot; we wait for
//! `/slots` to show it idle before ending the stream (a batched engine: until
//! no more slots process than the pool's other running tasks). An engine that sends
//! nothing for `stall_timeout` (alive but hung) ends the stream with
//! `ENGINE_STALLED` and is reported to its owner, which restarts it.
//!
//! Chat `messages` are rendered with the model's own template through
//! llama-server's `/apply-template` first.

use crate::events::{EndEvent, ErrorEvent, StartedEvent, TaskEvent, TokenEvent};
use crate::link::EngineInfo;
use crate::tasks::{CancelReason, Task};
use crate::AppState;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use llorch_io::llama_server::{all_idle, Api, Slot};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

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

pub async fn run_task(st: &AppState, task: &Task) {
    let started_at = Instant::now();
    task.send(TaskEvent::Started(StartedEvent {
        queue_position: task.queue_position,
        predicted_start_ms: task.predicted_start_ms,
    }));
    let pool = &task.pool;
    let crate::link::LinkState::Ready(engine) = pool.link_state() else {
        fail(
            st,
            task,
            "ENGINE_NOT_READY",
            "the engine went away before the task started".into(),
            true,
        );
        return;
    };
    let mut p = Progress::default();
    // A non-streamed relay: nothing here polls the engine's queue until its
    // slot is idle again (see `Pool::silent_waits`).
    let silent = task
        .req
        .forward
        .as_ref()
        .filter(|f| f.silent())
        .map(|_| crate::forward::SilentWait::new(&task.pool));
    let (outcome, engine) = attempt(st, task, engine, &mut p).await;
    let queue_wait_ms = (started_at - task.admitted_at).as_millis() as u64;
    match outcome {
        Outcome::Finished(fin) => finished(st, task, &fin, &p, queue_wait_ms),
        Outcome::Canceled(reason) => {
            let idle = wait_slot_freed(st, task, &engine, silent.is_some()).await;
            let since = task
                .cancel_reason()
                .map(|(_, t)| t)
                .unwrap_or_else(Instant::now);
            st.metrics
                .cancel_latency_ms
                .observe(since.elapsed().as_secs_f64() * 1000.0);
            st.metrics.canceled.inc();
            st.metrics.tokens_out.inc_by(p.tokens);
            pool.tokens_out.fetch_add(p.tokens, Ordering::Relaxed);
            task.finish(TaskEvent::End(EndEvent {
                tokens_out: p.tokens,
                decode_ms: started_at.elapsed().as_secs_f64() * 1000.0,
                stop_reason: reason.as_str().into(),
                canceled: true,
                queue_wait_ms,
                slot_idle: Some(idle),
                ..Default::default()
            }));
        }
        Outcome::EngineGone(msg) | Outcome::NotSent(msg) => {
            pool.mark_not_ready();
            fail(st, task, "ENGINE_CRASHED", msg, true);
        }
        Outcome::Stalled(msg) => {
            pool.mark_not_ready();
            pool.link.report_stalled();
            fail(st, task, "ENGINE_STALLED", msg, true);
        }
        Outcome::EngineError(msg) => fail(st, task, "ENGINE_ERROR", msg, false),
        Outcome::ContextExceeded(msg) => fail(st, task, CONTEXT_LENGTH_EXCEEDED, msg, false),
        Outcome::Refused(msg) => fail(st, task, ENGINE_REFUSED, msg, false),
    }
}

/// Run the task on `engine`; an engine that died before this task reached
/// it (its supervisor restarts it) is waited for, as a queued task waits,
/// instead of failing the task for a crash it never saw. The outcome, and
/// the engine it came from.
async fn attempt(
    st: &AppState,
    task: &Task,
    mut engine: EngineInfo,
    p: &mut Progress,
) -> (Outcome, EngineInfo) {
    let mut restarts = 0;
    loop {
        let outcome = match &task.req.forward {
            Some(f) => crate::forward::relay(st, task, &engine, f, p).await,
            None => generate(st, task, &engine, p).await,
        };
        match outcome {
            Outcome::NotSent(msg) if p.events == 0 && restarts < NOT_SENT_RESTARTS => {
                restarts += 1;
                task.pool.mark_not_ready();
                match engine_after(st, task, &engine).await {
                    Ok(next) => {
                        eprintln!(
                            "orchestratord: {msg}; task {} goes to the restarted engine at {}",
                            task.id, next.url
                        );
                        engine = next;
                    }
                    Err(o) => return (o, engine),
                }
            }
            Outcome::NotSent(msg) => return (Outcome::EngineGone(msg), engine),
            o => return (o, engine),
        }
    }
}

/// End a task the engine finished, with llama-server's own counts and timings.
fn finished(st: &AppState, task: &Task, fin: &Value, p: &Progress, queue_wait_ms: u64) {
    let t = &fin["timings"];
    let tokens_out = fin["tokens_predicted"].as_u64().unwrap_or(p.tokens);
    st.metrics.completed.inc();
    st.metrics.tokens_out.inc_by(tokens_out);
    task.pool
        .tokens_out
        .fetch_add(tokens_out, Ordering::Relaxed);
    task.finish(TaskEvent::End(EndEvent {
        tokens_out,
        decode_ms: t["predicted_ms"].as_f64().unwrap_or(0.0),
        stop_reason: fin["stop_type"].as_str().unwrap_or("eos").to_string(),
        canceled: false,
        prompt_tokens: fin["tokens_evaluated"]
            .as_u64()
            .or_else(|| t["prompt_n"].as_u64())
            .unwrap_or(0),
        prompt_evaluated: t["prompt_n"].as_u64().unwrap_or(0),
        prompt_ms: t["prompt_ms"].as_f64().unwrap_or(0.0),
        decode_tokens_per_s: t["predicted_per_second"].as_f64().unwrap_or(0.0),
        queue_wait_ms,
        slot_idle: None,
    }));
}

/// After a cancel (the upstream request is already dropped): whether the
/// engine freed the task's slot. One slot: wait until the engine is idle.
/// Several: until no more slots process than this pool's other running
/// tasks (the engine is ours alone; llama-server names a task's slot only
/// in its final frame, so which slot was ours is not known). A non-streamed
/// (`silent`) relay is stopped by llama-server only after a second with no
/// result at all: poll slower than that, and for longer (a streamed one
/// stops at its next write).
async fn wait_slot_freed(st: &AppState, task: &Task, engine: &EngineInfo, silent: bool) -> bool {
    let pool = &task.pool;
    // Wait for the state, not for a time: the engine frees the slot at its
    // next decode step, which a busy machine makes slow (measured on two
    // loaded cores: up to 5.9 s, where a fixed 3 s wait ended streams with
    // `slot_idle: false`). An engine that does not free it within the stall
    // timeout is as good as stalled.
    let within = st.cfg.stall_timeout.max(Duration::from_secs(5));
    let every = if silent {
        Duration::from_millis(1200)
    } else {
        // Every `/slots` request is a task in the engine's own queue,
        // handled between decode steps: polling it hard delays the very
        // cancel it waits for on a busy machine.
        Duration::from_millis(10)
    };
    if pool.slots > 1 {
        let others = || pool.running.load(Ordering::SeqCst).saturating_sub(1) as usize;
        poll_slots(st, engine, within, every, |a| {
            a.iter().filter(|s| s.is_processing).count() <= others()
        })
        .await
    } else {
        poll_slots(st, engine, within, every, all_idle).await
    }
}

fn fail(st: &AppState, task: &Task, code: &str, message: String, retriable: bool) {
    st.metrics.failed.inc();
    task.finish(TaskEvent::Error(ErrorEvent {
        code: code.into(),
        message,
        retriable,
    }));
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

async fn generate(st: &AppState, task: &Task, engine: &EngineInfo, p: &mut Progress) -> Outcome {
    let stall = st.cfg.stall_timeout;
    let req = &task.req;
    let prompt = match (&req.prompt, &req.messages) {
        (Some(p), _) => p.clone(),
        (None, Some(m)) => {
            let resp = send(st, task, engine, || {
                engine
                    .server()
                    .post(&st.http, Api::ApplyTemplate)
                    .json(&json!({"messages": m}))
            })
            .await;
            match resp {
                Ok(r) if r.status().is_success() => {
                    match guarded(task, stall, r.json::<Value>()).await {
                        Ok(Ok(v)) => v["prompt"].as_str().unwrap_or("").to_string(),
                        Ok(Err(e)) => return Outcome::EngineError(format!("apply-template: {e}")),
                        Err(o) => return o,
                    }
                }
                Ok(r) => {
                    return Outcome::EngineError(format!("apply-template answered {}", r.status()))
                }
                Err(o) => return o,
            }
        }
        (None, None) => return Outcome::EngineError("empty task".into()),
    };
    let mut body = json!({
        "prompt": prompt,
        "n_predict": req.max_tokens,
        "temperature": req.temperature,
        "seed": req.seed,
        "stream": true,
        // Exact mode evaluates every prompt afresh (byte-identical results);
        // batched mode reuses a slot's cached prefix.
        "cache_prompt": engine.batched,
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
    let resp = match send(st, task, engine, || {
        engine.server().post(&st.http, Api::Completion).json(&body)
    })
    .await
    {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            let s = r.status();
            let text = r.text().await.unwrap_or_default();
            if let Some(msg) = context_exceeded(&text) {
                return Outcome::ContextExceeded(msg);
            }
            return Outcome::EngineError(format!(
                "llama-server answered {s}: {}",
                text.chars().take(300).collect::<String>()
            ));
        }
        Err(o) => return o,
    };
    let mut frames = resp.bytes_stream().eventsource();
    let mut first = true;
    // Probabilities of held-back tokens travel with the next text.
    let mut pending_probs: Vec<Value> = Vec::new();
    // Ids of the tokens held back since the last text.
    let mut held: Vec<i64> = Vec::new();
    loop {
        let next = match watched(st, task, engine, frames.next()).await {
            Ok(n) => n,
            Err(o) => return o,
        };
        let ev = match next {
            Some(Ok(ev)) => ev,
            Some(Err(e)) => {
                return Outcome::EngineGone(format!(
                    "the engine stream broke after {} tokens: {e}",
                    p.tokens
                ))
            }
            None => {
                return Outcome::EngineGone(format!(
                    "the engine closed the stream after {} tokens without a final frame",
                    p.tokens
                ))
            }
        };
        let v: Value = match serde_json::from_str(&ev.data) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if let Some(err) = v.get("error") {
            return Outcome::EngineError(err.to_string());
        }
        if let Some(n) = v["tokens_predicted"].as_u64() {
            p.tokens = p.tokens.max(n);
        }
        if v["stop"].as_bool() == Some(true) {
            // Cut by max_tokens while text was held back as a possible stop
            // string: llama-server's stream never sends that text (its final
            // frame is empty), though its own non-streamed answer has it.
            // Those tokens' text, from llama-server's /detokenize, ends the stream.
            if v["stop_type"].as_str() == Some("limit") && !held.is_empty() {
                let text = match detokenize(st, task, engine, &held).await {
                    Ok(t) => t,
                    Err(o) => return o,
                };
                if !text.is_empty() {
                    let probs = (req.n_probs.is_some()).then(|| std::mem::take(&mut pending_probs));
                    task.send(TaskEvent::Token(TokenEvent {
                        t: text,
                        i: p.events,
                        probs,
                    }));
                    p.events += 1;
                }
            }
            return Outcome::Finished(v);
        }
        if let Some(probs) = v["completion_probabilities"].as_array() {
            pending_probs.extend(probs.iter().cloned());
        }
        let t = v["content"].as_str().unwrap_or("");
        if t.is_empty() {
            // A token held back (a possible stop-string prefix).
            held.extend(
                v["tokens"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_i64)
                    .filter(|t| *t >= 0),
            );
            continue;
        }
        held.clear();
        if first {
            first = false;
            st.metrics
                .ttft_ms
                .observe(task.admitted_at.elapsed().as_secs_f64() * 1000.0);
        }
        let probs = (req.n_probs.is_some()).then(|| std::mem::take(&mut pending_probs));
        if !task.send(TaskEvent::Token(TokenEvent {
            t: t.to_string(),
            i: p.events,
            probs,
        })) {
            // Nobody is listening any more (the client went away).
            task.request_cancel(CancelReason::ClientDisconnected);
            return Outcome::Canceled(CancelReason::ClientDisconnected);
        }
        p.events += 1;
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
                eprintln!(
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

/// How many engine restarts one task waits through before its connect failure is a crash.
const NOT_SENT_RESTARTS: u32 = 3;

/// Wait until the task's pool is ready again after `gone` could not be
/// reached (its supervisor restarts it), unless the task is canceled or
/// the pool fails for good.
async fn engine_after(
    st: &AppState,
    task: &Task,
    gone: &EngineInfo,
) -> Result<EngineInfo, Outcome> {
    let pool = &task.pool;
    loop {
        if let Some((r, _)) = task.cancel_reason() {
            return Err(Outcome::Canceled(r));
        }
        if st.stopping.load(Ordering::SeqCst) {
            return Err(Outcome::EngineGone(format!(
                "the engine at {} went away while the orchestrator stops",
                gone.url
            )));
        }
        match pool.link_state() {
            // Ready as the health loop saw it, and answering now (a stale
            // look of the health loop may still call the dead engine ready).
            crate::link::LinkState::Ready(e)
                if pool.ready.load(Ordering::SeqCst) && engine_healthy(st, &e).await =>
            {
                return Ok(e)
            }
            crate::link::LinkState::Failed(why) => {
                return Err(Outcome::EngineGone(format!(
                    "the engine at {} went away and could not be restarted: {why}",
                    gone.url
                )))
            }
            _ => {}
        }
        let changed = pool.work.notified();
        tokio::select! {
            _ = changed => {}
            _ = task.cancel_notify.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

async fn engine_healthy(st: &AppState, engine: &EngineInfo) -> bool {
    engine
        .server()
        .healthy(&st.http, Duration::from_secs(2))
        .await
}

/// Poll `/slots` (every `every`) until `done` says so of the slot list, or `timeout` passes.
async fn poll_slots(
    st: &AppState,
    engine: &EngineInfo,
    timeout: Duration,
    every: Duration,
    mut done: impl FnMut(&[Slot]) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    let server = engine.server();
    loop {
        if let Ok(slots) = server.slots(&st.http, Duration::from_secs(1)).await {
            if done(&slots) {
                return true;
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
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
            llorch_io::handoff::excerpt(e["message"].as_str().unwrap_or(""), 200)
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
    let r = send(st, task, engine, || {
        engine
            .server()
            .post(&st.http, Api::Detokenize)
            .json(&json!({"tokens": tokens}))
    })
    .await?;
    if !r.status().is_success() {
        return Err(Outcome::EngineError(format!(
            "detokenize answered {}",
            r.status()
        )));
    }
    match guarded(task, st.cfg.stall_timeout, r.json::<Value>()).await? {
        Ok(v) => Ok(v["content"].as_str().unwrap_or("").to_string()),
        Err(e) => Err(Outcome::EngineError(format!("detokenize: {e}"))),
    }
}
