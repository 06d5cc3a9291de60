//! Prometheus metrics of the orchestrator, through `prometheus-client`
//! (OpenMetrics text, which Prometheus scrapes as is).

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

pub const BUCKETS_MS: &[f64] = &[
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabel {
    pub pool: String,
    pub replica: String,
}

pub struct Metrics {
    registry: Registry,
    pub admitted: Counter,
    pub rejected: Family<Reason, Counter>,
    pub canceled: Counter,
    pub completed: Counter,
    pub failed: Counter,
    pub tokens_out: Counter,
    pub queue_depth: Gauge,
    pub engine_ready: Gauge,
    pub ttft_ms: Histogram,
    pub cancel_latency_ms: Histogram,
    pub pool_queue_depth: Family<PoolLabel, Gauge>,
    pub pool_loaded: Family<PoolLabel, Gauge>,
    pub pool_ready: Family<PoolLabel, Gauge>,
    pub pool_last_load_ms: Family<PoolLabel, Gauge>,
    pub pool_loads: Family<PoolLabel, Gauge>,
    pub pool_unloads: Family<PoolLabel, Gauge>,
    pub pool_tokens_out: Family<PoolLabel, Gauge>,
    pub pool_running: Family<PoolLabel, Gauge>,
    pub pool_capacity: Family<PoolLabel, Gauge>,
    pub pool_kv_utilization: Family<PoolLabel, Gauge<f64, AtomicU64>>,
    pub replica_kv_utilization: Family<ReplicaLabel, Gauge<f64, AtomicU64>>,
    pub replica_queue_depth: Family<ReplicaLabel, Gauge>,
    pub replica_running: Family<ReplicaLabel, Gauge>,
    pub replica_ready: Family<ReplicaLabel, Gauge>,
    pub replica_tokens_out: Family<ReplicaLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("llorch");
        let m = Metrics {
            admitted: Counter::default(),
            rejected: Family::default(),
            canceled: Counter::default(),
            completed: Counter::default(),
            failed: Counter::default(),
            tokens_out: Counter::default(),
            queue_depth: Gauge::default(),
            engine_ready: Gauge::default(),
            ttft_ms: Histogram::new(BUCKETS_MS.iter().copied()),
            cancel_latency_ms: Histogram::new(BUCKETS_MS.iter().copied()),
            pool_queue_depth: Family::default(),
            pool_loaded: Family::default(),
            pool_ready: Family::default(),
            pool_last_load_ms: Family::default(),
            pool_loads: Family::default(),
            pool_unloads: Family::default(),
            pool_tokens_out: Family::default(),
            pool_running: Family::default(),
            pool_capacity: Family::default(),
            pool_kv_utilization: Family::default(),
            replica_kv_utilization: Family::default(),
            replica_queue_depth: Family::default(),
            replica_running: Family::default(),
            replica_ready: Family::default(),
            replica_tokens_out: Family::default(),
            registry: Registry::default(),
        };
        registry.register("tasks_admitted", "Tasks admitted", m.admitted.clone());
        registry.register(
            "tasks_rejected",
            "Tasks rejected at admission",
            m.rejected.clone(),
        );
        registry.register(
            "tasks_canceled",
            "Tasks canceled (request, client disconnect, deadline, shutdown)",
            m.canceled.clone(),
        );
        registry.register(
            "tasks_completed",
            "Tasks that ended normally",
            m.completed.clone(),
        );
        registry.register(
            "tasks_failed",
            "Tasks that ended with an error event",
            m.failed.clone(),
        );
        registry.register(
            "tokens_out",
            "Tokens generated for clients (the engine's count)",
            m.tokens_out.clone(),
        );
        registry.register("queue_depth", "Tasks waiting", m.queue_depth.clone());
        registry.register(
            "engine_ready",
            "Engine readiness (1 ready, 0 not)",
            m.engine_ready.clone(),
        );
        registry.register(
            "time_to_first_token_ms",
            "Admission to first token, milliseconds",
            m.ttft_ms.clone(),
        );
        registry.register(
            "cancel_latency_ms",
            "Cancel request to engine slot idle, milliseconds",
            m.cancel_latency_ms.clone(),
        );
        registry.register(
            "pool_queue_depth",
            "Tasks waiting, per pool",
            m.pool_queue_depth.clone(),
        );
        registry.register(
            "pool_loaded",
            "An engine process runs for the pool (loading, ready or unloading: 1)",
            m.pool_loaded.clone(),
        );
        registry.register(
            "pool_ready",
            "The pool's engine is ready (1) or not (0)",
            m.pool_ready.clone(),
        );
        registry.register(
            "pool_last_load_ms",
            "Milliseconds of the pool's last load on demand (asked to ready)",
            m.pool_last_load_ms.clone(),
        );
        registry.register(
            "pool_loads",
            "Loads on demand of the pool since start",
            m.pool_loads.clone(),
        );
        registry.register(
            "pool_unloads",
            "Unloads of the pool (idle, or to make room) since start",
            m.pool_unloads.clone(),
        );
        registry.register(
            "pool_tokens_out",
            "Tokens generated by the pool's engine for clients",
            m.pool_tokens_out.clone(),
        );
        registry.register(
            "pool_running",
            "Tasks running, per pool (all replicas)",
            m.pool_running.clone(),
        );
        registry.register(
            "pool_capacity",
            "Tasks the pool runs at once (slots x replicas)",
            m.pool_capacity.clone(),
        );
        registry.register(
            "pool_kv_cache_utilization",
            "KV-cache utilization, 0 to 1: tokens held by the engines' processing slots over what all their slots hold (slots x context)",
            m.pool_kv_utilization.clone(),
        );
        registry.register(
            "replica_kv_cache_utilization",
            "KV-cache utilization of one replica's engine, 0 to 1",
            m.replica_kv_utilization.clone(),
        );
        registry.register(
            "replica_queue_depth",
            "Tasks waiting, per replica",
            m.replica_queue_depth.clone(),
        );
        registry.register(
            "replica_running",
            "Tasks running, per replica",
            m.replica_running.clone(),
        );
        registry.register(
            "replica_ready",
            "The replica's engine is ready (1) or not (0)",
            m.replica_ready.clone(),
        );
        registry.register(
            "replica_tokens_out",
            "Tokens generated by the replica's engine for clients",
            m.replica_tokens_out.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&Reason { reason }).inc();
    }

    pub fn render(&self, pools: &[std::sync::Arc<crate::pool::Pool>]) -> String {
        use crate::link::LinkState;
        use std::sync::atomic::Ordering::Relaxed;
        let mut depth = 0;
        // Per pool: the sums over its replicas (a pool of one engine: that engine).
        for head in pools.iter().filter(|p| p.replica == 0) {
            let members: Vec<_> = pools.iter().filter(|p| p.group == head.group).collect();
            let l = PoolLabel {
                pool: head.group.to_string(),
            };
            let sum = |f: &dyn Fn(&crate::pool::Pool) -> u64| -> i64 {
                members.iter().map(|p| f(p)).sum::<u64>() as i64
            };
            let queued = sum(&|p| p.queue.len() as u64);
            depth += queued;
            self.pool_queue_depth.get_or_create(&l).set(queued);
            self.pool_loaded.get_or_create(&l).set(sum(&|p| {
                !matches!(p.link_state(), LinkState::Unloaded | LinkState::Failed(_)) as u64
            }));
            self.pool_ready
                .get_or_create(&l)
                .set(sum(&|p| p.ready.load(Relaxed) as u64));
            self.pool_last_load_ms
                .get_or_create(&l)
                .set(head.last_load_ms.load(Relaxed) as i64);
            self.pool_loads
                .get_or_create(&l)
                .set(sum(&|p| p.loads.load(Relaxed)));
            self.pool_unloads
                .get_or_create(&l)
                .set(sum(&|p| p.unloads.load(Relaxed)));
            self.pool_tokens_out
                .get_or_create(&l)
                .set(sum(&|p| p.tokens_out.load(Relaxed)));
            self.pool_running
                .get_or_create(&l)
                .set(sum(&|p| p.running.load(Relaxed)));
            self.pool_capacity
                .get_or_create(&l)
                .set(sum(&|p| p.slots as u64));
            let owned: Vec<std::sync::Arc<crate::pool::Pool>> =
                members.iter().map(|p| (*p).clone()).collect();
            self.pool_kv_utilization
                .get_or_create(&l)
                .set(kv_utilization(&owned).2);
            for p in &members {
                let r = ReplicaLabel {
                    pool: head.group.to_string(),
                    replica: p.replica.to_string(),
                };
                self.replica_queue_depth
                    .get_or_create(&r)
                    .set(p.queue.len() as i64);
                self.replica_running
                    .get_or_create(&r)
                    .set(p.running.load(Relaxed) as i64);
                self.replica_ready
                    .get_or_create(&r)
                    .set(p.ready.load(Relaxed) as i64);
                self.replica_tokens_out
                    .get_or_create(&r)
                    .set(p.tokens_out.load(Relaxed) as i64);
                self.replica_kv_utilization
                    .get_or_create(&r)
                    .set(kv_utilization(std::slice::from_ref(*p)).2);
            }
        }
        self.queue_depth.set(depth);
        // Readiness of the default (first) pool, as before pools existed.
        self.engine_ready
            .set(pools.first().is_some_and(|p| p.ready.load(Relaxed)) as i64);
        let mut s = String::new();
        encode(&mut s, &self.registry).expect("writing to a String cannot fail");
        s
    }
}

/// KV-cache utilization of these engines together: tokens held by
/// processing slots over what all their slots can hold (0 when nothing
/// was sampled yet, or nothing runs).
pub fn kv_utilization(members: &[std::sync::Arc<crate::pool::Pool>]) -> (u64, u64, f64) {
    let held = members
        .iter()
        .map(|p| p.kv_held.load(std::sync::atomic::Ordering::Relaxed))
        .fold(0u64, u64::saturating_add);
    let cap = members
        .iter()
        .map(|p| p.kv_capacity.load(std::sync::atomic::Ordering::Relaxed))
        .fold(0u64, u64::saturating_add);
    let ratio = if cap == 0 {
        0.0
    } else {
        (held as f64 / cap as f64).clamp(0.0, 1.0)
    };
    (held, cap, ratio)
}

/// Read the engine's `/slots` for the KV-cache gauges while tasks run (and
/// once more after, so the gauges return to zero); an engine that is not
/// ready holds nothing.
pub(crate) async fn sample_kv(
    st: &crate::Shared,
    pool: &crate::pool::Pool,
    state: &crate::link::LinkState,
    ready: bool,
) {
    use crate::link::LinkState;
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let LinkState::Ready(i) = state else {
        pool.kv_held.store(0, Ordering::Relaxed);
        return;
    };
    if !ready {
        pool.kv_held.store(0, Ordering::Relaxed);
        return;
    }
    // Polling /slots would keep llama-server from noticing a dropped
    // non-streamed request (see `Pool::silent_waits`): keep the last value.
    if pool.silent_waits.load(Ordering::SeqCst) > 0 {
        return;
    }
    let busy = pool.running.load(Ordering::SeqCst) > 0;
    let known = pool.kv_capacity.load(Ordering::Relaxed) > 0;
    if !busy && known && pool.kv_held.load(Ordering::Relaxed) == 0 {
        return;
    }
    if let Ok(slots) = i.server().slots(&st.http, Duration::from_secs(2)).await {
        let (held, cap) = llorch_io::llama_server::kv_use(&slots);
        pool.kv_capacity.store(cap, Ordering::Relaxed);
        pool.kv_held.store(held, Ordering::Relaxed);
    }
}
