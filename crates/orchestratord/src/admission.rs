//! Admission, shared by the task API and the OpenAI endpoints: which pool a
//! request names ([`route`]), which replica takes it and whether it fits
//! ([`admit`]), when to retry ([`retry_after_s`]), and cancel on disconnect.

use crate::errors::ApiError;
use crate::link::LinkState;
use crate::pool::Pool;
use crate::tasks::{self, CancelReason, Task, TaskRequest};
use crate::{AppState, Shared};
use axum::http::StatusCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn not_ready(st: &AppState, pool: &Pool) -> ApiError {
    st.metrics.reject("not_ready");
    if st.stopping.load(Ordering::SeqCst) {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "DRAINING",
            "the orchestrator is shutting down",
        );
    }
    match pool.link_state() {
        LinkState::Failed(reason) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ENGINE_FAILED",
            format!(
                "the engine of pool `{}` has failed and will not be restarted: {reason}",
                pool.id
            ),
        ),
        _ => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ENGINE_NOT_READY",
            format!(
                "the engine of pool `{}` is not ready; try again shortly",
                pool.id
            ),
        )
        .retry_after(1),
    }
}

/// The pool a request names (`None`: the first pool); 404 with `code` when no pool answers to it.
pub fn route(
    st: &AppState,
    name: Option<&str>,
    field: &'static str,
    code: &'static str,
) -> Result<Arc<Pool>, ApiError> {
    let Some(name) = name else {
        return Ok(st.default_pool().clone());
    };
    if let Some(p) = st.find_pool(name) {
        return Ok(p.clone());
    }
    st.metrics.reject("invalid");
    let served: Vec<String> = st.heads().map(|p| format!("`{}`", p.group)).collect();
    Err(ApiError {
        field: Some(field.into()),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            code,
            format!(
                "no pool or model `{}` here; this orchestrator serves {} (GET /v1/models lists every name)",
                llorch_types::excerpt(name, 64),
                served.join(", ")
            ),
        )
    })
}

/// The text a task's affinity key is taken from: the prompt, or the messages in order.
fn affinity_text(req: &TaskRequest) -> String {
    if let Some(p) = &req.prompt {
        return p.chars().take(crate::pool::AFFINITY_PREFIX_CHARS).collect();
    }
    let mut s = String::new();
    for m in req.messages.iter().flatten() {
        s.push_str(m.role);
        s.push('\n');
        s.push_str(&m.content);
        s.push('\n');
        if s.len() >= crate::pool::AFFINITY_PREFIX_CHARS * 4 {
            break;
        }
    }
    s
}

/// Seconds until the pool `members` frees a place, from its observed
/// service rate (tasks finished per second over the last ones, summed over
/// replicas); before any finished, from its slots and the average task time.
pub fn retry_after_s(members: &[Arc<Pool>]) -> u64 {
    let observed: f64 = members.iter().filter_map(|p| p.service_rate()).sum();
    let rate = if observed > 0.0 {
        observed
    } else {
        let slots: usize = members.iter().map(|p| p.slots).sum();
        let avg_s = members
            .iter()
            .map(|p| p.avg_task_ms.load(Ordering::Relaxed))
            .max()
            .unwrap_or(1000)
            .max(1) as f64
            / 1000.0;
        slots.max(1) as f64 / avg_s
    };
    ((1.0 / rate).ceil() as u64).clamp(1, 3600)
}

/// Admit a checked request into a pool's queue (shared by the task API and
/// the OpenAI endpoints): the replica ([`crate::pool::pick_replica`]),
/// readiness (or load on demand), a unique id, capacity (`queue_capacity`
/// tasks waiting over all the pool's replicas).
pub fn admit(
    st: &Shared,
    head: &Arc<Pool>,
    req: TaskRequest,
    task_id: Option<String>,
) -> Result<Arc<Task>, ApiError> {
    let members = st.members(&head.group);
    let key = (members.len() > 1).then(|| affinity_text(&req));
    let task_id = task_id.unwrap_or_else(|| st.new_task_id());
    let (pool, task) = {
        // One admission at a time from the replica choice to the push:
        // clients arriving at once could otherwise see the same loads and
        // pick one replica, whose queue then holds tasks while another
        // replica's slots are free.
        let mut all = st.tasks.lock().unwrap();
        let pool = &match &key {
            Some(k) => crate::pool::pick_replica(&members, k),
            None => head.clone(),
        };
        let waits_for_load =
            pool.link.loads_on_demand() && !matches!(pool.link_state(), LinkState::Failed(_));
        if st.stopping.load(Ordering::SeqCst)
            || !(pool.ready.load(Ordering::SeqCst) || waits_for_load)
        {
            drop(all);
            return Err(not_ready(st, pool));
        }
        if all.contains_key(&task_id) {
            st.metrics.reject("invalid");
            return Err(ApiError {
                field: Some("task_id".into()),
                ..ApiError::new(
                    StatusCode::CONFLICT,
                    "TASK_EXISTS",
                    format!("task `{task_id}` already exists"),
                )
            });
        }
        let depth: usize = members.iter().map(|p| p.queue.len()).sum();
        if depth >= st.cfg.queue_capacity {
            st.metrics.reject("queue_full");
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "QUEUE_FULL",
                format!("the queue of pool `{}` is full ({depth} tasks)", pool.group),
            )
            .retry_after(retry_after_s(&members)));
        }
        // Tasks ahead on this replica, shared by its slots.
        let ahead = pool.load();
        let position = ahead;
        let predicted = (ahead / pool.slots) as u64 * pool.avg_task_ms.load(Ordering::Relaxed);
        let task = Arc::new(Task::new(
            task_id.clone(),
            pool.clone(),
            req,
            position,
            predicted,
            st.status.clone(),
        ));
        all.insert(task_id, task.clone());
        pool.queue.push(task.clone());
        (pool.clone(), task)
    };
    st.changed.notify_waiters();
    pool.touch();
    tasks::arm_deadline(st, &task);
    st.metrics.admitted.inc();
    st.status.poke();
    pool.work.notify_one();
    st.sched.notify_one();
    Ok(task)
}

/// Cancels its task when the client's stream is dropped (disconnect).
pub struct DisconnectGuard(pub Arc<Task>, pub Shared);
impl Drop for DisconnectGuard {
    fn drop(&mut self) {
        tasks::cancel(&self.1, &self.0, CancelReason::ClientDisconnected);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(queue_capacity: usize) -> Shared {
        crate::AppState::new(
            crate::Config {
                queue_capacity,
                ..Default::default()
            },
            crate::pool::tests::ready_specs(1, crate::Affinity::None),
            crate::scheduler::SchedulerConfig::default(),
        )
    }

    fn req() -> TaskRequest {
        TaskRequest {
            prompt: Some("x".into()),
            ..TaskRequest::default()
        }
    }

    #[test]
    fn each_refusal_has_its_status_code_and_retry_hint() {
        let st = state(2);
        let head = st.pools[0].clone();
        // Not ready yet (a pool that does not load on demand): 503, retry in 1 s.
        let e = admit(&st, &head, req(), None).err().expect("not ready");
        assert_eq!((e.status.as_u16(), e.code), (503, "ENGINE_NOT_READY"));
        assert_eq!(e.retry_after_s, Some(1));
        head.ready.store(true, Ordering::SeqCst);
        admit(&st, &head, req(), Some("a".into())).unwrap();
        // The same id twice: 409, naming the field.
        let e = admit(&st, &head, req(), Some("a".into()))
            .err()
            .expect("dup");
        assert_eq!((e.status.as_u16(), e.code), (409, "TASK_EXISTS"));
        assert_eq!(e.field.as_deref(), Some("task_id"));
        // The queue full (capacity 2): 429 with a retry hint from the pool's rate.
        admit(&st, &head, req(), None).unwrap();
        let e = admit(&st, &head, req(), None).err().expect("full");
        assert_eq!((e.status.as_u16(), e.code), (429, "QUEUE_FULL"));
        assert!(e.retry_after_s.is_some_and(|s| (1..=3600).contains(&s)));
        assert_eq!(head.queue.len(), 2, "nothing admitted past the capacity");
        // Shutting down: 503 DRAINING, whatever else holds.
        st.stopping.store(true, Ordering::SeqCst);
        let e = admit(&st, &head, req(), None).err().expect("draining");
        assert_eq!((e.status.as_u16(), e.code), (503, "DRAINING"));
        assert_eq!(st.metrics.admitted.get(), 2);
    }

    #[test]
    fn a_request_names_a_pool_or_gets_the_first_and_an_unknown_name_is_404() {
        let st = state(8);
        let first = route(&st, None, "pool", "POOL_NOT_FOUND").unwrap();
        assert!(Arc::ptr_eq(&first, st.default_pool()));
        let named = route(&st, Some(first.group.as_str()), "pool", "POOL_NOT_FOUND").unwrap();
        assert!(Arc::ptr_eq(&named, &first));
        let e = route(&st, Some("nope\u{1b}[31m"), "model", "MODEL_NOT_FOUND")
            .err()
            .expect("unknown");
        assert_eq!((e.status.as_u16(), e.code), (404, "MODEL_NOT_FOUND"));
        assert_eq!(e.field.as_deref(), Some("model"));
        assert!(
            e.message.contains(&format!("`{}`", first.group)),
            "{}",
            e.message
        );
    }

    #[test]
    fn retry_after_follows_the_observed_rate_else_slots_and_task_time() {
        let st = state(8);
        let members = st.members(&st.pools[0].group);
        // No task finished yet: slots over the average task time (1 s default).
        st.pools[0].avg_task_ms.store(4000, Ordering::Relaxed);
        let slots = st.pools[0].slots as u64;
        assert_eq!(
            retry_after_s(&members),
            4000u64.div_ceil(1000 * slots).max(1)
        );
    }

    #[test]
    fn clients_arriving_at_once_are_spread_evenly_over_the_replicas() {
        let cfg = crate::Config {
            queue_capacity: 1024,
            ..Default::default()
        };
        let st = crate::AppState::new(
            cfg,
            crate::pool::tests::ready_specs(4, crate::Affinity::None),
            crate::scheduler::SchedulerConfig::default(),
        );
        for p in &st.pools {
            p.ready.store(true, Ordering::SeqCst);
        }
        let head = st.pools[0].clone();
        // No workers run: every admitted task stays queued, so an even
        // spread is exact: 256 tasks from 8 threads at once, 64 each.
        let start = std::sync::Barrier::new(8);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    start.wait();
                    for _ in 0..32 {
                        let req = TaskRequest {
                            prompt: Some("x".into()),
                            ..TaskRequest::default()
                        };
                        admit(&st, &head, req, None).unwrap();
                    }
                });
            }
        });
        let queued: Vec<usize> = st.pools.iter().map(|p| p.queue.len()).collect();
        assert_eq!(queued, [64, 64, 64, 64]);
    }
}
