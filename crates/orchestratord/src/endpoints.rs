//! The endpoints whose work llama-server does itself, through the one
//! forwarding path ([`crate::forward`]): chat and completions requests that
//! use more than the task path serves (tools, structured output, penalties,
//! …), `POST /v1/embeddings`, `POST /v1/rerank`, `POST /v1/messages`
//! (Anthropic Messages) and `POST /v1/responses` (OpenAI Responses).
//!
//! Each handler checks the request at the edge (a JSON object, the pool its
//! `model` names and what that pool serves, the limits table, the fields
//! refused or ignored), fills in the deterministic defaults (`temperature`
//! 0, the fixed `seed`, `max_tokens`), and relays the body. Errors come in
//! the endpoint's own shape (Anthropic's for `/v1/messages`, see
//! [`crate::errors::anthropic_shape`]).

use crate::errors::{parse_body, ApiError};
use crate::forward::{self, Out, Reply, Request};
use crate::limits;
use crate::link::Serves;
use crate::tools::{self, Choice, Forced};
use crate::{Pool, Shared};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// What a pool serves (a pool whose engine was never seen: generation).
pub fn serves(pool: &Pool) -> Serves {
    pool.last_engine
        .lock()
        .unwrap()
        .as_ref()
        .map(|e| e.serves())
        .unwrap_or(Serves::Generation)
}

/// A 400 unless the pool serves `want` (an embedding pool takes no chat, and the reverse).
pub fn require(pool: &Pool, want: Serves, endpoint: &str) -> Result<(), ApiError> {
    let has = serves(pool);
    if has == want {
        return Ok(());
    }
    let hint = match want {
        Serves::Generation => "name a pool that generates text",
        Serves::Embeddings => "name a pool whose profile sets `server.embeddings: true`",
        Serves::Rerank => "name a pool whose profile sets `server.embeddings: true` and `server.pooling: rank` with a reranking model",
    };
    Err(ApiError::invalid(
        "model",
        format!(
            "pool `{}` serves {} ({}), not {endpoint}; {hint} (GET /v1/models says what each pool serves)",
            pool.group,
            has.as_str(),
            has.endpoints().join(", ")
        ),
    ))
}

/// The request body as a JSON object.
fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    parse_body::<Map<String, Value>>(body)
}

/// The pool `model` names (required).
fn pool_of(st: &Shared, body: &Map<String, Value>) -> Result<(String, Arc<Pool>), ApiError> {
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                "model",
                "you must provide a model parameter",
            ))
        }
        Some(_) => return Err(ApiError::invalid("model", "`model` must be a string")),
    };
    let pool = crate::admission::route(st, Some(&model), "model", "model_not_found")?;
    Ok((model, pool))
}

/// Characters of the text fields a prompt is made of.
fn prompt_chars(body: &Map<String, Value>) -> usize {
    fn count(v: &Value) -> usize {
        match v {
            Value::String(s) => s.chars().count(),
            Value::Array(a) => a.iter().map(count).sum(),
            Value::Object(o) => o.values().map(count).sum(),
            _ => 0,
        }
    }
    [
        "messages",
        "prompt",
        "input",
        "system",
        "instructions",
        "tools",
    ]
    .iter()
    .filter_map(|k| body.get(*k))
    .map(count)
    .sum()
}

/// Which API a generation request speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    OpenAi,
    Anthropic,
}

/// The limits table and the deterministic defaults for a generation request.
fn check_generation(
    st: &Shared,
    body: &mut Map<String, Value>,
    max_fields: &[&'static str],
    api: Api,
) -> Result<(), ApiError> {
    let cfg = &st.cfg;
    limits::check_fields(body)?;
    let mut any = false;
    for f in max_fields {
        match body.get(*f) {
            None | Some(Value::Null) => {}
            Some(v) => {
                any = true;
                let ok = v
                    .as_i64()
                    .is_some_and(|m| m >= 1 && m <= cfg.max_tokens_limit as i64);
                if !ok {
                    return Err(ApiError::invalid(
                        *f,
                        format!(
                            "{f} must be between 1 and {} (got {v})",
                            cfg.max_tokens_limit
                        ),
                    ));
                }
            }
        }
    }
    if !any {
        if api == Api::Anthropic {
            return Err(ApiError::invalid(
                "max_tokens",
                "max_tokens: Field required",
            ));
        }
        body.insert(max_fields[0].into(), json!(cfg.default_max_tokens));
    }
    let t_max = if api == Api::Anthropic { 1.0 } else { 2.0 };
    match body.get("temperature") {
        None | Some(Value::Null) => {
            body.insert("temperature".into(), json!(0.0));
        }
        Some(t) if t.as_f64().is_some_and(|t| (0.0..=t_max).contains(&t)) => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature must be between 0 and {t_max}"),
            ))
        }
    }
    if let Some(p) = body.get("top_p").filter(|v| !v.is_null()) {
        if !p.as_f64().is_some_and(|p| (0.0..=1.0).contains(&p)) {
            return Err(ApiError::invalid("top_p", "top_p must be between 0 and 1"));
        }
    }
    if api == Api::OpenAi {
        match body.get("seed") {
            None | Some(Value::Null) => {
                body.insert("seed".into(), json!(cfg.default_seed));
            }
            Some(s) if s.as_u64().is_some() => {}
            Some(_) => {
                return Err(ApiError::invalid(
                    "seed",
                    "seed must be a non-negative integer",
                ))
            }
        }
    }
    let stop_field = if api == Api::Anthropic {
        "stop_sequences"
    } else {
        "stop"
    };
    let stop: Vec<String> = match body.get(stop_field) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
            .iter()
            .map(|s| s.as_str().unwrap_or("").to_string())
            .collect(),
        Some(_) => {
            return Err(ApiError::invalid(
                stop_field,
                format!("{stop_field} must be a string or a list of strings"),
            ))
        }
    };
    limits::check_stop(&stop).map_err(|mut e| {
        e.field = Some(stop_field.into());
        e
    })?;
    let chars = prompt_chars(body);
    if chars > cfg.max_prompt_chars {
        let field = ["messages", "input", "prompt"]
            .into_iter()
            .find(|k| body.contains_key(*k))
            .unwrap_or("body");
        return Err(ApiError::invalid(
            field,
            format!(
                "the request's text holds {chars} characters; at most {}",
                cfg.max_prompt_chars
            ),
        ));
    }
    Ok(())
}

/// `messages[i].role` for OpenAI chat (the limits table's roles).
fn check_chat_messages(body: &Map<String, Value>) -> Result<(), ApiError> {
    let msgs = body
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::invalid("messages", "`messages` must be a non-empty list"))?;
    for (i, m) in msgs.iter().enumerate() {
        limits::check_role(i, m["role"].as_str().unwrap_or(""))?;
    }
    Ok(())
}

/// The system fingerprint of a pool's engine (empty before it was seen).
fn fingerprint(pool: &Pool) -> String {
    pool.last_engine
        .lock()
        .unwrap()
        .as_ref()
        .map(crate::openai::system_fingerprint)
        .unwrap_or_default()
}

/// Relay, then answer with the JSON (edited) or the SSE events (each edited).
async fn relay(
    st: &Shared,
    pool: &Arc<Pool>,
    req: Request,
    stream: bool,
    mut edit_json: impl FnMut(&mut Value),
    edit_event: impl FnMut(Out) -> Vec<Out> + Send + 'static,
    on_error: fn(ApiError) -> Vec<Out>,
) -> Result<Response, ApiError> {
    let reply: Reply = forward::start(st, pool, req).await?;
    if stream {
        return Ok(reply.sse(edit_event, on_error));
    }
    let mut v = reply.json().await?;
    edit_json(&mut v);
    Ok(Json(v).into_response())
}

/// An OpenAI error in a stream: one `data: {"error": …}` event.
fn openai_stream_error(e: ApiError) -> Vec<Out> {
    vec![Out {
        event: None,
        data: crate::openai::error_json(e).to_string(),
    }]
}

/// Edit each JSON event with `f` (events that are not JSON, like `[DONE]`, pass).
fn each_json(mut f: impl FnMut(Value) -> Vec<Value> + Send) -> impl FnMut(Out) -> Vec<Out> + Send {
    move |o: Out| match serde_json::from_str::<Value>(&o.data) {
        Ok(v) => f(v)
            .into_iter()
            .map(|v| Out {
                event: o.event.clone(),
                data: v.to_string(),
            })
            .collect(),
        Err(_) => vec![o],
    }
}

/// A chat or completions request with fields the task path does not serve:
/// llama-server's own `/v1/chat/completions` or `/v1/completions`.
pub async fn openai_forward(st: Shared, chat: bool, raw: &[u8]) -> Result<Response, ApiError> {
    let mut body = object(raw)?;
    let (model, pool) = pool_of(&st, &body)?;
    require(
        &pool,
        Serves::Generation,
        if chat {
            "chat completions"
        } else {
            "completions"
        },
    )?;
    check_generation(
        &st,
        &mut body,
        &["max_completion_tokens", "max_tokens"],
        Api::OpenAi,
    )?;
    if let Some(v) = body.remove("max_completion_tokens") {
        body.insert("max_tokens".into(), v);
    }
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let mut forced: Option<Forced> = None;
    if chat {
        check_chat_messages(&body)?;
        let tools = match body.get("tools") {
            None | Some(Value::Null) => Vec::new(),
            Some(t) => tools::read_tools(t)?,
        };
        let choice = tools::read_choice(body.get("tool_choice"), &tools)?;
        if choice == Choice::None || tools.is_empty() {
            // llama-server takes only a string tool_choice.
            if body.get("tool_choice").is_some_and(|c| !c.is_string()) {
                body.remove("tool_choice");
            }
        }
        forced = Forced::of(&choice, &tools);
        if let Some(f) = &forced {
            f.apply(&mut body);
        }
    } else if body.get("prompt").is_none() {
        return Err(ApiError::invalid("prompt", "`prompt` is required"));
    }
    let prefix = affinity_prefix(&body);
    let fp = fingerprint(&pool);
    let path = if chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let call_id = format!("call_{}", st.new_task_id());
    let (m1, f1) = (model.clone(), fp.clone());
    let forced_json = forced.clone();
    let id_json = call_id.clone();
    let mut editor = forced.map(|f| f.stream_editor(call_id));
    relay(
        &st,
        &pool,
        Request {
            path,
            body: Value::Object(body),
            generation: true,
            prefix,
        },
        stream,
        move |v| {
            forward::relabel(v, &m1, &f1);
            if let Some(f) = &forced_json {
                f.edit_response(v, &id_json);
            }
        },
        each_json(move |mut v| {
            forward::relabel(&mut v, &model, &fp);
            match editor.as_mut() {
                Some(e) => e.chunk(v),
                None => vec![v],
            }
        }),
        openai_stream_error,
    )
    .await
}

/// The text a request's replica affinity is taken from.
fn affinity_prefix(body: &Map<String, Value>) -> String {
    let mut s = String::new();
    for k in ["system", "instructions", "messages", "prompt", "input"] {
        if let Some(v) = body.get(k) {
            s.push_str(&v.to_string());
        }
        if s.len() > crate::pool::AFFINITY_PREFIX_CHARS * 4 {
            break;
        }
    }
    s.chars().take(crate::pool::AFFINITY_PREFIX_CHARS).collect()
}

/// `POST /v1/embeddings`: OpenAI's embeddings from an embedding pool.
pub async fn embeddings(
    State(st): State<Shared>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let mut body = object(&raw)?;
    let (model, pool) = pool_of(&st, &body)?;
    require(&pool, Serves::Embeddings, "/v1/embeddings")?;
    limits::check_fields(&mut body)?;
    if body.get("dimensions").is_some_and(|d| !d.is_null()) {
        return Err(ApiError::invalid(
            "dimensions",
            "`dimensions` is not supported: vectors have the model's own size (n_embd)",
        ));
    }
    match body.get("encoding_format") {
        None | Some(Value::Null) => {}
        Some(f) if f == "float" || f == "base64" => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "encoding_format",
                "encoding_format is `float` or `base64`",
            ))
        }
    }
    check_inputs(&st, body.get("input"), "input")?;
    let prefix = affinity_prefix(&body);
    let req = Request {
        path: "/v1/embeddings",
        body: Value::Object(body),
        generation: false,
        prefix,
    };
    forward::start(&st, &pool, req)
        .await?
        .json_relabeled(&model)
        .await
}

/// An embeddings `input` (or rerank `documents`): a non-empty string, list
/// of strings, token list or list of token lists, within the limits.
fn check_inputs(st: &Shared, v: Option<&Value>, field: &str) -> Result<(), ApiError> {
    let bad = || {
        ApiError::invalid(
            field,
            format!(
                "`{field}` is a non-empty string, a list of them, or token ids (at most {} inputs)",
                limits::EMBED_INPUTS
            ),
        )
    };
    let too_long = |n: usize| {
        ApiError::invalid(
            field,
            format!(
                "an input holds {n} characters; at most {}",
                st.cfg.max_prompt_chars
            ),
        )
    };
    match v {
        Some(Value::String(s)) if !s.is_empty() => {
            let n = s.chars().count();
            if n > st.cfg.max_prompt_chars {
                return Err(too_long(n));
            }
            Ok(())
        }
        Some(Value::Array(a)) if !a.is_empty() && a.len() <= limits::EMBED_INPUTS => {
            for x in a {
                match x {
                    Value::String(s) if !s.is_empty() => {
                        let n = s.chars().count();
                        if n > st.cfg.max_prompt_chars {
                            return Err(too_long(n));
                        }
                    }
                    Value::Number(_) => {}
                    Value::Array(t) if !t.is_empty() && t.iter().all(Value::is_u64) => {}
                    _ => return Err(bad()),
                }
            }
            Ok(())
        }
        _ => Err(bad()),
    }
}

/// `POST /v1/rerank`: scores of documents for a query, from a reranking pool.
pub async fn rerank(
    State(st): State<Shared>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let mut body = object(&raw)?;
    let (model, pool) = pool_of(&st, &body)?;
    require(&pool, Serves::Rerank, "/v1/rerank")?;
    limits::check_fields(&mut body)?;
    match body.get("query") {
        Some(Value::String(q)) if !q.is_empty() && q.chars().count() <= st.cfg.max_prompt_chars => {
        }
        _ => return Err(ApiError::invalid("query", "`query` is a non-empty string")),
    }
    check_inputs(&st, body.get("documents"), "documents")?;
    let prefix = affinity_prefix(&body);
    let req = Request {
        path: "/v1/rerank",
        body: Value::Object(body),
        generation: false,
        prefix,
    };
    forward::start(&st, &pool, req)
        .await?
        .json_relabeled(&model)
        .await
}

/// `POST /v1/responses` (OpenAI Responses): text `input` (a string or a
/// list of messages) and `instructions`, plain or streamed; llama-server
/// translates it to chat and back.
pub async fn responses(
    State(st): State<Shared>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let mut body = object(&raw)?;
    let (model, pool) = pool_of(&st, &body)?;
    require(&pool, Serves::Generation, "/v1/responses")?;
    check_generation(&st, &mut body, &["max_output_tokens"], Api::OpenAi)?;
    match body.get("input") {
        Some(Value::String(s)) if !s.is_empty() => {}
        Some(Value::Array(a)) if !a.is_empty() => {}
        _ => {
            return Err(ApiError::invalid(
                "input",
                "`input` is a non-empty string or list of input items",
            ))
        }
    }
    match body.get("tool_choice") {
        None | Some(Value::Null) => {}
        Some(c) if c == "auto" || c == "none" => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "tool_choice",
                "/v1/responses takes tool_choice `auto` or `none`; a forced tool call is served on /v1/chat/completions and /v1/messages",
            ))
        }
    }
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let prefix = affinity_prefix(&body);
    let m1 = model.clone();
    relay(
        &st,
        &pool,
        Request {
            path: "/v1/responses",
            body: Value::Object(body),
            generation: true,
            prefix,
        },
        stream,
        move |v| forward::relabel(v, &m1, ""),
        each_json({
            let mut ed = ResponsesStream::default();
            move |mut v| {
                forward::relabel(&mut v, &model, "");
                ed.complete(&mut v, &model);
                vec![v]
            }
        }),
        |e| {
            vec![Out {
                event: Some("error".into()),
                data:
                    json!({"type": "error", "code": e.code, "message": e.message, "param": e.field})
                        .to_string(),
            }]
        },
    )
    .await
}

/// Completes llama-server's Responses events to OpenAI's schema, which
/// clients' stream accumulators rely on: every event's `sequence_number`,
/// the `output_index` and `content_index` of item and content events, and
/// the `response` object's `output`, `model` and `created_at`.
#[derive(Default)]
struct ResponsesStream {
    seq: u64,
    items: u64,
    parts: u64,
    created_at: u64,
}

impl ResponsesStream {
    fn complete(&mut self, v: &mut Value, model: &str) {
        let Some(o) = v.as_object_mut() else {
            return;
        };
        let kind = o
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        o.entry("sequence_number").or_insert(json!(self.seq));
        self.seq += 1;
        if kind == "response.output_item.added" {
            self.items += 1;
            self.parts = 0;
        }
        if kind == "response.content_part.added" {
            self.parts += 1;
        }
        if kind.starts_with("response.output_item.")
            || kind.starts_with("response.content_part.")
            || kind.starts_with("response.output_text.")
            || kind.starts_with("response.function_call_arguments.")
        {
            o.entry("output_index")
                .or_insert(json!(self.items.saturating_sub(1)));
        }
        if kind.starts_with("response.content_part.") || kind.starts_with("response.output_text.") {
            o.entry("content_index")
                .or_insert(json!(self.parts.saturating_sub(1)));
        }
        if let Some(r) = o.get_mut("response").and_then(Value::as_object_mut) {
            if self.created_at == 0 {
                self.created_at = r
                    .get("created_at")
                    .and_then(Value::as_u64)
                    .unwrap_or_else(crate::openai::unix_now);
            }
            r.entry("output").or_insert(json!([]));
            r.entry("model").or_insert(json!(model));
            r.entry("created_at").or_insert(json!(self.created_at));
        }
    }
}

/// `POST /v1/messages` (Anthropic Messages): `system`, `messages`,
/// `max_tokens`, `stop_sequences`, `temperature`, `tools`, streaming with
/// Anthropic's events; llama-server translates it. A forced tool
/// (`tool_choice` `any` or `tool`) is asked as an OpenAI chat request with
/// the call's schema ([`crate::tools`]) and answered as a `tool_use` block.
pub async fn messages(
    State(st): State<Shared>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let mut body = object(&raw)?;
    let (model, pool) = pool_of(&st, &body)?;
    require(&pool, Serves::Generation, "/v1/messages")?;
    check_generation(&st, &mut body, &["max_tokens"], Api::Anthropic)?;
    let msgs = body
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::invalid("messages", "messages: a non-empty list is required"))?;
    for (i, m) in msgs.iter().enumerate() {
        if !matches!(m["role"].as_str(), Some("user" | "assistant")) {
            return Err(ApiError::invalid(
                format!("messages.{i}.role"),
                format!("messages.{i}.role: Input should be 'user' or 'assistant'"),
            ));
        }
    }
    let tools = anthropic_tools(&body)?;
    let forced = match body.get("tool_choice") {
        None | Some(Value::Null) => None,
        Some(c) => match c["type"].as_str() {
            Some("auto") | Some("none") => None,
            Some("any") => Forced::of(&Choice::Required, &tools),
            Some("tool") => {
                let name = c["name"].as_str().unwrap_or("");
                let choice = tools::read_choice(
                    Some(&json!({"type": "function", "function": {"name": name}})),
                    &tools,
                )
                .map_err(|mut e| {
                    e.field = Some("tool_choice".into());
                    e
                })?;
                Forced::of(&choice, &tools)
            }
            _ => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "tool_choice.type is `auto`, `any`, `tool` or `none`",
                ))
            }
        },
    };
    if body.get("tool_choice").is_some_and(|c| c["type"] == "any") && tools.is_empty() {
        return Err(ApiError::invalid(
            "tool_choice",
            "tool_choice `any` needs `tools`",
        ));
    }
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if let Some(f) = forced {
        return crate::anthropic::forced_call(&st, &pool, &model, body, f, stream).await;
    }
    let prefix = affinity_prefix(&body);
    let m1 = model.clone();
    relay(
        &st,
        &pool,
        Request {
            path: "/v1/messages",
            body: Value::Object(body),
            generation: true,
            prefix,
        },
        stream,
        move |v| forward::relabel(v, &m1, ""),
        each_json(move |mut v| {
            forward::relabel(&mut v, &model, "");
            vec![v]
        }),
        |e| {
            vec![Out {
                event: Some("error".into()),
                data: crate::errors::anthropic_error_body(&e).to_string(),
            }]
        },
    )
    .await
}

/// Anthropic's `tools` (`name`, `description`, `input_schema`) as [`tools::Tool`]s.
fn anthropic_tools(body: &Map<String, Value>) -> Result<Vec<tools::Tool>, ApiError> {
    let Some(list) = body.get("tools").filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or_else(|| ApiError::invalid("tools", "`tools` must be a list"))?;
    let as_openai: Vec<Value> = list
        .iter()
        .map(|t| {
            json!({"type": if t.get("type").is_none_or(|k| k == "custom") { "function" } else { "unsupported" },
                   "function": {"name": t["name"], "description": t["description"], "parameters": t["input_schema"]}})
        })
        .collect();
    tools::read_tools(&Value::Array(as_openai))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_events_get_the_indices_clients_accumulate_by() {
        let mut ed = ResponsesStream::default();
        let mut evs = vec![
            json!({"type": "response.created", "response": {"id": "r", "status": "in_progress"}}),
            json!({"type": "response.output_item.added", "item": {"type": "message", "content": []}}),
            json!({"type": "response.content_part.added", "part": {"type": "output_text", "text": ""}}),
            json!({"type": "response.output_text.delta", "delta": "Hi"}),
            json!({"type": "response.completed", "response": {"id": "r", "output": [1], "created_at": 5}}),
        ];
        for v in &mut evs {
            ed.complete(v, "smol");
        }
        assert_eq!(evs[0]["response"]["output"], json!([]));
        assert_eq!(evs[0]["response"]["model"], "smol");
        assert_eq!(evs[3]["output_index"], 0);
        assert_eq!(evs[3]["content_index"], 0);
        assert_eq!(evs[4]["response"]["output"], json!([1]));
        let seq: Vec<u64> = evs
            .iter()
            .map(|v| v["sequence_number"].as_u64().unwrap())
            .collect();
        assert_eq!(seq, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn prompt_characters_count_every_text_field() {
        let b = json!({"model": "m", "messages": [{"role": "user", "content": "abc"}], "system": "de", "max_tokens": 5});
        assert_eq!(prompt_chars(b.as_object().unwrap()), 3 + 4 + 2);
    }
}
