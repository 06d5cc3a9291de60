//! `POST /v1/responses` (OpenAI Responses) through the forwarding path:
//! llama-server translates it to chat and back; the orchestrator completes
//! its stream events to the schema clients accumulate by.

use crate::endpoints::{affinity_prefix, check_generation, each_json, edge, relay, Api, Edge};
use crate::errors::ApiError;
use crate::forward::{self, Out, Request};
use crate::link::Serves;
use crate::Shared;
use axum::extract::State;
use axum::response::Response;
use serde_json::{json, Value};

/// `POST /v1/responses` (OpenAI Responses): text `input` (a string or a
/// list of messages) and `instructions`, plain or streamed; llama-server
/// translates it to chat and back.
pub async fn responses(
    State(st): State<Shared>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let Edge {
        mut body,
        model,
        pool,
    } = edge(&st, &raw, Serves::Generation, "/v1/responses")?;
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
                    .unwrap_or_else(crate::models::unix_now);
            }
            r.entry("output").or_insert(json!([]));
            r.entry("model").or_insert(json!(model));
            r.entry("created_at").or_insert(json!(self.created_at));
        }
    }
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
}
