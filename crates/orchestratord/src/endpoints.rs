//! The checks every forwarded endpoint shares, and chat and completions
//! requests that use more than the task path serves (tools, structured
//! output, penalties, …), relayed to llama-server's own endpoint through the
//! one forwarding path ([`crate::forward`]). The other forwarded endpoints
//! use these checks: [`crate::embeddings`] (`/v1/embeddings`, `/v1/rerank`),
//! [`crate::anthropic`] (`/v1/messages`), [`crate::responses`]
//! (`/v1/responses`).
//!
//! Each handler checks the request at the edge (a JSON object, the pool its
//! `model` names and what that pool serves, the limits table, the fields
//! refused or ignored), fills in the deterministic defaults (`temperature`
//! 0, the fixed `seed`, `max_tokens`), and relays the body. Errors come in
//! the endpoint's own shape (Anthropic's for `/v1/messages`: the
//! `errors::error_shape` layer re-shapes them there).

use crate::errors::{parse_body, ApiError};
use crate::forward::{self, Out, Reply, Request};
use crate::limits;
use crate::link::Serves;
use crate::tools::{self, Choice, Forced};
use crate::{Pool, Shared};
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
pub(crate) fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    parse_body::<Map<String, Value>>(body)
}

/// The pool `model` names (required).
pub(crate) fn pool_of(
    st: &Shared,
    body: &Map<String, Value>,
) -> Result<(String, Arc<Pool>), ApiError> {
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

/// A request at the edge: its body as a JSON object, the model it names,
/// and the pool that name routes to, which serves what the endpoint needs.
pub(crate) struct Edge {
    pub body: Map<String, Value>,
    pub model: String,
    pub pool: Arc<Pool>,
}

/// Parse the body, route its `model`, and check what the pool serves.
pub(crate) fn edge(
    st: &Shared,
    raw: &[u8],
    serves: Serves,
    endpoint: &str,
) -> Result<Edge, ApiError> {
    let body = object(raw)?;
    crate::fields::check_known(endpoint, &body)?;
    let (model, pool) = pool_of(st, &body)?;
    require(&pool, serves, endpoint)?;
    Ok(Edge { body, model, pool })
}

/// Relay a request whose JSON answer passes through with only `model` replaced.
pub(crate) async fn relay_passthrough(
    st: &Shared,
    e: Edge,
    path: &'static str,
) -> Result<Response, ApiError> {
    let prefix = affinity_prefix(&e.body);
    let req = Request {
        path,
        body: Value::Object(e.body),
        generation: false,
        prefix,
    };
    forward::start(st, &e.pool, req)
        .await?
        .json_relabeled(&e.model)
        .await
}

/// Characters of the text fields a prompt is made of.
pub(crate) fn prompt_chars(body: &Map<String, Value>) -> usize {
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
pub(crate) enum Api {
    OpenAi,
    Anthropic,
}

/// The limits table and the deterministic defaults for a generation request.
pub(crate) fn check_generation(
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
                match v.as_i64() {
                    Some(n) => limits::check_max_tokens(f, Some(n), 0, cfg.max_tokens_limit)?,
                    None => return Err(limits::max_tokens_refused(f, v, cfg.max_tokens_limit)),
                };
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
    let t_max = if api == Api::Anthropic {
        limits::TEMPERATURE_MAX_ANTHROPIC
    } else {
        limits::TEMPERATURE_MAX
    };
    // A present value that is not a number is out of every range (NaN).
    let number = |body: &Map<String, Value>, k: &str| {
        body.get(k)
            .filter(|v| !v.is_null())
            .map(|v| v.as_f64().unwrap_or(f64::NAN))
    };
    let t = limits::check_temperature(number(body, "temperature"), t_max)?;
    limits::check_top_p(number(body, "top_p"))?;
    body.insert("temperature".into(), json!(t));
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
    let field = ["messages", "input", "prompt"]
        .into_iter()
        .find(|k| body.contains_key(*k))
        .unwrap_or("body");
    limits::check_prompt_chars(field, prompt_chars(body), cfg.max_prompt_chars)?;
    Ok(())
}

/// `messages[i].role` for OpenAI chat (the limits table's roles).
pub(crate) fn check_chat_messages(body: &Map<String, Value>) -> Result<(), ApiError> {
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
pub(crate) fn fingerprint(pool: &Pool) -> String {
    pool.last_engine
        .lock()
        .unwrap()
        .as_ref()
        .map(crate::models::system_fingerprint)
        .unwrap_or_default()
}

/// Relay, then answer with the JSON (edited) or the SSE events (each edited).
pub(crate) async fn relay(
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
pub(crate) fn openai_stream_error(e: ApiError) -> Vec<Out> {
    vec![Out {
        event: None,
        data: crate::openai::error_json(e).to_string(),
    }]
}

/// Edit each JSON event with `f` (events that are not JSON, like `[DONE]`, pass).
pub(crate) fn each_json(
    mut f: impl FnMut(Value) -> Vec<Value> + Send,
) -> impl FnMut(Out) -> Vec<Out> + Send {
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
    let endpoint = if chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let Edge {
        mut body,
        model,
        pool,
    } = edge(&st, raw, Serves::Generation, endpoint)?;
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
    response_format(&mut body, chat)?;
    let mut forced: Option<Forced> = None;
    if chat {
        check_chat_messages(&body)?;
        check_tool_history(&body)?;
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

/// `response_format`, checked: on chat, `json_object` is enforced as the
/// schema `{"type": "object"}` (llama-server turns a schema into a grammar;
/// it leaves `json_object` to the model's goodwill); on completions only
/// `text` is served (send `grammar` through the task API, or use chat).
fn response_format(body: &mut Map<String, Value>, chat: bool) -> Result<(), ApiError> {
    let Some(rf) = body.get("response_format").filter(|v| !v.is_null()) else {
        return Ok(());
    };
    limits::check_response_format(rf)?;
    let kind = rf["type"].as_str().unwrap_or("").to_string();
    if !chat && kind != "text" {
        return Err(ApiError::invalid(
            "response_format",
            "structured output is served on /v1/chat/completions (or a `grammar` through /v1/tasks), not on /v1/completions",
        ));
    }
    if kind == "json_object" {
        body.insert(
            "response_format".into(),
            json!({"type": "json_schema", "json_schema": {"name": "json_object", "schema": {"type": "object"}}}),
        );
    }
    Ok(())
}

/// Tool turns in a chat history: an assistant's `tool_calls` is a list of
/// `{"id"?, "type": "function", "function": {"name", "arguments"}}` (a
/// string of arguments), a `tool` message has string content. A malformed
/// history is the client's 400, never the engine's 500.
pub(crate) fn check_tool_history(body: &Map<String, Value>) -> Result<(), ApiError> {
    let Some(msgs) = body.get("messages").and_then(Value::as_array) else {
        return Ok(());
    };
    for (i, m) in msgs.iter().enumerate() {
        if let Some(calls) = m.get("tool_calls").filter(|v| !v.is_null()) {
            let calls = calls.as_array().ok_or_else(|| {
                ApiError::invalid(
                    format!("messages[{i}].tool_calls"),
                    "`tool_calls` must be a list",
                )
            })?;
            for (j, c) in calls.iter().enumerate() {
                let f = &c["function"];
                let field = format!("messages[{i}].tool_calls[{j}].function");
                if !f["name"].is_string() || f["name"].as_str() == Some("") {
                    return Err(ApiError::invalid(
                        format!("{field}.name"),
                        "a tool call needs the function's `name`",
                    ));
                }
                if !f["arguments"].is_string() {
                    return Err(ApiError::invalid(
                        format!("{field}.arguments"),
                        "a tool call's `arguments` is a string of JSON",
                    ));
                }
            }
        }
        if m["role"] == "tool" && !(m["content"].is_string() || m["content"].is_array()) {
            return Err(ApiError::invalid(
                format!("messages[{i}].content"),
                "a `tool` message carries the call's result as `content`",
            ));
        }
    }
    Ok(())
}

/// The text a request's replica affinity is taken from.
pub(crate) fn affinity_prefix(body: &Map<String, Value>) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_characters_count_every_text_field() {
        let b = json!({"model": "m", "messages": [{"role": "user", "content": "abc"}], "system": "de", "max_tokens": 5});
        assert_eq!(prompt_chars(b.as_object().unwrap()), 3 + 4 + 2);
    }
}
