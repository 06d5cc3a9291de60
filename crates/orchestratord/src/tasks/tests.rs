//! The task state machine in milliseconds, without an engine: an `AppState`
//! whose replica is a link that says Ready and points nowhere; every task
//! here ends before it could reach one.

use super::*;
use crate::events::{StartedEvent, TokenEvent};

fn state(cfg: crate::Config) -> crate::Shared {
    let st = crate::AppState::new(
        cfg,
        crate::pool::tests::ready_specs(1, crate::Affinity::None),
        crate::scheduler::SchedulerConfig::default(),
    );
    st.pools[0].ready.store(true, Ordering::SeqCst);
    st
}

fn task(st: &crate::Shared, id: &str) -> Arc<Task> {
    let req = TaskRequest {
        prompt: Some("x".into()),
        ..TaskRequest::default()
    };
    crate::admission::admit(st, &st.pools[0].clone(), req, Some(id.into())).unwrap()
}

fn token() -> TaskEvent {
    TaskEvent::Token(TokenEvent {
        t: "a".into(),
        i: 0,
        probs: None,
    })
}

/// Every event the task's stream holds now, and whether it is closed.
fn drain(rx: &mut mpsc::UnboundedReceiver<TaskEvent>) -> (Vec<TaskEvent>, bool) {
    let mut out = Vec::new();
    loop {
        match rx.try_recv() {
            Ok(ev) => out.push(ev),
            Err(mpsc::error::TryRecvError::Empty) => return (out, false),
            Err(mpsc::error::TryRecvError::Disconnected) => return (out, true),
        }
    }
}

#[test]
fn finish_is_the_one_way_to_done_and_happens_once() {
    let st = state(crate::Config::default());
    let t = task(&st, "t1");
    let mut rx = t.take_stream().expect("the stream, once");
    assert!(t.take_stream().is_none());
    assert_eq!(t.phase(), Phase::Queued);
    assert_eq!(t.start_running(), Ok(()));
    assert_eq!(t.phase(), Phase::Running);
    assert!(t.send(TaskEvent::Started(StartedEvent::default())));
    assert!(t.first_token_at().is_none());
    assert!(t.send(token()));
    assert!(t.first_token_at().is_some());
    assert!(t.finish(TaskEvent::End(EndEvent::default())));
    assert_eq!(t.phase(), Phase::Done);
    // A second terminal event, a late token, a late cancel: nothing.
    assert!(!t.finish(TaskEvent::End(EndEvent::default())));
    assert!(!t.send(token()));
    t.request_cancel(CancelReason::Requested);
    assert!(!t.canceled());
    let (events, closed) = drain(&mut rx);
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match e {
            TaskEvent::Started(_) => "started",
            TaskEvent::Token(_) => "token",
            TaskEvent::End(_) => "end",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["started", "token", "end"]);
    assert!(closed, "the stream closes after the terminal event");
}

#[test]
fn a_queued_task_canceled_ends_at_once_and_leaves_the_queue() {
    let st = state(crate::Config::default());
    let t = task(&st, "t2");
    let mut rx = t.take_stream().unwrap();
    assert_eq!(st.pools[0].queue.len(), 1);
    cancel(&st, &t, CancelReason::Requested);
    assert_eq!(t.phase(), Phase::Done);
    assert!(st.pools[0].queue.is_empty());
    assert_eq!(st.metrics.canceled.get(), 1);
    let (events, closed) = drain(&mut rx);
    match events.as_slice() {
        [TaskEvent::End(e)] => {
            assert!(e.canceled && e.stop_reason == "canceled" && e.tokens_out == 0)
        }
        other => panic!("one canceled end, got {other:?}"),
    }
    assert!(closed);
    // Canceling again (a done task) changes nothing.
    cancel(&st, &t, CancelReason::Deadline);
    assert_eq!(st.metrics.canceled.get(), 1);
}

#[test]
fn a_cancel_that_races_the_pop_wins_and_the_first_reason_is_kept() {
    let st = state(crate::Config::default());
    let t = task(&st, "t3");
    // The cancel recorded its reason; the worker popped the task before the
    // cancel looked in the queue.
    t.request_cancel(CancelReason::Deadline);
    t.request_cancel(CancelReason::Requested);
    let popped = st.pools[0].queue.pop().unwrap();
    assert_eq!(popped.start_running(), Err(CancelReason::Deadline));
    assert_eq!(popped.phase(), Phase::Queued, "never marked running");
    assert_eq!(
        popped.cancel_reason().map(|(r, _)| r),
        Some(CancelReason::Deadline)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn the_worker_ends_a_task_canceled_in_the_queue_without_running_it() {
    let st = state(crate::Config::default());
    let t = task(&st, "t4");
    let mut rx = t.take_stream().unwrap();
    t.request_cancel(CancelReason::ClientDisconnected);
    let w = tokio::spawn(worker(st.clone(), st.pools[0].clone()));
    match rx.recv().await.expect("an end event") {
        TaskEvent::End(e) => assert!(e.canceled && e.stop_reason == "client_disconnected"),
        other => panic!("{other:?}"),
    }
    assert!(rx.recv().await.is_none(), "closed after the end");
    assert_eq!(st.metrics.canceled.get(), 1);
    assert_eq!(st.pools[0].running.load(Ordering::SeqCst), 0);
    st.stopping.store(true, Ordering::SeqCst);
    st.pools[0].work.notify_one();
    w.await.unwrap();
}

#[test]
fn failing_a_pool_ends_every_queued_task_with_the_reason() {
    let st = state(crate::Config::default());
    let ts: Vec<_> = (0..3).map(|i| task(&st, &format!("f{i}"))).collect();
    fail_queued(&st, &st.pools[0], "ENGINE_FAILED", "it crashed", false);
    for t in &ts {
        let (events, closed) = drain(&mut t.take_stream().unwrap());
        match events.as_slice() {
            [TaskEvent::Error(e)] => assert_eq!(
                (e.code.as_str(), e.message.as_str(), e.retriable),
                ("ENGINE_FAILED", "it crashed", false)
            ),
            other => panic!("{other:?}"),
        }
        assert!(closed);
    }
    assert_eq!(st.metrics.failed.get(), 3);
    assert!(st.pools[0].queue.is_empty());
}

#[test]
fn done_tasks_are_dropped_after_their_retention_and_others_kept() {
    let st = state(crate::Config {
        retention: Duration::ZERO,
        ..Default::default()
    });
    let done = task(&st, "done");
    let queued = task(&st, "queued");
    done.finish(TaskEvent::End(EndEvent::default()));
    reap(&st);
    let left: Vec<String> = st.tasks.lock().unwrap().keys().cloned().collect();
    assert_eq!(left, ["queued"]);
    assert_eq!(queued.phase(), Phase::Queued);
}
