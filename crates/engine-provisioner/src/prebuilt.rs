//! Engines that come prebuilt, in a directory laid out like the cache's
//! `engines-v1/` (a container image's `/opt/llorch/prebuilt`): no compiler,
//! CMake or nvcc is there to compute a fingerprint with, so the entry is
//! chosen by what the *profile* decides (the pin's source identity, the
//! normalized CMake flags, build type, targets, CUDA archs) and then checked
//! like any cache hit: manifest, recorded inputs that give its fingerprint,
//! layout, every file's sha256.
//!
//! Architecture Invariant: a prebuilt engine is used only after the same
//! checks as a cache hit ([`crate::cache::ArtifactCache::lookup`]); a
//! directory holding no entry for the profile is an error naming what it
//! holds, never a fallback to another build.

use crate::build::{base_flags, BuildOutcome, TARGET};
use crate::cache::{ArtifactCache, Lookup};
use llorch_profile::normalize_flags;
use llorch_profile::Profile;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum PrebuiltError {
    #[error("{dir} holds no engine for profile `{profile}` (it wants {wants}); it holds: {holds}\n  hint: rebuild the image with `cargo xtask image build --profile {profile}`")]
    NoEntry {
        dir: String,
        profile: String,
        wants: String,
        holds: String,
    },
    #[error("the prebuilt engine {fingerprint} in {dir} cannot be used: {why}")]
    Broken {
        dir: String,
        fingerprint: String,
        why: String,
    },
    #[error(transparent)]
    Flag(#[from] llorch_profile::FlagError),
}

/// What the profile alone decides about its engine's build inputs: the
/// fields of `BuildInputs` that do not depend on the machine's tools.
pub fn profile_inputs(profile: &Profile) -> Result<Value, PrebuiltError> {
    let mut flags = base_flags(profile);
    flags.extend(profile.file.engine.cmake_flags.iter().cloned());
    let archs = (profile.file.engine.backend == llorch_profile::Backend::Cuda)
        .then(|| profile.file.engine.cuda_archs.clone());
    Ok(json!({
        "source": crate::source::identity(&profile.pin),
        "cmake_flags": normalize_flags(&flags)?,
        "build_type": profile.file.engine.build_type,
        "targets": [TARGET],
        "cuda_archs": archs,
    }))
}

/// The same fields of a manifest's recorded inputs.
fn recorded(inputs: &Value) -> Value {
    json!({
        "source": inputs["source"],
        "cmake_flags": inputs["cmake_flags"],
        "build_type": inputs["build_type"],
        "targets": inputs["targets"],
        "cuda_archs": inputs["cuda"]["archs"],
    })
}

/// The engine for `profile` among the entries below `root` (a directory
/// holding `engines-v1/<fingerprint>/`), checked as a cache hit is.
pub fn find(profile: &Profile, root: &Path) -> Result<BuildOutcome, PrebuiltError> {
    let started = Instant::now();
    let want = profile_inputs(profile)?;
    let cache = ArtifactCache::new(root);
    let entries = cache.list();
    let found = entries.iter().find(|(_, m)| recorded(&m.inputs) == want);
    let Some((_, m)) = found else {
        return Err(PrebuiltError::NoEntry {
            dir: cache.dir.display().to_string(),
            profile: profile.name.clone(),
            wants: format!(
                "pin {} ({}), flags {}",
                profile.pin_name,
                &profile.pin.commit[..12.min(profile.pin.commit.len())],
                want["cmake_flags"]
            ),
            holds: if entries.is_empty() {
                "nothing".into()
            } else {
                entries
                    .iter()
                    .map(|(_, m)| format!("{} (profile {})", &m.fingerprint[..12], m.profile))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        });
    };
    let fp = m.fingerprint.clone();
    match cache.lookup(&fp, None) {
        Lookup::Fresh(m) => {
            let dir = cache.entry(&fp);
            Ok(BuildOutcome {
                profile: profile.name.clone(),
                binary: dir.join(&m.binary),
                fingerprint: fp,
                dir,
                cache_hit: true,
                reason: Some("prebuilt".into()),
                cmake_invocations: 0,
                duration_s: started.elapsed().as_secs_f64(),
                version: m.version_output.clone(),
                compile_cache: None,
                manifest: *m,
            })
        }
        Lookup::Stale(why) => Err(PrebuiltError::Broken {
            dir: cache.dir.display().to_string(),
            fingerprint: fp,
            why,
        }),
        Lookup::Missing => Err(PrebuiltError::Broken {
            dir: cache.dir.display().to_string(),
            fingerprint: fp,
            why: "it went away".into(),
        }),
    }
}
