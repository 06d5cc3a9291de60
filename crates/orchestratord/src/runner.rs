//! A task's life on its engine: it runs once (the adapter's generation,
//! or a forwarded request), waits for a restarted engine when the one it
//! was given died before it connected, and ends with exactly one terminal
//! event: `end` with llama-server's own counts, `end` canceled once the
//! engine freed the slot, or `error` with the code the outcome names.

use crate::adapter::{engine_healthy, generate, Outcome, Progress};
use crate::adapter::{CONTEXT_LENGTH_EXCEEDED, ENGINE_REFUSED};
use crate::events::{EndEvent, ErrorEvent, StartedEvent, TaskEvent};
use crate::link::EngineInfo;
use crate::tasks::Task;
use crate::AppState;
use llorch_io::llama_server::{all_idle, Slot};
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub async fn run_task(st: &AppState, task: &Task) {
    let started_at = Instant::now();
    task.send(TaskEvent::Started(StartedEvent {
        queue_position: task.queue_position,
        predicted_start_ms: task.predicted_start_ms,
    }));
    let pool = &task.pool;
    let crate::link::LinkState::Ready(engine) = pool.link_state() else {
        fail(
            st,
            task,
            "ENGINE_NOT_READY",
            "the engine went away before the task started".into(),
            true,
        );
        return;
    };
    let mut p = Progress::default();
    // A non-streamed relay: nothing here polls the engine's queue until its
    // slot is idle again (see `Pool::silent_waits`).
    let silent = task
        .req
        .forward
        .as_ref()
        .filter(|f| f.silent())
        .map(|_| crate::forward::SilentWait::new(&task.pool));
    let (outcome, engine) = attempt(st, task, engine, &mut p).await;
    let queue_wait_ms = (started_at - task.admitted_at).as_millis() as u64;
    match outcome {
        Outcome::Finished(fin) => finished(st, task, &fin, &p, queue_wait_ms),
        Outcome::Canceled(reason) => {
            let idle = wait_slot_freed(st, task, &engine, silent.is_some()).await;
            let since = task
                .cancel_reason()
                .map(|(_, t)| t)
                .unwrap_or_else(Instant::now);
            st.metrics
                .cancel_latency_ms
                .observe(since.elapsed().as_secs_f64() * 1000.0);
            st.metrics.canceled.inc();
            st.metrics.tokens_out.inc_by(p.tokens);
            pool.tokens_out.fetch_add(p.tokens, Ordering::Relaxed);
            task.finish(TaskEvent::End(EndEvent {
                tokens_out: p.tokens,
                decode_ms: started_at.elapsed().as_secs_f64() * 1000.0,
                stop_reason: reason.as_str().into(),
                canceled: true,
                queue_wait_ms,
                slot_idle: Some(idle),
                ..Default::default()
            }));
        }
        Outcome::EngineGone(msg) | Outcome::NotSent(msg) => {
            pool.mark_not_ready();
            fail(st, task, "ENGINE_CRASHED", msg, true);
        }
        Outcome::Stalled(msg) => {
            pool.mark_not_ready();
            pool.link.report_stalled();
            fail(st, task, "ENGINE_STALLED", msg, true);
        }
        Outcome::EngineError(msg) => fail(st, task, "ENGINE_ERROR", msg, false),
        Outcome::ContextExceeded(msg) => fail(st, task, CONTEXT_LENGTH_EXCEEDED, msg, false),
        Outcome::Refused(msg) => fail(st, task, ENGINE_REFUSED, msg, false),
    }
}

/// Run the task on `engine`; an engine that died before this task reached
/// it (its supervisor restarts it) is waited for, as a queued task waits,
/// instead of failing the task for a crash it never saw. The outcome, and
/// the engine it came from.
async fn attempt(
    st: &AppState,
    task: &Task,
    mut engine: EngineInfo,
    p: &mut Progress,
) -> (Outcome, EngineInfo) {
    let mut restarts = 0;
    loop {
        let outcome = match &task.req.forward {
            Some(f) => crate::forward::relay(st, task, &engine, f, p).await,
            None => generate(st, task, &engine, p).await,
        };
        match outcome {
            Outcome::NotSent(msg) if p.events == 0 && restarts < NOT_SENT_RESTARTS => {
                restarts += 1;
                task.pool.mark_not_ready();
                match engine_after(st, task, &engine).await {
                    Ok(next) => {
                        llorch_io::info!(
                            "orchestratord: {msg}; task {} goes to the restarted engine at {}",
                            task.id,
                            next.url
                        );
                        engine = next;
                    }
                    Err(o) => return (o, engine),
                }
            }
            Outcome::NotSent(msg) => return (Outcome::EngineGone(msg), engine),
            o => return (o, engine),
        }
    }
}

/// End a task the engine finished, with llama-server's own counts and timings.
fn finished(st: &AppState, task: &Task, fin: &Value, p: &Progress, queue_wait_ms: u64) {
    let t = &fin["timings"];
    let tokens_out = fin["tokens_predicted"].as_u64().unwrap_or(p.tokens);
    st.metrics.completed.inc();
    st.metrics.tokens_out.inc_by(tokens_out);
    task.pool
        .tokens_out
        .fetch_add(tokens_out, Ordering::Relaxed);
    task.finish(TaskEvent::End(EndEvent {
        tokens_out,
        decode_ms: t["predicted_ms"].as_f64().unwrap_or(0.0),
        stop_reason: fin["stop_type"].as_str().unwrap_or("eos").to_string(),
        canceled: false,
        prompt_tokens: fin["tokens_evaluated"]
            .as_u64()
            .or_else(|| t["prompt_n"].as_u64())
            .unwrap_or(0),
        prompt_evaluated: t["prompt_n"].as_u64().unwrap_or(0),
        prompt_ms: t["prompt_ms"].as_f64().unwrap_or(0.0),
        decode_tokens_per_s: t["predicted_per_second"].as_f64().unwrap_or(0.0),
        queue_wait_ms,
        slot_idle: None,
    }));
}

/// After a cancel (the upstream request is already dropped): whether the
/// engine freed the task's slot. One slot: wait until the engine is idle.
/// Several: until no more slots process than this pool's other running
/// tasks (the engine is ours alone; llama-server names a task's slot only
/// in its final frame, so which slot was ours is not known). A non-streamed
/// (`silent`) relay is stopped by llama-server only after a second with no
/// result at all: poll slower than that, and for longer (a streamed one
/// stops at its next write).
async fn wait_slot_freed(st: &AppState, task: &Task, engine: &EngineInfo, silent: bool) -> bool {
    let pool = &task.pool;
    // Wait for the state, not for a time: the engine frees the slot at its
    // next decode step, which a busy machine makes slow (measured on two
    // loaded cores: up to 5.9 s, where a fixed 3 s wait ended streams with
    // `slot_idle: false`). An engine that does not free it within the stall
    // timeout is as good as stalled.
    let within = st.cfg.stall_timeout.max(Duration::from_secs(5));
    let every = if silent {
        Duration::from_millis(1200)
    } else {
        // Every `/slots` request is a task in the engine's own queue,
        // handled between decode steps: polling it hard delays the very
        // cancel it waits for on a busy machine.
        Duration::from_millis(10)
    };
    if pool.slots > 1 {
        let others = || pool.running.load(Ordering::SeqCst).saturating_sub(1) as usize;
        poll_slots(st, engine, within, every, |a| {
            a.iter().filter(|s| s.is_processing).count() <= others()
        })
        .await
    } else {
        poll_slots(st, engine, within, every, all_idle).await
    }
}

fn fail(st: &AppState, task: &Task, code: &str, message: String, retriable: bool) {
    st.metrics.failed.inc();
    task.finish(TaskEvent::Error(ErrorEvent {
        code: code.into(),
        message,
        retriable,
    }));
}

/// How many engine restarts one task waits through before its connect failure is a crash.
const NOT_SENT_RESTARTS: u32 = 3;

/// Wait until the task's pool is ready again after `gone` could not be
/// reached (its supervisor restarts it), unless the task is canceled or
/// the pool fails for good.
async fn engine_after(
    st: &AppState,
    task: &Task,
    gone: &EngineInfo,
) -> Result<EngineInfo, Outcome> {
    let pool = &task.pool;
    loop {
        if let Some((r, _)) = task.cancel_reason() {
            return Err(Outcome::Canceled(r));
        }
        if st.stopping.load(Ordering::SeqCst) {
            return Err(Outcome::EngineGone(format!(
                "the engine at {} went away while the orchestrator stops",
                gone.url
            )));
        }
        match pool.link_state() {
            // Ready as the health loop saw it, and answering now (a stale
            // look of the health loop may still call the dead engine ready).
            crate::link::LinkState::Ready(e)
                if pool.ready.load(Ordering::SeqCst) && engine_healthy(st, &e).await =>
            {
                return Ok(e)
            }
            crate::link::LinkState::Failed(why) => {
                return Err(Outcome::EngineGone(format!(
                    "the engine at {} went away and could not be restarted: {why}",
                    gone.url
                )))
            }
            _ => {}
        }
        let changed = pool.work.notified();
        tokio::select! {
            _ = changed => {}
            _ = task.cancel_notify.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// Poll `/slots` (every `every`) until `done` says so of the slot list, or `timeout` passes.
async fn poll_slots(
    st: &AppState,
    engine: &EngineInfo,
    timeout: Duration,
    every: Duration,
    mut done: impl FnMut(&[Slot]) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    let server = engine.server();
    loop {
        if let Ok(slots) = server.slots(&st.http, Duration::from_secs(1)).await {
            if done(&slots) {
                return true;
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}
