//! The OpenAI-compatible endpoints `POST /v1/chat/completions` and
//! `POST /v1/completions` (`GET /v1/models` is [`crate::models`]; streamed
//! answers are shaped in [`crate::openai_stream`]).
//!
//! A request becomes an ordinary task ([`crate::admission::admit`]): the same
//! queue, admission limits, deadlines, cancel-on-disconnect and metrics as
//! `/v1/tasks`, and every token is a frame of llama-server's own stream. This
//! module only translates: OpenAI request → [`TaskRequest`], task events →
//! OpenAI objects or `data:` chunks ending with `data: [DONE]`.
//!
//! Differences from OpenAI, on purpose: `temperature` defaults to 0 and
//! `seed` to the orchestrator's fixed seed (the deterministic profile); `n`
//! must be 1. A request with fields the task path does not serve (tools,
//! `response_format`, penalties, tool turns in the history) is relayed to
//! llama-server's own endpoint instead ([`crate::endpoints`]); the fields
//! of the limits table's ignore list are accepted and ignored; its refuse
//! list is a 400 naming the field.

use crate::admission::admit;
use crate::admission::DisconnectGuard;
use crate::errors::ApiError;
use crate::events::{EndEvent, TaskEvent};
use crate::limits;
use crate::models::{system_fingerprint, unix_now};
use crate::openai_stream::{stream, Head};
use crate::tasks::{ChatTurn, TaskRequest};
use crate::Shared;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

/// A message's `content`: a string, or OpenAI's list of parts (text only).
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// `stop`: one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A completions `prompt`: one string or a list of one.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// `logprobs`: a bool for chat, a count for completions.
#[derive(Deserialize)]
#[serde(untagged)]
enum Logprobs {
    Flag(bool),
    Count(u32),
}

/// The fields both endpoints take (unknown ones are ignored).
#[derive(Deserialize)]
struct OpenAiRequest {
    model: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    prompt: Option<Prompt>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    logprobs: Option<Logprobs>,
    top_logprobs: Option<i64>,
    /// llama-server's extension (also vLLM's): keep generating past end-of-sequence.
    ignore_eos: Option<bool>,
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Chat,
    Text,
}

/// Checked request: the task, and how to answer.
struct Plan {
    task: TaskRequest,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
    model: String,
    pool: std::sync::Arc<crate::Pool>,
}

fn plan(st: &Shared, kind: Kind, body: &[u8]) -> Result<Plan, ApiError> {
    let r: OpenAiRequest = crate::errors::parse_body(body)?;
    let cfg = &st.cfg;
    let Some(model) = r.model.clone() else {
        return Err(ApiError::invalid(
            "model",
            "you must provide a model parameter",
        ));
    };
    let pool = crate::admission::route(st, Some(&model), "model", "model_not_found")?;
    crate::endpoints::require(
        &pool,
        crate::link::Serves::Generation,
        match kind {
            Kind::Chat => "chat completions",
            Kind::Text => "completions",
        },
    )?;
    if r.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "only n=1 is supported"));
    }
    let (prompt, messages) = match kind {
        Kind::Chat => (None, Some(chat_messages(&r, cfg.max_prompt_chars)?)),
        Kind::Text => (Some(text_prompt(&r, cfg.max_prompt_chars)?), None),
    };
    let (max_field, max) = match (r.max_completion_tokens, r.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    let max_tokens =
        limits::check_max_tokens(max_field, max, cfg.default_max_tokens, cfg.max_tokens_limit)?;
    let temperature = limits::check_temperature(r.temperature, limits::TEMPERATURE_MAX)?;
    let top_p = limits::check_top_p(r.top_p)?;
    let seed = match r.seed {
        None => cfg.default_seed,
        Some(s) if s >= 0 => s as u64,
        Some(_) => {
            return Err(ApiError::invalid(
                "seed",
                "seed must be a non-negative integer",
            ))
        }
    };
    let stop = match r.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    limits::check_stop(&stop)?;
    let (logprobs, n_probs) = logprobs(kind, r.logprobs, r.top_logprobs)?;
    Ok(Plan {
        task: TaskRequest {
            prompt,
            messages,
            max_tokens,
            seed,
            temperature,
            deadline_ms: None,
            ignore_eos: r.ignore_eos.unwrap_or(false),
            stop,
            grammar: None,
            top_p,
            n_probs,
            forward: None,
        },
        stream: r.stream.unwrap_or(false),
        include_usage: r
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        logprobs,
        model,
        pool,
    })
}

/// Chat completions' `messages`: a non-empty list of text messages whose
/// roles the limits table knows, at most `max_chars` characters in all.
fn chat_messages(r: &OpenAiRequest, max_chars: usize) -> Result<Vec<ChatTurn>, ApiError> {
    if r.prompt.is_some() {
        return Err(ApiError::invalid(
            "prompt",
            "chat completions take `messages`, not `prompt`",
        ));
    }
    let msgs = r
        .messages
        .as_ref()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::invalid("messages", "`messages` must be a non-empty list"))?;
    let mut out = Vec::new();
    let mut chars = 0;
    for (i, m) in msgs.iter().enumerate() {
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(p)) => {
                let mut s = String::new();
                for part in p {
                    if part.kind != "text" {
                        return Err(ApiError::invalid(
                            format!("messages[{i}].content"),
                            format!(
                                "content parts of type `{}` are not supported (text only)",
                                llorch_types::excerpt(&part.kind, 32)
                            ),
                        ));
                    }
                    s.push_str(part.text.as_deref().unwrap_or(""));
                }
                s
            }
        };
        chars += content.chars().count();
        out.push(ChatTurn {
            role: limits::check_role(i, &m.role)?,
            content,
        });
    }
    limits::check_prompt_chars("messages", chars, max_chars)?;
    Ok(out)
}

/// Completions' `prompt`: one non-empty text of at most `max_chars` characters.
fn text_prompt(r: &OpenAiRequest, max_chars: usize) -> Result<String, ApiError> {
    if r.messages.is_some() {
        return Err(ApiError::invalid(
            "messages",
            "completions take `prompt`, not `messages`",
        ));
    }
    let p = match &r.prompt {
        Some(Prompt::One(p)) => p.clone(),
        Some(Prompt::Many(v)) if v.len() == 1 => v[0].clone(),
        Some(Prompt::Many(_)) => {
            return Err(ApiError::invalid(
                "prompt",
                "only one prompt per request is supported",
            ))
        }
        None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
    };
    if p.is_empty() {
        return Err(ApiError::invalid("prompt", "prompt is empty"));
    }
    limits::check_prompt_chars("prompt", p.chars().count(), max_chars)?;
    Ok(p)
}

/// Log-probabilities as each API spells them: chat's `logprobs: true` with
/// `top_logprobs` 0 to 20, completions' `logprobs` count 0 to 5; whether to
/// answer with them, and llama-server's `n_probs`.
fn logprobs(
    kind: Kind,
    flag: Option<Logprobs>,
    top: Option<i64>,
) -> Result<(bool, Option<u32>), ApiError> {
    Ok(match (kind, flag, top) {
        (_, None | Some(Logprobs::Flag(false)), None) => (false, None),
        (Kind::Chat, Some(Logprobs::Flag(true)), top) => {
            let top = top.unwrap_or(0);
            if !(0..=20).contains(&top) {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "top_logprobs must be between 0 and 20",
                ));
            }
            (true, Some(top.max(1) as u32))
        }
        (Kind::Chat, _, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ))
        }
        (Kind::Text, Some(Logprobs::Count(n)), None) if n <= 5 => (true, Some(n.max(1))),
        (Kind::Text, Some(Logprobs::Flag(false)), _) | (Kind::Text, None, Some(_)) => {
            return Err(ApiError::invalid(
                "logprobs",
                "completions take logprobs as a count from 0 to 5",
            ))
        }
        (_, Some(_), _) => {
            return Err(ApiError::invalid(
                "logprobs",
                match kind {
                    Kind::Chat => "chat completions take logprobs as true or false",
                    Kind::Text => "completions take logprobs as a count from 0 to 5",
                },
            ))
        }
    })
}

/// OpenAI's `finish_reason` for our end: `stop` or `length`.
pub(crate) fn finish_reason(end: &EndEvent) -> &'static str {
    match end.stop_reason.as_str() {
        "limit" => "length",
        _ => "stop",
    }
}

pub(crate) fn usage(end: &EndEvent) -> Value {
    json!({
        "prompt_tokens": end.prompt_tokens,
        "completion_tokens": end.tokens_out,
        "total_tokens": end.prompt_tokens + end.tokens_out,
    })
}

/// OpenAI's logprob entries from llama-server's `completion_probabilities`.
pub(crate) fn chat_logprobs(probs: &[Value]) -> Vec<Value> {
    let entry = |p: &Value| {
        json!({
            "token": p["token"],
            "logprob": p["logprob"],
            "bytes": p["bytes"],
        })
    };
    probs
        .iter()
        .map(|p| {
            let mut e = entry(p);
            e["top_logprobs"] = Value::Array(
                p["top_logprobs"]
                    .as_array()
                    .map(|v| v.iter().map(entry).collect())
                    .unwrap_or_default(),
            );
            e
        })
        .collect()
}

/// The error object of an error event (in a stream, or as a response).
pub(crate) fn event_error(e: &crate::events::ErrorEvent, kind: Kind) -> ApiError {
    if e.code == crate::adapter::CONTEXT_LENGTH_EXCEEDED {
        // The client's error: OpenAI's own code and shape.
        return ApiError::invalid(
            if kind == Kind::Chat {
                "messages"
            } else {
                "prompt"
            },
            e.message.clone(),
        )
        .with_code("context_length_exceeded");
    }
    if e.code == crate::adapter::ENGINE_REFUSED {
        // llama-server refused the request as the client's error: its words.
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            e.message.clone(),
        );
    }
    let status = match e.code.as_str() {
        "ENGINE_ERROR" => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let code: &'static str = match e.code.as_str() {
        "ENGINE_CRASHED" => "ENGINE_CRASHED",
        "ENGINE_STALLED" => "ENGINE_STALLED",
        "ENGINE_FAILED" => "ENGINE_FAILED",
        "DRAINING" => "DRAINING",
        "ENGINE_NOT_READY" => "ENGINE_NOT_READY",
        _ => "ENGINE_ERROR",
    };
    ApiError::new(status, code, e.message.clone())
}

pub(crate) fn error_json(e: ApiError) -> Value {
    let status = e.status.as_u16();
    json!({"error": {
        "message": e.message,
        "type": if status >= 500 { "server_error" } else { "invalid_request_error" },
        "param": e.field,
        "code": e.code,
    }})
}

pub async fn chat_completions(
    State(st): State<Shared>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    complete(st, Kind::Chat, &body).await
}

pub async fn completions(
    State(st): State<Shared>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    complete(st, Kind::Text, &body).await
}

/// The fields the task path serves; a request with any other (tools,
/// `response_format`, penalties, …) goes to llama-server's own endpoint
/// through [`crate::endpoints::openai_forward`].
const TASK_PATH_FIELDS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "ignore_eos",
];

/// Whether the task path serves this request: only its fields, text
/// content, and no tool turns in the history.
fn task_path_serves(v: &serde_json::Map<String, Value>) -> bool {
    let plain_message = |m: &Value| {
        m.as_object().is_some_and(|o| {
            o.keys()
                .all(|k| k == "role" || k == "content" || k == "name")
                && o.get("role").and_then(Value::as_str) != Some("tool")
        })
    };
    v.keys().all(|k| {
        TASK_PATH_FIELDS.contains(&k.as_str())
            || crate::limits::IGNORED_FIELDS.iter().any(|(f, _)| f == k)
    }) && v
        .get("messages")
        .and_then(Value::as_array)
        .is_none_or(|ms| ms.iter().all(plain_message))
}

async fn complete(st: Shared, kind: Kind, body: &[u8]) -> Result<Response, ApiError> {
    // A body that cannot be read as the request (nested too deep, not an
    // object, not JSON) is a 400, never read again as a smaller request.
    let mut v = crate::errors::parse_body::<serde_json::Map<String, Value>>(body)
        .inspect_err(|_| st.metrics.reject("invalid"))?;
    crate::limits::check_fields(&mut v).inspect_err(|_| st.metrics.reject("invalid"))?;
    if !task_path_serves(&v) {
        return crate::endpoints::openai_forward(st.clone(), kind == Kind::Chat, body)
            .await
            .inspect_err(|_| st.metrics.reject("invalid"));
    }
    let Plan {
        task: req,
        stream: streaming,
        include_usage,
        logprobs,
        model,
        pool,
    } = plan(&st, kind, body).inspect_err(|_| st.metrics.reject("invalid"))?;
    let task = admit(&st, &pool, req, None)?;
    let rx = task
        .take_stream()
        .expect("a new task's stream is not taken");
    let guard = DisconnectGuard(task.clone(), st.clone());
    // Known once the pool's engine has been seen ready (a lazy pool: after its first load).
    let fp = pool
        .last_engine
        .lock()
        .unwrap()
        .as_ref()
        .map(system_fingerprint)
        .unwrap_or_default();
    let (id, object) = match kind {
        Kind::Chat => (format!("chatcmpl-{}", task.id), "chat.completion"),
        Kind::Text => (format!("cmpl-{}", task.id), "text_completion"),
    };
    let created = unix_now();
    let head = Head {
        id,
        created,
        model,
        fp,
        kind,
        logprobs,
    };
    let mut rx = rx;
    if streaming {
        // Headers go out with the first token (as llama-server does): an
        // error before it is an HTTP error in OpenAI's shape (a prompt over
        // the context is the client's 400), not a 200 stream that fails.
        let mut first = Vec::new();
        loop {
            match rx.recv().await {
                Some(ev @ TaskEvent::Started(_)) => first.push(ev),
                Some(TaskEvent::Error(e)) => return Err(event_error(&e, kind)),
                Some(ev) => {
                    first.push(ev);
                    break;
                }
                None => break,
            }
        }
        return Ok(stream(head, include_usage, first, rx, guard));
    }
    let mut text = String::new();
    let mut probs: Vec<Value> = Vec::new();
    let end = loop {
        match rx.recv().await {
            Some(TaskEvent::Token(t)) => {
                text.push_str(&t.t);
                probs.extend(t.probs.unwrap_or_default());
            }
            Some(TaskEvent::End(e)) => break e,
            Some(TaskEvent::Error(e)) => return Err(event_error(&e, kind)),
            Some(TaskEvent::Started(_)) => {}
            None => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ENGINE_ERROR",
                    "the task ended without a result",
                ))
            }
        }
    };
    drop(guard);
    if end.canceled {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "CANCELED",
            format!("the request was canceled ({})", end.stop_reason),
        ));
    }
    let choice = match kind {
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": if head.logprobs { json!({"content": chat_logprobs(&probs)}) } else { Value::Null },
            "finish_reason": finish_reason(&end),
        }),
        Kind::Text => json!({
            "index": 0,
            "text": text,
            "logprobs": if head.logprobs { text_logprobs(&probs) } else { Value::Null },
            "finish_reason": finish_reason(&end),
        }),
    };
    Ok(Json(json!({
        "id": head.id,
        "object": object,
        "created": head.created,
        "model": head.model,
        "system_fingerprint": head.fp,
        "choices": [choice],
        "usage": usage(&end),
    }))
    .into_response())
}

/// The legacy completions `logprobs` object.
pub(crate) fn text_logprobs(probs: &[Value]) -> Value {
    let tokens: Vec<Value> = probs.iter().map(|p| p["token"].clone()).collect();
    let lps: Vec<Value> = probs.iter().map(|p| p["logprob"].clone()).collect();
    let tops: Vec<Value> = probs
        .iter()
        .map(|p| {
            let mut m = serde_json::Map::new();
            for t in p["top_logprobs"].as_array().into_iter().flatten() {
                if let Some(k) = t["token"].as_str() {
                    m.insert(k.to_string(), t["logprob"].clone());
                }
            }
            Value::Object(m)
        })
        .collect();
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": Value::Null})
}
