//! The HTTP surface: typed requests, one error type, handlers, auth, router.

use crate::events::TaskEvent;
use crate::link::LinkState;
use crate::pool::Pool;
use crate::tasks::{self, CancelReason, Task, TaskRequest};
use crate::{AppState, Shared};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Every error the API answers: status, a stable code, a message and the field at fault.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after_s: None,
        }
    }
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            field: Some(field.into()),
            ..ApiError::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message)
        }
    }
    /// The same error under another stable code (an API's own, e.g. OpenAI's `context_length_exceeded`).
    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = code;
        self
    }
    fn retry_after(mut self, s: u64) -> ApiError {
        self.retry_after_s = Some(s);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Also OpenAI's shape (`type`, `param`), so OpenAI clients read every error.
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        };
        let mut body = json!({"error": {
            "code": self.code,
            "message": self.message,
            "type": kind,
            "param": self.field,
        }});
        if let Some(f) = &self.field {
            body["error"]["field"] = json!(f);
        }
        let mut r = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after_s {
            r.headers_mut().insert(
                "retry-after",
                HeaderValue::from_str(&s.to_string()).unwrap(),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        }
        r
    }
}

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

/// Parse a JSON body into `T`, naming the field at fault.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let v = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let inner = e.inner().to_string();
        let path = e.path().to_string();
        let field = if let Some(rest) = inner.strip_prefix("unknown field `") {
            rest.split('`').next().unwrap_or("body").to_string()
        } else if path == "." || inner.contains("EOF") || e.inner().is_syntax() {
            "body".to_string()
        } else {
            path
        };
        let msg = if field == "body" && e.inner().is_syntax() {
            format!("invalid JSON: {inner}")
        } else {
            inner
        };
        ApiError::invalid(field, msg)
    })?;
    // One JSON value and nothing after it (`{...}xyz` is not a request).
    de.end().map_err(|e| {
        ApiError::invalid(
            "body",
            format!("invalid JSON: unexpected data after the request object ({e})"),
        )
    })?;
    Ok(v)
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
        if matches!(&self.prompt, Some(p) if p.is_empty()) {
            return Err(ApiError::invalid("prompt", "prompt is empty"));
        }
        let messages = match &self.messages {
            None => None,
            Some(m) if m.is_empty() => {
                return Err(ApiError::invalid(
                    "messages",
                    "messages must be a non-empty array of {role, content}",
                ))
            }
            Some(m) => {
                let mut out = Vec::new();
                for (i, m) in m.iter().enumerate() {
                    let role = crate::limits::check_role(i, &m.role)?;
                    out.push(json!({"role": role, "content": m.content}));
                }
                Some(json!(out))
            }
        };
        let chars = match (&self.prompt, &self.messages) {
            (None, None) => return Err(ApiError::invalid("prompt", "give `prompt` or `messages`")),
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "messages",
                    "give `prompt` or `messages`, not both",
                ))
            }
            (Some(p), None) => p.chars().count(),
            (None, Some(m)) => m
                .iter()
                .map(|m| m.role.chars().count() + m.content.chars().count())
                .sum(),
        };
        if chars > c.max_prompt_chars {
            let f = if self.prompt.is_some() {
                "prompt"
            } else {
                "messages"
            };
            return Err(ApiError::invalid(
                f,
                format!(
                    "prompt is {chars} characters; the limit is {}",
                    c.max_prompt_chars
                ),
            ));
        }
        let max_tokens = match self.max_tokens {
            None => c.default_max_tokens,
            Some(n) if n >= 1 && n <= c.max_tokens_limit as u64 => n as u32,
            Some(_) => {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!(
                        "max_tokens must be an integer from 1 to {}",
                        c.max_tokens_limit
                    ),
                ))
            }
        };
        let temperature = match self.temperature {
            None => 0.0,
            Some(t) if (0.0..=2.0).contains(&t) => t,
            Some(_) => {
                return Err(ApiError::invalid(
                    "temperature",
                    "temperature must be a number from 0 to 2",
                ))
            }
        };
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
            },
            self.task_id,
            pool,
        ))
    }
}

/// A checked request, its client-chosen id and the pool it names.
pub type Validated = (TaskRequest, Option<String>, Option<String>);

fn not_ready(st: &AppState, pool: &Pool) -> ApiError {
    st.metrics.reject("not_ready");
    if st.stopping.load(Ordering::SeqCst) {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "DRAINING",
            "the orchestrator is shutting down",
        );
    }
    match pool.link_state() {
        LinkState::Failed(reason) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ENGINE_FAILED",
            format!(
                "the engine of pool `{}` has failed and will not be restarted: {reason}",
                pool.id
            ),
        ),
        _ => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ENGINE_NOT_READY",
            format!(
                "the engine of pool `{}` is not ready; try again shortly",
                pool.id
            ),
        )
        .retry_after(1),
    }
}

async fn create_task(
    State(st): State<Shared>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: CreateTask = parse_body(&body).inspect_err(|_| st.metrics.reject("invalid"))?;
    let (req, task_id, pool) = req
        .validate(&st)
        .inspect_err(|_| st.metrics.reject("invalid"))?;
    let pool = route(&st, pool.as_deref(), "pool", "POOL_NOT_FOUND")?;
    let task = admit(&st, &pool, req, task_id)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"task_id": task.id, "pool": pool.group.as_str(), "replica": task.pool.replica, "queue_position": task.queue_position, "predicted_start_ms": task.predicted_start_ms})),
    )
        .into_response())
}

/// The pool a request names (`None`: the first pool); 404 with `code` when no pool answers to it.
pub fn route(
    st: &AppState,
    name: Option<&str>,
    field: &'static str,
    code: &'static str,
) -> Result<Arc<Pool>, ApiError> {
    let Some(name) = name else {
        return Ok(st.default_pool().clone());
    };
    if let Some(p) = st.find_pool(name) {
        return Ok(p.clone());
    }
    st.metrics.reject("invalid");
    let served: Vec<String> = st.heads().map(|p| format!("`{}`", p.group)).collect();
    Err(ApiError {
        field: Some(field.into()),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            code,
            format!(
                "no pool or model `{}` here; this orchestrator serves {} (GET /v1/models lists every name)",
                llorch_io::handoff::excerpt(name, 64),
                served.join(", ")
            ),
        )
    })
}

/// The text a task's affinity key is taken from: the prompt, or the messages in order.
fn affinity_text(req: &TaskRequest) -> String {
    if let Some(p) = &req.prompt {
        return p.chars().take(crate::pool::AFFINITY_PREFIX_CHARS).collect();
    }
    let mut s = String::new();
    for m in req
        .messages
        .as_ref()
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
    {
        s.push_str(m["role"].as_str().unwrap_or(""));
        s.push('\n');
        s.push_str(m["content"].as_str().unwrap_or(""));
        s.push('\n');
        if s.len() >= crate::pool::AFFINITY_PREFIX_CHARS * 4 {
            break;
        }
    }
    s
}

/// Seconds until the pool `members` frees a place, from its observed
/// service rate (tasks finished per second over the last ones, summed over
/// replicas); before any finished, from its slots and the average task time.
pub fn retry_after_s(members: &[Arc<Pool>]) -> u64 {
    let observed: f64 = members.iter().filter_map(|p| p.service_rate()).sum();
    let rate = if observed > 0.0 {
        observed
    } else {
        let slots: usize = members.iter().map(|p| p.slots).sum();
        let avg_s = members
            .iter()
            .map(|p| p.avg_task_ms.load(Ordering::Relaxed))
            .max()
            .unwrap_or(1000)
            .max(1) as f64
            / 1000.0;
        slots.max(1) as f64 / avg_s
    };
    ((1.0 / rate).ceil() as u64).clamp(1, 3600)
}

/// Admit a checked request into a pool's queue (shared by the task API and
/// the OpenAI endpoints): the replica ([`crate::pool::pick_replica`]),
/// readiness (or load on demand), a unique id, capacity (`queue_capacity`
/// tasks waiting over all the pool's replicas).
pub fn admit(
    st: &Shared,
    head: &Arc<Pool>,
    req: TaskRequest,
    task_id: Option<String>,
) -> Result<Arc<Task>, ApiError> {
    let members = st.members(&head.group);
    let pool = &if members.len() > 1 {
        crate::pool::pick_replica(&members, &affinity_text(&req))
    } else {
        head.clone()
    };
    let waits_for_load =
        pool.link.loads_on_demand() && !matches!(pool.link_state(), LinkState::Failed(_));
    if st.stopping.load(Ordering::SeqCst) || !(pool.ready.load(Ordering::SeqCst) || waits_for_load)
    {
        return Err(not_ready(st, pool));
    }
    let task_id = task_id.unwrap_or_else(|| st.new_task_id());
    let task = {
        let mut all = st.tasks.lock().unwrap();
        if all.contains_key(&task_id) {
            st.metrics.reject("invalid");
            return Err(ApiError {
                field: Some("task_id".into()),
                ..ApiError::new(
                    StatusCode::CONFLICT,
                    "TASK_EXISTS",
                    format!("task `{task_id}` already exists"),
                )
            });
        }
        let depth: usize = members.iter().map(|p| p.queue.len()).sum();
        if depth >= st.cfg.queue_capacity {
            st.metrics.reject("queue_full");
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "QUEUE_FULL",
                format!("the queue of pool `{}` is full ({depth} tasks)", pool.group),
            )
            .retry_after(retry_after_s(&members)));
        }
        // Tasks ahead on this replica, shared by its slots.
        let ahead = pool.load();
        let position = ahead;
        let predicted = (ahead / pool.slots) as u64 * pool.avg_task_ms.load(Ordering::Relaxed);
        let task = Arc::new(Task::new(
            task_id.clone(),
            pool.clone(),
            req,
            position,
            predicted,
        ));
        all.insert(task_id, task.clone());
        pool.queue.push(task.clone());
        task
    };
    pool.touch();
    tasks::arm_deadline(st, &task);
    st.metrics.admitted.inc();
    pool.work.notify_one();
    st.sched.notify_one();
    Ok(task)
}

/// Cancels its task when the client's stream is dropped (disconnect).
pub struct DisconnectGuard(pub Arc<Task>, pub Shared);
impl Drop for DisconnectGuard {
    fn drop(&mut self) {
        tasks::cancel(&self.1, &self.0, CancelReason::ClientDisconnected);
    }
}

fn find_task(st: &AppState, id: &str) -> Result<Arc<Task>, ApiError> {
    st.tasks.lock().unwrap().get(id).cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "TASK_NOT_FOUND",
            format!("no task `{}`", llorch_io::handoff::excerpt(id, 64)),
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

fn pool_json(st: &AppState, head: &Pool) -> serde_json::Value {
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
        "system_fingerprint": e.as_ref().map(crate::openai::system_fingerprint),
        "model": e.as_ref().map(|e| json!({"ref": e.model_ref, "digest": e.model_digest})),
        "ctx_max": e.as_ref().and_then(|e| e.ctx_max),
        "mode": e.as_ref().map(|e| e.mode()).unwrap_or("exact"),
        "deterministic": !e.as_ref().is_some_and(|e| e.batched),
        "slots": p.slots,
        "capacity": p.slots * members.len(),
        "affinity": p.affinity.as_str(),
        "replicas": replicas,
        "queue_depth": sum(&|m| m.queue.len() as u64),
        "running": sum(&|m| m.running.load(Ordering::SeqCst)),
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

fn token_ok(st: &AppState, headers: &HeaderMap) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let Some(want) = &st.cfg.api_token else {
        return true;
    };
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Hash both so the comparison is constant-time whatever the lengths.
    let a = Sha256::digest(got.as_bytes());
    let b = Sha256::digest(want.as_bytes());
    a.ct_eq(&b).into()
}

async fn auth(
    State(st): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    let open = path == "/healthz" || path == "/readyz";
    if !open && !token_ok(&st, req.headers()) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "missing or wrong `Authorization: Bearer <token>`",
        )
        .into_response();
    }
    next.run(req).await
}

/// The `Host` a request names, lowercased, without its port.
fn request_host(req: &axum::extract::Request) -> Option<String> {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))?;
    let raw = raw.trim().to_ascii_lowercase();
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or("").to_string()
    } else {
        raw.rsplit_once(':')
            .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
            .map(|(h, _)| h.to_string())
            .unwrap_or(raw)
    };
    Some(host)
}

/// Whether `host` may address this orchestrator (DNS-rebinding guard).
pub fn host_allowed(cfg: &crate::Config, host: &str) -> bool {
    if cfg.allowed_hosts.iter().any(|h| h == host) {
        return true;
    }
    let ip = cfg.addr.ip();
    if ip.is_loopback() {
        return matches!(host, "localhost" | "127.0.0.1" | "::1") || host == ip.to_string();
    }
    // Off loopback the token protects the API; names are checked only when configured.
    cfg.allowed_hosts.is_empty() || host == ip.to_string()
}

/// Refuse what a web page could send: a foreign `Host` (403) and, on
/// endpoints that change state, a body that is not `application/json` (415;
/// a cross-origin form or `text/plain` post cannot set that type without a
/// CORS preflight, which this server never approves).
async fn guard(
    State(st): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(host) = request_host(&req) {
        if !host_allowed(&st.cfg, &host) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "HOST_NOT_ALLOWED",
                format!(
                    "requests for host `{}` are not served here; pass --allowed-host {} if this name is yours",
                    llorch_io::handoff::excerpt(&host, 64),
                    llorch_io::handoff::excerpt(&host, 64)
                ),
            )
            .into_response();
        }
    }
    if req.method() == axum::http::Method::POST {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UNSUPPORTED_MEDIA_TYPE",
                "send `Content-Type: application/json`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Every error in the API's shape: what the framework answers on its own
/// (413 for a body over the limit, 405 for a method a path does not take,
/// 404 for no such path: plain text or empty) becomes an [`ApiError`].
async fn error_shape(
    State(st): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let r = next.run(req).await;
    let status = r.status();
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return r;
    }
    let shown = llorch_io::handoff::excerpt(&path, 64);
    let e = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError {
            field: Some("body".into()),
            ..ApiError::new(
                status,
                "BODY_TOO_LARGE",
                format!(
                    "the request body is over {} bytes (max_body_bytes)",
                    st.cfg.max_body_bytes
                ),
            )
        },
        StatusCode::METHOD_NOT_ALLOWED => ApiError::new(
            status,
            "METHOD_NOT_ALLOWED",
            format!("{method} is not served on {shown}"),
        ),
        StatusCode::NOT_FOUND => ApiError::new(
            status,
            "NOT_FOUND",
            format!("no endpoint {shown} (GET /v1/capabilities lists what is served)"),
        ),
        _ => ApiError::new(
            status,
            "HTTP_ERROR",
            format!(
                "{} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            ),
        ),
    };
    let allow = r.headers().get(header::ALLOW).cloned();
    let mut out = e.into_response();
    if let Some(a) = allow {
        out.headers_mut().insert(header::ALLOW, a);
    }
    out
}

pub fn router(st: Shared) -> Router {
    Router::new()
        .route("/v1/tasks", post(create_task))
        .route("/v1/tasks/{id}/stream", get(stream_task).head(stream_task))
        .route("/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/v1/capabilities", get(capabilities))
        .route("/v1/models", get(crate::openai::models))
        .route(
            "/v1/chat/completions",
            post(crate::openai::chat_completions),
        )
        .route("/v1/completions", post(crate::openai::completions))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(axum::middleware::from_fn_with_state(st.clone(), auth))
        .layer(axum::middleware::from_fn_with_state(st.clone(), guard))
        .layer(DefaultBodyLimit::max(st.cfg.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            st.clone(),
            error_shape,
        ))
        .with_state(st)
}
