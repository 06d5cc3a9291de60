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
//!     replicas: 2        # engines serving the pool (default 1), exact or batched
//!     replica_devices: [[0], [1]]  # each replica's GPUs (default: round robin over devices)
//!     affinity: prefix   # none (default): fewest queued + running; prefix: shared prefixes together
//!     mode: batched      # exact (default) or batched, with
//!     slots: 8           # parallel slots of a batched engine
//! ```
//!
//! `mode`, `slots`, `replicas` and `affinity` may also stand in the
//! profile's `server` section; the stack file's value wins.
//!
//! Strict like profiles: unknown keys are errors, values are range-checked,
//! every error names the file and the key.

use crate::concurrency::{Concurrency, ConcurrencyKeys, Count, STACKED_REPLICAS_COST};
use crate::{invalid_at, parse_yaml, Affinity, ConfigError, Mode, Profile};
use llorch_types::PoolId;
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
    #[serde(default)]
    pub mode: Option<Mode>,
    #[serde(default)]
    pub slots: Option<Count>,
    #[serde(default)]
    pub replicas: Option<Count>,
    #[serde(default)]
    pub affinity: Option<Affinity>,
    /// Each replica's GPUs (one list per replica).
    #[serde(default)]
    pub replica_devices: Option<Vec<Vec<u32>>>,
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
    /// Mode, slots, replicas and affinity (the stack's values over the profile's);
    /// also written into `profile.file.server`, so the engine flags follow them.
    pub concurrency: Concurrency,
    /// Each replica's GPUs: `concurrency.replicas` lists, or empty (CPU, or no devices named).
    pub replica_devices: Vec<Vec<u32>>,
}

#[derive(Clone, Debug)]
pub struct Stack {
    pub max_loaded: Option<usize>,
    pub pools: Vec<StackPool>,
    /// Things that work but cost (replicas stacked on one device); printed by `serve`.
    pub warnings: Vec<String>,
}

/// Each replica's GPUs, and a warning when replicas share a device.
pub type Placement = (Vec<Vec<u32>>, Option<String>);

/// Each replica's devices: the explicit lists, or round robin over `devices`
/// (one device per replica); a warning when replicas share a device.
pub fn place_replicas(
    pool: &PoolId,
    c: &Concurrency,
    cuda: bool,
    devices: &[u32],
    explicit: Option<&Vec<Vec<u32>>>,
) -> Result<Placement, (&'static str, String)> {
    let k = c.replicas as usize;
    if c.auto.replicas && explicit.is_some() {
        return Err((
            "replica_devices",
            format!(
                "pool `{pool}`: replica_devices needs a number of replicas, not replicas: auto"
            ),
        ));
    }
    let placed: Vec<Vec<u32>> = match explicit {
        Some(_) if !cuda => {
            return Err((
                "replica_devices",
                format!("pool `{pool}`: replica_devices places replicas on GPUs, but its profile builds a CPU engine"),
            ))
        }
        Some(lists) => {
            if lists.len() != k
                || lists
                    .iter()
                    .any(|l| l.is_empty() || l.len() > 16 || l.iter().any(|d| *d > MAX_DEVICE))
            {
                return Err((
                    "replica_devices",
                    format!("pool `{pool}`: replica_devices needs one non-empty list of GPU indexes (0 to {MAX_DEVICE}) per replica: {k} lists"),
                ));
            }
            lists.clone()
        }
        None if devices.is_empty() => Vec::new(),
        None => (0..k).map(|i| vec![devices[i % devices.len()]]).collect(),
    };
    // Batched engines sharing one GPU are the measured gain (several 16-slot
    // engines under NVIDIA MPS: 2.6x one 64-slot engine on an H100); the
    // stacking cost holds for single-slot exact engines.
    let warning = if k < 2 || (cuda && c.mode == Mode::Batched) {
        None
    } else if !cuda {
        Some(format!("pool `{pool}`: {k} replicas share this machine's CPU cores; replicas pay off one per device or CPU socket ({STACKED_REPLICAS_COST})"))
    } else if placed.is_empty() {
        Some(format!("pool `{pool}`: {k} replicas see every GPU; name devices or replica_devices to give each its own GPU ({STACKED_REPLICAS_COST})"))
    } else {
        let mut seen = std::collections::HashSet::new();
        let shared: Vec<u32> = placed
            .iter()
            .flatten()
            .filter(|d| !seen.insert(**d))
            .copied()
            .collect();
        (!shared.is_empty()).then(|| format!("pool `{pool}`: replicas share GPU {shared:?}; replicas pay off one per GPU ({STACKED_REPLICAS_COST})"))
    };
    Ok((placed, warning))
}

/// One pool entry's own limits: devices, memory, the profile name's length.
fn check_entry(p: &PoolEntry) -> Result<(), (&'static str, String)> {
    if p.devices.len() > 16 || p.devices.iter().any(|d| *d > MAX_DEVICE) {
        return Err((
            "devices",
            format!(
                "pool `{}`: devices takes at most 16 GPU indexes from 0 to {MAX_DEVICE}",
                p.id
            ),
        ));
    }
    if p.memory_mib.is_some_and(|m| m == 0 || m > 16 << 20) {
        return Err((
            "memory_mib",
            format!(
                "pool `{}`: memory_mib must be from 1 to {}",
                p.id,
                16u64 << 20
            ),
        ));
    }
    if p.profile.len() > 4096 {
        return Err((
            "profile",
            format!("pool `{}`: profile name is too long", p.id),
        ));
    }
    Ok(())
}

/// `max_loaded` (`m`) against the pools: room for a pool that is not pinned,
/// and for every engine that loads at start.
fn check_max_loaded(m: usize, pools: &[StackPool]) -> Result<(), String> {
    let pinned = pools.iter().filter(|p| p.keep_loaded).count();
    if pools.len() > m && pinned >= m {
        return Err(format!("max_loaded is {m} but {pinned} pools are keep_loaded: the other pools could never load; raise max_loaded or unpin a pool"));
    }
    let engines: u32 = pools
        .iter()
        .filter(|p| p.load == LoadPolicy::Eager)
        .map(|p| p.concurrency.replicas)
        .sum();
    if engines as usize > m {
        return Err(format!("max_loaded is {m} but the pools that load at start have {engines} engines (replicas count one by one); raise max_loaded or mark pools `load: lazy`"));
    }
    Ok(())
}

impl Stack {
    /// Read a stack file; profiles are resolved against the workspace `root`.
    pub fn load(path: &Path, root: &Path) -> Result<Stack, ConfigError> {
        let text = crate::read_config(path)?;
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
        let mut warnings = Vec::new();
        for p in &f.pools {
            if p.id.is_replica() {
                return Err(invalid(
                    "id",
                    format!(
                        "pool `{}`: ids ending in `.r<N>` name replicas; choose another pool id",
                        p.id
                    ),
                ));
            }
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
            check_entry(p).map_err(|(key, m)| invalid(key, m))?;
            // A relative profile path is relative to the stack file.
            let prof = if p.profile.contains('/') && !Path::new(&p.profile).is_absolute() {
                let base = path.parent().unwrap_or(Path::new("."));
                base.join(&p.profile).display().to_string()
            } else {
                p.profile.clone()
            };
            let mut profile = Profile::resolve(root, Some(&prof))?;
            let keys = ConcurrencyKeys {
                mode: p.mode,
                slots: p.slots,
                replicas: p.replicas,
                affinity: p.affinity,
            };
            let concurrency = keys
                .over(profile.file.server.concurrency_keys())
                .resolve()
                .map_err(|(key, m)| invalid(key, format!("pool `{}`: {m}", p.id)))?;
            profile.file.server.set_concurrency(concurrency);
            let cuda = profile.file.engine.backend == crate::Backend::Cuda;
            let (replica_devices, warning) = place_replicas(
                &p.id,
                &concurrency,
                cuda,
                &p.devices,
                p.replica_devices.as_ref(),
            )
            .map_err(|(key, m)| invalid(key, m))?;
            warnings.extend(warning);
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
                concurrency,
                replica_devices,
            });
        }
        if let Some(m) = f.max_loaded {
            check_max_loaded(m, &pools).map_err(|msg| invalid("max_loaded", msg))?;
        }
        Ok(Stack {
            max_loaded: f.max_loaded,
            pools,
            warnings,
        })
    }

    /// One eager pool per profile, each under the profile's own `pool` id.
    pub fn from_profiles(profiles: Vec<Profile>) -> Result<Stack, ConfigError> {
        let mut seen = std::collections::HashSet::new();
        let mut pools = Vec::new();
        let mut warnings = Vec::new();
        for profile in profiles {
            let id = profile.pool().clone();
            if !seen.insert(id.to_string()) {
                return Err(ConfigError::Invalid {
                    path: profile.path.display().to_string(),
                    message: format!("two profiles name pool `{id}`; give each pool its own id in a stack file (--stack FILE)"),
                });
            }
            let concurrency = profile.concurrency();
            let cuda = profile.file.engine.backend == crate::Backend::Cuda;
            let (replica_devices, warning) = place_replicas(&id, &concurrency, cuda, &[], None)
                .map_err(|(_, message)| ConfigError::Invalid {
                    path: profile.path.display().to_string(),
                    message,
                })?;
            warnings.extend(warning);
            pools.push(StackPool {
                id,
                profile,
                load: LoadPolicy::Eager,
                idle_unload_s: None,
                keep_loaded: false,
                devices: Vec::new(),
                memory_mib: None,
                concurrency,
                replica_devices,
            });
        }
        Ok(Stack {
            max_loaded: None,
            pools,
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    fn load(name: &str, yaml: &str) -> Result<Stack, ConfigError> {
        let dir = std::env::temp_dir().join(format!("llorch-stack-{name}-{}", std::process::id()));
        fs_err::create_dir_all(&dir).unwrap();
        let f = dir.join("s.yaml");
        fs_err::write(&f, yaml).unwrap();
        let r = Stack::load(&f, &root());
        let _ = fs_err::remove_dir_all(&dir);
        r
    }

    #[test]
    fn replicas_slots_and_affinity_resolve_over_the_profile_and_warn_when_stacked() {
        let s = load(
            "ok",
            "schema: 1\npools:\n  - {id: a, profile: cpu, replicas: 2, affinity: prefix}\n  - {id: b, profile: cpu, mode: batched, slots: 4}\n",
        )
        .unwrap();
        let (a, b) = (&s.pools[0], &s.pools[1]);
        assert_eq!(
            (a.concurrency.replicas, a.concurrency.affinity),
            (2, Affinity::Prefix)
        );
        assert_eq!(
            a.profile.concurrency(),
            a.concurrency,
            "written into the profile"
        );
        assert_eq!(
            (b.concurrency.mode, b.concurrency.slots),
            (Mode::Batched, 4)
        );
        assert!(a.replica_devices.is_empty());
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        assert!(s.warnings[0].contains("451 tokens/s"), "{:?}", s.warnings);
    }

    #[test]
    fn replicas_are_placed_round_robin_over_devices_and_sharing_a_gpu_is_warned() {
        let p = PoolId::parse("g").unwrap();
        let c = Concurrency {
            replicas: 2,
            ..Default::default()
        };
        let (placed, w) = place_replicas(&p, &c, true, &[0, 1], None).unwrap();
        assert_eq!(placed, vec![vec![0], vec![1]]);
        assert!(w.is_none());
        let (placed, w) = place_replicas(&p, &c, true, &[3], None).unwrap();
        assert_eq!(placed, vec![vec![3], vec![3]]);
        assert!(w.unwrap().contains("share GPU [3]"));
        // Batched engines sharing a GPU are not warned of (they gain there).
        let batched = Concurrency {
            mode: Mode::Batched,
            slots: 16,
            ..c
        };
        let (placed, w) = place_replicas(&p, &batched, true, &[3], None).unwrap();
        assert_eq!(placed, vec![vec![3], vec![3]]);
        assert!(w.is_none(), "{w:?}");
        assert!(place_replicas(&p, &batched, false, &[], None)
            .unwrap()
            .1
            .is_some());
        let explicit = vec![vec![1], vec![0]];
        let (placed, _) = place_replicas(&p, &c, true, &[], Some(&explicit)).unwrap();
        assert_eq!(placed, explicit);
        for bad in [
            vec![vec![0]],
            vec![vec![0], vec![]],
            vec![vec![0], vec![64]],
        ] {
            assert_eq!(
                place_replicas(&p, &c, true, &[], Some(&bad)).unwrap_err().0,
                "replica_devices"
            );
        }
    }

    #[test]
    fn hostile_concurrency_values_are_refused_by_key_before_anything_starts() {
        for (yaml, key) in [
            ("replicas: 0", "replicas"),
            ("replicas: 65", "replicas"),
            ("replicas: -1", "replicas"),
            ("replicas: 99999999999", "replicas"),
            ("mode: batched", "slots"),
            ("mode: batched, slots: 0", "slots"),
            ("mode: batched, slots: 257", "slots"),
            ("slots: 4", "slots"),
            ("affinity: random", "affinity"),
            ("mode: fast", "mode"),
            (
                "replica_devices: [[0], [1]], replicas: 2",
                "replica_devices",
            ),
        ] {
            let text = format!("schema: 1\npools:\n  - {{id: a, profile: cpu, {yaml}}}\n");
            let e = load("bad", &text).expect_err(yaml).to_string();
            assert!(e.contains(key), "{yaml}: {e}");
        }
        // A pool id in a replica's run-id form is refused.
        let e = load("rid", "schema: 1\npools:\n  - {id: a.r1, profile: cpu}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("replicas"), "{e}");
        // Eager replicas count one by one against max_loaded.
        let e = load(
            "max",
            "schema: 1\nmax_loaded: 1\npools:\n  - {id: a, profile: cpu, replicas: 2}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("max_loaded") && e.contains("2 engines"), "{e}");
    }

    #[test]
    fn a_file_that_is_not_a_profile_is_named_never_echoed() {
        let dir = tempfile_dir("secret");
        let creds = dir.join("credentials");
        fs_err::write(&creds, "TOKEN=supersecret123\napi_key: sk-live-abcdef\n").unwrap();
        let stack = dir.join("s.yaml");
        fs_err::write(
            &stack,
            format!(
                "schema: 1\npools:\n  - {{id: a, profile: {}}}\n",
                creds.display()
            ),
        )
        .unwrap();
        let e = Stack::load(&stack, &root()).unwrap_err().to_string();
        assert!(e.contains("credentials"), "names the file: {e}");
        assert!(!e.contains("supersecret") && !e.contains("sk-live"), "{e}");
        let _ = fs_err::remove_dir_all(&dir);
    }

    #[test]
    fn configuration_is_read_only_from_bounded_regular_files() {
        let dir = tempfile_dir("fifo");
        let fifo = dir.join("stack.yaml");
        llorch_io::cmd::Cmd::new("mkfifo")
            .arg(&fifo)
            .read()
            .unwrap();
        let t0 = std::time::Instant::now();
        for p in [fifo.as_path(), Path::new("/dev/zero"), dir.as_path()] {
            let e = Stack::load(p, &root()).unwrap_err().to_string();
            assert!(e.contains("regular file"), "{e}");
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "nothing hangs"
        );
        let big = dir.join("big.yaml");
        fs_err::write(&big, vec![b'#'; (crate::MAX_CONFIG_BYTES + 1) as usize]).unwrap();
        let e = Stack::load(&big, &root()).unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
        // A 1 MB model ref is refused by key, in a short message.
        let cpu = fs_err::read_to_string(root().join("requirements/cpu.yaml")).unwrap();
        let long = cpu.replace("ref: pypi:", &format!("ref: pypi:{}", "x".repeat(1 << 19)));
        let prof = dir.join("long.yaml");
        fs_err::write(&prof, long).unwrap();
        let e = crate::Profile::load(&prof, &root().join("toolchains/llama.cpp.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.ref") && e.len() < 1000, "{}", e.len());
        let _ = fs_err::remove_dir_all(&dir);
    }

    fn tempfile_dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("llorch-cfg-{name}-{}", std::process::id()));
        let _ = fs_err::remove_dir_all(&d);
        fs_err::create_dir_all(&d).unwrap();
        d
    }
}
