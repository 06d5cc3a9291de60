//! orchestratord: admits tasks, streams real llama.cpp tokens over SSE,
//! cancels promptly.
//!
//! Theory of operation:
//! * A health loop keeps `ready` equal to "the engine's `/health` is 200"
//!   for the engine that the [`EngineLink`] points at (a handoff file, or a
//!   supervisor in `cargo xtask serve`).
//! * `POST /v1/tasks` validates, then pushes onto a bounded FIFO; each task
//!   owns a channel of SSE events, buffered until the client opens its stream.
//! * One worker per engine slot pops tasks and runs them through the
//!   llama.cpp adapter ([`adapter`]), which turns llama-server's streaming
//!   `data:` frames into `token` events as they arrive.
//! * Cancel (request, client disconnect, deadline) drops the upstream
//!   request: llama-server sees the closed connection and frees its slot; we
//!   wait for `/slots` to show it idle before ending the stream.
//!
//! Architecture Invariant: no token is ever made up here. If the engine
//! cannot answer, the client gets an `error` event.

pub mod adapter;
pub mod metrics;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

/// What the orchestrator knows about the engine it fronts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EngineInfo {
    pub url: String,
    pub engine: String,
    pub engine_version: String,
    pub model_ref: String,
    pub model_digest: String,
    pub ctx_max: Option<u64>,
    pub slots: usize,
}

impl EngineInfo {
    /// From a handoff file written by `provision`.
    pub fn from_handoff(v: &Value) -> Option<EngineInfo> {
        Some(EngineInfo {
            url: v["url"].as_str()?.to_string(),
            engine: v["engine"].as_str().unwrap_or("llamacpp").to_string(),
            engine_version: v["engine_version"].as_str().unwrap_or("").to_string(),
            model_ref: v["model"]["ref"].as_str().unwrap_or("").to_string(),
            model_digest: v["model"]["digest"].as_str().unwrap_or("").to_string(),
            ctx_max: v["model"]["metadata"]["ctx_max"].as_u64(),
            slots: 1,
        })
    }
}

/// Where the engine is right now (it moves when a supervisor restarts it).
pub trait EngineLink: Send + Sync + 'static {
    fn current(&self) -> Option<EngineInfo>;
}

/// Follows `.runtime/engines/<pool>.json`.
pub struct HandoffLink(pub std::path::PathBuf);

impl EngineLink for HandoffLink {
    fn current(&self) -> Option<EngineInfo> {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&self.0).ok()?).ok()?;
        EngineInfo::from_handoff(&v)
    }
}

impl<F: Fn() -> Option<EngineInfo> + Send + Sync + 'static> EngineLink for F {
    fn current(&self) -> Option<EngineInfo> {
        self()
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub addr: SocketAddr,
    pub api_token: Option<String>,
    pub queue_capacity: usize,
    pub max_body_bytes: usize,
    pub max_prompt_chars: usize,
    pub max_tokens_limit: u32,
    pub default_max_tokens: u32,
    pub default_seed: u64,
    pub health_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_token: None,
            queue_capacity: 64,
            max_body_bytes: 256 * 1024,
            max_prompt_chars: 64 * 1024,
            max_tokens_limit: 4096,
            default_max_tokens: 128,
            default_seed: 42,
            health_interval: Duration::from_millis(200),
        }
    }
}

/// The listening options shared by `orchestratord` and `cargo xtask serve`.
#[derive(Clone, Debug, clap::Args)]
pub struct ListenArgs {
    /// Address to listen on (a non-loopback address needs an API token)
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Bearer token clients must send (required off loopback)
    #[arg(long, env = "LLORCH_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Tasks that may wait in the queue
    #[arg(long, default_value_t = 64)]
    pub queue_capacity: usize,
}

impl ListenArgs {
    pub fn config(&self) -> Config {
        Config {
            addr: self.addr,
            api_token: self.api_token.clone(),
            queue_capacity: self.queue_capacity,
            ..Default::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("refusing to bind {0} without an API token: a non-loopback address is reachable from other machines\n  hint: set LLORCH_API_TOKEN (clients then send `Authorization: Bearer <token>`) or bind 127.0.0.1")]
    TokenRequired(SocketAddr),
    #[error("bind {addr}: {err}")]
    Bind {
        addr: SocketAddr,
        err: std::io::Error,
    },
}

/// A validated task request.
#[derive(Clone, Debug)]
pub struct TaskRequest {
    pub prompt: Option<String>,
    pub messages: Option<Value>,
    pub max_tokens: u32,
    pub seed: u64,
    pub temperature: f64,
    pub deadline_ms: Option<u64>,
    /// Keep generating past end-of-sequence (fixed-length benchmarks).
    pub ignore_eos: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TaskState {
    Queued,
    Running,
    Done,
}

pub struct Task {
    pub id: String,
    pub req: TaskRequest,
    tx: Mutex<Option<mpsc::UnboundedSender<Event>>>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
    pub cancel: AtomicBool,
    pub cancel_notify: Notify,
    cancel_at: Mutex<Option<Instant>>,
    pub state: Mutex<TaskState>,
    pub admitted_at: Instant,
    pub queue_position: usize,
    pub predicted_start_ms: u64,
}

impl Task {
    fn send(&self, name: &str, data: Value) -> bool {
        let g = self.tx.lock().unwrap();
        match g.as_ref() {
            Some(tx) => tx
                .send(Event::default().event(name).data(data.to_string()))
                .is_ok(),
            None => false,
        }
    }
    /// Send the final event and close the stream.
    fn finish(&self, name: &str, data: Value) {
        self.send(name, data);
        self.tx.lock().unwrap().take();
        *self.state.lock().unwrap() = TaskState::Done;
    }
    pub fn request_cancel(&self) {
        let mut g = self.cancel_at.lock().unwrap();
        if g.is_none() {
            *g = Some(Instant::now());
        }
        self.cancel.store(true, Ordering::SeqCst);
        self.cancel_notify.notify_waiters();
        self.cancel_notify.notify_one();
    }
    pub fn canceled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

pub struct AppState {
    pub cfg: Config,
    pub link: Box<dyn EngineLink>,
    pub http: reqwest::Client,
    pub ready: AtomicBool,
    pub draining: AtomicBool,
    pub engine: Mutex<Option<EngineInfo>>,
    pub queue: Mutex<VecDeque<Arc<Task>>>,
    pub tasks: Mutex<HashMap<String, Arc<Task>>>,
    pub running: AtomicU64,
    pub work: Notify,
    pub ready_changed: Notify,
    pub metrics: metrics::Metrics,
    pub avg_task_ms: AtomicU64,
    seq: AtomicU64,
}

pub type Shared = Arc<AppState>;

impl AppState {
    pub fn new(cfg: Config, link: Box<dyn EngineLink>) -> Shared {
        Arc::new(AppState {
            cfg,
            link,
            http: llorch_io::http::async_client(),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            engine: Mutex::new(None),
            queue: Mutex::new(VecDeque::new()),
            tasks: Mutex::new(HashMap::new()),
            running: AtomicU64::new(0),
            work: Notify::new(),
            ready_changed: Notify::new(),
            metrics: Default::default(),
            avg_task_ms: AtomicU64::new(1000),
            seq: AtomicU64::new(0),
        })
    }

    pub fn engine_url(&self) -> Option<String> {
        self.engine.lock().unwrap().as_ref().map(|e| e.url.clone())
    }

    fn new_task_id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let seed = format!(
            "{}-{}-{n}-{:?}",
            std::process::id(),
            llorch_io::now_rfc3339(),
            Instant::now()
        );
        format!(
            "t-{}",
            &llorch_io::digest::sha256_bytes(seed.as_bytes())[..16]
        )
    }
}

/// Keep `ready` and `engine` current.
pub async fn health_loop(st: Shared) {
    loop {
        let info = st.link.current();
        let ok = match &info {
            Some(i) => st
                .http
                .get(format!("{}/health", i.url))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .map(|r| r.status().as_u16() == 200)
                .unwrap_or(false),
            None => false,
        };
        *st.engine.lock().unwrap() = info;
        let was = st.ready.swap(ok, Ordering::SeqCst);
        if was != ok {
            st.ready_changed.notify_waiters();
            st.work.notify_waiters();
        }
        tokio::time::sleep(st.cfg.health_interval).await;
    }
}

/// One worker per engine slot: pop a task, run it.
pub async fn worker(st: Shared) {
    loop {
        if !st.ready.load(Ordering::SeqCst) {
            let n = st.ready_changed.notified();
            tokio::select! { _ = n => {}, _ = tokio::time::sleep(Duration::from_millis(100)) => {} }
            continue;
        }
        let next = st.queue.lock().unwrap().pop_front();
        let Some(task) = next else {
            let n = st.work.notified();
            tokio::select! { _ = n => {}, _ = tokio::time::sleep(Duration::from_millis(100)) => {} }
            continue;
        };
        if task.canceled() {
            continue;
        }
        *task.state.lock().unwrap() = TaskState::Running;
        st.running.fetch_add(1, Ordering::SeqCst);
        let t0 = Instant::now();
        adapter::run_task(&st, &task).await;
        st.running.fetch_sub(1, Ordering::SeqCst);
        let ms = t0.elapsed().as_millis() as u64;
        let avg = st.avg_task_ms.load(Ordering::Relaxed);
        st.avg_task_ms.store((avg * 7 + ms) / 8, Ordering::Relaxed);
    }
}

fn err_json(status: StatusCode, code: &str, message: String, field: Option<&str>) -> Response {
    let mut body = json!({"error": {"code": code, "message": message}});
    if let Some(f) = field {
        body["error"]["field"] = json!(f);
    }
    (status, Json(body)).into_response()
}

fn bad(st: &AppState, field: &str, message: impl Into<String>) -> Response {
    st.metrics.rejected_invalid.fetch_add(1, Ordering::Relaxed);
    err_json(
        StatusCode::BAD_REQUEST,
        "INVALID_REQUEST",
        message.into(),
        Some(field),
    )
}

async fn create_task(State(st): State<Shared>, body: axum::body::Bytes) -> Response {
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return bad(&st, "body", "the body must be a JSON object"),
        Err(e) => return bad(&st, "body", format!("invalid JSON: {e}")),
    };
    let known = [
        "prompt",
        "messages",
        "max_tokens",
        "seed",
        "temperature",
        "deadline_ms",
        "task_id",
        "ignore_eos",
    ];
    if let Some(k) = v
        .as_object()
        .unwrap()
        .keys()
        .find(|k| !known.contains(&k.as_str()))
    {
        return bad(
            &st,
            k,
            format!("unknown field `{k}` (known: {})", known.join(", ")),
        );
    }
    let prompt = match &v["prompt"] {
        Value::Null => None,
        Value::String(s) if s.is_empty() => return bad(&st, "prompt", "prompt is empty"),
        Value::String(s) => Some(s.clone()),
        _ => return bad(&st, "prompt", "prompt must be a string"),
    };
    let messages = match &v["messages"] {
        Value::Null => None,
        Value::Array(a) if !a.is_empty() => {
            for (i, m) in a.iter().enumerate() {
                if !m["role"].is_string() || !m["content"].is_string() {
                    return bad(
                        &st,
                        &format!("messages[{i}]"),
                        "each message needs string `role` and `content`",
                    );
                }
            }
            Some(v["messages"].clone())
        }
        _ => {
            return bad(
                &st,
                "messages",
                "messages must be a non-empty array of {role, content}",
            )
        }
    };
    let chars = prompt.as_ref().map(|p| p.chars().count()).unwrap_or(0)
        + messages
            .as_ref()
            .map(|m| m.to_string().chars().count())
            .unwrap_or(0);
    match (&prompt, &messages) {
        (None, None) => return bad(&st, "prompt", "give `prompt` or `messages`"),
        (Some(_), Some(_)) => return bad(&st, "messages", "give `prompt` or `messages`, not both"),
        _ => {}
    }
    if chars > st.cfg.max_prompt_chars {
        return bad(
            &st,
            if prompt.is_some() {
                "prompt"
            } else {
                "messages"
            },
            format!(
                "prompt is {chars} characters; the limit is {}",
                st.cfg.max_prompt_chars
            ),
        );
    }
    let max_tokens = match &v["max_tokens"] {
        Value::Null => st.cfg.default_max_tokens,
        x => match x.as_u64() {
            Some(n) if n >= 1 && n <= st.cfg.max_tokens_limit as u64 => n as u32,
            _ => {
                return bad(
                    &st,
                    "max_tokens",
                    format!(
                        "max_tokens must be an integer from 1 to {}",
                        st.cfg.max_tokens_limit
                    ),
                )
            }
        },
    };
    let seed = match &v["seed"] {
        Value::Null => st.cfg.default_seed,
        x => match x.as_u64() {
            Some(n) => n,
            None => return bad(&st, "seed", "seed must be a non-negative integer"),
        },
    };
    let temperature = match &v["temperature"] {
        Value::Null => 0.0,
        x => match x.as_f64() {
            Some(t) if (0.0..=2.0).contains(&t) => t,
            _ => {
                return bad(
                    &st,
                    "temperature",
                    "temperature must be a number from 0 to 2",
                )
            }
        },
    };
    let deadline_ms = match &v["deadline_ms"] {
        Value::Null => None,
        x => match x.as_u64() {
            Some(n) if n > 0 => Some(n),
            _ => return bad(&st, "deadline_ms", "deadline_ms must be a positive integer"),
        },
    };
    let ignore_eos = match &v["ignore_eos"] {
        Value::Null => false,
        Value::Bool(b) => *b,
        _ => return bad(&st, "ignore_eos", "ignore_eos must be true or false"),
    };
    let task_id = match &v["task_id"] {
        Value::Null => st.new_task_id(),
        Value::String(s)
            if !s.is_empty()
                && s.len() <= 64
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
        {
            s.clone()
        }
        _ => {
            return bad(
                &st,
                "task_id",
                "task_id must be 1-64 letters, digits, '-' or '_'",
            )
        }
    };
    if st.draining.load(Ordering::SeqCst) {
        st.metrics
            .rejected_not_ready
            .fetch_add(1, Ordering::Relaxed);
        return err_json(
            StatusCode::SERVICE_UNAVAILABLE,
            "DRAINING",
            "the orchestrator is shutting down".into(),
            None,
        );
    }
    if !st.ready.load(Ordering::SeqCst) {
        st.metrics
            .rejected_not_ready
            .fetch_add(1, Ordering::Relaxed);
        let mut r = err_json(
            StatusCode::SERVICE_UNAVAILABLE,
            "ENGINE_NOT_READY",
            "no engine is ready; try again shortly".into(),
            None,
        );
        r.headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
        return r;
    }
    let mut tasks = st.tasks.lock().unwrap();
    // Forget finished tasks nobody will read any more.
    tasks.retain(|_, t| {
        *t.state.lock().unwrap() != TaskState::Done
            || t.admitted_at.elapsed() < Duration::from_secs(600)
    });
    if tasks.contains_key(&task_id) {
        st.metrics.rejected_invalid.fetch_add(1, Ordering::Relaxed);
        return err_json(
            StatusCode::CONFLICT,
            "TASK_EXISTS",
            format!("task `{task_id}` already exists"),
            Some("task_id"),
        );
    }
    let mut q = st.queue.lock().unwrap();
    if q.len() >= st.cfg.queue_capacity {
        st.metrics
            .rejected_queue_full
            .fetch_add(1, Ordering::Relaxed);
        let retry = (st.avg_task_ms.load(Ordering::Relaxed) / 1000).max(1);
        let mut r = err_json(
            StatusCode::TOO_MANY_REQUESTS,
            "QUEUE_FULL",
            format!("the queue is full ({} tasks)", q.len()),
            None,
        );
        r.headers_mut().insert(
            "retry-after",
            HeaderValue::from_str(&retry.to_string()).unwrap(),
        );
        return r;
    }
    let position = q.len() + st.running.load(Ordering::SeqCst) as usize;
    let predicted = position as u64 * st.avg_task_ms.load(Ordering::Relaxed);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = Arc::new(Task {
        id: task_id.clone(),
        req: TaskRequest {
            prompt,
            messages,
            max_tokens,
            seed,
            temperature,
            deadline_ms,
            ignore_eos,
        },
        tx: Mutex::new(Some(tx)),
        rx: Mutex::new(Some(rx)),
        cancel: AtomicBool::new(false),
        cancel_notify: Notify::new(),
        cancel_at: Mutex::new(None),
        state: Mutex::new(TaskState::Queued),
        admitted_at: Instant::now(),
        queue_position: position,
        predicted_start_ms: predicted,
    });
    q.push_back(task.clone());
    tasks.insert(task_id.clone(), task);
    drop(q);
    drop(tasks);
    st.metrics.admitted.fetch_add(1, Ordering::Relaxed);
    st.work.notify_one();
    (StatusCode::ACCEPTED, Json(json!({"task_id": task_id, "queue_position": position, "predicted_start_ms": predicted}))).into_response()
}

/// Cancels its task when the client's stream is dropped (disconnect).
struct DisconnectGuard(Arc<Task>);
impl Drop for DisconnectGuard {
    fn drop(&mut self) {
        if *self.0.state.lock().unwrap() != TaskState::Done {
            self.0.request_cancel();
        }
    }
}

fn find_task(st: &AppState, id: &str) -> Option<Arc<Task>> {
    st.tasks.lock().unwrap().get(id).cloned()
}

fn task_not_found(id: &str) -> Response {
    err_json(
        StatusCode::NOT_FOUND,
        "TASK_NOT_FOUND",
        format!("no task `{id}`"),
        None,
    )
}

async fn stream_task(State(st): State<Shared>, Path(id): Path<String>) -> Response {
    let Some(task) = find_task(&st, &id) else {
        return task_not_found(&id);
    };
    let rx = task.rx.lock().unwrap().take();
    let Some(rx) = rx else {
        return err_json(
            StatusCode::CONFLICT,
            "STREAM_TAKEN",
            format!("the stream of task `{id}` is already open"),
            None,
        );
    };
    let guard = DisconnectGuard(task);
    let stream = futures_util::stream::unfold((rx, guard), |(mut rx, g)| async move {
        rx.recv()
            .await
            .map(|ev| (Ok::<_, std::convert::Infallible>(ev), (rx, g)))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response()
}

async fn cancel_task(State(st): State<Shared>, Path(id): Path<String>) -> Response {
    let Some(task) = find_task(&st, &id) else {
        return task_not_found(&id);
    };
    let state = task.state.lock().unwrap().clone();
    match state {
        TaskState::Done => {}
        TaskState::Queued => {
            let removed = {
                let mut q = st.queue.lock().unwrap();
                let before = q.len();
                q.retain(|t| t.id != id);
                before != q.len()
            };
            task.request_cancel();
            if removed {
                st.metrics.canceled.fetch_add(1, Ordering::Relaxed);
                task.finish("end", json!({"tokens_out": 0, "decode_ms": 0, "stop_reason": "canceled", "canceled": true}));
            }
        }
        TaskState::Running => task.request_cancel(),
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn capabilities(State(st): State<Shared>) -> Response {
    let e = st.engine.lock().unwrap().clone();
    Json(json!({
        "api": "v1",
        "engine": e.as_ref().map(|e| e.engine.clone()),
        "engine_version": e.as_ref().map(|e| e.engine_version.clone()),
        "model": e.as_ref().map(|e| json!({"ref": e.model_ref, "digest": e.model_digest})),
        "ctx_max": e.as_ref().and_then(|e| e.ctx_max),
        "slots": e.as_ref().map(|e| e.slots).unwrap_or(1),
        "ready": st.ready.load(Ordering::SeqCst),
        "limits": {
            "queue_capacity": st.cfg.queue_capacity,
            "max_tokens": st.cfg.max_tokens_limit,
            "max_prompt_chars": st.cfg.max_prompt_chars,
            "max_body_bytes": st.cfg.max_body_bytes,
        },
        "streaming": "sse",
        "events": ["started", "token", "metrics", "end", "error"],
    }))
    .into_response()
}

async fn readyz(State(st): State<Shared>) -> Response {
    if st.ready.load(Ordering::SeqCst) && !st.draining.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "engine not ready\n").into_response()
    }
}

async fn metrics_text(State(st): State<Shared>) -> Response {
    let depth = st.queue.lock().unwrap().len();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        st.metrics.render(depth, st.ready.load(Ordering::SeqCst)),
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
        .get(axum::http::header::AUTHORIZATION)
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
        let mut r = err_json(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "missing or wrong `Authorization: Bearer <token>`".into(),
            None,
        );
        r.headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        return r;
    }
    next.run(req).await
}

pub fn router(st: Shared) -> Router {
    Router::new()
        .route("/v1/tasks", post(create_task))
        .route("/v1/tasks/{id}/stream", get(stream_task))
        .route("/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/v1/capabilities", get(capabilities))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .layer(axum::middleware::from_fn_with_state(st.clone(), auth))
        .layer(DefaultBodyLimit::max(st.cfg.max_body_bytes))
        .with_state(st)
}

/// A running orchestrator.
pub struct Server {
    pub addr: SocketAddr,
    pub state: Shared,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Stop admitting, let running tasks finish (up to `drain`), stop.
    pub async fn shutdown(mut self, drain: Duration) {
        self.state.draining.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + drain;
        while self.state.running.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for t in self.state.tasks.lock().unwrap().values() {
            t.request_cancel();
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.handle).await;
    }
}

/// Bind and start serving (health loop, workers, HTTP).
pub async fn start(cfg: Config, link: Box<dyn EngineLink>) -> Result<Server, ServeError> {
    if !cfg.addr.ip().is_loopback() && cfg.api_token.as_deref().unwrap_or("").is_empty() {
        return Err(ServeError::TokenRequired(cfg.addr));
    }
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|err| ServeError::Bind {
            addr: cfg.addr,
            err,
        })?;
    let addr = listener.local_addr().map_err(|err| ServeError::Bind {
        addr: cfg.addr,
        err,
    })?;
    let st = AppState::new(cfg, link);
    tokio::spawn(health_loop(st.clone()));
    tokio::spawn(worker(st.clone()));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = router(st.clone());
    // Each token is a small write: without TCP_NODELAY, Nagle and delayed ACKs hold it ~40 ms.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let handle = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
    });
    Ok(Server {
        addr,
        state: st,
        shutdown: Some(tx),
        handle,
    })
}
