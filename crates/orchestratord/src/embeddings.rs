//! `POST /v1/embeddings` and `POST /v1/rerank`: vectors and scores from a
//! pool whose engine runs with `--embeddings` (and `--pooling rank` for
//! rerank), through the forwarding path. The answer passes through as the
//! engine wrote it, with only its `model` replaced.

use crate::endpoints::{edge, relay_passthrough};
use crate::errors::ApiError;
use crate::limits;
use crate::link::Serves;
use crate::Shared;
use axum::extract::State;
use axum::response::Response;
use serde_json::Value;

/// `POST /v1/embeddings`: OpenAI's embeddings from an embedding pool.
pub async fn embeddings(
    State(st): State<Shared>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let mut e = edge(&st, &raw, Serves::Embeddings, "/v1/embeddings")?;
    let body = &mut e.body;
    limits::check_fields(body)?;
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
    relay_passthrough(&st, e, "/v1/embeddings").await
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
                    // Token ids: whole numbers a vocabulary can hold (the
                    // engine refuses ids past its vocabulary itself, with a 400).
                    Value::Number(n) if is_token_id(n) => {}
                    Value::Array(t)
                        if !t.is_empty()
                            && t.iter().all(|x| x.as_number().is_some_and(is_token_id)) => {}
                    _ => return Err(bad()),
                }
            }
            Ok(())
        }
        _ => Err(bad()),
    }
}

/// A token id: an integer from 0 below 2^31 (llama.cpp's `llama_token` is
/// an `int32_t`; a fraction or `1e30` is not one).
fn is_token_id(n: &serde_json::Number) -> bool {
    n.as_u64().is_some_and(|v| v < (1u64 << 31))
}

/// `POST /v1/rerank`: scores of documents for a query, from a reranking pool.
pub async fn rerank(
    State(st): State<Shared>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let mut e = edge(&st, &raw, Serves::Rerank, "/v1/rerank")?;
    let body = &mut e.body;
    limits::check_fields(body)?;
    match body.get("query") {
        Some(Value::String(q)) if !q.is_empty() && q.chars().count() <= st.cfg.max_prompt_chars => {
        }
        _ => return Err(ApiError::invalid("query", "`query` is a non-empty string")),
    }
    check_inputs(&st, body.get("documents"), "documents")?;
    relay_passthrough(&st, e, "/v1/rerank").await
}
