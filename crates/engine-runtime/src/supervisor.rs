//! One thread owns the engine child: it restarts it after a crash with
//! exponential backoff (0.5 s doubling to 30 s, reset after a minute
//! healthy), gives up after too many crashes in a window, and re-checks
//! readiness after each restart. Others watch the [`EngineState`].
//!
//! The child gets `PR_SET_PDEATHSIG=SIGKILL` from the supervisor thread and
//! its own process group, and the [`Supervisor`] stops it on drop: an engine
//! never outlives its supervisor, also when the supervisor crashes.
//!
//! Ownership: [`Supervisor::start`] refuses a pool that another live owner
//! keeps (a detached engine from `provision`, or another supervisor); each
//! (re)start runs under the pool lock, and the run record names this process
//! as the owner for as long as it supervises, also between restarts. A hung
//! engine reported through [`StateHandle::request_restart`] is killed and
//! restarted like a crashed one.

use crate::flags::PreparedEngine;
use crate::lifecycle::{self, EngineError, RunningEngine};
use llorch_io::handoff::{Owner, ProcessIdentity};
use llorch_io::paths::Layout;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum EngineState {
    Starting,
    Ready {
        url: String,
        pid: u32,
        ready_ms: u64,
        #[serde(skip)]
        api_key: Option<String>,
    },
    Restarting {
        attempt: u32,
        in_ms: u64,
        last_exit: String,
    },
    Failed {
        reason: String,
    },
    Stopped,
}

#[derive(Clone, Debug)]
pub struct RestartPolicy {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub healthy_reset: Duration,
    pub max_crashes: usize,
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            healthy_reset: Duration::from_secs(60),
            max_crashes: 5,
            window: Duration::from_secs(300),
        }
    }
}

/// What the supervisor does after its engine ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterExit {
    /// Start it again after `after` (the `attempt`-th restart).
    Restart { attempt: u32, after: Duration },
    /// Too many crashes within the window: `crashes` of them.
    GiveUp { crashes: usize },
}

/// The restart policy's memory: crashes in the window, the next backoff.
/// Pure (times are passed in), so the policy is tested without an engine.
#[derive(Debug)]
pub struct Crashes {
    policy: RestartPolicy,
    at: Vec<Instant>,
    backoff: Duration,
    attempt: u32,
}

impl Crashes {
    pub fn new(policy: RestartPolicy) -> Crashes {
        Crashes {
            backoff: policy.initial_backoff,
            policy,
            at: Vec::new(),
            attempt: 0,
        }
    }

    /// The engine ended at `now` after running healthy for `healthy`
    /// (zero: it never became ready). A long healthy run forgets earlier
    /// crashes and resets the backoff; then the crash counts, and either
    /// the engine is given up or restarted after a backoff that doubles up
    /// to the maximum.
    pub fn on_exit(&mut self, now: Instant, healthy: Duration) -> AfterExit {
        if healthy >= self.policy.healthy_reset {
            self.backoff = self.policy.initial_backoff;
            self.at.clear();
        }
        let window = self.policy.window;
        self.at.retain(|t| now.duration_since(*t) < window);
        self.at.push(now);
        if self.at.len() >= self.policy.max_crashes {
            return AfterExit::GiveUp {
                crashes: self.at.len(),
            };
        }
        self.attempt += 1;
        let after = self.backoff;
        self.backoff = (self.backoff * 2).min(self.policy.max_backoff);
        AfterExit::Restart {
            attempt: self.attempt,
            after,
        }
    }
}

struct Shared {
    state: Mutex<EngineState>,
    cv: Condvar,
    stop: AtomicBool,
    restart: AtomicBool,
    restarts: AtomicU32,
}

impl Shared {
    /// Raise `flag` (stop, restart) and wake every waiter. Raised under the
    /// state lock, so a waiter that checked the flag and is about to wait
    /// cannot miss the wake-up.
    fn flag(&self, flag: &AtomicBool) {
        let _g = self.state.lock().unwrap();
        flag.store(true, Ordering::SeqCst);
        self.cv.notify_all();
    }

    fn set(&self, s: EngineState) {
        llorch_io::info!(
            "[supervisor] {}",
            serde_json::to_string(&s).unwrap_or_default()
        );
        *self.state.lock().unwrap() = s;
        self.cv.notify_all();
    }
}

#[derive(Clone)]
pub struct StateHandle(Arc<Shared>);

/// A supervised engine that did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// It failed for good (restarts spent, or it cannot start): the reason.
    #[error("{0}")]
    Failed(String),
    #[error("engine not ready after {secs}s (state: {state:?})")]
    Timeout { secs: u64, state: EngineState },
}

impl StateHandle {
    pub fn get(&self) -> EngineState {
        self.0.state.lock().unwrap().clone()
    }

    /// Wait until the state satisfies `pred` or `timeout` passes.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&EngineState) -> bool) -> EngineState {
        let deadline = Instant::now() + timeout;
        let mut g = self.0.state.lock().unwrap();
        while !pred(&g) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            g = self.0.cv.wait_timeout(g, deadline - now).unwrap().0;
        }
        g.clone()
    }

    /// Wait for Ready (returns the URL) or Failed.
    pub fn wait_ready(&self, timeout: Duration) -> Result<String, NotReady> {
        match self.wait_for(timeout, |s| {
            matches!(s, EngineState::Ready { .. } | EngineState::Failed { .. })
        }) {
            EngineState::Ready { url, .. } => Ok(url),
            EngineState::Failed { reason } => Err(NotReady::Failed(reason)),
            state => Err(NotReady::Timeout {
                secs: timeout.as_secs(),
                state,
            }),
        }
    }

    /// Kill the current engine (hung: alive but silent) so that it is restarted.
    pub fn request_restart(&self) {
        self.0.flag(&self.0.restart);
    }
}

pub struct Supervisor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// Take the pool (refused if another live owner keeps it) and start supervising.
    /// `command` names what supervises, for others who find the pool taken.
    pub fn start(
        prep: PreparedEngine,
        layout: Layout,
        policy: RestartPolicy,
        command: &str,
    ) -> Result<Supervisor, EngineError> {
        {
            let _lock = crate::run_state::lock_pool(&layout, &prep.pool_id, || {})?;
            crate::run_state::claim(&layout, &prep.pool_id, crate::run_state::Intent::Supervise)?;
        }
        let owner = Owner::Supervised {
            supervisor: ProcessIdentity::current(),
            command: command.to_string(),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(EngineState::Starting),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            restart: AtomicBool::new(false),
            restarts: AtomicU32::new(0),
        });
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("supervise-{}", prep.pool_id))
            .spawn(move || run(prep, layout, policy, owner, s2))
            .expect("spawn supervisor thread");
        Ok(Supervisor {
            shared,
            thread: Some(thread),
        })
    }

    /// A cheap handle for reading the state from elsewhere (e.g. the orchestrator).
    pub fn state_handle(&self) -> StateHandle {
        StateHandle(self.shared.clone())
    }

    pub fn state(&self) -> EngineState {
        self.shared.state.lock().unwrap().clone()
    }

    pub fn restarts(&self) -> u32 {
        self.shared.restarts.load(Ordering::Relaxed)
    }

    /// Wait until the state satisfies `pred` or `timeout` passes.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&EngineState) -> bool) -> EngineState {
        self.state_handle().wait_for(timeout, pred)
    }

    /// Wait for Ready (returns the URL) or Failed.
    pub fn wait_ready(&self, timeout: Duration) -> Result<String, NotReady> {
        self.state_handle().wait_ready(timeout)
    }

    /// Stop the engine and the supervising thread.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.shared.flag(&self.shared.stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Wait `d` (a restart's backoff) unless a stop comes first: woken by the
/// condition variable `stop` is raised with, not by polling.
fn sleep_unless_stopped(shared: &Shared, d: Duration) -> bool {
    let deadline = Instant::now() + d;
    let mut g = shared.state.lock().unwrap();
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        g = shared.cv.wait_timeout(g, deadline - now).unwrap().0;
    }
}

fn run(
    prep: PreparedEngine,
    layout: Layout,
    policy: RestartPolicy,
    owner: Owner,
    shared: Arc<Shared>,
) {
    let paths = crate::run_state::RunPaths::new(&layout, &prep.pool_id);
    let window = policy.window;
    let mut crashes = Crashes::new(policy);
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            release(&paths, &owner);
            shared.set(EngineState::Stopped);
            return;
        }
        shared.set(EngineState::Starting);
        shared.restart.store(false, Ordering::SeqCst);
        // Under the pool lock, look again before spawning: the pool must
        // still be ours (or free), never someone else's engine.
        let spawned =
            crate::run_state::lock_pool(&layout, &prep.pool_id, || {}).and_then(|_lock| {
                match crate::run_state::read_pool(&layout, &prep.pool_id) {
                    Some(run) if run.record.owner != owner => Err(run.busy_error()),
                    _ => lifecycle::spawn(&prep, &layout, &owner),
                }
            });
        let mut healthy = Duration::ZERO;
        let last_exit = match spawned {
            Ok(eng) => {
                shared.set(EngineState::Ready {
                    url: eng.url.clone(),
                    pid: eng.pid(),
                    ready_ms: eng.ready_ms,
                    api_key: eng.api_key.clone(),
                });
                let healthy_since = Instant::now();
                match watch(eng, &shared) {
                    None => {
                        release(&paths, &owner);
                        shared.set(EngineState::Stopped);
                        return;
                    }
                    Some(status) => {
                        healthy = healthy_since.elapsed();
                        status
                    }
                }
            }
            Err(e) => e.to_string(),
        };
        let (attempt, backoff) = match crashes.on_exit(Instant::now(), healthy) {
            AfterExit::GiveUp { crashes } => {
                shared.set(EngineState::Failed {
                    reason: format!(
                        "llama-server crashed {crashes} times within {}s; giving up. Last exit: {last_exit}\n--- last lines of {} ---\n{}",
                        window.as_secs(),
                        paths.log.display(),
                        llorch_io::tail_lines(&paths.log, 20)
                    ),
                });
                release(&paths, &owner);
                return;
            }
            AfterExit::Restart { attempt, after } => (attempt, after),
        };
        shared.restarts.fetch_add(1, Ordering::Relaxed);
        shared.set(EngineState::Restarting {
            attempt,
            in_ms: backoff.as_millis() as u64,
            last_exit,
        });
        if !sleep_unless_stopped(&shared, backoff) {
            release(&paths, &owner);
            shared.set(EngineState::Stopped);
            return;
        }
    }
}

/// Watch a running engine until it exits (Some(status)) or we are told to stop (None).
fn watch(mut eng: RunningEngine, shared: &Shared) -> Option<String> {
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            eng.stop();
            return None;
        }
        // The engine is gone: its handoff goes (nobody may attach to a dead
        // URL), its run record stays, naming this supervisor as the pool's
        // owner until the restart replaces it or we give the pool up.
        if shared.restart.swap(false, Ordering::SeqCst) {
            // Hung (e.g. SIGSTOP): SIGKILL works on a stopped process too.
            eng.identity.signal(libc::SIGKILL);
            let _ = eng.child.wait();
            crate::run_state::remove_handoff(&eng.paths, &eng.identity);
            return Some("killed after it stopped answering (stalled)".into());
        }
        match eng.child.try_wait() {
            Ok(Some(status)) => {
                crate::run_state::remove_handoff(&eng.paths, &eng.identity);
                return Some(format!(
                    "{status}; log tail:\n{}",
                    llorch_io::tail_lines(&eng.paths.log, 10)
                ));
            }
            Ok(None) => {}
            Err(e) => return Some(e.to_string()),
        }
        let g = shared.state.lock().unwrap();
        let _ = shared.cv.wait_timeout(g, Duration::from_millis(50));
    }
}

/// Give the pool up: remove its run files if they still name us as owner.
fn release(paths: &crate::run_state::RunPaths, owner: &Owner) {
    if let Ok(Some(r)) = llorch_io::handoff::RunRecord::read(&paths.pid_file) {
        if &r.owner == owner {
            let _ = fs_err::remove_file(&paths.pid_file);
            let _ = fs_err::remove_file(&paths.handoff);
            let _ = fs_err::remove_file(&paths.api_key);
        }
    }
}

#[cfg(test)]
mod tests;
