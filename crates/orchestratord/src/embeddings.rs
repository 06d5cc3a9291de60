//! `POST /v1/embeddings` and `POST /v1/rerank`: vectors and scores from a
//! pool whose engine runs with `--embeddings` (and `--pooling rank` for
//! rerank), through the forwarding path. The answer passes through as the
//! engine wrote it, with only its `model` replaced.

use crate::endpoints::{affinity_prefix, object, pool_of, require};
use crate::errors::ApiError;
use crate::forward::{self, Request};
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
