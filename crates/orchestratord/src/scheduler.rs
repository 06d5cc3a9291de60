//! The scheduler: loads pools on demand, unloads idle ones and keeps at
//! most `max_loaded` engines (the theory of operation is in [`crate::pool`]'s
//! header: the gate, replicas counted one by one, one log line per change).

use crate::link::{LinkState, LoadContext, LoadRefusal};
use crate::pool::state_name;
use crate::Shared;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The global knobs of the scheduler.
#[derive(Clone, Debug, Default)]
pub struct SchedulerConfig {
    /// At most this many engines loaded (or loading, or unloading) at once.
    pub max_loaded: Option<usize>,
}

/// Load, unload and swap pools (see the module header).
pub async fn run(st: Shared) {
    let mut seen: Vec<&'static str> = vec![""; st.pools.len()];
    loop {
        if st.stopping.load(Ordering::SeqCst) {
            return;
        }
        let states: Vec<LinkState> = st.pools.iter().map(|p| p.link_state()).collect();
        for (i, p) in st.pools.iter().enumerate() {
            let now = state_name(&states[i], p.ready.load(Ordering::SeqCst));
            if now != seen[i] {
                if !seen[i].is_empty() {
                    let extra = match &states[i] {
                        LinkState::Failed(r) => format!(": {}", r.lines().next().unwrap_or("")),
                        LinkState::Ready(e) => format!(" ({})", e.url),
                        _ => String::new(),
                    };
                    llorch_io::info!("[pool {}] {} -> {now}{extra}", p.id, seen[i]);
                }
                if now == "ready" {
                    if let Some(t0) = p.loading_since.lock().unwrap().take() {
                        p.last_load_ms
                            .store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
                    }
                }
                if now == "unloaded" {
                    *p.gate.lock().unwrap() = false;
                    p.loading_since.lock().unwrap().take();
                }
                seen[i] = now;
            }
        }
        // Idle unload.
        for (i, p) in st.pools.iter().enumerate() {
            let Some(idle) = p.policy.idle_unload else {
                continue;
            };
            if p.link.loads_on_demand()
                && !p.policy.keep_loaded
                && matches!(states[i], LinkState::Ready(_))
                && p.idle_for() >= idle
            {
                p.try_unload(&format!("idle for {} s", idle.as_secs_f64()));
            }
        }
        // Loads on demand, making room under max_loaded.
        // Updated as this round decides, so two loads in one round count each other.
        let mut states: Vec<LinkState> = st.pools.iter().map(|p| p.link_state()).collect();
        let unloads_in_flight = states.contains(&LinkState::Unloading);
        for (i, p) in st.pools.iter().enumerate() {
            if states[i] != LinkState::Unloaded || p.queue.is_empty() || !p.link.loads_on_demand() {
                continue;
            }
            let loaded = states
                .iter()
                .filter(|s| !matches!(s, LinkState::Unloaded | LinkState::Failed(_)))
                .count();
            if st.sched_cfg.max_loaded.is_some_and(|m| loaded >= m) {
                let victim = st
                    .pools
                    .iter()
                    .enumerate()
                    .filter(|(j, q)| {
                        *j != i
                            && matches!(states[*j], LinkState::Ready(_))
                            && !q.policy.keep_loaded
                            && q.link.loads_on_demand()
                            && q.is_idle()
                    })
                    .max_by_key(|(_, q)| q.idle_for())
                    .map(|(j, q)| (j, q.clone()));
                if let Some((j, v)) = victim {
                    if v.try_unload(&format!("making room for pool {}", p.id)) {
                        states[j] = LinkState::Unloading;
                    }
                }
                // Load once the victim is down (next rounds).
                continue;
            }
            let (pool, ctx) = (p.clone(), LoadContext { unloads_in_flight });
            let t0 = Instant::now();
            let r = tokio::task::spawn_blocking(move || pool.link.load(&ctx))
                .await
                .unwrap_or_else(|e| Err(LoadRefusal::Fail(format!("load panicked: {e}"))));
            match r {
                Ok(()) => {
                    let call_ms = t0.elapsed().as_millis() as u64;
                    p.last_load_call_ms.store(call_ms, Ordering::Relaxed);
                    states[i] = LinkState::Starting;
                    p.waiting_logged.store(false, Ordering::Relaxed);
                    p.loads.fetch_add(1, Ordering::Relaxed);
                    *p.loading_since.lock().unwrap() = Some(t0);
                    *p.gate.lock().unwrap() = false;
                    llorch_io::info!(
                        "[pool {}] loading ({} task(s) waiting; probe and start took {call_ms} ms)",
                        p.id,
                        p.queue.len()
                    );
                }
                Err(LoadRefusal::Wait(why)) => {
                    if !p.waiting_logged.swap(true, Ordering::Relaxed) {
                        llorch_io::info!("[pool {}] waiting to load: {why}", p.id);
                    }
                }
                Err(LoadRefusal::Fail(why)) => {
                    p.waiting_logged.store(false, Ordering::Relaxed);
                    llorch_io::info!("[pool {}] cannot load: {why}", p.id);
                    crate::tasks::fail_queued(&st, p, "POOL_LOAD_FAILED", &why, false);
                }
            }
        }
        // While a load or an unload is under way, look every 2 ms (a swap waits on both).
        let busy = st.pools.iter().any(|p| {
            p.loading_since.lock().unwrap().is_some() || p.link_state() == LinkState::Unloading
        });
        let n = st.sched.notified();
        let pause = Duration::from_millis(if busy { 2 } else { 10 });
        tokio::select! { _ = n => {}, _ = tokio::time::sleep(pause) => {} }
    }
}
