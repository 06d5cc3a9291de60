//! orchestratord: admits tasks, streams real llama.cpp tokens over SSE,
//! cancels promptly.
//!
//! Theory of operation:
//! * A health loop keeps `ready` equal to "the link says Ready and the
//!   engine's `/health` is 200" for the engine that the [`EngineLink`]
//!   points at (a handoff file, or a supervisor in `cargo xtask serve`).
//! * `POST /v1/tasks` validates ([`api`]) and pushes onto a bounded FIFO;
//!   each task owns a channel of SSE events, buffered until the client opens
//!   its stream ([`tasks`]).
//! * One worker per engine slot pops tasks and runs them through the
//!   llama.cpp adapter ([`adapter`]), which turns llama-server's streaming
//!   frames into `token` events as they arrive.
//! * Every task ends in exactly one `end` or `error` (see [`tasks`]).
//!
//! Module map: [`config`] (flags, limits), [`link`] (where the engine is),
//! [`tasks`] (queue, state machine, workers, deadlines, retention), [`api`]
//! (typed requests, `ApiError`, handlers), [`adapter`] (llama.cpp), [`events`]
//! (the SSE event types), [`metrics`], [`client`] (a client of this API).
//!
//! Architecture Invariant: no token is ever made up here. If the engine
//! cannot answer, the client gets an `error` event.

pub mod adapter;
pub mod api;
pub mod client;
pub mod config;
pub mod events;
pub mod link;
pub mod metrics;
pub mod openai;
pub mod tasks;

pub use config::{Config, ListenArgs, ServeError};
pub use link::{EngineInfo, EngineLink, HandoffLink, LinkState};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

pub struct AppState {
    pub cfg: Config,
    pub link: Box<dyn EngineLink>,
    pub http: reqwest::Client,
    pub ready: AtomicBool,
    /// Draining or stopped: no new tasks.
    pub stopping: AtomicBool,
    /// The engine last seen ready (for capabilities while it restarts).
    pub last_engine: Mutex<Option<EngineInfo>>,
    pub queue: tasks::Queue,
    pub tasks: Mutex<HashMap<String, Arc<tasks::Task>>>,
    pub running: AtomicU64,
    pub work: Notify,
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
            stopping: AtomicBool::new(false),
            last_engine: Mutex::new(None),
            queue: Default::default(),
            tasks: Mutex::new(HashMap::new()),
            running: AtomicU64::new(0),
            work: Notify::new(),
            metrics: Default::default(),
            avg_task_ms: AtomicU64::new(1000),
            seq: AtomicU64::new(0),
        })
    }

    pub fn link_state(&self) -> LinkState {
        self.link.current()
    }

    /// `ready`, `starting`, `failed` or `draining`.
    pub fn pool_state(&self) -> &'static str {
        if self.stopping.load(Ordering::SeqCst) {
            return "draining";
        }
        match self.link_state() {
            LinkState::Failed(_) => "failed",
            LinkState::Ready(_) if self.ready.load(Ordering::SeqCst) => "ready",
            _ => "starting",
        }
    }

    pub fn mark_not_ready(&self) {
        self.ready.store(false, Ordering::SeqCst);
    }

    fn new_task_id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let r: u64 = rand::random();
        format!("t-{:016x}{n:x}", r)
    }
}

/// Keep `ready` current.
pub async fn health_loop(st: Shared) {
    while !st.stopping.load(Ordering::SeqCst) {
        let ok = match st.link_state() {
            LinkState::Ready(i) => {
                let healthy = st
                    .http
                    .get(format!("{}/health", i.url))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .map(|r| r.status().as_u16() == 200)
                    .unwrap_or(false);
                if healthy {
                    *st.last_engine.lock().unwrap() = Some(i);
                }
                healthy
            }
            _ => false,
        };
        let was = st.ready.swap(ok, Ordering::SeqCst);
        if was != ok {
            st.work.notify_waiters();
        }
        tokio::time::sleep(st.cfg.health_interval).await;
    }
}

/// A running orchestrator.
pub struct Server {
    pub addr: SocketAddr,
    pub state: Shared,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Stop admitting, let running tasks finish (up to `drain`), then end
    /// every remaining task with a terminal event and stop serving.
    pub async fn shutdown(mut self, drain: Duration) {
        let st = self.state.clone();
        st.stopping.store(true, Ordering::SeqCst);
        st.work.notify_waiters();
        tasks::fail_queued(&st, "DRAINING", "the orchestrator is shutting down", true);
        let deadline = Instant::now() + drain;
        while st.running.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let all: Vec<_> = st.tasks.lock().unwrap().values().cloned().collect();
        for t in &all {
            tasks::cancel(&st, t, tasks::CancelReason::Shutdown);
        }
        // Running tasks end in the adapter (a canceled `end` once the slot is idle).
        let deadline = Instant::now() + Duration::from_secs(5);
        while st.running.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.handle).await;
    }
}

/// Bind and start serving (health loop, worker, reaper, HTTP).
pub async fn start(cfg: Config, link: Box<dyn EngineLink>) -> Result<Server, ServeError> {
    cfg.check()?;
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
    tokio::spawn(tasks::worker(st.clone()));
    tokio::spawn(tasks::reaper(st.clone()));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = api::router(st.clone());
    let handle = tokio::spawn(serve_connections(
        listener,
        app,
        st.cfg.header_read_timeout,
        rx,
    ));
    Ok(Server {
        addr,
        state: st,
        shutdown: Some(tx),
        handle,
    })
}

/// Accept and serve HTTP/1.1 connections until `stop` fires, then let open
/// connections finish (graceful). Unlike `axum::serve`, a connection that has
/// not sent a complete request head within `header_timeout` is closed, so
/// slow-header clients cannot hold sockets. Each token is a small write:
/// TCP_NODELAY keeps Nagle and delayed ACKs from holding it ~40 ms.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    header_timeout: Duration,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = tcp.set_nodelay(true);
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(tcp), svc));
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}
