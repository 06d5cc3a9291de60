//! Prometheus text metrics of the orchestrator.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

pub const BUCKETS_MS: &[f64] = &[
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

#[derive(Default)]
pub struct Histogram {
    inner: Mutex<(Vec<u64>, u64, f64)>,
}

impl Histogram {
    pub fn observe(&self, ms: f64) {
        let mut g = self.inner.lock().unwrap();
        if g.0.is_empty() {
            g.0 = vec![0; BUCKETS_MS.len()];
        }
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            if ms <= *b {
                g.0[i] += 1;
            }
        }
        g.1 += 1;
        g.2 += ms;
    }

    /// All observations so far (count, sum).
    pub fn count_sum(&self) -> (u64, f64) {
        let g = self.inner.lock().unwrap();
        (g.1, g.2)
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let g = self.inner.lock().unwrap();
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            let c = g.0.get(i).copied().unwrap_or(0);
            out.push_str(&format!("{name}_bucket{{le=\"{b}\"}} {c}\n"));
        }
        out.push_str(&format!(
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}\n",
            g.1, g.2, g.1
        ));
    }
}

#[derive(Default)]
pub struct Metrics {
    pub admitted: AtomicU64,
    pub rejected_queue_full: AtomicU64,
    pub rejected_not_ready: AtomicU64,
    pub rejected_invalid: AtomicU64,
    pub canceled: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub tokens_out: AtomicU64,
    pub ttft_ms: Histogram,
    pub cancel_latency_ms: Histogram,
}

impl Metrics {
    pub fn render(&self, queue_depth: usize, ready: bool) -> String {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = String::new();
        let counter = |s: &mut String, name: &str, help: &str, v: u64| {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
            ));
        };
        counter(
            &mut s,
            "llorch_tasks_admitted_total",
            "Tasks admitted.",
            c(&self.admitted),
        );
        s.push_str("# HELP llorch_tasks_rejected_total Tasks rejected at admission.\n# TYPE llorch_tasks_rejected_total counter\n");
        s.push_str(&format!(
            "llorch_tasks_rejected_total{{reason=\"queue_full\"}} {}\n",
            c(&self.rejected_queue_full)
        ));
        s.push_str(&format!(
            "llorch_tasks_rejected_total{{reason=\"not_ready\"}} {}\n",
            c(&self.rejected_not_ready)
        ));
        s.push_str(&format!(
            "llorch_tasks_rejected_total{{reason=\"invalid\"}} {}\n",
            c(&self.rejected_invalid)
        ));
        counter(
            &mut s,
            "llorch_tasks_canceled_total",
            "Tasks canceled (by request or client disconnect).",
            c(&self.canceled),
        );
        counter(
            &mut s,
            "llorch_tasks_completed_total",
            "Tasks that ended normally.",
            c(&self.completed),
        );
        counter(
            &mut s,
            "llorch_tasks_failed_total",
            "Tasks that ended with an error event.",
            c(&self.failed),
        );
        counter(
            &mut s,
            "llorch_tokens_out_total",
            "Tokens streamed to clients.",
            c(&self.tokens_out),
        );
        s.push_str(&format!("# HELP llorch_queue_depth Tasks waiting.\n# TYPE llorch_queue_depth gauge\nllorch_queue_depth {queue_depth}\n"));
        s.push_str(&format!("# HELP llorch_engine_ready Engine readiness.\n# TYPE llorch_engine_ready gauge\nllorch_engine_ready {}\n", ready as u8));
        self.ttft_ms.render(
            "llorch_time_to_first_token_ms",
            "Admission to first token, milliseconds.",
            &mut s,
        );
        self.cancel_latency_ms.render(
            "llorch_cancel_latency_ms",
            "Cancel request to engine slot idle, milliseconds.",
            &mut s,
        );
        s
    }
}
