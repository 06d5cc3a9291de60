//! The monitor: the one task that keeps the tokens-per-second window and the
//! GPU readings and builds each snapshot the watchers share (at once after a
//! change, within [`TICK`]). The replicas' states come from their health
//! loops, which see every state (every 2 ms while an engine loads), through
//! [`Hub::saw`](super::Hub::saw): a state too short for a snapshot is
//! still in the ring of changes.

use super::{unix_ms, Transition, EVENTS_KEPT, MIN_BUILD_GAP, REFRESH, TICK};
use crate::{AppState, Shared};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the monitor keeps between looks.
#[derive(Default)]
pub(super) struct Monitor {
    /// Per pool: (when, tokens out so far), the last minute.
    tokens: HashMap<String, VecDeque<(Instant, u64)>>,
    gpus: Arc<Mutex<Option<Vec<llorch_io::gpu::GpuMemory>>>>,
}

/// A replica's last state as its health loop saw it.
#[derive(Default)]
pub(super) struct ReplicaSeen {
    pub(super) state: String,
    pub(super) ready_since: Option<Instant>,
    pub(super) restarts: u64,
}

/// The replicas' states and the ring of their changes, kept in the [`Hub`](super::Hub).
#[derive(Default)]
pub(super) struct Seen {
    pub(super) replicas: HashMap<String, ReplicaSeen>,
    pub(super) events: VecDeque<Transition>,
}

impl Seen {
    /// Replica `run_id` of `pool` is in `state` now; true when that is a change.
    pub(super) fn saw(&mut self, run_id: &str, pool: &str, replica: usize, state: &str) -> bool {
        // Called every few milliseconds by each health loop: no allocation
        // unless the state changed.
        if self.replicas.get(run_id).is_some_and(|r| r.state == state) {
            return false;
        }
        let seen = self.replicas.entry(run_id.to_string()).or_default();
        // A ready engine that starts again without being unloaded restarted.
        if seen.state == "ready" && state == "loading" {
            seen.restarts += 1;
        }
        seen.ready_since = (state == "ready").then(Instant::now);
        let from = std::mem::replace(&mut seen.state, state.to_string());
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_back();
        }
        self.events.push_front(Transition {
            at_ms: unix_ms(),
            pool: pool.to_string(),
            replica,
            from: if from.is_empty() { "-".into() } else { from },
            to: state.to_string(),
        });
        true
    }
}

impl Monitor {
    /// Record every pool's token count; tokens per second over the last minute.
    fn sample_tokens(&mut self, st: &AppState, now: Instant) {
        for h in st.heads() {
            let total: u64 = st
                .members(&h.group)
                .iter()
                .map(|m| m.tokens_out.load(Ordering::Relaxed))
                .sum();
            let q = self.tokens.entry(h.group.to_string()).or_default();
            if q.back()
                .is_some_and(|(t, _)| now.duration_since(*t) < REFRESH)
            {
                continue;
            }
            q.push_back((now, total));
            while q
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(61))
            {
                q.pop_front();
            }
        }
    }

    fn tokens_per_s(&self, pool: &str) -> f64 {
        let Some(q) = self.tokens.get(pool) else {
            return 0.0;
        };
        match (q.front(), q.back()) {
            (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => {
                n1.saturating_sub(*n0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    pub(super) fn snapshot(&self, st: &AppState, seq: u64) -> Value {
        let stopping = st.stopping.load(Ordering::SeqCst);
        let pools: Vec<Value> = st
            .heads()
            .map(|h| {
                let mut v = crate::api::pool_json(st, h);
                let members = st.members(&h.group);
                let seen_all = st.status.seen.lock().unwrap();
                let mut since_load: Option<f64> = None;
                let mut unload_in: Option<f64> = None;
                if let Some(reps) = v.get_mut("replicas").and_then(Value::as_array_mut) {
                    for (r, m) in reps.iter_mut().zip(&members) {
                        let seen = seen_all.replicas.get(m.id.as_str());
                        let ready_for = seen
                            .and_then(|s| s.ready_since)
                            .map(|t| t.elapsed().as_secs_f64());
                        // The idle unload's countdown: a ready replica with nothing to do.
                        let countdown = m
                            .policy
                            .idle_unload
                            .filter(|_| m.state(stopping) == "ready" && m.load() == 0)
                            .map(|d| d.saturating_sub(m.idle_for()).as_secs_f64());
                        since_load = match (since_load, ready_for) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                        unload_in = match (unload_in, countdown) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                        if let Some(o) = r.as_object_mut() {
                            o.insert("restarts".into(), json!(seen.map_or(0, |s| s.restarts)));
                            o.insert("ready_for_s".into(), json!(ready_for));
                            o.insert("idle_unload_in_s".into(), json!(countdown));
                            o.insert("devices".into(), json!(m.link.devices()));
                            o.insert("log".into(), json!(m.link.log_path().is_some()));
                        }
                    }
                }
                if let Some(o) = v.as_object_mut() {
                    o.insert(
                        "tokens_per_s".into(),
                        json!((self.tokens_per_s(h.group.as_str()) * 10.0).round() / 10.0),
                    );
                    o.insert("ready_for_s".into(), json!(since_load));
                    o.insert("idle_unload_in_s".into(), json!(unload_in));
                }
                v
            })
            .collect();
        let gpus: Vec<Value> = self
            .gpus
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .map(|g| {
                json!({"index": g.index, "used_mib": g.total_mib.saturating_sub(g.free_mib), "total_mib": g.total_mib})
            })
            .collect();
        json!({
            "seq": seq,
            "at_ms": unix_ms(),
            "uptime_s": st.status.started.elapsed().as_secs(),
            "state": if stopping { "draining" } else if st.is_ready() { "ready" } else { "not ready" },
            "pools": pools,
            "gpus": gpus,
            "requests": st.status.requests(),
            "events": st.status.seen.lock().unwrap().events,
            "watchers": st.status.live_watchers(),
            "text_recorded": false,
        })
    }
}

/// GPU memory every few seconds, where `nvidia-smi` is on `PATH` (never on a CPU host).
async fn gpu_reader(slot: Arc<Mutex<Option<Vec<llorch_io::gpu::GpuMemory>>>>) {
    let probe = llorch_io::gpu::GpuProbe::new("nvidia-smi");
    loop {
        let p = probe.clone();
        match tokio::task::spawn_blocking(move || p.read()).await {
            Ok(Ok(g)) => *slot.lock().unwrap() = Some(g),
            // No GPU here (or no driver): nothing to show, nothing to ask again.
            _ => return,
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Builds the snapshots until the server stops (then ends every stream).
pub async fn monitor(st: Shared) {
    let mut m = Monitor::default();
    tokio::spawn(gpu_reader(m.gpus.clone()));
    let mut seq = 0u64;
    let mut built: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = st.status.poke.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
        if st.stopping.load(Ordering::SeqCst) && st.running() == 0 {
            st.status.tx.send_replace(None);
            return;
        }
        let now = Instant::now();
        if st.stopping.load(Ordering::SeqCst) {
            // The health loops have stopped: the monitor says what follows.
            for p in &st.pools {
                st.status.saw(p, "draining");
            }
        }
        m.sample_tokens(&st, now);
        let dirty = st.status.dirty.swap(false, Ordering::SeqCst);
        if dirty || built.is_none_or(|b| now.duration_since(b) >= REFRESH) {
            seq += 1;
            let snap = m.snapshot(&st, seq).to_string();
            st.status.tx.send_replace(Some(Arc::from(snap)));
            built = Some(now);
        }
        tokio::time::sleep(MIN_BUILD_GAP).await;
    }
}
