//! Tasks: admission into a bounded FIFO, one worker per engine slot, cancel,
//! deadlines and retention.
//!
//! State machine (one mutex per task guards phase and cancel reason):
//!
//! ```text
//! Queued ──pop──▶ Running ──adapter──▶ Done
//!   │               │ cancel: flag + notify; the adapter ends the stream
//!   └─cancel──────────────────────────▶ Done
//! ```
//!
//! `finish` is the only way to Done and sends the one terminal event (`end`
//! or `error`); a second `finish` does nothing. A cancel that races the
//! worker's pop cannot be lost: the cancel records its reason under the task
//! lock before looking in the queue, and the worker checks the reason under
//! the same lock before it marks the task Running. A deadline is a timer from
//! admission that cancels the task wherever it is (queued, in prompt
//! processing, decoding). Done tasks are dropped after `retention`.

use crate::events::{EndEvent, ErrorEvent, TaskEvent};
use crate::link::LinkState;
use crate::pool::Pool;
use crate::AppState;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

/// One message of a chat task: its role as the engine's template takes it
/// (the limits table's roles) and its text.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ChatTurn {
    pub role: &'static str,
    pub content: String,
}

/// A validated task request.
#[derive(Clone, Debug, Default)]
pub struct TaskRequest {
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatTurn>>,
    pub max_tokens: u32,
    pub seed: u64,
    pub temperature: f64,
    pub deadline_ms: Option<u64>,
    /// Keep generating past end-of-sequence (fixed-length benchmarks).
    pub ignore_eos: bool,
    /// Strings that end generation (not included in the output).
    pub stop: Vec<String>,
    /// A GBNF grammar the output must follow (llama.cpp's own).
    pub grammar: Option<String>,
    /// Nucleus sampling (llama-server's `top_p`; default: the engine's).
    pub top_p: Option<f64>,
    /// Top log-probabilities per generated token (llama-server's `n_probs`).
    pub n_probs: Option<u32>,
    /// Relay this request to one of the engine's own endpoints instead
    /// ([`crate::forward`]); `prompt` then only names the prompt for affinity.
    pub forward: Option<std::sync::Arc<crate::forward::Forward>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Queued,
    Running,
    Done,
}

/// Why a task was stopped before it finished on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelReason {
    Requested,
    ClientDisconnected,
    Deadline,
    Shutdown,
}

impl CancelReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::Requested => "canceled",
            CancelReason::ClientDisconnected => "client_disconnected",
            CancelReason::Deadline => "deadline",
            CancelReason::Shutdown => "shutdown",
        }
    }
}

struct Inner {
    phase: Phase,
    cancel: Option<(CancelReason, Instant)>,
    finished_at: Option<Instant>,
}

pub struct Task {
    pub id: String,
    /// The pool it runs on.
    pub pool: Arc<Pool>,
    pub req: TaskRequest,
    pub admitted_at: Instant,
    pub queue_position: usize,
    pub predicted_start_ms: u64,
    /// The API path it came in on (the status page's request list).
    pub api: String,
    first_token: std::sync::OnceLock<Instant>,
    hub: Arc<crate::status::Hub>,
    inner: Mutex<Inner>,
    tx: Mutex<Option<mpsc::UnboundedSender<TaskEvent>>>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<TaskEvent>>>,
    pub cancel_notify: Notify,
}

impl Task {
    pub fn new(
        id: String,
        pool: Arc<Pool>,
        req: TaskRequest,
        queue_position: usize,
        predicted_start_ms: u64,
        hub: Arc<crate::status::Hub>,
    ) -> Task {
        let (tx, rx) = mpsc::unbounded_channel();
        Task {
            id,
            pool,
            req,
            admitted_at: Instant::now(),
            queue_position,
            predicted_start_ms,
            api: crate::status::current_api(),
            first_token: std::sync::OnceLock::new(),
            hub,
            inner: Mutex::new(Inner {
                phase: Phase::Queued,
                cancel: None,
                finished_at: None,
            }),
            tx: Mutex::new(Some(tx)),
            rx: Mutex::new(Some(rx)),
            cancel_notify: Notify::new(),
        }
    }

    /// When its first token came (none yet: none).
    pub fn first_token_at(&self) -> Option<Instant> {
        self.first_token.get().copied()
    }

    pub fn phase(&self) -> Phase {
        self.inner.lock().unwrap().phase
    }

    /// Send a non-terminal event; false when the task is done or nobody listens any more.
    pub fn send(&self, ev: TaskEvent) -> bool {
        match &ev {
            TaskEvent::Token(_) => {
                let _ = self.first_token.set(Instant::now());
            }
            TaskEvent::Started(_) => self.hub.poke(),
            _ => {}
        }
        match self.tx.lock().unwrap().as_ref() {
            Some(tx) => tx.send(ev).is_ok(),
            None => false,
        }
    }

    /// Send the terminal event and close the stream. Only the first call does anything.
    pub fn finish(&self, ev: TaskEvent) -> bool {
        {
            let mut g = self.inner.lock().unwrap();
            if g.phase == Phase::Done {
                return false;
            }
            g.phase = Phase::Done;
            g.finished_at = Some(Instant::now());
        }
        if let Some(f) = &self.req.forward {
            f.end(&ev);
        }
        self.hub.record(crate::status::record_of(self, &ev));
        if let Some(tx) = self.tx.lock().unwrap().take() {
            let _ = tx.send(ev);
        }
        true
    }

    /// Record a cancel (the first reason wins) and wake the adapter.
    pub fn request_cancel(&self, reason: CancelReason) {
        {
            let mut g = self.inner.lock().unwrap();
            if g.phase == Phase::Done {
                return;
            }
            g.cancel.get_or_insert((reason, Instant::now()));
        }
        self.cancel_notify.notify_waiters();
        self.cancel_notify.notify_one();
    }

    pub fn cancel_reason(&self) -> Option<(CancelReason, Instant)> {
        self.inner.lock().unwrap().cancel
    }

    pub fn canceled(&self) -> bool {
        self.cancel_reason().is_some()
    }

    /// Queued → Running, unless a cancel came first (then the caller ends it).
    fn start_running(&self) -> Result<(), CancelReason> {
        let mut g = self.inner.lock().unwrap();
        if let Some((r, _)) = g.cancel {
            return Err(r);
        }
        if g.phase == Phase::Queued {
            g.phase = Phase::Running;
        }
        Ok(())
    }

    /// The receiving end of the task's events (once).
    pub fn take_stream(&self) -> Option<mpsc::UnboundedReceiver<TaskEvent>> {
        self.rx.lock().unwrap().take()
    }

    fn expired(&self, retention: Duration) -> bool {
        let g = self.inner.lock().unwrap();
        g.phase == Phase::Done && g.finished_at.is_some_and(|t| t.elapsed() >= retention)
    }

    /// The `end` of a task that never produced a token.
    pub fn canceled_end(&self, reason: CancelReason, tokens_out: u64) -> TaskEvent {
        TaskEvent::End(EndEvent {
            tokens_out,
            stop_reason: reason.as_str().into(),
            canceled: true,
            queue_wait_ms: self.admitted_at.elapsed().as_millis() as u64,
            ..Default::default()
        })
    }
}

/// The waiting tasks.
#[derive(Default)]
pub struct Queue(Mutex<VecDeque<Arc<Task>>>);

impl Queue {
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn push(&self, t: Arc<Task>) {
        self.0.lock().unwrap().push_back(t)
    }
    pub(crate) fn pop(&self) -> Option<Arc<Task>> {
        self.0.lock().unwrap().pop_front()
    }
    fn remove(&self, id: &str) -> bool {
        let mut q = self.0.lock().unwrap();
        let before = q.len();
        q.retain(|t| t.id != id);
        before != q.len()
    }
    fn drain(&self) -> Vec<Arc<Task>> {
        self.0.lock().unwrap().drain(..).collect()
    }
}

/// Cancel a task wherever it is; a queued one ends here, a running one in the adapter.
pub fn cancel(st: &AppState, task: &Arc<Task>, reason: CancelReason) {
    if task.phase() == Phase::Done {
        return;
    }
    task.request_cancel(reason);
    if task.pool.queue.remove(&task.id) && task.finish(task.canceled_end(reason, 0)) {
        st.metrics.canceled.inc();
    }
}

/// Cancel `task` at its deadline (measured from admission).
pub fn arm_deadline(st: &Arc<AppState>, task: &Arc<Task>) {
    let Some(ms) = task.req.deadline_ms else {
        return;
    };
    let at = tokio::time::Instant::from_std(task.admitted_at) + Duration::from_millis(ms);
    let (st, task): (Weak<AppState>, Weak<Task>) = (Arc::downgrade(st), Arc::downgrade(task));
    tokio::spawn(async move {
        tokio::time::sleep_until(at).await;
        if let (Some(st), Some(task)) = (st.upgrade(), task.upgrade()) {
            cancel(&st, &task, CancelReason::Deadline);
        }
    });
}

/// Fail every queued task of a pool (its engine is gone for good, it cannot load, or we are shutting down).
pub fn fail_queued(st: &AppState, pool: &Pool, code: &str, message: &str, retriable: bool) {
    for t in pool.queue.drain() {
        if t.finish(TaskEvent::Error(ErrorEvent {
            code: code.into(),
            message: message.into(),
            retriable,
        })) {
            st.metrics.failed.inc();
        }
    }
}

/// One worker per engine slot: pop a task, run it.
pub async fn worker(st: Arc<AppState>, pool: Arc<Pool>) {
    loop {
        if st.stopping.load(Ordering::SeqCst) {
            return;
        }
        match pool.link_state() {
            LinkState::Ready(_) if pool.ready.load(Ordering::SeqCst) => {}
            LinkState::Failed(reason) => {
                fail_queued(&st, &pool, "ENGINE_FAILED", &reason, false);
                wait(&pool).await;
                continue;
            }
            _ => {
                wait(&pool).await;
                continue;
            }
        }
        // Under the gate: the scheduler never unloads between this pop and `running`.
        let task = {
            let closed = pool.gate.lock().unwrap();
            if *closed {
                None
            } else {
                let t = pool.queue.pop();
                if t.is_some() {
                    pool.running.fetch_add(1, Ordering::SeqCst);
                }
                t
            }
        };
        let Some(task) = task else {
            wait(&pool).await;
            continue;
        };
        st.changed.notify_waiters();
        if let Err(reason) = task.start_running() {
            if task.finish(task.canceled_end(reason, 0)) {
                st.metrics.canceled.inc();
            }
            pool.running.fetch_sub(1, Ordering::SeqCst);
            st.changed.notify_waiters();
            continue;
        }
        pool.touch();
        let t0 = Instant::now();
        crate::runner::run_task(&st, &task).await;
        pool.touch();
        pool.record_finished();
        pool.running.fetch_sub(1, Ordering::SeqCst);
        st.changed.notify_waiters();
        let ms = t0.elapsed().as_millis() as u64;
        let avg = pool.avg_task_ms.load(Ordering::Relaxed);
        pool.avg_task_ms
            .store((avg * 7 + ms) / 8, Ordering::Relaxed);
    }
}

async fn wait(pool: &Pool) {
    let n = pool.work.notified();
    tokio::select! { _ = n => {}, _ = tokio::time::sleep(Duration::from_millis(50)) => {} }
}

/// Drop finished tasks past their retention.
pub async fn reaper(st: Arc<AppState>) {
    let every = (st.cfg.retention / 4).clamp(Duration::from_millis(10), Duration::from_secs(30));
    loop {
        tokio::time::sleep(every).await;
        reap(&st);
        if st.stopping.load(Ordering::SeqCst) {
            return;
        }
    }
}

pub fn reap(st: &AppState) {
    let r = st.cfg.retention;
    st.tasks.lock().unwrap().retain(|_, t| !t.expired(r));
}

#[cfg(test)]
mod tests;
