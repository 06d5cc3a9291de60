//! `POST /v1/messages` (Anthropic Messages) through the forwarding path,
//! and the piece the orchestrator does itself: a forced tool call
//! (`tool_choice` `any` or `tool`), which llama-server's translation turns
//! into `required` and so does not force with every template. That request
//! is asked as an OpenAI chat request carrying the call's schema
//! ([`crate::tools::Forced`]) and answered as Anthropic's `tool_use` block
//! (streamed: Anthropic's events for that one block).

use crate::endpoints::{affinity_prefix, check_generation, each_json, edge, relay, Api, Edge};
use crate::errors::ApiError;
use crate::forward::{self, Out, Request};
use crate::link::Serves;
use crate::tools::{self, Choice, Forced};
use crate::{Pool, Shared};
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// Anthropic `system` and `messages` as OpenAI chat messages.
pub fn to_openai_messages(body: &Map<String, Value>) -> Result<Vec<Value>, ApiError> {
    let text_of = |v: &Value, field: &str| -> Result<String, ApiError> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Array(blocks) => {
                let mut s = String::new();
                for b in blocks {
                    match b["type"].as_str() {
                        Some("text") => s.push_str(b["text"].as_str().ok_or_else(|| {
                            ApiError::invalid(
                                field,
                                format!("{field}: a text block needs a string `text`"),
                            )
                        })?),
                        other => {
                            return Err(ApiError::invalid(
                                field,
                                format!(
                                    "{field}: content blocks of type `{}` are not served here",
                                    llorch_types::excerpt(other.unwrap_or("?"), 32)
                                ),
                            ))
                        }
                    }
                }
                Ok(s)
            }
            Value::Null => Ok(String::new()),
            _ => Err(ApiError::invalid(
                field,
                format!("{field}: a string or a list of blocks"),
            )),
        }
    };
    let mut out = Vec::new();
    if let Some(s) = body.get("system").filter(|v| !v.is_null()) {
        out.push(json!({"role": "system", "content": text_of(s, "system")?}));
    }
    for (i, m) in body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let role = m["role"].as_str().unwrap_or("user");
        let field = format!("messages.{i}.content");
        let Value::Array(blocks) = &m["content"] else {
            out.push(json!({"role": role, "content": text_of(&m["content"], &field)?}));
            continue;
        };
        let mut text = String::new();
        let mut calls = Vec::new();
        for b in blocks {
            match b["type"].as_str() {
                Some("text") => text.push_str(b["text"].as_str().ok_or_else(|| {
                    ApiError::invalid(
                        &field,
                        format!("{field}: a text block needs a string `text`"),
                    )
                })?),
                Some("tool_use") if role == "assistant" => calls.push(json!({
                    "id": b["id"], "type": "function",
                    "function": {"name": b["name"], "arguments": b["input"].to_string()}})),
                Some("tool_result") if role == "user" => out.push(json!({
                    "role": "tool", "tool_call_id": b["tool_use_id"],
                    "content": text_of(&b["content"], &field)?})),
                other => {
                    return Err(ApiError::invalid(
                        field.clone(),
                        format!(
                            "{field}: content blocks of type `{}` are not served here",
                            llorch_types::excerpt(other.unwrap_or("?"), 32)
                        ),
                    ))
                }
            }
        }
        if !calls.is_empty() {
            out.push(json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) }, "tool_calls": calls}));
        } else if !text.is_empty() || role == "assistant" {
            out.push(json!({"role": role, "content": text}));
        }
    }
    Ok(out)
}

/// The forced call: asked as chat with the call's schema, answered as a `tool_use` block.
pub async fn forced_call(
    st: &Shared,
    pool: &Arc<Pool>,
    model: &str,
    body: Map<String, Value>,
    forced: Forced,
    stream: bool,
) -> Result<Response, ApiError> {
    let chat = chat_request(st, model, &body, &forced)?;
    let prefix = body
        .get("messages")
        .map(|m| m.to_string())
        .unwrap_or_default()
        .chars()
        .take(crate::pool::AFFINITY_PREFIX_CHARS)
        .collect();
    let reply = forward::start(
        st,
        pool,
        Request {
            path: "/v1/chat/completions",
            body: chat,
            generation: true,
            prefix,
        },
    )
    .await?;
    let message = anthropic_message(st, model, &reply.json().await?, &forced);
    if !stream {
        return Ok(Json(message).into_response());
    }
    let events = futures_util::stream::iter(message_events(&message).into_iter().map(|(n, d)| {
        Ok::<_, std::convert::Infallible>(Event::default().event(n).data(d.to_string()))
    }));
    Ok(Sse::new(events).into_response())
}

/// The OpenAI chat request that asks a forced call: the messages, the
/// sampling fields under their OpenAI names, the orchestrator's seed, and
/// the call's constraint.
fn chat_request(
    st: &Shared,
    model: &str,
    body: &Map<String, Value>,
    forced: &Forced,
) -> Result<Value, ApiError> {
    let mut chat = Map::new();
    chat.insert("model".into(), json!(model));
    chat.insert("messages".into(), Value::Array(to_openai_messages(body)?));
    for (from, to) in [
        ("max_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("stop_sequences", "stop"),
    ] {
        if let Some(v) = body.get(from).filter(|v| !v.is_null()) {
            chat.insert(to.into(), v.clone());
        }
    }
    chat.insert("seed".into(), json!(st.cfg.default_seed));
    forced.apply(&mut chat);
    Ok(Value::Object(chat))
}

/// The chat answer `v` as an Anthropic message: a `tool_use` block when it
/// holds the forced call, else its text.
fn anthropic_message(st: &Shared, model: &str, v: &Value, forced: &Forced) -> Value {
    let content = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
    let cut = v["choices"][0]["finish_reason"] == "length";
    let (blocks, stop_reason) = match forced.call(content) {
        Some((name, args)) => {
            let input: Value = serde_json::from_str(&args).unwrap_or(json!({}));
            (
                vec![
                    json!({"type": "tool_use", "id": format!("toolu_{}", st.new_task_id()), "name": name, "input": input}),
                ],
                "tool_use",
            )
        }
        None => (
            vec![json!({"type": "text", "text": content})],
            if cut { "max_tokens" } else { "end_turn" },
        ),
    };
    let usage = json!({
        "input_tokens": v["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
        "output_tokens": v["usage"]["completion_tokens"].as_u64().unwrap_or(0),
    });
    json!({
        "id": format!("msg_{}", st.new_task_id()), "type": "message", "role": "assistant", "model": model,
        "content": blocks, "stop_reason": stop_reason, "stop_sequence": Value::Null, "usage": usage,
    })
}

/// Anthropic's stream events for a finished message: its start (empty),
/// each block's start, one delta and stop, the message's delta and stop.
fn message_events(message: &Value) -> Vec<(&'static str, Value)> {
    let mut start = message.clone();
    start["content"] = json!([]);
    start["stop_reason"] = Value::Null;
    start["usage"]["output_tokens"] = json!(0);
    let mut evs = vec![(
        "message_start",
        json!({"type": "message_start", "message": start}),
    )];
    for (i, b) in message["content"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let (empty, delta) = if b["type"] == "tool_use" {
            let mut e = b.clone();
            e["input"] = json!({});
            (
                e,
                json!({"type": "input_json_delta", "partial_json": b["input"].to_string()}),
            )
        } else {
            (
                json!({"type": "text", "text": ""}),
                json!({"type": "text_delta", "text": b["text"]}),
            )
        };
        evs.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": i, "content_block": empty}),
        ));
        evs.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": i, "delta": delta}),
        ));
        evs.push((
            "content_block_stop",
            json!({"type": "content_block_stop", "index": i}),
        ));
    }
    evs.push((
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": message["stop_reason"], "stop_sequence": Value::Null},
               "usage": {"output_tokens": message["usage"]["output_tokens"]}}),
    ));
    evs.push(("message_stop", json!({"type": "message_stop"})));
    evs
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
    let Edge {
        mut body,
        model,
        pool,
    } = edge(&st, &raw, Serves::Generation, "/v1/messages")?;
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
    // Every block checked here (the same reading a forced call uses): an
    // image, a text block without text or a `system` that is not text is
    // the client's 400, never llama-server's 500.
    to_openai_messages(&body)?;
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
        return forced_call(&st, &pool, &model, body, f, stream).await;
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
    fn anthropic_history_becomes_chat_messages() {
        let body = json!({
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
            ]
        });
        let m = to_openai_messages(body.as_object().unwrap()).unwrap();
        assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(m[1]["content"], "Weather in Paris?");
        assert_eq!(
            m[2]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Paris\"}"
        );
        assert_eq!(m[2]["content"], "Let me look.");
        assert_eq!(
            m[3],
            json!({"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"})
        );
        assert_eq!(m.len(), 4);
        let bad =
            json!({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]});
        let e = to_openai_messages(bad.as_object().unwrap()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("messages.0.content"));
    }

    #[test]
    fn a_finished_message_streams_as_anthropics_events() {
        let message = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Oslo"}},
            ],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 12, "output_tokens": 7},
        });
        let evs = message_events(&message);
        let names: Vec<&str> = evs.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        // The start holds no content and no output yet; the deltas carry it.
        assert_eq!(evs[0].1["message"]["content"], json!([]));
        assert_eq!(evs[0].1["message"]["usage"]["output_tokens"], 0);
        assert_eq!(evs[0].1["message"]["stop_reason"], Value::Null);
        assert_eq!(evs[2].1["delta"]["text"], "Checking.");
        assert_eq!(evs[4].1["content_block"]["input"], json!({}));
        assert_eq!(evs[4].1["index"], 1);
        let partial = evs[5].1["delta"]["partial_json"].as_str().unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(partial).unwrap(),
            json!({"city": "Oslo"})
        );
        assert_eq!(evs[7].1["delta"]["stop_reason"], "tool_use");
        assert_eq!(evs[7].1["usage"]["output_tokens"], 7);
    }
}
