//! Build + fetch + flags: everything an engine needs but the process.

use engine_provisioner::{build, BuildOptions, BuildOutcome};
use engine_runtime::flags::PreparedEngine;
use llorch_io::handoff::EngineModel;
use llorch_io::paths::Layout;
use llorch_profile::Profile;
use llorch_types::PoolId;
use model_provisioner::{FetchOptions, ModelStore};

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Build(#[from] engine_provisioner::error::BuildError),
    #[error(transparent)]
    Model(#[from] model_provisioner::error::ModelError),
    #[error(transparent)]
    Engine(#[from] engine_runtime::EngineError),
    #[error("profile {0} has no `model:` section; add `model: {{ref: …, sha256: …}}`")]
    NoModel(String),
    #[error(transparent)]
    NotUtf8(#[from] llorch_io::paths::NotUtf8),
    #[error("profile {profile} asks for {replicas} replicas; `provision` starts one detached engine per pool\n  hint: run `cargo xtask serve --profile {profile}`, which supervises every replica, or set server.replicas: 1")]
    Replicas { profile: String, replicas: u32 },
    #[error("profile {profile} leaves slots or replicas to `auto`, which `serve` chooses when the pool starts; `provision` starts one engine as written\n  hint: run `cargo xtask serve --profile {profile}`, or name the counts")]
    Auto { profile: String },
}

pub struct Prepared {
    pub engine: PreparedEngine,
    pub build: BuildOutcome,
}

/// Check what needs no build (flags), then build (or reuse) and fetch (or reuse).
pub fn prepare(
    profile: &Profile,
    pool: &PoolId,
    layout: &Layout,
    opts: &BuildOptions,
) -> Result<Prepared, ProvisionError> {
    // Configuration errors first: a bad flag is refused before any build.
    engine_runtime::flags::server_flags(profile)?;
    let m = profile
        .file
        .model
        .as_ref()
        .ok_or_else(|| ProvisionError::NoModel(profile.path.display().to_string()))?;
    let built = build(profile, layout, opts)?;
    let fetched = ModelStore::new(layout).fetch(
        &m.reference,
        &FetchOptions {
            expected_sha256: m.sha256.clone(),
            require_digest: m.require_digest,
            import: false,
            report: opts.report,
            ..Default::default()
        },
    )?;
    let md = fetched.metadata;
    let model = EngineModel {
        reference: md.reference.clone(),
        path: md.path.clone(),
        digest: md.digest.clone(),
        metadata: serde_json::to_value(&md).unwrap_or_default(),
    };
    let engine = engine_runtime::flags::prepare(
        profile,
        pool,
        &built.binary,
        &built.fingerprint,
        &built.version,
        model,
    )?;
    Ok(Prepared {
        engine,
        build: built,
    })
}
