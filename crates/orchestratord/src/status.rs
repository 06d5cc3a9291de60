//! The status page and its feed: what a person watches instead of reading
//! `/v1/capabilities`, `/metrics` and engine logs by hand.
//!
//! * `GET /status`: one server-rendered HTML page ([`page`]); `/status/app.js`
//!   (the project's own small script) keeps it current from the feed,
//!   `/status/app.css` styles it. No inline script or style, no third-party
//!   file: `Content-Security-Policy: default-src 'self'`.
//! * `GET /v1/status`: the snapshot as JSON (`cargo xtask status`);
//!   `GET /v1/status/events`: the same snapshots pushed over SSE on every
//!   change (a pool's or replica's state, a task admitted, started, ended)
//!   and once a second for the rates and countdowns.
//! * `GET /v1/status/pools/{pool}/log`: the tail of a pool's engine logs.
//!
//! One task (the monitor) builds each snapshot once, whoever watches; a
//! watcher holds only the newest (a `watch` channel: a slow one skips
//! snapshots, it never queues them). Watchers are capped; one that has not
//! taken a snapshot for [`STALE_WATCHER`] while newer ones waited no longer
//! counts against the cap and its stream ends at its next read. History is
//! two fixed rings ([`REQUESTS_KEPT`] requests, [`EVENTS_KEPT`] state
//! changes). No prompt or generated text is ever recorded.
//!
//! Off loopback the API token guards all of it; a browser carries it in a
//! cookie that `POST /status/login` sets (the page's login form; never in a
//! URL). The cookie opens only these read-only paths, never the task API.

mod monitor;
pub mod page;

pub use monitor::monitor;
use monitor::Monitor;

use crate::errors::ApiError;
use crate::{AppState, Shared};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Notify};

/// Requests the page lists (the newest first).
pub const REQUESTS_KEPT: usize = 50;
/// State changes the page lists.
pub const EVENTS_KEPT: usize = 50;
/// Watchers of the feed at once (each open page is one).
pub const MAX_WATCHERS: usize = 256;
/// Watchers kept at all, stale ones included.
const MAX_WATCHERS_KEPT: usize = 4 * MAX_WATCHERS;
/// A watcher that took nothing for this long, while newer snapshots waited, is dropped.
pub const STALE_WATCHER: Duration = Duration::from_secs(30);
/// How often the monitor looks at the pools' states.
pub(crate) const TICK: Duration = Duration::from_millis(250);
/// A snapshot at least this often (rates, countdowns).
pub(crate) const REFRESH: Duration = Duration::from_secs(1);
/// At most four snapshots a second are built, however busy the server (each
/// goes to every watcher; a change still shows within a second).
pub(crate) const MIN_BUILD_GAP: Duration = Duration::from_millis(250);
/// The engine log tail: lines and bytes read from the end of each log.
pub const LOG_TAIL_LINES: usize = 200;
const LOG_TAIL_BYTES: u64 = 64 * 1024;
/// The cookie a browser carries the token in.
pub const COOKIE: &str = "llorch_status";
/// Every status response's headers: its own files only, never framed.
pub const CSP: &str =
    "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// One finished request, as the page lists it (counts and times, no text).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RequestRecord {
    /// When it ended (Unix milliseconds).
    pub at_ms: u64,
    /// The API path it came in on (`/v1/tasks`, `/v1/chat/completions`, …).
    pub api: String,
    pub pool: String,
    pub replica: usize,
    /// `ok`, `canceled`, or the error code.
    pub status: String,
    pub prompt_tokens: u64,
    pub tokens_out: u64,
    pub queue_wait_ms: u64,
    /// Admission to the first token; none when no token came.
    pub ttft_ms: Option<u64>,
    pub tokens_per_s: Option<f64>,
    pub canceled: bool,
}

/// A replica's state change.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Transition {
    pub at_ms: u64,
    pub pool: String,
    pub replica: usize,
    pub from: String,
    pub to: String,
}

/// The feed's state, shared by the monitor, the tasks and the watchers.
pub struct Hub {
    /// The newest snapshot (JSON); `None` once the server stops (streams end).
    tx: watch::Sender<Option<Arc<str>>>,
    poke: Notify,
    dirty: AtomicBool,
    requests: Mutex<VecDeque<RequestRecord>>,
    /// Watchers: when each last took a snapshot (ms since `started`).
    watchers: Mutex<HashMap<u64, Arc<AtomicU64>>>,
    next_watcher: AtomicU64,
    /// Each replica's last state and the ring of state changes.
    seen: Mutex<monitor::Seen>,
    started: Instant,
}

impl Default for Hub {
    fn default() -> Hub {
        Hub {
            tx: watch::Sender::new(None),
            poke: Notify::new(),
            dirty: AtomicBool::new(false),
            requests: Mutex::new(VecDeque::with_capacity(REQUESTS_KEPT)),
            watchers: Mutex::new(HashMap::new()),
            next_watcher: AtomicU64::new(0),
            seen: Mutex::new(Default::default()),
            started: Instant::now(),
        }
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Hub {
    /// Something the page shows changed: a snapshot follows soon.
    pub fn poke(&self) {
        self.dirty.store(true, Ordering::SeqCst);
        self.poke.notify_one();
    }

    /// Replica `p` is in `state` now (its health loop looks every few
    /// milliseconds while it changes): a change goes into the ring and
    /// starts a snapshot.
    pub fn saw(&self, p: &crate::pool::Pool, state: &str) {
        let changed =
            self.seen
                .lock()
                .unwrap()
                .saw(p.id.as_str(), p.group.as_str(), p.replica, state);
        if changed {
            self.poke();
        }
    }

    /// A request ended.
    pub fn record(&self, r: RequestRecord) {
        {
            let mut q = self.requests.lock().unwrap();
            if q.len() == REQUESTS_KEPT {
                q.pop_back();
            }
            q.push_front(r);
        }
        self.poke();
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.requests.lock().unwrap().iter().cloned().collect()
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Watchers that took a snapshot within [`STALE_WATCHER`].
    pub fn live_watchers(&self) -> usize {
        let now = self.now_ms();
        let stale = STALE_WATCHER.as_millis() as u64;
        self.watchers
            .lock()
            .unwrap()
            .values()
            .filter(|t| now.saturating_sub(t.load(Ordering::Relaxed)) <= stale)
            .count()
    }

    /// A place among the watchers, or why there is none.
    fn join(self: &Arc<Self>) -> Result<WatcherSlot, usize> {
        let live = self.live_watchers();
        let mut w = self.watchers.lock().unwrap();
        if live >= MAX_WATCHERS || w.len() >= MAX_WATCHERS_KEPT {
            return Err(live);
        }
        let id = self.next_watcher.fetch_add(1, Ordering::Relaxed);
        let taken = Arc::new(AtomicU64::new(self.now_ms()));
        w.insert(id, taken.clone());
        Ok(WatcherSlot {
            hub: self.clone(),
            id,
            taken,
        })
    }
}

/// A watcher's place; given back when its stream ends.
struct WatcherSlot {
    hub: Arc<Hub>,
    id: u64,
    taken: Arc<AtomicU64>,
}

impl Drop for WatcherSlot {
    fn drop(&mut self) {
        self.hub.watchers.lock().unwrap().remove(&self.id);
    }
}

tokio::task_local! {
    /// The API path of the request being handled (for [`RequestRecord::api`]).
    static API: String;
}

/// The API path a task is admitted through (set by the `api_scope` middleware).
pub fn current_api() -> String {
    API.try_with(|a| a.clone()).unwrap_or_default()
}

/// Middleware: remembers the request's path while its handler runs.
pub(crate) async fn api_scope(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = llorch_types::excerpt(req.uri().path(), 64);
    API.scope(path, next.run(req)).await
}

/// Whether the request carries the token: the API's headers, or the status cookie.
pub fn authorized(st: &AppState, headers: &HeaderMap) -> bool {
    if st.cfg.api_token.is_none() || crate::guard::token_ok(st, headers) {
        return true;
    }
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v);
    cookie.is_some_and(|c| crate::guard::token_matches(st, c))
}

/// The headers every status response carries.
fn secure(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

fn html(status: StatusCode, body: String) -> Response {
    secure(
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            body,
        )
            .into_response(),
    )
}

/// The newest snapshot (built now when the monitor has made none yet).
fn current(st: &AppState) -> Value {
    let snap = st.status.tx.borrow().clone();
    match snap.and_then(|s| serde_json::from_str(&s).ok()) {
        Some(v) => v,
        None => Monitor::default().snapshot(st, 0),
    }
}

/// `GET /status`: the page, or the login form when the token is needed.
pub async fn status_page(State(st): State<Shared>, headers: HeaderMap) -> Response {
    if !authorized(&st, &headers) {
        // A page, not an error: the error shape would turn a 401 into JSON.
        return html(StatusCode::OK, page::login());
    }
    html(StatusCode::OK, page::render(&current(&st)))
}

pub async fn app_js() -> Response {
    secure(
        (
            [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
            page::APP_JS,
        )
            .into_response(),
    )
}

pub async fn app_css() -> Response {
    secure(
        (
            [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
            page::APP_CSS,
        )
            .into_response(),
    )
}

#[derive(serde::Deserialize)]
pub struct Login {
    token: String,
}

/// `POST /status/login` (JSON `{"token": …}`, sent by the page's script):
/// sets the cookie when the token is right.
pub async fn login(State(st): State<Shared>, body: axum::body::Bytes) -> Response {
    let Ok(l) = serde_json::from_slice::<Login>(&body) else {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "send {\"token\": \"…\"}",
        )
        .into_response();
    };
    if st.cfg.api_token.is_some() && !crate::guard::token_matches(&st, &l.token) {
        return ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "wrong token")
            .into_response();
    }
    // The token itself is the session (a cookie value may not hold every byte).
    if l.token.is_empty()
        || !l
            .token
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b';' && b != b',' && b != b'"')
    {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "this token cannot be carried in a cookie; use the API with `Authorization: Bearer`",
        )
        .into_response();
    }
    let cookie = format!("{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict", l.token);
    let mut r = secure(StatusCode::NO_CONTENT.into_response());
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// `GET /v1/status`: the newest snapshot.
pub async fn status_json(State(st): State<Shared>) -> Response {
    secure(axum::Json(current(&st)).into_response())
}

/// `GET /v1/status/events`: snapshots over SSE, `event: snapshot`.
pub async fn events(State(st): State<Shared>) -> Response {
    let slot = match st.status.join() {
        Ok(s) => s,
        Err(live) => {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "TOO_MANY_WATCHERS",
                format!("{live} status pages are open already (at most {MAX_WATCHERS}); close one"),
            )
            .retry_after(5)
            .into_response();
        }
    };
    let hub = st.status.clone();
    let rx = st.status.tx.subscribe();
    let stream = futures_util::stream::unfold((rx, slot, true), move |(mut rx, slot, first)| {
        let hub = hub.clone();
        async move {
            if !first {
                let now = hub.now_ms();
                let last = slot.taken.load(Ordering::Relaxed);
                // A reader that fell this far behind is dropped, not waited for.
                if rx.has_changed().unwrap_or(true)
                    && now.saturating_sub(last) > STALE_WATCHER.as_millis() as u64
                {
                    return None;
                }
                rx.changed().await.ok()?;
            }
            let snap = rx.borrow_and_update().clone()?;
            slot.taken.store(hub.now_ms(), Ordering::Relaxed);
            let ev = Event::default().event("snapshot").data(&*snap);
            Some((Ok::<_, std::convert::Infallible>(ev), (rx, slot, false)))
        }
    });
    secure(Sse::new(stream).into_response())
}

/// `GET /v1/status/pools/{pool}/log`: the last lines of each replica's engine log.
pub async fn pool_log(State(st): State<Shared>, Path(pool): Path<String>) -> Response {
    let members: Vec<_> = st
        .pools
        .iter()
        .filter(|p| p.group.as_str() == pool)
        .cloned()
        .collect();
    if members.is_empty() {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "POOL_NOT_FOUND",
            format!("no pool `{}` here", llorch_types::excerpt(&pool, 64)),
        )
        .into_response();
    }
    let logs = tokio::task::spawn_blocking(move || {
        members
            .iter()
            .map(|m| {
                let lines = m.link.log_path().map(|p| tail(&p));
                json!({"replica": m.replica, "run_id": m.id.as_str(), "lines": lines})
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    secure(axum::Json(json!({"pool": pool, "replicas": logs})).into_response())
}

/// The last [`LOG_TAIL_LINES`] lines of a log, reading at most its last
/// 64 KiB (lossy UTF-8; a missing log is no lines).
pub fn tail(path: &std::path::Path) -> Vec<String> {
    use fs_err::os::unix::fs::OpenOptionsExt;
    use std::io::{Read, Seek, SeekFrom};
    // A regular file only, not followed through a link, opened without
    // blocking: a FIFO or device put in a log's place never stalls the reader.
    let regular = fs_err::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file());
    let opened = fs_err::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path);
    let (true, Ok(mut f)) = (regular, opened) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(LOG_TAIL_BYTES);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(LOG_TAIL_BYTES).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    // A cut first line is not shown.
    if start > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    let from = lines.len().saturating_sub(LOG_TAIL_LINES);
    lines[from..].iter().map(|l| l.to_string()).collect()
}

/// Finish-time facts of a task for the page (no text).
pub fn record_of(task: &crate::tasks::Task, ev: &crate::events::TaskEvent) -> RequestRecord {
    use crate::events::TaskEvent;
    let ttft_ms = task
        .first_token_at()
        .map(|t| t.duration_since(task.admitted_at).as_millis() as u64);
    let mut r = RequestRecord {
        at_ms: unix_ms(),
        api: task.api.clone(),
        pool: task.pool.group.to_string(),
        replica: task.pool.replica,
        status: "ok".into(),
        prompt_tokens: 0,
        tokens_out: 0,
        queue_wait_ms: 0,
        ttft_ms,
        tokens_per_s: None,
        canceled: false,
    };
    match ev {
        TaskEvent::End(e) => {
            r.canceled = e.canceled;
            if e.canceled {
                r.status = "canceled".into();
            }
            r.prompt_tokens = e.prompt_tokens;
            r.tokens_out = e.tokens_out;
            r.queue_wait_ms = e.queue_wait_ms;
            r.tokens_per_s = (e.decode_tokens_per_s > 0.0)
                .then(|| (e.decode_tokens_per_s * 10.0).round() / 10.0);
        }
        TaskEvent::Error(e) => {
            r.status = e.code.clone();
            r.canceled = task.canceled();
            r.queue_wait_ms = task.admitted_at.elapsed().as_millis() as u64;
        }
        _ => {}
    }
    r
}

#[cfg(test)]
mod tests;
