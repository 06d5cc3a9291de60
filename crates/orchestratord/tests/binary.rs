//! The `orchestratord` binary against an engine started by `provision`:
//! SIGTERM and SIGHUP drain like SIGINT. The open stream ends with a terminal
//! event, the binary exits 0, and the detached engine (owned by `provision`,
//! not by the orchestrator) keeps running.

use engine_runtime::lifecycle;
use llorch_io::cmd::Io;
use llorch_types::PoolId;
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

#[test]
fn the_binary_drains_on_sigterm_and_sighup() {
    let root = test_support::workspace_root();
    let rt = tempfile::tempdir().unwrap();
    let layout = test_support::layout(rt.path());
    let profile = llorch_profile::Profile::resolve(&root, None).unwrap();
    let pool = PoolId::parse(&format!("orch-bin-{}", std::process::id())).unwrap();
    let out = llorch_stack::provision(
        &profile,
        &pool,
        &layout,
        &engine_provisioner::BuildOptions::quiet(),
    )
    .unwrap();
    // The provisioned engine is stopped when the test ends, passed or not.
    struct Down<'a>(&'a llorch_io::paths::Layout, &'a PoolId);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = lifecycle::stop_pool(self.0, self.1);
        }
    }
    let handoff = layout.handoff(&pool);
    let _down = Down(&layout, &pool);
    let mut failures = Vec::new();
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGHUP, "SIGHUP")] {
        let mut child = llorch_io::cmd::KillOnDrop(
            llorch_io::cmd::Cmd::new(env!("CARGO_BIN_EXE_orchestratord"))
                .arg("--handoff")
                .arg(&handoff)
                .args(["--addr", "127.0.0.1:0"])
                .spawn(Io::Null, Io::Piped)
                .unwrap(),
        );
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = loop {
            let line = lines.next().expect("it says where it listens").unwrap();
            if let Some(rest) = line.strip_prefix("orchestratord listening on ") {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        let pid = child.id() as i32;
        let r = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let c = llorch_io::http::async_client();
                let deadline = Instant::now() + Duration::from_secs(30);
                while c
                    .get(format!("{url}/readyz"))
                    .send()
                    .await
                    .map(|r| r.status() != 200)
                    .unwrap_or(true)
                {
                    assert!(Instant::now() < deadline, "never ready");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let id = orchestratord::client::submit(
                    &c,
                    &url,
                    &serde_json::json!({"prompt": "Count to fifty:", "max_tokens": 48, "ignore_eos": true}),
                )
                .await
                .unwrap();
                let sent = std::sync::atomic::AtomicBool::new(false);
                let on_token = |_: &str| {
                    if !sent.swap(true, std::sync::atomic::Ordering::SeqCst) {
                        unsafe { libc::kill(pid, sig) };
                    }
                };
                tokio::time::timeout(
                    Duration::from_secs(60),
                    orchestratord::client::read_stream(&c, &url, &id, Some(&on_token), None),
                )
                .await
                .expect("the stream ended")
                .unwrap()
            });
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let status = child.wait().unwrap();
        if !(r.order_ok() && r.end.is_some() && status.success()) {
            failures.push(format!(
                "{name}: order {:?}, exit {status}, {rest:?}",
                r.order
            ));
        }
        if !rest.iter().any(|l| l.contains(name)) {
            failures.push(format!("{name}: not reported as the reason: {rest:?}"));
        }
    }
    let run = engine_runtime::run_state::read_pool(&layout, &pool);
    let stopped = lifecycle::stop_pool(&layout, &pool);
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        run.is_some_and(|r| r.engine_alive),
        "the provisioned engine keeps running"
    );
    assert!(matches!(stopped, Ok(lifecycle::Stopped::Engine(p)) if p == out.pid));
}
