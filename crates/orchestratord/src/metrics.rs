//! Prometheus metrics of the orchestrator, through `prometheus-client`
//! (OpenMetrics text, which Prometheus scrapes as is).

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub const BUCKETS_MS: &[f64] = &[
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
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
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&Reason { reason }).inc();
    }

    pub fn render(&self, queue_depth: usize, ready: bool) -> String {
        self.queue_depth.set(queue_depth as i64);
        self.engine_ready.set(ready as i64);
        let mut s = String::new();
        encode(&mut s, &self.registry).expect("writing to a String cannot fail");
        s
    }
}
