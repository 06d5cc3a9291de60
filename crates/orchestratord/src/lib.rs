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
//! Module map:
//! * the server: [`config`] (flags), [`limits`] (the one request-limits table
//!   of every API), [`errors`] (error shapes), [`guard`] (Host and
//!   Content-Type), [`admission`] (auth, queue bounds), [`metrics`];
//! * engines: [`link`] (where a pool's engine is, load and unload), [`pool`]
//!   (per engine: queue, health loop, gate, workers), [`adapter`] (llama.cpp's
//!   streaming frames → `token` events);
//! * tasks: [`tasks`] (queue, state machine, deadlines, retention), [`events`]
//!   (the SSE event types), [`api`] (typed `/v1/tasks` requests, `ApiError`);
//! * client APIs: [`openai`] and [`openai_stream`] (chat and completions),
//!   [`endpoints`] (the relayed llama-server endpoints), [`forward`] (one
//!   forwarding path for them), [`tools`] (forced tool calls under a grammar),
//!   [`anthropic`] (Messages), [`responses`] (Responses), [`embeddings`]
//!   (embeddings and rerank), [`models`] (`/v1/models`, capabilities);
//! * [`status`]: the status page, its JSON and its SSE feed;
//! * [`client`]: a client of this API (the CLI and tests use it).
//!
//! Architecture Invariant: no token is ever made up here. If the engine
//! cannot answer, the client gets an `error` event.

pub mod adapter;
pub mod admission;
pub mod anthropic;
pub mod api;
pub mod client;
pub mod config;
pub mod embeddings;
pub mod endpoints;
pub mod errors;
pub mod events;
pub mod fields;
pub mod forward;
pub mod guard;
pub mod limits;
pub mod link;
pub mod metrics;
pub mod models;
pub mod openai;
pub mod openai_stream;
pub mod pool;
pub mod responses;
pub mod runner;
pub mod scheduler;
pub mod status;
pub mod tasks;
pub mod tools;

pub use config::{Config, ListenArgs, ServeError};
pub use link::{EngineInfo, EngineLink, HandoffLink, LinkState, LoadContext, LoadRefusal};
pub use pool::{Affinity, Pool, PoolPolicy, PoolSpec};
pub use scheduler::SchedulerConfig;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

pub struct AppState {
    pub cfg: Config,
    /// The pools, in the order they were given (the first is the default).
    pub pools: Vec<Arc<pool::Pool>>,
    pub sched_cfg: scheduler::SchedulerConfig,
    pub http: reqwest::Client,
    /// Draining or stopped: no new tasks.
    pub stopping: AtomicBool,
    pub tasks: Mutex<HashMap<String, Arc<tasks::Task>>>,
    pub metrics: metrics::Metrics,
    /// Wakes the scheduler (a task queued on an unloaded pool, a state change).
    pub sched: Notify,
    /// Wakes whoever waits on the pools' state ([`AppState::wait_until`]:
    /// the stacks at start, the drain at shutdown, tests): a pool's `ready`
    /// changed, a task was queued, or a task started or stopped running.
    pub changed: Notify,
    /// The status page's feed ([`status`]).
    pub status: Arc<status::Hub>,
    seq: AtomicU64,
}

pub type Shared = Arc<AppState>;

impl AppState {
    pub fn new(cfg: Config, pools: Vec<PoolSpec>, sched_cfg: scheduler::SchedulerConfig) -> Shared {
        Arc::new(AppState {
            cfg,
            pools: pools
                .into_iter()
                .map(|p| Arc::new(pool::Pool::new(p)))
                .collect(),
            sched_cfg,
            http: llorch_io::http::async_client(),
            stopping: AtomicBool::new(false),
            tasks: Mutex::new(HashMap::new()),
            metrics: Default::default(),
            sched: Notify::new(),
            changed: Notify::new(),
            status: Arc::new(status::Hub::default()),
            seq: AtomicU64::new(0),
        })
    }

    /// The first pool (the one a task without `pool` runs on).
    pub fn default_pool(&self) -> &Arc<pool::Pool> {
        &self.pools[0]
    }

    /// Replica 0 of every pool, in the order given: the pools clients see.
    pub fn heads(&self) -> impl Iterator<Item = &Arc<pool::Pool>> {
        self.pools.iter().filter(|p| p.replica == 0)
    }

    /// Every replica of the pool `group`, replica 0 first.
    pub fn members(&self, group: &llorch_types::PoolId) -> Vec<Arc<pool::Pool>> {
        let mut m: Vec<Arc<pool::Pool>> = self
            .pools
            .iter()
            .filter(|p| &p.group == group)
            .cloned()
            .collect();
        m.sort_by_key(|p| p.replica);
        m
    }

    /// The pool a name routes to (its replica 0): a pool id first, then an
    /// alias (the first pool listed wins). Replica run ids are not names.
    pub fn find_pool(&self, name: &str) -> Option<&Arc<pool::Pool>> {
        self.heads()
            .find(|p| p.group.as_str() == name)
            .or_else(|| self.heads().find(|p| p.answers_to(name)))
    }

    /// Every pool's engine failed for good (no restart left): the reasons,
    /// one line per pool; `None` while any pool can still serve.
    pub fn all_failed(&self) -> Option<String> {
        let failed: Vec<String> = self
            .pools
            .iter()
            .filter_map(|p| match p.link_state() {
                LinkState::Failed(r) => Some(format!("pool {}: {r}", p.id)),
                _ => None,
            })
            .collect();
        (!failed.is_empty() && failed.len() == self.pools.len()).then(|| failed.join("\n"))
    }

    /// The default pool's engine state (single-pool callers).
    pub fn link_state(&self) -> LinkState {
        self.default_pool().link_state()
    }

    /// Every pool has a replica that is ready or can load on demand, and the
    /// orchestrator is not draining (a pool of several replicas serves while one restarts).
    pub fn is_ready(&self) -> bool {
        !self.stopping.load(Ordering::SeqCst)
            && self.heads().all(|h| {
                self.members(&h.group).iter().any(|p| {
                    p.ready.load(Ordering::SeqCst)
                        || (p.link.loads_on_demand()
                            && matches!(p.link_state(), LinkState::Unloaded | LinkState::Unloading))
                })
            })
    }

    /// The default pool's state, or `draining` (single-pool callers).
    pub fn pool_state(&self) -> &'static str {
        self.default_pool()
            .state(self.stopping.load(Ordering::SeqCst))
    }

    fn new_task_id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let r: u64 = rand::random();
        format!("t-{:016x}{n:x}", r)
    }

    /// Wait until `done` holds or `within` passes, woken by [`AppState::changed`];
    /// whether it holds. (A pool that loads on demand changes its link state
    /// outside this state, so a wake-up also comes every 250 ms.)
    pub async fn wait_until(&self, within: Duration, done: impl Fn(&AppState) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done(self) {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            let tick = (deadline - now).min(Duration::from_millis(250));
            let _ = tokio::time::timeout(tick, changed).await;
        }
    }

    /// Tasks running on every engine now.
    pub fn running(&self) -> u64 {
        self.pools
            .iter()
            .map(|p| p.running.load(Ordering::SeqCst))
            .sum()
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
        for p in &st.pools {
            p.work.notify_waiters();
            tasks::fail_queued(
                &st,
                p,
                "DRAINING",
                "the orchestrator is shutting down",
                true,
            );
        }
        st.wait_until(drain, |s| s.running() == 0).await;
        let all: Vec<_> = st.tasks.lock().unwrap().values().cloned().collect();
        for t in &all {
            tasks::cancel(&st, t, tasks::CancelReason::Shutdown);
        }
        // Running tasks end in the adapter (a canceled `end` once the slot is idle).
        st.wait_until(Duration::from_secs(5), |s| s.running() == 0)
            .await;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.handle).await;
    }
}

/// Serve one pool (its id: the engine's pool when it is ready at start, else `default`).
pub async fn start(cfg: Config, link: Box<dyn EngineLink>) -> Result<Server, ServeError> {
    let (id, slots) = match link.current() {
        LinkState::Ready(e) => (llorch_types::PoolId::parse(&e.pool).ok(), e.slots),
        _ => (None, 1),
    };
    let id = id.unwrap_or_else(|| llorch_types::PoolId::parse("default").expect("a valid pool id"));
    let mut spec = PoolSpec::new(id, link);
    spec.slots = slots;
    start_pools(cfg, vec![spec], SchedulerConfig::default()).await
}

/// Bind and start serving (per pool: health loop and worker; the scheduler, the reaper, HTTP).
pub async fn start_pools(
    cfg: Config,
    pools: Vec<PoolSpec>,
    sched_cfg: SchedulerConfig,
) -> Result<Server, ServeError> {
    cfg.check()?;
    if pools.is_empty() {
        return Err(ServeError::NoPools);
    }
    let mut ids = std::collections::HashSet::new();
    if let Some(dup) = pools.iter().find(|p| !ids.insert(p.id.to_string())) {
        return Err(ServeError::DuplicatePool(dup.id.to_string()));
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
    let st = AppState::new(cfg, pools, sched_cfg);
    for p in &st.pools {
        tokio::spawn(pool::health_loop(st.clone(), p.clone()));
        // One worker per engine slot.
        for _ in 0..p.slots {
            tokio::spawn(tasks::worker(st.clone(), p.clone()));
        }
    }
    tokio::spawn(scheduler::run(st.clone()));
    tokio::spawn(tasks::reaper(st.clone()));
    tokio::spawn(status::monitor(st.clone()));
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
        // Who watches for the client hanging up while a handler still works
        // (hyper notices only when it writes): see `guard::client_gone`.
        let (tcp, gone, watcher) = match guard::watch_hang_up(tcp) {
            Ok(w) => w,
            Err(_) => continue,
        };
        let svc = tower::ServiceExt::map_request(
            app.clone(),
            move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(gone.clone());
                req
            },
        );
        let svc = hyper_util::service::TowerToHyperService::new(svc);
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(tcp), svc));
        tokio::spawn(async move {
            let _ = conn.await;
            watcher.abort();
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}
