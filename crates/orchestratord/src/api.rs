//! The HTTP surface: typed requests of the task API, its handlers, pools in
//! capabilities, the router. Errors: [`crate::errors`]; admission:
//! [`crate::admission`]; the web-page guard and auth: [`crate::guard`].

use crate::admission::{admit, route, DisconnectGuard};
use crate::errors::{parse_body, ApiError};

use crate::events::TaskEvent;
use crate::link::LinkState;
use crate::pool::Pool;
use crate::tasks::{self, CancelReason, ChatTurn, Task, TaskRequest};
use crate::{AppState, Shared};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// `POST /v1/tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTask {
    pub prompt: Option<String>,
    pub messages: Option<Vec<Message>>,
    pub max_tokens: Option<u64>,
    pub seed: Option<u64>,
    pub temperature: Option<f64>,
    pub deadline_ms: Option<u64>,
    pub task_id: Option<String>,
    pub ignore_eos: Option<bool>,
    pub stop: Option<Vec<String>>,
    pub grammar: Option<String>,
    /// The pool to run on: a pool id or a model name (default: the first pool).
    pub pool: Option<String>,
}

impl CreateTask {
    pub fn validate(self, st: &AppState) -> Result<Validated, ApiError> {
        let c = &st.cfg;
        // A pool id or a model name (routed later; an unknown name is 404).
        let pool = match &self.pool {
            None => None,
            Some(p) if p.is_empty() || p.len() > 256 || p.chars().any(char::is_control) => {
                return Err(ApiError::invalid(
                    "pool",
                    "pool must be a pool id or a model name of 1 to 256 printable characters",
                ))
            }
            Some(p) => Some(p.clone()),
        };
        let messages = self.checked_text(c.max_prompt_chars)?;
        let max_tokens = crate::limits::check_max_tokens(
            "max_tokens",
            self.max_tokens
                .map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
            c.default_max_tokens,
            c.max_tokens_limit,
        )?;
        let temperature =
            crate::limits::check_temperature(self.temperature, crate::limits::TEMPERATURE_MAX)?;
        if self.deadline_ms == Some(0) || self.deadline_ms.is_some_and(|d| d > 86_400_000) {
            return Err(ApiError::invalid(
                "deadline_ms",
                "deadline_ms must be from 1 to 86400000 (a day)",
            ));
        }
        let stop = self.stop.unwrap_or_default();
        crate::limits::check_stop(&stop)?;
        crate::limits::check_grammar(self.grammar.as_deref())?;
        if let Some(id) = &self.task_id {
            check_task_id(id)?;
        }
        Ok((
            TaskRequest {
                prompt: self.prompt,
                messages,
                max_tokens,
                seed: self.seed.unwrap_or(c.default_seed),
                temperature,
                deadline_ms: self.deadline_ms,
                ignore_eos: self.ignore_eos.unwrap_or(false),
                stop,
                grammar: self.grammar,
                top_p: None,
                n_probs: None,
                forward: None,
            },
            self.task_id,
            pool,
        ))
    }
}

impl CreateTask {
    /// `prompt` or `messages` (not both, not empty; roles from the limits
    /// table), at most `max_chars` characters in all; the messages typed.
    fn checked_text(&self, max_chars: usize) -> Result<Option<Vec<ChatTurn>>, ApiError> {
        if matches!(&self.prompt, Some(p) if p.is_empty()) {
            return Err(ApiError::invalid("prompt", "prompt is empty"));
        }
        let (field, chars, messages) = match (&self.prompt, &self.messages) {
            (None, None) => return Err(ApiError::invalid("prompt", "give `prompt` or `messages`")),
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "messages",
                    "give `prompt` or `messages`, not both",
                ))
            }
            (Some(p), None) => ("prompt", p.chars().count(), None),
            (None, Some(m)) if m.is_empty() => {
                return Err(ApiError::invalid(
                    "messages",
                    "messages must be a non-empty array of {role, content}",
                ))
            }
            (None, Some(m)) => {
                let mut out = Vec::new();
                for (i, m) in m.iter().enumerate() {
                    out.push(ChatTurn {
                        role: crate::limits::check_role(i, &m.role)?,
                        content: m.content.clone(),
                    });
                }
                let chars = m
                    .iter()
                    .map(|m| m.role.chars().count() + m.content.chars().count())
                    .sum();
                ("messages", chars, Some(out))
            }
        };
        crate::limits::check_prompt_chars(field, chars, max_chars)?;
        Ok(messages)
    }
}

/// `task_id`: 1 to 64 letters, digits, `-` or `_` (it names files and URLs).
fn check_task_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        return Err(ApiError::invalid(
            "task_id",
            "task_id must be 1-64 letters, digits, '-' or '_'",
        ));
    }
    Ok(())
}

/// A checked request, its client-chosen id and the pool it names.
pub type Validated = (TaskRequest, Option<String>, Option<String>);

async fn create_task(
    State(st): State<Shared>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: CreateTask = parse_body(&body).inspect_err(|_| st.metrics.reject("invalid"))?;
    let (req, task_id, pool) = req
        .validate(&st)
        .inspect_err(|_| st.metrics.reject("invalid"))?;
    let pool = route(&st, pool.as_deref(), "pool", "POOL_NOT_FOUND")?;
    crate::endpoints::require(&pool, crate::link::Serves::Generation, "/v1/tasks").map_err(
        |mut e| {
            e.field = Some("pool".into());
            e
        },
    )?;
    let task = admit(&st, &pool, req, task_id)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"task_id": task.id, "pool": pool.group.as_str(), "replica": task.pool.replica, "queue_position": task.queue_position, "predicted_start_ms": task.predicted_start_ms})),
    )
        .into_response())
}

fn find_task(st: &AppState, id: &str) -> Result<Arc<Task>, ApiError> {
    st.tasks.lock().unwrap().get(id).cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "TASK_NOT_FOUND",
            format!("no task `{}`", llorch_types::excerpt(id, 64)),
        )
    })
}

async fn stream_task(
    method: Method,
    State(st): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let task = find_task(&st, &id)?;
    if method == Method::HEAD {
        // A probe: says the stream exists, takes nothing.
        return Ok(([(header::CONTENT_TYPE, "text/event-stream")], "").into_response());
    }
    let Some(rx) = task.take_stream() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "STREAM_TAKEN",
            format!("the stream of task `{id}` is already open"),
        ));
    };
    let guard = DisconnectGuard(task, st.clone());
    let stream = futures_util::stream::unfold((rx, guard), |(mut rx, g)| async move {
        rx.recv().await.map(|ev: TaskEvent| {
            (
                Ok::<_, std::convert::Infallible>(
                    Event::default().event(ev.name()).data(ev.data()),
                ),
                (rx, g),
            )
        })
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response())
}

async fn cancel_task(
    State(st): State<Shared>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let task = find_task(&st, &id)?;
    tasks::cancel(&st, &task, CancelReason::Requested);
    Ok(StatusCode::NO_CONTENT)
}

/// A pool's state over its replicas: ready if any is, else loading if any
/// is, else replica 0's (`unloaded`, `draining`, `failed`).
pub fn group_state(st: &AppState, members: &[Arc<Pool>]) -> &'static str {
    let stopping = st.stopping.load(Ordering::SeqCst);
    let states: Vec<&'static str> = members.iter().map(|p| p.state(stopping)).collect();
    for want in ["ready", "loading"] {
        if states.contains(&want) {
            return want;
        }
    }
    if states.iter().all(|s| *s == "failed") {
        return "failed";
    }
    states.first().copied().unwrap_or("unloaded")
}

/// Tokens held in the engines' processing slots, what their slots hold at
/// most, and the ratio (the `llorch_pool_kv_cache_utilization` gauge).
fn kv_json(members: &[Arc<Pool>]) -> serde_json::Value {
    let (held, capacity, utilization) = crate::metrics::kv_utilization(members);
    json!({"tokens_held": held, "capacity": capacity, "utilization": utilization})
}

pub(crate) fn pool_json(st: &AppState, head: &Pool) -> serde_json::Value {
    let members = st.members(&head.group);
    let p = head;
    let state = p.link_state();
    let (e, failed) = match &state {
        LinkState::Ready(e) => (Some(e.clone()), None),
        LinkState::Failed(r) => (p.last_engine.lock().unwrap().clone(), Some(r.clone())),
        _ => (p.last_engine.lock().unwrap().clone(), None),
    };
    let stopping = st.stopping.load(Ordering::SeqCst);
    let sum = |f: &dyn Fn(&Pool) -> u64| members.iter().map(|m| f(m)).sum::<u64>();
    let replicas: Vec<serde_json::Value> = members
        .iter()
        .map(|m| {
            json!({
                "replica": m.replica,
                "run_id": m.id.as_str(),
                "state": m.state(stopping),
                "ready": m.ready.load(Ordering::SeqCst),
                "url": match m.link_state() { LinkState::Ready(e) => Some(e.url), _ => None },
                "queue_depth": m.queue.len(),
                "running": m.running.load(Ordering::SeqCst),
                "tokens_out": m.tokens_out.load(Ordering::Relaxed),
                "kv_cache": kv_json(std::slice::from_ref(m)),
                "loads": m.loads.load(Ordering::Relaxed),
                "unloads": m.unloads.load(Ordering::Relaxed),
            })
        })
        .collect();
    json!({
        "id": p.group.as_str(),
        "aliases": p.aliases,
        "state": group_state(st, &members),
        "ready": members.iter().any(|m| m.ready.load(Ordering::SeqCst)),
        "failed_reason": failed,
        "engine": e.as_ref().map(|e| e.engine.clone()),
        "engine_version": e.as_ref().map(|e| e.engine_version.clone()),
        "fingerprint": e.as_ref().map(|e| e.fingerprint.clone()),
        "system_fingerprint": e.as_ref().map(crate::models::system_fingerprint),
        "model": e.as_ref().map(|e| json!({"ref": e.model_ref, "digest": e.model_digest})),
        "ctx_max": e.as_ref().and_then(|e| e.ctx_max),
        "mode": e.as_ref().map(|e| e.mode()).unwrap_or("exact"),
        "sandbox": e.as_ref().and_then(|e| e.sandbox.clone()),
        "serves": crate::endpoints::serves(p).as_str(),
        "endpoints": crate::endpoints::serves(p).endpoints(),
        "deterministic": !e.as_ref().is_some_and(|e| e.batched),
        "slots": p.slots,
        "capacity": p.slots * members.len(),
        "affinity": p.affinity.as_str(),
        "auto": p.auto,
        "replicas": replicas,
        "queue_depth": sum(&|m| m.queue.len() as u64),
        "running": sum(&|m| m.running.load(Ordering::SeqCst)),
        "kv_cache": kv_json(&members),
        "load": if p.policy.lazy { "lazy" } else { "eager" },
        "idle_unload_s": p.policy.idle_unload.map(|d| d.as_secs_f64()),
        "keep_loaded": p.policy.keep_loaded,
        "loads": sum(&|m| m.loads.load(Ordering::Relaxed)),
        "unloads": sum(&|m| m.unloads.load(Ordering::Relaxed)),
        "last_load_ms": p.last_load_ms.load(Ordering::Relaxed),
    })
}

async fn capabilities(State(st): State<Shared>) -> Response {
    // The top-level fields describe the default (first) pool; `pools` lists all.
    let mut body = pool_json(&st, st.default_pool());
    let pools: Vec<serde_json::Value> = st.heads().map(|p| pool_json(&st, p)).collect();
    let obj = body.as_object_mut().expect("an object");
    let id = obj.remove("id").unwrap_or_default();
    obj.insert("pool".into(), id);
    obj.insert("api".into(), json!("v1"));
    obj.insert("pools".into(), json!(pools));
    obj.insert("max_loaded".into(), json!(st.sched_cfg.max_loaded));
    obj.insert(
        "limits".into(),
        json!({
            "queue_capacity": st.cfg.queue_capacity,
            "max_tokens": st.cfg.max_tokens_limit,
            "max_prompt_chars": st.cfg.max_prompt_chars,
            "max_body_bytes": st.cfg.max_body_bytes,
        }),
    );
    obj.insert("streaming".into(), json!("sse"));
    obj.insert("events".into(), json!(["started", "token", "end", "error"]));
    Json(body).into_response()
}

async fn readyz(State(st): State<Shared>) -> Response {
    if st.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let states: Vec<String> = st
            .heads()
            .map(|p| format!("{} {}", p.group, group_state(&st, &st.members(&p.group))))
            .collect();
        let body = if st.heads().count() == 1 && st.pools.len() == 1 {
            format!("{}\n", st.pool_state())
        } else {
            format!("{}\n", states.join("\n"))
        };
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics_text(State(st): State<Shared>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.render(&st.pools),
    )
        .into_response()
}

pub fn router(st: Shared) -> Router {
    Router::new()
        .route("/v1/tasks", post(create_task))
        .route("/v1/tasks/{id}/stream", get(stream_task).head(stream_task))
        .route("/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/v1/capabilities", get(capabilities))
        .route("/v1/models", get(crate::models::models))
        .route(
            "/v1/chat/completions",
            post(crate::openai::chat_completions),
        )
        .route("/v1/completions", post(crate::openai::completions))
        .route("/v1/embeddings", post(crate::embeddings::embeddings))
        .route("/v1/rerank", post(crate::embeddings::rerank))
        .route("/v1/messages", post(crate::anthropic::messages))
        .route("/v1/responses", post(crate::responses::responses))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/status", get(crate::status::status_page))
        .route("/status/app.js", get(crate::status::app_js))
        .route("/status/app.css", get(crate::status::app_css))
        .route("/status/login", post(crate::status::login))
        .route("/v1/status", get(crate::status::status_json))
        .route("/v1/status/events", get(crate::status::events))
        .route("/v1/status/pools/{pool}/log", get(crate::status::pool_log))
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(axum::middleware::from_fn(crate::guard::client_gone))
        .layer(axum::middleware::from_fn(crate::status::api_scope))
        .layer(axum::middleware::from_fn_with_state(
            st.clone(),
            crate::guard::auth,
        ))
        .layer(axum::middleware::from_fn_with_state(
            st.clone(),
            crate::guard::guard,
        ))
        .layer(DefaultBodyLimit::max(st.cfg.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            st.clone(),
            crate::errors::error_shape,
        ))
        .with_state(st)
}

#[cfg(test)]
mod tests;
