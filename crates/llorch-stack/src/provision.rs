//! `provision`: build (or reuse) the engine, fetch (or reuse) the model,
//! start llama-server detached, wait until ready, write the handoff.
//!
//! One engine per pool, whoever asks. Everything below runs under the pool
//! lock, so two `provision` runs started at the same moment end with one
//! engine: the second waits, then finds the first one's engine and attaches.
//! * a live detached engine with the same build, model and flags: `already_running`;
//! * a live detached engine that differs: stopped and restarted (`restarted`, with what differed);
//! * a pool kept by a live supervisor (`serve`, `haiku`, `engine up --foreground`):
//!   attached when it matches, refused when it differs (its supervisor owns it).

use crate::prepare::{self, Prepared};
use engine_runtime::lifecycle;
use engine_runtime::run_state::RunPaths;
use llorch_io::handoff::{Handoff, Owner};
use llorch_io::paths::Layout;
use llorch_profile::Profile;
use llorch_types::PoolId;
use serde::Serialize;
use std::time::{Duration, Instant};

use crate::prepare::ProvisionError;

#[derive(Debug, Serialize)]
pub struct ProvisionOutcome {
    pub pool_id: PoolId,
    pub url: String,
    pub pid: u32,
    /// `already_running` (attached), `started`, or `restarted`.
    pub action: String,
    pub owner: String,
    pub changes: Vec<String>,
    pub build_cache_hit: bool,
    pub ready_ms: Option<u64>,
    pub total_ms: u64,
    pub handoff: String,
    pub log: String,
    /// The protections the engine runs with (`engine_runtime::sandbox`).
    pub sandbox: Option<serde_json::Value>,
}

fn healthy(h: &Handoff) -> bool {
    // `/health` needs no key; an unreadable key file does not make the engine unhealthy.
    llorch_io::llama_server::LlamaServer::new(h.url.clone(), h.api_key().ok().flatten())
        .healthy_blocking(&llorch_io::http::probe_client())
}

/// Start the pool's engine detached (it outlives this process until `engine down`).
pub fn provision(
    profile: &Profile,
    pool: &PoolId,
    layout: &Layout,
    opts: &engine_provisioner::BuildOptions,
) -> Result<ProvisionOutcome, ProvisionError> {
    let started = Instant::now();
    let report = opts.report;
    let c = profile.concurrency();
    if c.auto.any() {
        return Err(crate::prepare::ProvisionError::Auto {
            profile: profile.name.clone(),
        });
    }
    let replicas = c.replicas;
    if replicas > 1 {
        return Err(crate::prepare::ProvisionError::Replicas {
            profile: profile.name.clone(),
            replicas,
        });
    }
    let _lock = engine_runtime::run_state::lock_pool(layout, pool, || {
        report.info(format_args!(
            "waiting for another provision, start or stop of pool {pool}"
        ))
    })?;
    let Prepared {
        engine: prep,
        build,
    } = prepare::prepare(profile, pool, layout, opts)?;
    let paths = RunPaths::new(layout, pool);
    let (handoff_path, log_path) = (
        llorch_io::paths::utf8(&paths.handoff)?.to_string(),
        llorch_io::paths::utf8(&paths.log)?.to_string(),
    );
    let outcome = |action: &str, h: &Handoff, changes: Vec<String>, ready_ms| ProvisionOutcome {
        pool_id: pool.clone(),
        url: h.url.clone(),
        pid: h.process.pid,
        action: action.into(),
        owner: h.owner.describe(),
        changes,
        build_cache_hit: build.cache_hit,
        ready_ms,
        total_ms: started.elapsed().as_millis() as u64,
        handoff: handoff_path.clone(),
        log: log_path.clone(),
        sandbox: h.sandbox.clone(),
    };
    let mut action = "started";
    let mut changes = Vec::new();
    let replace = match engine_runtime::run_state::claim(
        layout,
        pool,
        engine_runtime::run_state::Intent::Provision(&prep),
    )? {
        engine_runtime::run_state::Claim::Free => None,
        engine_runtime::run_state::Claim::Attach(h) if healthy(&h) => {
            return Ok(outcome("already_running", &h, changes, None));
        }
        // The same engine, not answering: replaced if detached; a supervisor restarts its own.
        engine_runtime::run_state::Claim::Attach(_) => {
            match engine_runtime::run_state::read_pool(layout, pool) {
                Some(run) if run.record.owner == Owner::Detached => {
                    Some((run, vec!["running engine is not healthy".to_string()]))
                }
                Some(run) => return Err(run.busy_error().into()),
                None => None,
            }
        }
        engine_runtime::run_state::Claim::Replace { run, changes } => Some((*run, changes)),
    };
    if let Some((run, c)) = replace {
        changes = c;
        report.info(format_args!(
            "restarting engine for pool {pool}: {}",
            changes.join("; ")
        ));
        run.record.process.stop(Duration::from_secs(5));
        action = "restarted";
    }
    let eng = lifecycle::spawn(&prep, layout, &Owner::Detached)?;
    let h = Handoff::read(&paths.handoff)
        .ok()
        .flatten()
        .expect("spawn wrote the handoff");
    // Detached: dropping the Child handle does not kill it.
    let out = outcome(action, &h, changes, Some(eng.ready_ms));
    drop(eng);
    Ok(out)
}
