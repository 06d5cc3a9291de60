//! A Stack: an engine and the orchestrator in front of it, in this process.
//!
//! * A free pool gets a supervised engine ([`Supervisor`]): restarted when it
//!   crashes or hangs, stopped when the stack stops or this process dies.
//! * A pool whose engine `provision` started (detached) with the same build,
//!   model and flags is attached: the orchestrator follows its handoff, and if
//!   that engine dies it is started again through `provision` (the same path,
//!   under the pool lock). It keeps running after the stack stops.
//! * A pool kept by another supervisor, or by a detached engine that differs,
//!   is refused with the owner's pid and how to stop it.

use crate::prepare::{self, Prepared};
use engine_provisioner::BuildOptions;
use engine_runtime::lifecycle::{self, PreparedEngine, RunPaths};
use engine_runtime::supervisor::{EngineState, RestartPolicy, StateHandle, Supervisor};
use llorch_io::handoff::PoolId;
use llorch_io::paths::Layout;
use llorch_profile::Profile;
use orchestratord::{Config, EngineInfo, EngineLink, HandoffLink, LinkState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What the orchestrator reports about a prepared engine (its URL is filled in once it runs).
pub fn engine_info(prep: &PreparedEngine) -> EngineInfo {
    EngineInfo {
        pool: prep.pool_id.to_string(),
        fingerprint: prep.fingerprint.clone(),
        flags: prep.flags.clone(),
        url: String::new(),
        engine: "llamacpp".into(),
        engine_version: prep.engine_version.clone(),
        model_ref: prep.model.reference.clone(),
        model_digest: prep.model.digest.clone(),
        ctx_max: prep.model.metadata["ctx_max"].as_u64(),
        slots: orchestratord::link::slots_of(&prep.flags),
        batched: orchestratord::link::is_batched(&prep.flags),
        api_key: None,
    }
}

/// Points the orchestrator at wherever the supervisor's engine is now.
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

/// Follows a detached engine's handoff; starts it again through `provision` when it is gone.
pub struct ProvisionedLink {
    handoff: HandoffLink,
    reviving: Arc<AtomicBool>,
    revive: Arc<dyn Fn() + Send + Sync>,
}

impl EngineLink for ProvisionedLink {
    fn current(&self) -> LinkState {
        let s = self.handoff.current();
        if s == LinkState::Starting && !self.reviving.swap(true, Ordering::SeqCst) {
            let (flag, revive) = (self.reviving.clone(), self.revive.clone());
            std::thread::spawn(move || {
                revive();
                flag.store(false, Ordering::SeqCst);
            });
        }
        s
    }
    fn report_stalled(&self) {
        // A hung detached engine: stop it (identity-checked); the next look revives it.
        if let Ok(Some(h)) = llorch_io::handoff::Handoff::read(&self.handoff.0) {
            h.process.signal(9); // SIGKILL: a stopped process ignores SIGTERM
        }
    }
}

/// How the stack holds its engine.
pub enum EngineHold {
    Supervised(Supervisor),
    Attached { pid: u32 },
}

/// Everything the proof, `serve` and `bench` run against.
pub struct Stack {
    pub hold: EngineHold,
    pub server: orchestratord::Server,
    pub pool: PoolId,
    pub engine_url: String,
    pub engine_api_key: Option<String>,
    pub fingerprint: String,
    pub engine_version: String,
    pub model_ref: String,
    pub model_digest: String,
}

impl Stack {
    pub fn orchestrator_url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    pub fn supervisor(&self) -> Option<&Supervisor> {
        match &self.hold {
            EngineHold::Supervised(s) => Some(s),
            EngineHold::Attached { .. } => None,
        }
    }

    /// Drain the orchestrator, then stop a supervised engine (an attached one keeps running).
    pub async fn stop(self, drain: Duration) {
        self.server.shutdown(drain).await;
        if let EngineHold::Supervised(sup) = self.hold {
            let _ = tokio::task::spawn_blocking(move || sup.stop()).await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error(transparent)]
    Provision(#[from] prepare::ProvisionError),
    #[error(transparent)]
    Serve(#[from] orchestratord::ServeError),
    #[error(transparent)]
    Engine(#[from] engine_runtime::EngineError),
    #[error("{0}")]
    Other(String),
}

/// Build, fetch, take or attach the pool's engine, start the orchestrator.
/// `command` names this process for others who find the pool taken.
pub async fn start_stack(
    profile: &Profile,
    pool: &PoolId,
    layout: &Layout,
    cfg: Config,
    quiet: bool,
    command: &str,
) -> Result<Stack, StackError> {
    // Configuration errors that need no build come first.
    cfg.check()?;
    let (p2, l2, pool2) = (profile.clone(), layout.clone(), pool.clone());
    let Prepared { engine: prep, .. } = tokio::task::spawn_blocking(move || {
        prepare::prepare(
            &p2,
            &pool2,
            &l2,
            &BuildOptions {
                quiet,
                ..Default::default()
            },
        )
    })
    .await
    .map_err(|e| StackError::Other(e.to_string()))??;
    let base = engine_info(&prep);
    let (fingerprint, model_ref, model_digest, engine_version) = (
        prep.fingerprint.clone(),
        prep.model.reference.clone(),
        prep.model.digest.clone(),
        prep.engine_version.clone(),
    );
    let existing = {
        let (l, p) = (layout.clone(), pool.clone());
        let prep = prep.clone();
        tokio::task::spawn_blocking(move || {
            lifecycle::claim(&l, &p, lifecycle::Intent::SuperviseOrAttach(&prep))
        })
        .await
        .map_err(|e| StackError::Other(e.to_string()))??
    };
    let (hold, link, engine_url, engine_api_key): (
        EngineHold,
        Box<dyn EngineLink>,
        String,
        Option<String>,
    ) = match existing {
        lifecycle::Claim::Attach(h) => {
            if !quiet {
                eprintln!(
                        "attaching to the engine that `provision` started for pool {pool} (pid {}); it keeps running after this exits",
                        h.process.pid
                    );
            }
            let (p3, l3, pool3) = (profile.clone(), layout.clone(), pool.clone());
            let link = ProvisionedLink {
                handoff: HandoffLink(RunPaths::new(layout, pool).handoff),
                reviving: Arc::new(AtomicBool::new(false)),
                revive: Arc::new(move || {
                    if let Err(e) =
                        crate::provision::provision(&p3, &pool3, &l3, &BuildOptions::quiet())
                    {
                        eprintln!("could not start the engine of pool {pool3} again: {e}");
                    }
                }),
            };
            let key = h.api_key().map_err(|e| StackError::Other(e.to_string()))?;
            (
                EngineHold::Attached { pid: h.process.pid },
                Box::new(link),
                h.url.clone(),
                key,
            )
        }
        lifecycle::Claim::Replace { .. } => unreachable!("claim replaces for Provision only"),
        lifecycle::Claim::Free => {
            let timeout = Duration::from_secs(prep.ready_timeout_s + 10);
            let (l3, cmd) = (layout.clone(), command.to_string());
            let sup = tokio::task::spawn_blocking(move || {
                Supervisor::start(prep, l3, RestartPolicy::default(), &cmd)
            })
            .await
            .map_err(|e| StackError::Other(e.to_string()))??;
            let url = tokio::task::block_in_place(|| sup.wait_ready(timeout))
                .map_err(|e| StackError::Other(e.to_string()))?;
            let key = match sup.state() {
                EngineState::Ready { api_key, .. } => api_key,
                _ => None,
            };
            let link = SupervisorLink {
                base,
                state: sup.state_handle(),
            };
            (EngineHold::Supervised(sup), Box::new(link), url, key)
        }
    };
    let server = orchestratord::start(cfg, link).await?;
    // Wait until the orchestrator has seen the engine healthy (its own
    // state, woken when readiness changes; no HTTP to itself).
    if !server
        .state
        .wait_until(Duration::from_secs(10), |s| s.is_ready())
        .await
    {
        return Err(StackError::Other(
            "the orchestrator did not see the engine ready".into(),
        ));
    }
    Ok(Stack {
        hold,
        server,
        pool: pool.clone(),
        engine_url,
        engine_api_key,
        fingerprint,
        engine_version,
        model_ref,
        model_digest,
    })
}
