//! `provision`: build (or reuse) the engine, fetch (or reuse) the model,
//! start llama-server, wait until ready, write the handoff. Idempotent: an
//! engine of this pool already running with the same fingerprint, model
//! digest and flags is left alone; one that differs is restarted, and we
//! say what differed.

use crate::build::{self, BuildOptions, BuildOutcome};
use crate::lifecycle::{self, Attach, EngineModel, Handoff, PreparedEngine, RunPaths};
use crate::profile::Profile;
use llorch_io::paths::Layout;
use model_provisioner::{FetchOptions, ModelStore};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Build(#[from] build::BuildError),
    #[error(transparent)]
    Model(#[from] model_provisioner::store::ModelError),
    #[error(transparent)]
    Engine(#[from] lifecycle::EngineError),
    #[error("profile {0} has no `model:` section; add `model: {{ref: …, sha256: …}}`")]
    NoModel(String),
}

/// Build + fetch + flags: everything but the process.
pub fn prepare(
    profile: &Profile,
    layout: &Layout,
    opts: &BuildOptions,
) -> Result<(PreparedEngine, BuildOutcome), ProvisionError> {
    let built = build::build(profile, layout, opts)?;
    let m = profile
        .file
        .model
        .as_ref()
        .ok_or_else(|| ProvisionError::NoModel(profile.path.display().to_string()))?;
    let fetched = ModelStore::new(layout).fetch(
        &m.reference,
        &FetchOptions {
            expected_sha256: m.sha256.clone(),
            require_digest: m.require_digest,
            import: false,
            quiet: opts.quiet,
        },
    )?;
    let md = fetched.metadata;
    let model = EngineModel {
        reference: md.reference.clone(),
        path: md.path.clone(),
        digest: md.digest.clone(),
        metadata: serde_json::to_value(&md).unwrap_or_default(),
    };
    let prep = lifecycle::prepare(
        profile,
        &built.binary,
        &built.fingerprint,
        &built.version,
        model,
    )?;
    Ok((prep, built))
}

#[derive(Debug, Serialize)]
pub struct ProvisionOutcome {
    pub pool_id: String,
    pub url: String,
    pub pid: u32,
    /// `already_running`, `started`, or `restarted`.
    pub action: String,
    pub changes: Vec<String>,
    pub build_cache_hit: bool,
    pub ready_ms: Option<u64>,
    pub total_ms: u64,
    pub handoff: String,
    pub log: String,
}

/// What differs between a running engine's handoff and what we would start.
pub fn differences(h: &Handoff, prep: &PreparedEngine) -> Vec<String> {
    let mut d = Vec::new();
    if h.fingerprint != prep.fingerprint {
        d.push(format!(
            "engine build {} → {}",
            &h.fingerprint[..12.min(h.fingerprint.len())],
            &prep.fingerprint[..12]
        ));
    }
    if h.model.digest != prep.model.digest {
        d.push(format!(
            "model {} → {}",
            h.model.reference, prep.model.reference
        ));
    }
    if h.flags != prep.flags {
        let old: Vec<_> = h
            .flags
            .iter()
            .filter(|f| !prep.flags.contains(f))
            .cloned()
            .collect();
        let new: Vec<_> = prep
            .flags
            .iter()
            .filter(|f| !h.flags.contains(f))
            .cloned()
            .collect();
        d.push(format!(
            "server flags [{}] → [{}]",
            old.join(" "),
            new.join(" ")
        ));
    }
    d
}

/// Start the pool's engine detached (it outlives this process until `engine down`).
pub fn provision(
    profile: &Profile,
    layout: &Layout,
    opts: &BuildOptions,
) -> Result<ProvisionOutcome, ProvisionError> {
    let started = Instant::now();
    let (prep, built) = prepare(profile, layout, opts)?;
    let paths = RunPaths::new(layout, &prep.pool_id);
    let mut action = "started";
    let mut changes = Vec::new();
    if let Some(pf) = lifecycle::check_pid_file(&paths) {
        match Handoff::read(&paths.handoff) {
            Some(h) if h.pid == pf.pid => {
                changes = differences(&h, &prep);
                let healthy = llorch_io::http::probe_client()
                    .get(format!("{}/health", h.url))
                    .send()
                    .map(|r| r.status().as_u16() == 200)
                    .unwrap_or(false);
                if changes.is_empty() && healthy {
                    return Ok(ProvisionOutcome {
                        pool_id: prep.pool_id,
                        url: h.url,
                        pid: h.pid,
                        action: "already_running".into(),
                        changes,
                        build_cache_hit: built.cache_hit,
                        ready_ms: None,
                        total_ms: started.elapsed().as_millis() as u64,
                        handoff: paths.handoff.display().to_string(),
                        log: paths.log.display().to_string(),
                    });
                }
                if !healthy {
                    changes.push("running engine is not healthy".into());
                }
            }
            _ => changes.push("running engine has no handoff".into()),
        }
        if !opts.quiet {
            eprintln!(
                "restarting engine for pool {}: {}",
                prep.pool_id,
                changes.join("; ")
            );
        }
        lifecycle::stop_pool(layout, &prep.pool_id);
        action = "restarted";
    }
    let eng = lifecycle::spawn(&prep, layout, Attach::Detached)?;
    let out = ProvisionOutcome {
        pool_id: prep.pool_id.clone(),
        url: eng.url.clone(),
        pid: eng.pid,
        action: action.into(),
        changes,
        build_cache_hit: built.cache_hit,
        ready_ms: Some(eng.ready_ms),
        total_ms: started.elapsed().as_millis() as u64,
        handoff: paths.handoff.display().to_string(),
        log: paths.log.display().to_string(),
    };
    // Detached: dropping the Child handle does not kill it.
    drop(eng);
    Ok(out)
}
