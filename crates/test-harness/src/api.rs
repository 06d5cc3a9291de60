//! One real supervised engine per test binary of the v1 API (`api.rs`,
//! `api_faults.rs`, `openai_api.rs` of `crates/orchestratord/tests/`):
//! tests take turns on it ([`TURN`]: it has one slot), each with its own
//! orchestrator.

use crate::{wait_ready, Engine};
use engine_runtime::supervisor::EngineState;
use orchestratord::Config;
use serde_json::Value;
use std::sync::OnceLock;
use std::time::Duration;

static ENGINE: OnceLock<Engine> = OnceLock::new();

/// This test binary's name (`api_faults` of `api_faults-<hash>`).
fn test_binary() -> String {
    let exe = std::env::current_exe().expect("the test binary's path");
    let stem = exe
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.bytes().all(|b| b.is_ascii_hexdigit()) => name.to_string(),
        _ => stem,
    }
}

/// This test binary's pool (its name and pid): two runs at once must not
/// share one (one engine per pool).
pub fn pool() -> String {
    format!("{}-{}", test_binary().replace('_', "-"), std::process::id())
}
pub static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn engine() -> &'static Engine {
    ENGINE.get_or_init(|| Engine::start(None, &pool(), &test_binary()))
}

pub fn engine_url() -> String {
    engine().url()
}

pub async fn orchestrator(mut cfg: Config) -> orchestratord::Server {
    let e = engine();
    // The orchestrator names its pool after the engine it finds ready; a
    // test before this one may have killed it (the supervisor restarts it):
    // wait for the state, woken by the supervisor, not for a time.
    let sup_state = {
        let s = e.sup.state_handle();
        tokio::task::spawn_blocking(move || {
            s.wait_for(Duration::from_secs(300), |st| {
                matches!(st, EngineState::Ready { .. })
            })
        })
        .await
        .unwrap()
    };
    assert!(
        matches!(sup_state, EngineState::Ready { .. }),
        "the shared engine is not ready: {sup_state:?}"
    );
    cfg.health_interval = Duration::from_millis(50);
    if cfg.addr.port() == 8080 {
        cfg.addr = "127.0.0.1:0".parse().unwrap();
    }
    let srv = orchestratord::start(cfg, e.link()).await.unwrap();
    wait_ready(&format!("http://{}", srv.addr)).await;
    srv
}

pub async fn status(req: reqwest::RequestBuilder) -> u16 {
    req.send().await.unwrap().status().as_u16()
}

pub const LONG: &str = "Count from one to one thousand, one number per line:\n";

pub async fn submit(c: &reqwest::Client, base: &str, body: Value) -> Value {
    let r = c
        .post(format!("{base}/v1/tasks"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    r.json().await.unwrap()
}

pub fn engine_pid() -> u32 {
    match engine().sup.state() {
        EngineState::Ready { pid, .. } => pid,
        s => panic!("engine not ready: {s:?}"),
    }
}

/// A signal sent to the engine once, on the first token a stream reads
/// (`read_stream`'s per-token callback): the crash and stall tests.
pub struct OnFirstToken {
    pid: u32,
    signal: i32,
    sent: std::sync::atomic::AtomicBool,
}

impl OnFirstToken {
    pub fn new(pid: u32, signal: i32) -> OnFirstToken {
        OnFirstToken {
            pid,
            signal,
            sent: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn token(&self, _: &str) {
        if !self.sent.swap(true, std::sync::atomic::Ordering::SeqCst) {
            unsafe { libc::kill(self.pid as i32, self.signal) };
        }
    }

    pub fn sent(&self) -> bool {
        self.sent.load(std::sync::atomic::Ordering::SeqCst)
    }
}
