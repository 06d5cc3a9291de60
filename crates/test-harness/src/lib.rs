//! The system tests' harness (dev-only): a real supervised engine of a
//! profile (the workspace's cached build and model), the link an
//! orchestrator follows it by, waits on an engine's slots and an
//! orchestrator's readiness. The orchestrator's API tests
//! (`crates/orchestratord/tests/`) and the engine runtime's
//! (`crates/engine-runtime/tests/real_engine.rs`) share it; [`api`] is the
//! one engine per test binary the v1 API tests take turns on.

pub mod api;

use engine_provisioner::build::BuildOptions;
use engine_runtime::supervisor::StateHandle;
use engine_runtime::supervisor::{EngineState, RestartPolicy, Supervisor};
use llorch_types::PoolId;
use orchestratord::{EngineInfo, EngineLink, LinkState};
use std::time::{Duration, Instant};

/// How long a wait on a state change may last before the test calls it a
/// hang: never a measure of speed (a slow or busy machine only waits longer).
pub const HANG: Duration = Duration::from_secs(600);

/// A supervised real engine and what the orchestrator knows of it.
pub struct Engine {
    pub sup: Supervisor,
    pub base: EngineInfo,
}

/// Points an orchestrator at wherever a test's own supervisor has its
/// engine now (the stacks users run link their engines through
/// `llorch_stack::ManagedLink`; a test that starts one orchestrator on one
/// shared engine uses this).
pub struct SupervisorLink {
    pub base: EngineInfo,
    pub state: StateHandle,
}

impl EngineLink for SupervisorLink {
    fn current(&self) -> LinkState {
        match self.state.get() {
            EngineState::Ready { url, api_key, .. } => LinkState::Ready(EngineInfo {
                url,
                api_key,
                ..self.base.clone()
            }),
            EngineState::Failed { reason } => LinkState::Failed(reason),
            _ => LinkState::Starting,
        }
    }
    fn report_stalled(&self) {
        self.state.request_restart();
    }
}

impl Engine {
    /// An orchestrator's link to this engine.
    pub fn link(&self) -> Box<SupervisorLink> {
        Box::new(SupervisorLink {
            base: self.base.clone(),
            state: self.sup.state_handle(),
        })
    }

    /// Start the engine of `profile` (default: the default profile) as
    /// `pool`, from the workspace cache (built once per machine, under its lock).
    pub fn start(profile: Option<&str>, pool: &str, who: &str) -> Engine {
        let root = test_support::workspace_root();
        let rt = std::env::temp_dir().join(format!("llorch-{who}-{}", std::process::id()));
        let layout = test_support::layout(&rt);
        let p = llorch_profile::Profile::resolve(&root, profile).unwrap();
        let pool = PoolId::parse(pool).unwrap();
        let mut prep = llorch_stack::prepare(&p, &pool, &layout, &BuildOptions::quiet())
            .unwrap()
            .engine;
        // The API tests also ask this engine directly by its TCP URL (from
        // Python too); engines on a unix socket are tested by the stack tests.
        prep.listen = llorch_profile::ListenMode::Tcp;
        let base = llorch_stack::engine_info(&prep);
        let policy = RestartPolicy {
            initial_backoff: Duration::from_millis(100),
            ..Default::default()
        };
        let sup = Supervisor::start(prep, layout, policy, who).unwrap();
        sup.wait_ready(HANG).unwrap();
        Engine { sup, base }
    }

    /// The engine's URL (it must be ready).
    pub fn url(&self) -> String {
        match self.sup.state() {
            EngineState::Ready { url, .. } => url,
            s => panic!("engine not ready: {s:?}"),
        }
    }
}

/// Whether no slot of the engine is processing.
pub async fn slots_idle(engine: &str) -> bool {
    use llorch_io::llama_server::{all_idle, LlamaServer};
    let slots = LlamaServer::new(engine, None)
        .slots(&llorch_io::http::async_client(), Duration::from_secs(5))
        .await
        .unwrap();
    all_idle(&slots)
}

/// Wait until the engine's first slot is processing (`processing`) or idle,
/// and return its `/slots` answer (raw JSON, `next_token` and all).
/// llama-server cannot be waited on, so it is asked every 1.5 s: a faster
/// asker would keep it from noticing a client that hung up (it looks between
/// tokens). `abandon` is asked before each wait: `Some(why)` fails the test
/// (what the wait is for can no longer happen). Bounded only by [`HANG`].
pub async fn first_slot_becomes(
    engine: &str,
    processing: bool,
    abandon: impl Fn() -> Option<String>,
) -> serde_json::Value {
    use llorch_io::llama_server::{Api, LlamaServer};
    let server = LlamaServer::new(engine, None);
    let http = llorch_io::http::async_client();
    let deadline = Instant::now() + HANG;
    loop {
        let slots: serde_json::Value = server
            .get(&http, Api::Slots)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if slots[0]["is_processing"] == processing {
            return slots;
        }
        if let Some(why) = abandon() {
            panic!("{why}: {slots}");
        }
        assert!(
            Instant::now() < deadline,
            "the engine's first slot never became processing={processing}: {slots}"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
}

/// How many more tokens a slot may hold after a stop before [`wait_idle`]
/// calls the task not stopped (llama-server stops a slot within a few).
pub const STOPPED_WITHIN_TOKENS: u64 = 400;

/// Wait until no slot of the engine is processing. False when the task was
/// not stopped: a processing slot went on to hold `ran_on` more tokens than
/// when the wait began (the tests' tasks run to 1,500 or 2,000 tokens unless
/// stopped), or it made no progress at all for a minute. Never a bound on
/// time: a slow or busy machine only makes the wait longer.
pub async fn wait_idle(engine: &str, ran_on: u64) -> bool {
    use llorch_io::llama_server::LlamaServer;
    let server = LlamaServer::new(engine, None);
    let http = llorch_io::http::async_client();
    let held = |slots: &[llorch_io::llama_server::Slot]| {
        slots
            .iter()
            .filter(|s| s.is_processing)
            .map(|s| s.n_prompt_tokens)
            .max()
    };
    let first = server.slots(&http, Duration::from_secs(30)).await.unwrap();
    let Some(start) = held(&first) else {
        return true;
    };
    let (mut last, mut since) = (start, Instant::now());
    loop {
        let slots = server.slots(&http, Duration::from_secs(30)).await.unwrap();
        let Some(now) = held(&slots) else {
            return true;
        };
        if now >= start + ran_on {
            eprintln!("wait_idle: a slot went on from {start} to {now} tokens: not stopped");
            return false;
        }
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() > Duration::from_secs(60) {
            eprintln!("wait_idle: a slot stayed busy at {now} tokens for a minute");
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait until the orchestrator at `base` answers `/readyz` with 200.
pub async fn wait_ready(base: &str) {
    let c = llorch_io::http::async_client();
    let deadline = Instant::now() + HANG;
    while Instant::now() < deadline {
        if c.get(format!("{base}/readyz"))
            .send()
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("orchestrator never ready");
}

/// `GET url` and its JSON body (any status).
pub async fn get_json(c: &reqwest::Client, url: impl reqwest::IntoUrl) -> serde_json::Value {
    c.get(url).send().await.unwrap().json().await.unwrap()
}
