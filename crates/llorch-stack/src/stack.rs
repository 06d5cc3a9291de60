//! How an engine is linked to the orchestrator, and the stack of one pool.
//!
//! * [`SupervisorLink`]: an engine under a [`Supervisor`] of this process.
//! * [`ProvisionedLink`]: the detached engine `provision` started, attached
//!   to: the orchestrator follows its handoff, and if that engine dies it is
//!   started again through `provision` (the same path, under the pool lock).
//! * [`start_stack`]: one profile as a stack of one pool; every stack,
//!   of one pool or many, is started by [`start_pools`](crate::pools::start_pools).

use crate::pools::{start_pools, PoolsOptions, Stack};
use crate::prepare;
use engine_provisioner::BuildOptions;
use engine_runtime::lifecycle::{PreparedEngine, RunPaths};
#[cfg(doc)]
use engine_runtime::supervisor::Supervisor;
use engine_runtime::supervisor::{EngineState, StateHandle};
use llorch_io::handoff::PoolId;
use llorch_io::paths::Layout;
use llorch_profile::Profile;
use orchestratord::{Config, EngineInfo, EngineLink, HandoffLink, LinkState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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

impl ProvisionedLink {
    /// Follow `pool`'s handoff; when its engine is gone, `provision` it again from `profile`.
    pub fn new(profile: &Profile, pool: &PoolId, layout: &Layout) -> ProvisionedLink {
        let (p, l, id) = (profile.clone(), layout.clone(), pool.clone());
        ProvisionedLink {
            handoff: HandoffLink(RunPaths::new(layout, pool).handoff),
            reviving: Arc::new(AtomicBool::new(false)),
            revive: Arc::new(move || {
                if let Err(e) = crate::provision::provision(&p, &id, &l, &BuildOptions::quiet()) {
                    eprintln!("could not start the engine of pool {id} again: {e}");
                }
            }),
        }
    }

    /// The pid of the engine it follows now.
    pub fn engine_pid(&self) -> Option<u32> {
        match llorch_io::handoff::Handoff::read(&self.handoff.0) {
            Ok(Some(h)) if h.process.is_running() => Some(h.process.pid),
            _ => None,
        }
    }
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

/// A stack of one pool: `serve` of one profile, the proof and the benches.
/// The pool's engine is built or reused, the model fetched, and the engine
/// supervised, or attached to when `provision` started this very engine;
/// the orchestrator is started and the engine is ready when this returns.
/// `command` names this process for others who find the pool taken.
pub async fn start_stack(
    profile: &Profile,
    pool: &PoolId,
    layout: &Layout,
    cfg: Config,
    quiet: bool,
    command: &str,
) -> Result<Stack, StackError> {
    let mut profile = profile.clone();
    profile.file.pool = pool.clone();
    let spec = llorch_profile::stack::Stack::from_profiles(vec![profile])
        .map_err(|e| StackError::Other(e.to_string()))?;
    let opts = PoolsOptions {
        quiet,
        ..Default::default()
    };
    start_pools(&spec, layout, cfg, &opts, command).await
}
