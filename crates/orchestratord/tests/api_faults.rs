//! The v1 API when the engine fails: killed mid-stream (an error, then a
//! restart serves), stopped (the stream stalls, the engine is restarted),
//! failed for good (503 `ENGINE_FAILED` with the reason). One real engine
//! for the file (`test_harness::api`).

use engine_provisioner::build::BuildOptions;
use engine_runtime::supervisor::{EngineState, RestartPolicy, Supervisor};
use llorch_types::PoolId;
use orchestratord::client::{read_stream, stream_task};
use orchestratord::Config;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

use test_harness::api::*;
use test_harness::get_json;
use test_harness::wait_ready;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_killed_mid_stream_gives_an_error_then_recovers() {
    let _t = TURN.lock().await;
    let srv = orchestrator(Config::default()).await;
    let base = format!("http://{}", srv.addr);
    let c = llorch_io::http::async_client();
    let pid = engine_pid();
    let t = submit(
        &c,
        &base,
        json!({"prompt": LONG, "max_tokens": 2000, "ignore_eos": true}),
    )
    .await;
    let id = t["task_id"].as_str().unwrap().to_string();
    // Kill the engine as soon as the first token has arrived.
    let kill = OnFirstToken::new(pid, libc::SIGKILL);
    let r = read_stream(&c, &base, &id, Some(&|t| kill.token(t)), None)
        .await
        .unwrap();
    assert!(kill.sent());
    let err = r.error.expect("an error event");
    assert_eq!(err.code, "ENGINE_CRASHED", "{err:?}");
    assert!(err.retriable);
    assert_eq!(r.order.last().map(String::as_str), Some("error"));
    // The supervisor restarts the engine; the next task succeeds.
    wait_ready(&base).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = stream_task(
            &c,
            &base,
            &json!({"prompt": "Hello", "max_tokens": 4}),
            None,
            None,
        )
        .await;
        if let Ok(r) = ok {
            if r.order_ok() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    srv.shutdown(Duration::from_secs(1)).await;
}

/// A hung engine (SIGSTOP) ends the stream with ENGINE_STALLED, `/readyz`
/// says not ready, the supervisor kills and restarts it, and the next task
/// succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_engine_stalls_the_stream_and_is_restarted() {
    let _t = TURN.lock().await;
    let srv = orchestrator(Config {
        stall_timeout: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let base = format!("http://{}", srv.addr);
    let c = llorch_io::http::async_client();
    let pid = engine_pid();
    let t = submit(
        &c,
        &base,
        json!({"prompt": LONG, "max_tokens": 2000, "ignore_eos": true}),
    )
    .await;
    let id = t["task_id"].as_str().unwrap().to_string();
    let stop = OnFirstToken::new(pid, libc::SIGSTOP);
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        read_stream(&c, &base, &id, Some(&|t| stop.token(t)), None),
    )
    .await
    .expect("the stream ended")
    .unwrap();
    let err = r.error.expect("an error event");
    assert_eq!(err.code, "ENGINE_STALLED", "{err:?}");
    assert!(err.retriable);
    assert_eq!(r.order.last().map(String::as_str), Some("error"));
    // Not ready from the moment the stall is reported until a new engine is up.
    assert_eq!(status(c.get(format!("{base}/readyz"))).await, 503);
    wait_ready(&base).await;
    let new_pid = engine_pid();
    assert_ne!(new_pid, pid, "the hung engine was replaced");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || fs_err::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true),
        "the hung engine is gone"
    );
    let ok = stream_task(
        &c,
        &base,
        &json!({"prompt": "Hello", "max_tokens": 4}),
        None,
        None,
    )
    .await
    .unwrap();
    assert!(ok.order_ok() && ok.end.is_some(), "{:?}", ok.order);
    srv.shutdown(Duration::from_secs(1)).await;
}

/// When the supervisor gives up, the pool says `failed` for good: the API
/// answers 503 ENGINE_FAILED with the reason, not "try again".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_engine_gives_503_engine_failed_with_the_reason() {
    let _t = TURN.lock().await;
    let root = test_support::workspace_root();
    let rt = tempfile::tempdir().unwrap();
    let layout = test_support::layout(rt.path());
    let p = llorch_profile::Profile::resolve(&root, None).unwrap();
    let pool = PoolId::parse(&format!("api-failed-{}", std::process::id())).unwrap();
    let prep = llorch_stack::prepare(&p, &pool, &layout, &BuildOptions::quiet())
        .unwrap()
        .engine;
    let base_info = llorch_stack::engine_info(&prep);
    let policy = RestartPolicy {
        initial_backoff: Duration::from_millis(50),
        max_crashes: 1,
        ..Default::default()
    };
    let sup = Supervisor::start(prep, layout, policy, "api tests (failed)").unwrap();
    sup.wait_ready(Duration::from_secs(120)).unwrap();
    let srv = orchestratord::start(
        Config {
            addr: "127.0.0.1:0".parse().unwrap(),
            health_interval: Duration::from_millis(50),
            ..Default::default()
        },
        Box::new(test_harness::SupervisorLink {
            base: base_info,
            state: sup.state_handle(),
        }),
    )
    .await
    .unwrap();
    let base = format!("http://{}", srv.addr);
    wait_ready(&base).await;
    let pid = match sup.state() {
        EngineState::Ready { pid, .. } => pid,
        s => panic!("{s:?}"),
    };
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let c = llorch_io::http::async_client();
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let r = c
            .post(format!("{base}/v1/tasks"))
            .json(&json!({"prompt": "Hi", "max_tokens": 2}))
            .send()
            .await
            .unwrap();
        let code = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or_default();
        if v["error"]["code"] == "ENGINE_FAILED" {
            assert_eq!(code, 503);
            break v;
        }
        assert!(Instant::now() < deadline, "never failed: {code} {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("giving up") && msg.contains("last lines"),
        "{msg}"
    );
    assert_ne!(body["error"]["retriable"], json!(true), "{body}");
    let caps: Value = get_json(&c, format!("{base}/v1/capabilities")).await;
    assert_eq!(caps["state"], "failed");
    assert!(caps["failed_reason"]
        .as_str()
        .unwrap()
        .contains("giving up"));
    // It stays failed: nobody restarts it behind the API's back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status(c.get(format!("{base}/readyz"))).await, 503);
    srv.shutdown(Duration::from_secs(1)).await;
    sup.stop();
}
