//! Pools: one engine link, one queue, one worker and one health loop each;
//! the scheduler loads pools on demand, unloads idle ones and keeps at most
//! `max_loaded` engines.
//!
//! Theory of operation:
//! * A task names its pool (`pool`, or OpenAI's `model`: a pool id or the
//!   model's name); [`crate::admission::route`] finds it, and it waits in that
//!   pool's queue. A pool that loads on demand admits tasks while it is
//!   unloaded or loading: they wait (bounded by their deadline), they never
//!   fail because of the load.
//! * The scheduler ([`crate::scheduler::run`]) runs every few milliseconds: it unloads a
//!   pool that has served nothing for its `idle_unload`, loads an unloaded
//!   pool with queued tasks, and, when `max_loaded` engines already run,
//!   first unloads the least recently used idle pool that is not
//!   `keep_loaded`. A pool that is busy (a task queued or running) is never
//!   unloaded.
//! * The gate: the worker takes a task (queue → running) and the scheduler
//!   decides an unload (queue empty, nothing running → closed) under the same
//!   per-pool mutex, so an unload never cuts a task that was just taken.
//! * Every state change is one log line: `[pool a] unloaded -> loading (...)`.
//! * Replicas: a pool served by K engines is K `Pool`s of one `group` (the
//!   pool id clients name), each with its own link, queue and workers, run
//!   id `<pool>.r<k>` for k > 0. The scheduler treats them one by one (so
//!   they count against `max_loaded` one by one); admission picks one
//!   ([`pick_replica`]): the usable replica with the fewest queued + running
//!   tasks, or, with `affinity: prefix`, the first replica in the prompt
//!   prefix's rendezvous-hash order whose load is within the bound
//!   (consistent hashing with bounded load).
//! * Slots: a batched engine with N slots gets N workers, so up to N tasks
//!   run on it at once; the rest wait in its queue.

use crate::link::{EngineInfo, EngineLink, LinkState};
use crate::tasks::Queue;
use crate::Shared;
use llorch_types::PoolId;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How a pool's engine is kept.
#[derive(Clone, Debug, Default)]
pub struct PoolPolicy {
    /// Start the engine at the first request, not at startup.
    pub lazy: bool,
    /// Stop the engine after this long without a task.
    pub idle_unload: Option<Duration>,
    /// Never unloaded to make room for another pool, nor when idle.
    pub keep_loaded: bool,
}

/// How admission spreads a pool's requests over its replicas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Affinity {
    /// The replica with the fewest queued + running tasks.
    #[default]
    None,
    /// Shared prompt prefixes go to one replica while its load is within the bound.
    Prefix,
}

impl Affinity {
    pub fn as_str(self) -> &'static str {
        match self {
            Affinity::None => "none",
            Affinity::Prefix => "prefix",
        }
    }
}

/// A pool to serve (one engine: the pool, or one replica of it): its id,
/// other names that route to it, and its engine.
pub struct PoolSpec {
    /// The run id (the pool id for replica 0, `<pool>.r<k>` otherwise).
    pub id: PoolId,
    /// The pool clients name (the same for every replica).
    pub group: PoolId,
    /// Replica index within the group (0 for a pool of one engine).
    pub replica: usize,
    /// Parallel slots of the engine: this many tasks run at once.
    pub slots: usize,
    pub affinity: Affinity,
    /// Names that also route here (the model's name); the first pool listed wins a shared name.
    pub aliases: Vec<String>,
    pub link: Box<dyn EngineLink>,
    pub policy: PoolPolicy,
    /// What the engine will be (build, model, flags; no URL yet), known before
    /// it loads: capabilities and `system_fingerprint` of an unloaded pool.
    pub engine: Option<EngineInfo>,
    /// How `slots: auto` / `replicas: auto` were chosen (shown in capabilities).
    pub auto: Option<String>,
}

impl PoolSpec {
    pub fn new(id: PoolId, link: Box<dyn EngineLink>) -> PoolSpec {
        PoolSpec {
            group: id.clone(),
            replica: 0,
            slots: 1,
            affinity: Affinity::None,
            id,
            aliases: Vec::new(),
            link,
            policy: PoolPolicy::default(),
            engine: None,
            auto: None,
        }
    }
}

pub struct Pool {
    /// The run id: the pool id for replica 0, `<pool>.r<k>` for replica k.
    pub id: PoolId,
    /// The pool clients name.
    pub group: PoolId,
    pub replica: usize,
    pub slots: usize,
    pub affinity: Affinity,
    pub aliases: Vec<String>,
    pub policy: PoolPolicy,
    /// How `auto` counts were chosen, if any were.
    pub auto: Option<String>,
    pub link: Box<dyn EngineLink>,
    /// The link says Ready and the engine's `/health` answered 200.
    pub ready: AtomicBool,
    /// Counts [`Pool::mark_not_ready`]: a health look that began before a
    /// task found the engine gone must not call it ready again.
    not_ready_marks: AtomicU64,
    /// The engine last seen ready (for capabilities while it restarts).
    pub last_engine: Mutex<Option<EngineInfo>>,
    pub queue: Queue,
    pub running: AtomicU64,
    pub work: Notify,
    pub avg_task_ms: AtomicU64,
    /// Closed while the scheduler unloads the pool: the worker takes nothing.
    pub gate: Mutex<bool>,
    /// When the last task was admitted or finished (idle unload, LRU).
    pub last_used: Mutex<Instant>,
    /// The scheduler asked the engine to load at this instant; cleared when it is ready.
    pub loading_since: Mutex<Option<Instant>>,
    /// How long the last load took (load asked → ready), milliseconds.
    pub last_load_ms: AtomicU64,
    /// How long the last `load` call took (memory probe, taking the pool, starting the process), milliseconds.
    pub last_load_call_ms: AtomicU64,
    pub loads: AtomicU64,
    pub unloads: AtomicU64,
    pub tokens_out: AtomicU64,
    /// KV-cache tokens held by the engine's processing slots, and what all
    /// its slots hold at most (llama-server's `/slots`, sampled by the
    /// health loop while tasks run: [`crate::metrics::kv_utilization`]).
    pub kv_held: AtomicU64,
    pub kv_capacity: AtomicU64,
    /// Non-streamed answers being relayed from the engine now. llama-server
    /// notices that such a request was dropped only when its results queue
    /// stays silent for a whole second, and every answer to a `/slots` or
    /// `/metrics` request ends that silence: while one runs, nothing here
    /// polls those (see [`crate::forward`]).
    pub silent_waits: AtomicU64,
    /// A load refusal already logged (so a waiting load logs once).
    pub(crate) waiting_logged: AtomicBool,
    /// When its last tasks finished (at most [`RATE_WINDOW`]): the observed service rate.
    finished: Mutex<std::collections::VecDeque<Instant>>,
}

/// How many recent completions the service rate is measured over.
pub const RATE_WINDOW: usize = 64;

impl Pool {
    pub fn new(spec: PoolSpec) -> Pool {
        Pool {
            id: spec.id,
            group: spec.group,
            replica: spec.replica,
            slots: spec.slots.max(1),
            affinity: spec.affinity,
            auto: spec.auto,
            aliases: spec.aliases,
            policy: spec.policy,
            link: spec.link,
            ready: AtomicBool::new(false),
            not_ready_marks: AtomicU64::new(0),
            last_engine: Mutex::new(spec.engine),
            queue: Default::default(),
            running: AtomicU64::new(0),
            work: Notify::new(),
            avg_task_ms: AtomicU64::new(1000),
            gate: Mutex::new(false),
            last_used: Mutex::new(Instant::now()),
            loading_since: Mutex::new(None),
            last_load_ms: AtomicU64::new(0),
            last_load_call_ms: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            unloads: AtomicU64::new(0),
            tokens_out: AtomicU64::new(0),
            kv_held: AtomicU64::new(0),
            kv_capacity: AtomicU64::new(0),
            silent_waits: AtomicU64::new(0),
            waiting_logged: AtomicBool::new(false),
            finished: Mutex::new(Default::default()),
        }
    }

    /// Queued + running tasks.
    pub fn load(&self) -> usize {
        self.queue.len() + self.running.load(Ordering::SeqCst) as usize
    }

    /// A task finished (for the observed service rate).
    pub fn record_finished(&self) {
        let mut f = self.finished.lock().unwrap();
        if f.len() == RATE_WINDOW {
            f.pop_front();
        }
        f.push_back(Instant::now());
    }

    /// Tasks finished per second over the last [`RATE_WINDOW`] (None: too few, or too long ago).
    pub fn service_rate(&self) -> Option<f64> {
        let f = self.finished.lock().unwrap();
        let (first, last) = (f.front()?, f.back()?);
        let span = last.duration_since(*first).as_secs_f64();
        // Finishes older than a minute say nothing about now.
        if f.len() < 2 || span <= 0.0 || last.elapsed() > Duration::from_secs(60) {
            return None;
        }
        Some((f.len() - 1) as f64 / span)
    }

    /// Whether admission may send tasks here: 0 ready or loads for them, 1 restarting, None failed.
    fn usability(&self) -> Option<u8> {
        match self.link_state() {
            LinkState::Failed(_) => None,
            LinkState::Ready(_) if self.ready.load(Ordering::SeqCst) => Some(0),
            LinkState::Unloaded if self.link.loads_on_demand() => Some(0),
            _ => Some(1),
        }
    }

    pub fn link_state(&self) -> LinkState {
        self.link.current()
    }

    /// `unloaded`, `loading`, `ready`, `draining` or `failed`.
    pub fn state(&self, stopping: bool) -> &'static str {
        if stopping {
            return "draining";
        }
        state_name(&self.link_state(), self.ready.load(Ordering::SeqCst))
    }

    pub fn mark_not_ready(&self) {
        self.not_ready_marks.fetch_add(1, Ordering::SeqCst);
        self.ready.store(false, Ordering::SeqCst);
    }

    pub fn touch(&self) {
        *self.last_used.lock().unwrap() = Instant::now();
    }

    pub fn idle_for(&self) -> Duration {
        self.last_used.lock().unwrap().elapsed()
    }

    /// Nothing queued, nothing running.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.running.load(Ordering::SeqCst) == 0
    }

    /// Whether a name routes here: the pool id, an alias, or the served model's name.
    pub fn answers_to(&self, name: &str) -> bool {
        self.id.as_str() == name
            || self.aliases.iter().any(|a| a == name)
            || self
                .last_engine
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|e| e.pool == name || crate::models::model_alias(e) == name)
    }

    /// Close the gate and unload, if the pool is idle. False when it is busy.
    pub(crate) fn try_unload(&self, why: &str) -> bool {
        let mut closed = self.gate.lock().unwrap();
        if !self.is_idle() {
            return false;
        }
        *closed = true;
        self.ready.store(false, Ordering::SeqCst);
        self.unloads.fetch_add(1, Ordering::Relaxed);
        llorch_io::info!("[pool {}] unloading ({why})", self.id);
        self.link.unload();
        true
    }
}

pub(crate) fn state_name(s: &LinkState, ready: bool) -> &'static str {
    match s {
        LinkState::Failed(_) => "failed",
        LinkState::Unloaded => "unloaded",
        LinkState::Unloading => "draining",
        LinkState::Ready(_) if ready => "ready",
        _ => "loading",
    }
}

/// How many characters of a prompt make its affinity key.
pub const AFFINITY_PREFIX_CHARS: usize = 256;
/// A replica takes a shared prefix while its load stays below
/// `ceil(AFFINITY_BOUND * (total load + 1) / replicas)` (bounded-load consistent hashing).
pub const AFFINITY_BOUND: f64 = 1.25;

/// The replica of `members` (one group, replica 0 first) a task goes to.
/// `prefix`: the task's prompt text, for `affinity: prefix`.
pub fn pick_replica(members: &[Arc<Pool>], prefix: &str) -> Arc<Pool> {
    let head = &members[0];
    // Usable replicas; when none is (all failed), replica 0 answers for the group.
    let usable: Vec<(u8, &Arc<Pool>)> = members
        .iter()
        .filter_map(|p| p.usability().map(|u| (u, p)))
        .collect();
    if usable.len() <= 1 {
        return usable
            .first()
            .map(|(_, p)| (*p).clone())
            .unwrap_or(head.clone());
    }
    // Replicas that are ready (or load for us) before restarting ones.
    let best = usable.iter().map(|(u, _)| *u).min().unwrap_or(0);
    let cands: Vec<&Arc<Pool>> = usable
        .iter()
        .filter(|(u, _)| *u == best)
        .map(|(_, p)| *p)
        .collect();
    if head.affinity == Affinity::Prefix {
        use sha2::{Digest, Sha256};
        let key: String = prefix.chars().take(AFFINITY_PREFIX_CHARS).collect();
        let total: usize = cands.iter().map(|p| p.load()).sum();
        let bound = (AFFINITY_BOUND * (total + 1) as f64 / cands.len() as f64).ceil() as usize;
        // Rendezvous hashing: each replica's score for this key; highest first.
        let mut order: Vec<(&Arc<Pool>, [u8; 32])> = cands
            .iter()
            .map(|p| {
                let mut h = Sha256::new();
                h.update(key.as_bytes());
                h.update((p.replica as u64).to_le_bytes());
                (*p, h.finalize().into())
            })
            .collect();
        order.sort_by_key(|o| std::cmp::Reverse(o.1));
        if let Some((p, _)) = order.iter().find(|(p, _)| p.load() < bound) {
            return (*p).clone();
        }
    }
    cands
        .iter()
        .min_by_key(|p| (p.load(), p.replica))
        .map(|p| (*p).clone())
        .unwrap_or(head.clone())
}

/// Keep `ready` current for one pool.
pub async fn health_loop(st: Shared, pool: Arc<Pool>) {
    while !st.stopping.load(Ordering::SeqCst) {
        let marks = pool.not_ready_marks.load(Ordering::SeqCst);
        let state = pool.link_state();
        let ok = match &state {
            LinkState::Ready(i) => {
                let healthy = i.server().healthy(&st.http, Duration::from_secs(2)).await;
                if healthy {
                    *pool.last_engine.lock().unwrap() = Some(i.clone());
                }
                healthy
            }
            _ => false,
        };
        crate::metrics::sample_kv(&st, &pool, &state, ok).await;
        // A task marked the engine gone while this look was under way: the
        // next look decides.
        let ok = ok && pool.not_ready_marks.load(Ordering::SeqCst) == marks;
        let was = pool.ready.swap(ok, Ordering::SeqCst);
        st.status.saw(&pool, state_name(&state, ok));
        if was != ok {
            pool.work.notify_waiters();
            st.sched.notify_one();
            st.changed.notify_waiters();
        }
        // Loading: look every 2 ms, so a loaded engine takes tasks at once.
        let pause = match (&state, ok) {
            // While tasks run, the KV gauges follow them every 100 ms at most.
            (_, true) if pool.running.load(Ordering::SeqCst) > 0 => {
                st.cfg.health_interval.min(Duration::from_millis(100))
            }
            (_, true) => st.cfg.health_interval,
            (LinkState::Starting | LinkState::Ready(_), false) => Duration::from_millis(2),
            _ => Duration::from_millis(20),
        };
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::link::EngineInfo;

    /// Specs of `k` replicas of pool `p` whose closure links always say Ready.
    pub(crate) fn ready_specs(k: usize, affinity: Affinity) -> Vec<PoolSpec> {
        let id = PoolId::parse("p").unwrap();
        (0..k)
            .map(|i| {
                let link = || {
                    Some(EngineInfo {
                        pool: "p".into(),
                        fingerprint: String::new(),
                        flags: Vec::new(),
                        url: "http://127.0.0.1:1".into(),
                        engine: "llamacpp".into(),
                        engine_version: String::new(),
                        model_ref: String::new(),
                        model_digest: String::new(),
                        ctx_max: None,
                        slots: 1,
                        batched: false,
                        api_key: None,
                        sandbox: None,
                    })
                };
                let mut spec = PoolSpec::new(id.replica(i), Box::new(link));
                spec.group = id.clone();
                spec.replica = i;
                spec.affinity = affinity;
                spec
            })
            .collect()
    }

    /// `k` ready replicas of pool `p`.
    fn group(k: usize, affinity: Affinity) -> Vec<Arc<Pool>> {
        ready_specs(k, affinity)
            .into_iter()
            .map(|spec| {
                let p = Arc::new(Pool::new(spec));
                p.ready.store(true, Ordering::SeqCst);
                p
            })
            .collect()
    }

    #[test]
    fn the_fewest_queued_and_running_replica_takes_the_task() {
        let g = group(3, Affinity::None);
        assert_eq!(pick_replica(&g, "x").replica, 0);
        g[0].running.store(1, Ordering::SeqCst);
        assert_eq!(pick_replica(&g, "x").replica, 1);
        g[1].running.store(1, Ordering::SeqCst);
        g[2].running.store(2, Ordering::SeqCst);
        assert_eq!(pick_replica(&g, "x").replica, 0);
        // A replica that is not ready is used only when none other can be.
        g[0].ready.store(false, Ordering::SeqCst);
        g[0].running.store(0, Ordering::SeqCst);
        assert_eq!(pick_replica(&g, "x").replica, 1);
    }

    #[test]
    fn a_shared_prefix_stays_on_one_replica_within_its_bound() {
        let g = group(2, Affinity::Prefix);
        let home = pick_replica(&g, "system prompt A").replica;
        for _ in 0..5 {
            assert_eq!(pick_replica(&g, "system prompt A").replica, home);
        }
        // Loads (home, other): (1, 0) → bound ceil(1.25 * 2 / 2) = 2: home.
        g[home].running.store(1, Ordering::SeqCst);
        assert_eq!(pick_replica(&g, "system prompt A").replica, home);
        // (2, 0) → bound ceil(1.25 * 3 / 2) = 2: home is at its bound, the other takes it.
        g[home].running.store(2, Ordering::SeqCst);
        assert_eq!(pick_replica(&g, "system prompt A").replica, 1 - home);
        // Prefixes spread: over many keys both replicas are someone's home.
        g[home].running.store(0, Ordering::SeqCst);
        let homes: std::collections::HashSet<usize> = (0..32)
            .map(|i| pick_replica(&g, &format!("prompt {i}")).replica)
            .collect();
        assert_eq!(homes.len(), 2);
    }
}
