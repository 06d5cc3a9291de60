//! One forwarding path for what llama-server implements itself: chat with
//! tools or structured output, embeddings, rerank, Anthropic Messages,
//! OpenAI Responses (and any chat or completions request with fields beyond
//! the task path's). A checked request body becomes a task like any other
//! (the same queue, replica routing, deadlines, cancel on disconnect,
//! metrics); when a worker takes it, `relay` POSTs the body to the
//! engine's own endpoint and relays the answer, byte for byte, to the
//! handler that admitted it. The handler ([`Reply`]) sees the answer's
//! status first, then its body: one JSON value, or SSE events it may edit
//! (the pool's model name and `system_fingerprint`, a forced tool call)
//! before they go out. Templates, tool-call parsing, JSON schema to grammar,
//! pooling and the Anthropic and Responses translations stay llama-server's.

use crate::adapter::{context_exceeded, watched, Outcome, Progress};
use crate::admission::{admit, DisconnectGuard};
use crate::errors::ApiError;
use crate::events::TaskEvent;
use crate::link::EngineInfo;
use crate::tasks::{CancelReason, Task, TaskRequest};
use crate::{AppState, Pool, Shared};
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// The most bytes of a JSON answer (or of an error body) read from the engine.
pub const MAX_ANSWER_BYTES: usize = 256 * 1024 * 1024;
/// The bytes of an engine's error body kept for the client's message.
const MAX_ERROR_BYTES: usize = 64 * 1024;
/// The tail of an answer kept to read its token counts from.
const TAIL_BYTES: usize = 16 * 1024;

/// What the relay hands the admitting handler.
#[derive(Debug)]
pub enum Piece {
    /// The engine answered 2xx: the stream of [`Piece::Data`] follows.
    Head,
    Data(Bytes),
    /// The task's terminal event (after the data, or instead of it).
    End(TaskEvent),
}

/// A request to relay to one of the engine's endpoints.
pub struct Forward {
    /// The engine's endpoint (`/v1/chat/completions`, `/v1/embeddings`, …).
    pub path: &'static str,
    pub body: Value,
    /// Set `cache_prompt` from the engine's mode (exact mode evaluates every prompt afresh).
    pub generation: bool,
    tx: Mutex<Option<mpsc::UnboundedSender<Piece>>>,
}

impl std::fmt::Debug for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Forward({})", self.path)
    }
}

impl Forward {
    /// Whether llama-server answers this request in one piece at its end
    /// (and notices a hang-up only by polling; see `SilentWait`).
    pub fn silent(&self) -> bool {
        self.body["stream"] != Value::Bool(true)
    }

    fn send(&self, p: Piece) -> bool {
        match self.tx.lock().unwrap().as_ref() {
            Some(tx) => tx.send(p).is_ok(),
            None => false,
        }
    }
    /// The task finished (called once, by [`Task::finish`]).
    pub fn end(&self, ev: &TaskEvent) {
        if let Some(tx) = self.tx.lock().unwrap().take() {
            let _ = tx.send(Piece::End(ev.clone()));
        }
    }
}

/// The worker's half: POST the body to the engine, relay what it answers.
pub(crate) async fn relay(
    st: &AppState,
    task: &Task,
    engine: &EngineInfo,
    f: &Forward,
    p: &mut Progress,
) -> Outcome {
    let mut body = f.body.clone();
    if f.generation {
        body["cache_prompt"] = Value::Bool(engine.batched);
    }
    let bytes = serde_json::to_vec(&body).expect("a JSON value serializes");
    // A connection of its own: a cancel (or the client hanging up) closes it,
    // and llama-server stops an answer nobody waits for.
    let mut resp = match send_owned(st, task, engine, f.path, &bytes).await {
        Ok(r) => r,
        Err(o) => return o,
    };
    let status =
        reqwest::StatusCode::from_u16(resp.status).unwrap_or(reqwest::StatusCode::BAD_GATEWAY);
    if !status.is_success() {
        let mut text = Vec::new();
        loop {
            match watched(st, task, engine, resp.chunk()).await {
                Ok(Some(Ok(b))) if text.len() < MAX_ERROR_BYTES => text.extend_from_slice(&b),
                Ok(Some(Ok(_))) | Ok(None) | Ok(Some(Err(_))) => break,
                Err(o) => return o,
            }
        }
        let text = String::from_utf8_lossy(&text);
        if let Some(msg) = context_exceeded(&text) {
            return Outcome::ContextExceeded(msg);
        }
        let msg = engine_message(&text);
        // An input over the engine's batch or context (embeddings): the
        // client's request, answered like a prompt over the context.
        if msg.contains("too large to process") || msg.contains("exceeds the available context") {
            return Outcome::ContextExceeded(format!(
                "the input does not fit the engine: {msg}; shorten it, or serve a profile with a larger server.ctx_size"
            ));
        }
        return if status.is_client_error() {
            Outcome::Refused(msg)
        } else {
            Outcome::EngineError(format!("llama-server answered {status}: {msg}"))
        };
    }
    f.send(Piece::Head);
    let mut tail: Vec<u8> = Vec::new();
    let mut first = true;
    loop {
        let next = match watched(st, task, engine, resp.chunk()).await {
            Ok(n) => n,
            Err(o) => return o,
        };
        match next {
            Some(Ok(b)) => {
                if first {
                    first = false;
                    st.metrics
                        .ttft_ms
                        .observe(task.admitted_at.elapsed().as_secs_f64() * 1000.0);
                }
                tail.extend_from_slice(&b);
                if tail.len() > 2 * TAIL_BYTES {
                    tail.drain(..tail.len() - TAIL_BYTES);
                }
                p.events += 1;
                if !f.send(Piece::Data(Bytes::from(b))) {
                    task.request_cancel(CancelReason::ClientDisconnected);
                    return Outcome::Canceled(CancelReason::ClientDisconnected);
                }
            }
            Some(Err(e)) => {
                return Outcome::EngineGone(format!("the engine's answer broke off: {e}"))
            }
            None => return Outcome::Finished(summary(&tail)),
        }
    }
}

/// Counts a non-streamed relay in [`crate::Pool::silent_waits`] while it
/// lives: from its send until the engine's slot is idle after a cancel.
pub(crate) struct SilentWait(Arc<Pool>);

impl SilentWait {
    pub(crate) fn new(p: &Arc<Pool>) -> SilentWait {
        p.silent_waits
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        SilentWait(p.clone())
    }
}

impl Drop for SilentWait {
    fn drop(&mut self) {
        self.0
            .silent_waits
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// POST to the engine on a connection of its own (guarded by cancel,
/// deadline and the engine's progress). A failed send to an engine that
/// still answers `/health` is sent again (nothing was generated for it).
async fn send_owned(
    st: &AppState,
    task: &Task,
    engine: &EngineInfo,
    path: &str,
    body: &[u8],
) -> Result<llorch_io::http::OwnedResponse, Outcome> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let fut = llorch_io::http::post_owned(
            &engine.url,
            path,
            engine.api_key.as_deref(),
            body.to_vec(),
        );
        match watched(st, task, engine, fut).await? {
            Ok(r) => return Ok(r),
            Err(e)
                if attempt < 3
                    && engine
                        .server()
                        .healthy(&st.http, Duration::from_secs(2))
                        .await =>
            {
                llorch_io::info!("orchestratord: sending to llama-server failed ({e}); it answers /health, sending again");
            }
            Err(e) => {
                let msg = format!("cannot reach llama-server at {}: {e}", engine.url);
                return Err(match e {
                    llorch_io::http::OwnedError::Connect { .. } => Outcome::NotSent(msg),
                    _ => Outcome::EngineGone(msg),
                });
            }
        }
    }
}

/// llama-server's error message from its error body (or the body itself, shortened).
pub fn engine_message(text: &str) -> String {
    let v: Option<Value> = serde_json::from_str(text).ok();
    let m = v
        .as_ref()
        .and_then(|v| v["error"]["message"].as_str().or(v["message"].as_str()))
        .unwrap_or(text);
    llorch_types::excerpt(m, 500)
}

/// What the end of an answer says about its work, in the adapter's final
/// frame's shape: llama-server's `timings` (every generation answer has
/// them), else the token counts of its `usage`.
fn summary(tail: &[u8]) -> Value {
    let last_value_after = |key: &[u8]| -> Option<Value> {
        let pos = tail.windows(key.len()).rposition(|w| w == key)?;
        serde_json::Deserializer::from_slice(&tail[pos + key.len()..])
            .into_iter::<Value>()
            .next()?
            .ok()
    };
    let timings = last_value_after(b"\"timings\":").unwrap_or(Value::Null);
    let tokens = timings["predicted_n"]
        .as_u64()
        .or_else(|| last_value_after(b"\"completion_tokens\":").and_then(|v| v.as_u64()))
        .or_else(|| last_value_after(b"\"output_tokens\":").and_then(|v| v.as_u64()))
        .unwrap_or(0);
    serde_json::json!({"timings": timings, "tokens_predicted": tokens, "stop_type": "eos"})
}

/// A checked request for an engine endpoint.
pub struct Request {
    pub path: &'static str,
    pub body: Value,
    pub generation: bool,
    /// Text that identifies the prompt (replica affinity).
    pub prefix: String,
}

/// The handler's half: an admitted task whose engine answered 2xx.
pub struct Reply {
    rx: mpsc::UnboundedReceiver<Piece>,
    pub guard: DisconnectGuard,
    pub pool: Arc<Pool>,
}

/// Admit the request on `pool` and wait until the engine answers (or the
/// task ends first: its error, as an [`ApiError`] of the given mapping).
pub async fn start(st: &Shared, pool: &Arc<Pool>, r: Request) -> Result<Reply, ApiError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let fwd = Arc::new(Forward {
        path: r.path,
        body: r.body,
        generation: r.generation,
        tx: Mutex::new(Some(tx)),
    });
    let req = TaskRequest {
        prompt: Some(r.prefix),
        forward: Some(fwd),
        ..TaskRequest::default()
    };
    let task = admit(st, pool, req, None)?;
    let guard = DisconnectGuard(task.clone(), st.clone());
    match rx.recv().await {
        Some(Piece::Head) => Ok(Reply {
            rx,
            guard,
            pool: task.pool.clone(),
        }),
        Some(Piece::End(ev)) => Err(end_error(&ev)),
        Some(Piece::Data(_)) | None => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ENGINE_ERROR",
            "the task ended without an answer",
        )),
    }
}

/// The API error for a task that ended without (the rest of) its answer.
pub fn end_error(ev: &TaskEvent) -> ApiError {
    match ev {
        TaskEvent::Error(e) => crate::openai::event_error(e, crate::openai::Kind::Chat),
        TaskEvent::End(e) if e.canceled => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "CANCELED",
            format!("the request was canceled ({})", e.stop_reason),
        ),
        _ => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ENGINE_ERROR",
            "the answer ended early",
        ),
    }
}

impl Reply {
    /// The whole answer's bytes (at most [`MAX_ANSWER_BYTES`]), once the task ended well.
    async fn body(self) -> Result<Vec<u8>, ApiError> {
        let Reply { mut rx, guard, .. } = self;
        let mut buf: Vec<u8> = Vec::new();
        loop {
            match rx.recv().await {
                Some(Piece::Data(b)) => {
                    if buf.len() + b.len() > MAX_ANSWER_BYTES {
                        return Err(ApiError::new(
                            StatusCode::BAD_GATEWAY,
                            "ENGINE_ERROR",
                            format!("the engine's answer is over {MAX_ANSWER_BYTES} bytes"),
                        ));
                    }
                    buf.extend_from_slice(&b);
                }
                Some(Piece::End(TaskEvent::End(e))) if !e.canceled => break,
                Some(Piece::End(ev)) => return Err(end_error(&ev)),
                Some(Piece::Head) => {}
                None => break,
            }
        }
        drop(guard);
        Ok(buf)
    }

    /// The whole answer as one JSON value.
    pub async fn json(self) -> Result<Value, ApiError> {
        let buf = self.body().await?;
        serde_json::from_slice(&buf).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "ENGINE_ERROR",
                format!("the engine's answer is not JSON: {e}"),
            )
        })
    }

    /// The whole answer, a JSON object, with only its top-level `model`
    /// replaced: the other members pass as the engine wrote them (an
    /// embeddings answer's vectors are not parsed into numbers and printed
    /// again).
    pub async fn json_relabeled(self, model: &str) -> Result<Response, ApiError> {
        let buf = self.body().await?;
        let mut raw: std::collections::BTreeMap<String, Box<serde_json::value::RawValue>> =
            serde_json::from_slice(&buf).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "ENGINE_ERROR",
                    format!("the engine's answer is not a JSON object: {e}"),
                )
            })?;
        if raw.contains_key("model") {
            let m = serde_json::value::to_raw_value(model).expect("a string serializes");
            raw.insert("model".into(), m);
        }
        let body = serde_json::to_vec(&raw).expect("raw values serialize");
        Ok((
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response())
    }

    /// The answer's SSE events, each passed through `edit` (which may
    /// change it, drop it, or add events), then `[DONE]`-style endings as
    /// the engine sent them. An error after the first event becomes the
    /// events `on_error` gives, then the end.
    pub fn sse<E>(self, edit: E, on_error: fn(ApiError) -> Vec<Out>) -> Response
    where
        E: FnMut(Out) -> Vec<Out> + Send + 'static,
    {
        let ended: Arc<Mutex<Option<TaskEvent>>> = Arc::default();
        let ended_w = ended.clone();
        let bytes = futures_util::stream::unfold(self.rx, move |mut rx| {
            let ended = ended_w.clone();
            async move {
                loop {
                    match rx.recv().await {
                        Some(Piece::Data(b)) => return Some((Ok::<_, std::io::Error>(b), rx)),
                        Some(Piece::Head) => {}
                        Some(Piece::End(ev)) => {
                            *ended.lock().unwrap() = Some(ev);
                            return None;
                        }
                        None => return None,
                    }
                }
            }
        });
        struct State<F, E> {
            frames: F,
            guard: DisconnectGuard,
            out: std::collections::VecDeque<Out>,
            edit: E,
            done: bool,
            ended: Arc<Mutex<Option<TaskEvent>>>,
        }
        let state = State {
            frames: Box::pin(bytes).eventsource(),
            guard: self.guard,
            out: Default::default(),
            edit,
            done: false,
            ended,
        };
        let events = futures_util::stream::unfold(state, move |mut s| async move {
            let o = loop {
                if let Some(o) = s.out.pop_front() {
                    break o;
                }
                if s.done {
                    return None;
                }
                match s.frames.next().await {
                    Some(Ok(ev)) => {
                        let event =
                            (!ev.event.is_empty() && ev.event != "message").then_some(ev.event);
                        let more = (s.edit)(Out {
                            event,
                            data: ev.data,
                        });
                        s.out.extend(more);
                    }
                    Some(Err(_)) | None => {
                        s.done = true;
                        let ended = s.ended.lock().unwrap().take();
                        match ended {
                            Some(TaskEvent::End(e)) if !e.canceled => {}
                            Some(ev) => s.out.extend(on_error(end_error(&ev))),
                            None => {}
                        }
                    }
                }
            };
            let mut ev = Event::default().data(o.data);
            if let Some(n) = o.event {
                ev = ev.event(n);
            }
            let _ = &s.guard;
            Some((Ok::<_, std::convert::Infallible>(ev), s))
        });
        Sse::new(events)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
            .into_response()
    }
}

/// One SSE event out: its name (`event:`, none for OpenAI's chunks) and data.
#[derive(Clone, Debug, PartialEq)]
pub struct Out {
    pub event: Option<String>,
    pub data: String,
}

/// Put the pool's names on an engine object: `model` (top level, and in
/// Anthropic's `message` and the Responses API's `response`) and
/// `system_fingerprint` where llama-server writes its own.
pub fn relabel(v: &mut Value, model: &str, fp: &str) {
    if let Some(o) = v.as_object_mut() {
        if o.get("model").is_some_and(Value::is_string) {
            o.insert("model".into(), Value::String(model.into()));
        }
        if o.get("system_fingerprint").is_some_and(Value::is_string) && !fp.is_empty() {
            o.insert("system_fingerprint".into(), Value::String(fp.into()));
        }
        for k in ["message", "response"] {
            if let Some(inner) = o.get_mut(k).and_then(Value::as_object_mut) {
                if inner.get("model").is_some_and(Value::is_string) {
                    inner.insert("model".into(), Value::String(model.into()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_summary_reads_timings_then_usage() {
        let t = br#"data: {"choices":[],"timings":{"predicted_n":7,"prompt_n":3}}

data: [DONE]

"#;
        let s = summary(t);
        assert_eq!(s["tokens_predicted"], 7);
        assert_eq!(s["timings"]["prompt_n"], 3);
        let s = summary(br#"{"usage":{"input_tokens":4,"output_tokens":9}}"#);
        assert_eq!(s["tokens_predicted"], 9);
        assert_eq!(summary(b"garbage")["tokens_predicted"], 0);
        // A truncated tail does not panic.
        assert_eq!(
            summary(br#"{"timings":{"predicted_n":"#)["tokens_predicted"],
            0
        );
    }

    #[test]
    fn relabel_names_the_pool_model_where_llama_server_wrote_its_own() {
        let mut v = json!({"model": "/cache/blob", "system_fingerprint": "b0-x", "choices": []});
        relabel(&mut v, "smol", "fp_1");
        assert_eq!(v["model"], "smol");
        assert_eq!(v["system_fingerprint"], "fp_1");
        let mut v = json!({"type": "message_start", "message": {"model": "/cache/blob"}});
        relabel(&mut v, "smol", "fp_1");
        assert_eq!(v["message"]["model"], "smol");
        assert!(v.get("system_fingerprint").is_none());
        let mut v = json!({"type": "response.created", "response": {"model": "x"}});
        relabel(&mut v, "smol", "");
        assert_eq!(v["response"]["model"], "smol");
        let mut v = json!([1, 2]);
        relabel(&mut v, "smol", "fp");
        assert_eq!(v, json!([1, 2]));
    }

    #[test]
    fn engine_messages_are_read_from_its_error_shape() {
        assert_eq!(
            engine_message(
                r#"{"error":{"code":400,"message":"bad tools","type":"invalid_request_error"}}"#
            ),
            "bad tools"
        );
        assert_eq!(engine_message("plain"), "plain");
    }
}
