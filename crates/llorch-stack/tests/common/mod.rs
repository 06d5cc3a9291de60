//! Shared by this crate's test files: a real supervised engine of a
//! profile (the workspace's cached build and model), waits on an engine's
//! slots and an orchestrator's readiness, pinned Python client packages.
#![allow(dead_code)]

pub mod api;

use engine_provisioner::build::BuildOptions;
use engine_runtime::supervisor::{EngineState, RestartPolicy, Supervisor};
use llorch_io::handoff::PoolId;
use orchestratord::EngineInfo;
use std::time::{Duration, Instant};

/// A supervised real engine and what the orchestrator knows of it.
pub struct Engine {
    pub sup: Supervisor,
    pub base: EngineInfo,
}

impl Engine {
    /// Start the engine of `profile` (default: the default profile) as
    /// `pool`, from the workspace cache (built once per machine, under its lock).
    pub fn start(profile: Option<&str>, pool: &str, who: &str) -> Engine {
        let root = test_support::workspace_root();
        let rt = std::env::temp_dir().join(format!("llorch-{who}-{}", std::process::id()));
        let layout = test_support::layout(&rt);
        let p = llorch_profile::Profile::resolve(&root, profile).unwrap();
        let pool = PoolId::parse(pool).unwrap();
        let prep = llorch_stack::prepare(&p, &pool, &layout, &BuildOptions::quiet())
            .unwrap()
            .engine;
        let base = llorch_stack::engine_info(&prep);
        let policy = RestartPolicy {
            initial_backoff: Duration::from_millis(100),
            ..Default::default()
        };
        let sup = Supervisor::start(prep, layout, policy, who).unwrap();
        sup.wait_ready(Duration::from_secs(120)).unwrap();
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

/// Wait until no slot of the engine is processing; false after `within`.
pub async fn wait_idle(engine: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if slots_idle(engine).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Wait until the orchestrator at `base` answers `/readyz` with 200.
pub async fn wait_ready(base: &str) {
    let c = llorch_io::http::async_client();
    let deadline = Instant::now() + Duration::from_secs(60);
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
