//! The fields each forwarded endpoint takes: an allow-list per API.
//!
//! A request for one of llama-server's own endpoints passes only the fields
//! its API defines here (plus llama-server's sampling extensions on the
//! generation endpoints). Any other field is a 400 that names it: an
//! engine-internal field (a slot, a limit, the answer's shape) never
//! reaches the engine, whether or not it is on [`crate::limits::ENGINE_FIELDS`].
//! The fields every API accepts and ignores, or refuses with a reason
//! ([`crate::limits::IGNORED_FIELDS`], `REFUSED_FIELDS`, `ENGINE_FIELDS`),
//! are left to [`crate::limits::check_fields`], which says why.

use crate::errors::ApiError;
use crate::limits::{ENGINE_FIELDS, IGNORED_FIELDS, REFUSED_FIELDS};
use serde_json::{Map, Value};

/// llama-server's sampling extensions: they change which token is drawn,
/// never a slot, a limit or the answer's shape.
pub const SAMPLING: &[&str] = &[
    "top_k",
    "min_p",
    "typical_p",
    "top_n_sigma",
    "repeat_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
    "dry_multiplier",
    "dry_base",
    "dry_allowed_length",
    "dry_penalty_last_n",
    "dry_sequence_breakers",
    "xtc_probability",
    "xtc_threshold",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "dynatemp_range",
    "dynatemp_exponent",
    "min_keep",
    "ignore_eos",
    "logit_bias",
];

/// OpenAI chat completions.
pub const CHAT: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "stream",
    "stream_options",
    "seed",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning_effort",
    "modalities",
    "chat_template_kwargs",
];

/// OpenAI (legacy) completions.
pub const COMPLETIONS: &[&str] = &[
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "stream",
    "stream_options",
    "seed",
    "logprobs",
    "echo",
    "response_format",
];

/// OpenAI Responses.
pub const RESPONSES: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "stream_options",
    "seed",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "reasoning",
    "top_logprobs",
    "include",
];

/// Anthropic Messages.
pub const MESSAGES: &[&str] = &[
    "model",
    "messages",
    "system",
    "max_tokens",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "stream",
    "tools",
    "tool_choice",
    "thinking",
];

/// OpenAI embeddings.
pub const EMBEDDINGS: &[&str] = &["model", "input", "encoding_format", "dimensions"];

/// Rerank (the Jina/Cohere shape llama-server serves).
pub const RERANK: &[&str] = &["model", "query", "documents", "top_n", "return_documents"];

/// The fields of an endpoint (by its path), and whether llama-server's
/// sampling extensions apply there. None: an endpoint with no table.
pub fn table(endpoint: &str) -> Option<(&'static [&'static str], bool)> {
    Some(match endpoint {
        "/v1/chat/completions" => (CHAT, true),
        "/v1/completions" => (COMPLETIONS, true),
        "/v1/responses" => (RESPONSES, true),
        "/v1/messages" => (MESSAGES, false),
        "/v1/embeddings" => (EMBEDDINGS, false),
        "/v1/rerank" => (RERANK, false),
        _ => return None,
    })
}

/// Refuse a field `endpoint`'s table does not name (400, naming it).
pub fn check_known(endpoint: &str, body: &Map<String, Value>) -> Result<(), ApiError> {
    let Some((fields, sampling)) = table(endpoint) else {
        return Ok(());
    };
    let said_elsewhere = |k: &str| {
        IGNORED_FIELDS
            .iter()
            .chain(REFUSED_FIELDS)
            .chain(ENGINE_FIELDS)
            .any(|(f, _)| *f == k)
    };
    for k in body.keys() {
        let known = fields.contains(&k.as_str()) || (sampling && SAMPLING.contains(&k.as_str()));
        if !known && !said_elsewhere(k) {
            let name = llorch_types::excerpt(k, 64);
            return Err(ApiError::invalid(
                name.clone(),
                format!(
                    "`{name}` is not a field of POST {endpoint} here; the fields it takes are {}{}",
                    fields.join(", "),
                    if sampling {
                        " and llama-server's sampling fields (top_k, min_p, repeat_penalty, …; README, Fields)"
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn each_endpoint_takes_its_own_fields_and_names_any_other() {
        check_known(
            "/v1/chat/completions",
            &obj(json!({"model": "m", "messages": [], "top_k": 4, "tools": []})),
        )
        .unwrap();
        // Left to check_fields, which says why.
        check_known("/v1/embeddings", &obj(json!({"user": "u", "id_slot": 0}))).unwrap();
        for (endpoint, field) in [
            ("/v1/chat/completions", "slot_save"),
            ("/v1/chat/completions", "prompt"),
            ("/v1/completions", "messages"),
            ("/v1/embeddings", "top_k"),
            ("/v1/messages", "min_p"),
            ("/v1/responses", "messages"),
            ("/v1/rerank", "input_extra"),
        ] {
            let e = check_known(endpoint, &obj(json!({"model": "m", field: 1}))).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{endpoint}");
            assert_eq!(e.status.as_u16(), 400);
            assert!(e.message.contains(endpoint), "{}", e.message);
        }
    }

    #[test]
    fn a_hostile_field_name_is_shortened_in_the_error() {
        let long = "x".repeat(10_000);
        let e = check_known("/v1/completions", &obj(json!({ long.clone(): 1 }))).unwrap_err();
        assert!(e.message.len() < 1_000, "{}", e.message.len());
    }
}
