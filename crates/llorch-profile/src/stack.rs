//! Stack files: several pools behind one orchestrator (`cargo xtask serve --stack FILE`).
//!
//! ```yaml
//! schema: 1
//! max_loaded: 1          # engines loaded at once (default: no limit)
//! idle_unload_s: 600     # default for every pool (0 or absent: never)
//! pools:
//!   - id: chat
//!     profile: cpu       # requirements/cpu.yaml, or a path
//!     load: lazy         # eager (default): at start; lazy: at the first request
//!     idle_unload_s: 60  # this pool only
//!     keep_loaded: false # true: never unloaded (idle, or to make room)
//!     devices: [0]       # CUDA pools: the GPUs its engine sees
//! ```
//!
//! Strict like profiles: unknown keys are errors, values are range-checked,
//! every error names the file and the key.

use crate::{invalid_at, parse_yaml, ConfigError, PoolId, Profile};
use serde::Deserialize;
use std::path::Path;

pub const STACK_SCHEMA: u32 = 1;
/// More pools than this in one file is a mistake, not a deployment.
pub const MAX_POOLS: usize = 64;
pub const MAX_DEVICE: u32 = 63;
pub const MAX_IDLE_UNLOAD_S: u64 = 7 * 86_400;

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LoadPolicy {
    #[default]
    Eager,
    Lazy,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackFile {
    pub schema: u32,
    #[serde(default)]
    pub max_loaded: Option<usize>,
    #[serde(default)]
    pub idle_unload_s: Option<u64>,
    pub pools: Vec<PoolEntry>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolEntry {
    pub id: PoolId,
    pub profile: String,
    #[serde(default)]
    pub load: LoadPolicy,
    #[serde(default)]
    pub idle_unload_s: Option<u64>,
    #[serde(default)]
    pub keep_loaded: bool,
    #[serde(default)]
    pub devices: Vec<u32>,
    /// MiB the pool needs on each device (default: the model's share + 1024).
    #[serde(default)]
    pub memory_mib: Option<u64>,
}

/// One pool of a stack, its profile loaded.
#[derive(Clone, Debug)]
pub struct StackPool {
    pub id: PoolId,
    pub profile: Profile,
    pub load: LoadPolicy,
    /// `None`: never unloaded when idle.
    pub idle_unload_s: Option<u64>,
    pub keep_loaded: bool,
    pub devices: Vec<u32>,
    pub memory_mib: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Stack {
    pub max_loaded: Option<usize>,
    pub pools: Vec<StackPool>,
}

impl Stack {
    /// Read a stack file; profiles are resolved against the workspace `root`.
    pub fn load(path: &Path, root: &Path) -> Result<Stack, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let f: StackFile = parse_yaml(path, &text)?;
        let invalid = |key: &str, message: String| invalid_at(path, &text, key, message);
        if f.schema != STACK_SCHEMA {
            return Err(invalid(
                "schema",
                format!(
                    "schema {} is not supported (this llama-orch reads stack schema {STACK_SCHEMA})",
                    f.schema
                ),
            ));
        }
        if f.pools.is_empty() || f.pools.len() > MAX_POOLS {
            return Err(invalid(
                "pools",
                format!("pools: list 1 to {MAX_POOLS} pools"),
            ));
        }
        if let Some(m) = f.max_loaded {
            if m == 0 || m > MAX_POOLS {
                return Err(invalid(
                    "max_loaded",
                    format!("max_loaded is {m}; it must be from 1 to {MAX_POOLS}"),
                ));
            }
        }
        let idle_ok = |v: Option<u64>, key: &str| match v {
            Some(s) if s > MAX_IDLE_UNLOAD_S => Err(invalid(
                key,
                format!("{key} is {s}; the largest accepted value is {MAX_IDLE_UNLOAD_S} (a week)"),
            )),
            _ => Ok(()),
        };
        idle_ok(f.idle_unload_s, "idle_unload_s")?;
        let mut seen = std::collections::HashSet::new();
        let mut pools = Vec::new();
        for p in &f.pools {
            if !seen.insert(p.id.to_string()) {
                return Err(invalid(
                    "pools",
                    format!(
                        "pool `{}` is listed twice; every pool needs its own id",
                        p.id
                    ),
                ));
            }
            idle_ok(p.idle_unload_s, "idle_unload_s")?;
            if p.devices.len() > 16 || p.devices.iter().any(|d| *d > MAX_DEVICE) {
                return Err(invalid(
                    "devices",
                    format!(
                        "pool `{}`: devices takes at most 16 GPU indexes from 0 to {MAX_DEVICE}",
                        p.id
                    ),
                ));
            }
            if p.memory_mib.is_some_and(|m| m == 0 || m > 16 << 20) {
                return Err(invalid(
                    "memory_mib",
                    format!(
                        "pool `{}`: memory_mib must be from 1 to {}",
                        p.id,
                        16u64 << 20
                    ),
                ));
            }
            if p.profile.len() > 4096 {
                return Err(invalid(
                    "profile",
                    format!("pool `{}`: profile name is too long", p.id),
                ));
            }
            // A relative profile path is relative to the stack file.
            let prof = if p.profile.contains('/') && !Path::new(&p.profile).is_absolute() {
                let base = path.parent().unwrap_or(Path::new("."));
                base.join(&p.profile).display().to_string()
            } else {
                p.profile.clone()
            };
            let profile = Profile::resolve(root, Some(&prof))?;
            if !p.devices.is_empty() && profile.file.engine.backend != crate::Backend::Cuda {
                return Err(invalid(
                    "devices",
                    format!(
                        "pool `{}` names GPU devices but its profile `{}` builds a CPU engine",
                        p.id, profile.name
                    ),
                ));
            }
            let idle = p.idle_unload_s.or(f.idle_unload_s).filter(|s| *s > 0);
            pools.push(StackPool {
                id: p.id.clone(),
                profile,
                load: p.load,
                idle_unload_s: idle,
                keep_loaded: p.keep_loaded,
                devices: p.devices.clone(),
                memory_mib: p.memory_mib,
            });
        }
        if let Some(m) = f.max_loaded {
            let pinned = pools.iter().filter(|p| p.keep_loaded).count();
            if pools.len() > m && pinned >= m {
                return Err(invalid(
                    "max_loaded",
                    format!("max_loaded is {m} but {pinned} pools are keep_loaded: the other pools could never load; raise max_loaded or unpin a pool"),
                ));
            }
        }
        Ok(Stack {
            max_loaded: f.max_loaded,
            pools,
        })
    }

    /// One eager pool per profile, each under the profile's own `pool` id.
    pub fn from_profiles(profiles: Vec<Profile>) -> Result<Stack, ConfigError> {
        let mut seen = std::collections::HashSet::new();
        let mut pools = Vec::new();
        for profile in profiles {
            let id = profile.pool().clone();
            if !seen.insert(id.to_string()) {
                return Err(ConfigError::Invalid {
                    path: profile.path.display().to_string(),
                    message: format!("two profiles name pool `{id}`; give each pool its own id in a stack file (--stack FILE)"),
                });
            }
            pools.push(StackPool {
                id,
                profile,
                load: LoadPolicy::Eager,
                idle_unload_s: None,
                keep_loaded: false,
                devices: Vec::new(),
                memory_mib: None,
            });
        }
        Ok(Stack {
            max_loaded: None,
            pools,
        })
    }
}
