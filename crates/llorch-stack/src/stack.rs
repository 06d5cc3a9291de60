//! A stack: pools behind one orchestrator, in this process. Every `serve`
//! (one profile is a stack of one pool, see [`start_stack`]),
//! the proof and the benches run one.
//!
//! * Every pool is prepared at start (engine built or reused, model fetched
//!   and verified), so a load on demand is only a process start.
//! * Each pool's engine is owned by a [`ManagedLink`]: the scheduler in
//!   `orchestratord::pool` asks it to load (a [`Supervisor`] starts) and to
//!   unload (the supervisor stops: signal, grace, kill of the process group).
//! * A pool of one engine (one replica, no pinned GPUs) whose detached
//!   engine `provision` started with the same build, model and flags is
//!   attached to instead ([`ProvisionedLink`]): always loaded, started again
//!   through `provision` if it dies, and left running when the stack stops.
//!   A pool kept by another supervisor, or by a detached engine that
//!   differs, is refused with the owner's pid and how to stop it.
//! * Nothing else outlives this process: engines get the parent-death signal and
//!   their own process group from the supervisor; at start the run records
//!   of a previous crashed run are swept, and a leftover engine whose
//!   supervisor is gone is stopped (identified by the run files, pid, start
//!   time and executable, never by name).
//! * A CUDA pool runs with `CUDA_VISIBLE_DEVICES` set to its devices. Before
//!   it loads, free memory on those devices is read with `nvidia-smi`; a load
//!   that cannot fit waits while another pool unloads, or fails with the
//!   device, its free memory and what the pool needs.

use crate::link::{ManagedLink, ProvisionedLink};
use crate::prepare::{self, Prepared};
use engine_provisioner::BuildOptions;
#[cfg(doc)]
use engine_runtime::supervisor::Supervisor;
use llorch_io::paths::Layout;
use llorch_profile::stack::LoadPolicy;
use llorch_profile::Profile;
use llorch_types::PoolId;
use orchestratord::{
    Config, EngineInfo, EngineLink, LinkState, LoadContext, LoadRefusal, PoolPolicy, PoolSpec,
    SchedulerConfig,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llorch_io::gpu::{GpuProbe, PROBE_FRESH};

/// An orchestrator and the engines of its pools, in this process: what
/// `serve`, the proof and the benches run against.
pub struct Stack {
    pub server: orchestratord::Server,
    /// Each engine (a pool's replicas one by one), by run id, in the stack's order.
    pub links: Vec<(llorch_types::PoolId, Arc<ManagedLink>)>,
    /// MPS control daemons of pools with `mps: own` (stopped after the engines;
    /// last field: dropped last).
    pub mps: Vec<crate::mps::OwnMps>,
}

impl Stack {
    pub fn orchestrator_url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// The first pool's engine as it runs now (URL, key, build, model):
    /// what a stack of one pool serves.
    pub fn engine(&self) -> Result<EngineInfo, StackError> {
        let (id, link) = self.links.first().ok_or(StackError::NoPool)?;
        match link.current() {
            LinkState::Ready(e) => Ok(e),
            other => Err(StackError::NotReady {
                pool: id.clone(),
                state: format!("{other:?}"),
            }),
        }
    }

    pub fn link(&self, pool: &str) -> Option<&Arc<ManagedLink>> {
        self.links
            .iter()
            .find(|(id, _)| id.as_str() == pool)
            .map(|(_, l)| l)
    }

    /// Drain the orchestrator, then stop every engine.
    pub async fn stop(self, drain: Duration) {
        self.server.shutdown(drain).await;
        let (links, mps) = (self.links, self.mps);
        let _ = tokio::task::spawn_blocking(move || {
            for (_, l) in &links {
                l.stop();
            }
            // Unloads under way finish too.
            let deadline = Instant::now() + Duration::from_secs(30);
            for (_, l) in &links {
                l.unloading.wait_done(deadline);
            }
            // The pools' own MPS daemons go after their engines.
            drop(mps);
        })
        .await;
    }
}

/// Options of [`start_pools`] that are not in the stack file.
#[derive(Clone, Debug, Default)]
pub struct PoolsOptions {
    /// What this call may print: progress, warnings.
    pub report: llorch_io::report::Reporter,
    pub probe: GpuProbe,
    /// Replaces every pool's `idle_unload_s` (seconds; 0: never).
    pub idle_unload_s: Option<u64>,
    /// Replaces the stack's `max_loaded`.
    pub max_loaded: Option<usize>,
    /// Never build: every pool's engine comes from this directory of
    /// prebuilt entries (a container image's; see `engine_provisioner::prebuilt`).
    pub prebuilt: Option<std::path::PathBuf>,
    /// Where `auto` looks for tune tables (default: the cache's `tune-v1/`).
    pub tune_dir: Option<std::path::PathBuf>,
}

/// Prepare every pool, load the eager ones, start the orchestrator.
pub async fn start_pools(
    stack: &llorch_profile::stack::Stack,
    layout: &Layout,
    cfg: Config,
    opts: &PoolsOptions,
    command: &str,
) -> Result<Stack, StackError> {
    cfg.check()?;
    let max_loaded = opts.max_loaded.or(stack.max_loaded);
    check_eager(stack, max_loaded)?;
    // Engines left by a previous run that crashed: swept before anything starts.
    {
        let l = layout.clone();
        let _ =
            tokio::task::spawn_blocking(move || engine_runtime::run_state::sweep_stale(&l)).await;
    }
    let mut pools = Replicas::default();
    for p in &stack.pools {
        pool_replicas(p, layout, opts, command, &mut pools).await?;
    }
    let Replicas {
        specs,
        links,
        eager,
        own_mps,
    } = pools;
    watch_gpu_memory(&links, &opts.probe)?;
    let eager_ids: Vec<PoolId> = eager.iter().map(|(id, _)| id.clone()).collect();
    let started = tokio::task::spawn_blocking(move || load_eager(&eager)).await?;
    if let Err(e) = started {
        for (_, l) in &links {
            l.stop();
        }
        return Err(e);
    }
    let server = match orchestratord::start_pools(cfg, specs, SchedulerConfig { max_loaded }).await
    {
        Ok(s) => s,
        Err(e) => {
            for (_, l) in &links {
                l.stop();
            }
            return Err(e.into());
        }
    };
    // Wait until the orchestrator has seen every eager engine healthy (every
    // replica: one seen ready is enough for /readyz, not for routing).
    if !server
        .state
        .wait_until(Duration::from_secs(60), |s| {
            s.is_ready()
                && s.pools
                    .iter()
                    .filter(|p| eager_ids.contains(&p.id))
                    .all(|p| p.ready.load(std::sync::atomic::Ordering::SeqCst))
        })
        .await
    {
        return Err(StackError::NotSeenReady);
    }
    Ok(Stack {
        server,
        links,
        mps: own_mps,
    })
}

/// Eager pools (every replica) must fit `max_loaded`.
fn check_eager(
    stack: &llorch_profile::stack::Stack,
    max_loaded: Option<usize>,
) -> Result<(), StackError> {
    let eager: u32 = stack
        .pools
        .iter()
        .filter(|p| p.load == LoadPolicy::Eager)
        .map(|p| p.concurrency.replicas)
        .sum();
    match max_loaded {
        Some(m) if eager as usize > m => Err(StackError::TooManyEager {
            eager: eager as usize,
            max_loaded: m,
        }),
        _ => Ok(()),
    }
}

/// What the pools of a stack became: the orchestrator's pool specs, every
/// replica's link, the links that load at start, the MPS daemons of their own.
#[derive(Default)]
struct Replicas {
    specs: Vec<PoolSpec>,
    links: Vec<(PoolId, Arc<ManagedLink>)>,
    eager: Vec<(PoolId, Arc<ManagedLink>)>,
    own_mps: Vec<crate::mps::OwnMps>,
}

/// Prepare pool `p` (build, model, `auto`, its own MPS daemon) and add one
/// link per replica: the same build, model and flags, its own run id and devices.
async fn pool_replicas(
    p: &llorch_profile::stack::StackPool,
    layout: &Layout,
    opts: &PoolsOptions,
    command: &str,
    out: &mut Replicas,
) -> Result<(), StackError> {
    let (prof, l2, id, report) = (p.profile.clone(), layout.clone(), p.id.clone(), opts.report);
    let prebuilt = opts.prebuilt.clone();
    let Prepared {
        engine: prep,
        build,
    } = tokio::task::spawn_blocking(move || {
        prepare::prepare(
            &prof,
            &id,
            &l2,
            &BuildOptions {
                report,
                prebuilt,
                ..Default::default()
            },
        )
    })
    .await??;
    // `mps: own`: the pool's daemon runs before `auto` looks and its engines start.
    let mps_env = match p.profile.file.server.mps {
        llorch_profile::MpsMode::Own => {
            let own = start_own_mps(layout, p, opts.report).await?;
            let env = own.engine_env();
            out.own_mps.push(own);
            env
        }
        llorch_profile::MpsMode::System => Vec::new(),
    };
    let (c, prep, auto_why) = with_auto(p, layout, prep, &build, opts).await?;
    let idle = match opts.idle_unload_s {
        Some(0) => None,
        Some(s) => Some(s),
        None => p.idle_unload_s,
    };
    for k in 0..c.replicas as usize {
        let run_id = p.id.replica(k);
        let mut rprep = prep.clone();
        rprep.pool_id = run_id.clone();
        rprep.replica_id = format!("r{k}");
        rprep.env.extend(mps_env.iter().cloned());
        let devices = p
            .replica_devices
            .get(k)
            .cloned()
            .unwrap_or_else(|| p.devices.clone());
        // A pool of one engine may be the detached one `provision` started.
        let attachable = c.replicas == 1 && devices.is_empty();
        let link = replica_link(p, layout, opts, command, rprep, devices, attachable).await?;
        // Nothing here starts or stops an attached engine: it is loaded, and stays.
        let eager = p.load == LoadPolicy::Eager || link.is_attached();
        let mut base = link.base.clone();
        // Capabilities and aliases name the pool, not the replica's run id.
        base.pool = p.id.to_string();
        out.specs.push(PoolSpec {
            id: run_id.clone(),
            group: p.id.clone(),
            replica: k,
            slots: c.slots as usize,
            affinity: match c.affinity {
                llorch_profile::Affinity::None => orchestratord::Affinity::None,
                llorch_profile::Affinity::Prefix => orchestratord::Affinity::Prefix,
            },
            aliases: if k == 0 {
                vec![orchestratord::models::model_alias(&link.base)]
            } else {
                Vec::new()
            },
            link: Box::new(link.clone()),
            auto: auto_why.clone(),
            policy: PoolPolicy {
                lazy: !eager,
                idle_unload: idle
                    .filter(|_| !link.is_attached())
                    .map(Duration::from_secs),
                keep_loaded: p.keep_loaded,
            },
            engine: Some(base),
        });
        if eager {
            out.eager.push((run_id.clone(), link.clone()));
        }
        out.links.push((run_id, link));
    }
    Ok(())
}

/// One replica's link, after claiming its run id: supervised, or (a pool of
/// one engine) attached to the detached engine `provision` started.
async fn replica_link(
    p: &llorch_profile::stack::StackPool,
    layout: &Layout,
    opts: &PoolsOptions,
    command: &str,
    rprep: engine_runtime::flags::PreparedEngine,
    devices: Vec<u32>,
    attachable: bool,
) -> Result<Arc<ManagedLink>, StackError> {
    let run_id = rprep.pool_id.clone();
    let claimed = {
        let (l, id, rp) = (layout.clone(), run_id.clone(), rprep.clone());
        tokio::task::spawn_blocking(move || {
            let intent = if attachable {
                engine_runtime::run_state::Intent::SuperviseOrAttach(&rp)
            } else {
                engine_runtime::run_state::Intent::Supervise
            };
            engine_runtime::run_state::claim(&l, &id, intent)
        })
        .await??
    };
    let mut link = ManagedLink::new(
        rprep,
        layout.clone(),
        command,
        devices,
        p.memory_mib,
        opts.probe.clone(),
    );
    if let engine_runtime::run_state::Claim::Attach(h) = claimed {
        opts.report.info(format_args!(
            "attaching to the engine that `provision` started for pool {run_id} (pid {}); it keeps running after this exits",
            h.process.pid
        ));
        link.attached = Some(ProvisionedLink::new(&p.profile, &run_id, layout));
    }
    Ok(Arc::new(link))
}

/// GPU pools that are unloaded keep a recent memory reading (one probe a
/// second for all GPUs), so a load on demand does not wait for nvidia-smi.
fn watch_gpu_memory(
    links: &[(PoolId, Arc<ManagedLink>)],
    probe: &GpuProbe,
) -> Result<(), StackError> {
    if !links.iter().any(|(_, l)| !l.devices.is_empty()) {
        return Ok(());
    }
    let watched: Vec<std::sync::Weak<ManagedLink>> = links
        .iter()
        .filter(|(_, l)| !l.devices.is_empty())
        .map(|(_, l)| Arc::downgrade(l))
        .collect();
    let probe = probe.clone();
    std::thread::Builder::new()
        .name("gpu-memory".into())
        .spawn(move || loop {
            std::thread::sleep(PROBE_FRESH / 2);
            let live: Vec<Arc<ManagedLink>> = watched.iter().filter_map(|w| w.upgrade()).collect();
            if live.is_empty() {
                return;
            }
            if live.iter().any(|l| l.current() == LinkState::Unloaded) {
                let _ = probe.read();
            }
        })
        .map_err(|e| StackError::Thread {
            what: "start the GPU memory monitor",
            source: e,
        })?;
    Ok(())
}

/// Eager pools: start them all (every replica), then wait for each.
fn load_eager(loads: &[(PoolId, Arc<ManagedLink>)]) -> Result<(), StackError> {
    for (id, l) in loads {
        l.load(&LoadContext::default()).map_err(|r| match r {
            LoadRefusal::Wait(why) | LoadRefusal::Fail(why) => StackError::Start {
                pool: id.clone(),
                why,
            },
        })?;
    }
    for (id, l) in loads {
        let timeout = Duration::from_secs(l.prep.ready_timeout_s + 10);
        // Waited on through a handle: the link stays readable meanwhile.
        let handle = l.sup.lock().unwrap().as_ref().map(|s| s.state_handle());
        if let Some(h) = handle {
            h.wait_ready(timeout)
                .map_err(|source| StackError::NotReadyInTime {
                    pool: id.clone(),
                    source,
                })?;
        }
    }
    Ok(())
}

/// Start pool `p`'s own MPS daemon for its GPUs (every GPU when it names none).
async fn start_own_mps(
    layout: &Layout,
    p: &llorch_profile::stack::StackPool,
    report: llorch_io::report::Reporter,
) -> Result<crate::mps::OwnMps, StackError> {
    let mut devices: Vec<u32> = p
        .devices
        .iter()
        .chain(p.replica_devices.iter().flatten())
        .copied()
        .collect();
    devices.sort_unstable();
    devices.dedup();
    let (l, id) = (layout.clone(), p.id.clone());
    let own =
        tokio::task::spawn_blocking(move || crate::mps::OwnMps::start(&l, &id, &devices)).await??;
    report.info(format_args!(
        "pool {}: MPS control daemon started (pid {}, pipe directory {})",
        p.id,
        own.pid.unwrap_or(0),
        own.pipe_dir.display()
    ));
    Ok(own)
}

/// A pool's concurrency and prepared engine with its `auto` counts chosen
/// (the engine's `--parallel` follows), and how they were chosen.
async fn with_auto(
    p: &llorch_profile::stack::StackPool,
    layout: &Layout,
    mut prep: engine_runtime::flags::PreparedEngine,
    build: &engine_provisioner::BuildOutcome,
    opts: &PoolsOptions,
) -> Result<
    (
        llorch_profile::Concurrency,
        engine_runtime::flags::PreparedEngine,
        Option<String>,
    ),
    StackError,
> {
    let mut c = p.concurrency;
    if !c.auto.any() {
        return Ok((c, prep, None));
    }
    let choice = choose_auto(p, layout, &prep, opts).await?;
    c.slots = choice.slots;
    c.replicas = choice.replicas;
    c.auto = Default::default();
    let mut prof = p.profile.clone();
    prof.file.server.set_concurrency(c);
    // The flags the table measured with (validated like the profile's own).
    prof.file
        .server
        .extra_args
        .extend(choice.args.iter().cloned());
    prep = engine_runtime::flags::prepare(
        &prof,
        &p.id,
        &build.binary,
        &build.fingerprint,
        &build.version,
        prep.model.clone(),
    )?;
    Ok((c, prep, Some(choice.why)))
}

/// Choose a pool's `auto` counts (printed through the options' reporter).
async fn choose_auto(
    p: &llorch_profile::stack::StackPool,
    layout: &Layout,
    prep: &engine_runtime::flags::PreparedEngine,
    opts: &PoolsOptions,
) -> Result<crate::auto::Choice, StackError> {
    let dir = opts
        .tune_dir
        .clone()
        .unwrap_or_else(|| crate::auto_table::tune_dir(layout));
    let (pool, pr, probe) = (p.clone(), prep.clone(), opts.probe.clone());
    let (choice, warning) =
        tokio::task::spawn_blocking(move || crate::auto::resolve(&dir, &pool, &pr, &probe))
            .await??;
    if let Some(w) = warning {
        opts.report
            .warn(format_args!("warning: pool {}: {w}", p.id));
    }
    opts.report.info(format_args!(
        "pool {}: auto chose {} slots x {} engine(s): {}",
        p.id, choice.slots, choice.replicas, choice.why
    ));
    Ok(choice)
}

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error(transparent)]
    Auto(#[from] crate::auto::AutoError),
    #[error(transparent)]
    Provision(#[from] prepare::ProvisionError),
    #[error(transparent)]
    Serve(#[from] orchestratord::ServeError),
    #[error(transparent)]
    Engine(#[from] engine_runtime::EngineError),
    #[error(transparent)]
    Mps(#[from] crate::mps::MpsError),
    #[error("the stack has no pool")]
    NoPool,
    #[error("pool {pool} has no engine ready ({state})")]
    NotReady { pool: PoolId, state: String },
    #[error("{eager} engines load at start (replicas count one by one) but max_loaded is {max_loaded}; mark some pools `load: lazy` or raise max_loaded")]
    TooManyEager { eager: usize, max_loaded: usize },
    /// A pool's engines could not be started: why, in the link's or the supervisor's words.
    #[error("pool {pool} cannot start: {why}")]
    Start { pool: PoolId, why: String },
    #[error("pool {pool}: {source}")]
    NotReadyInTime {
        pool: PoolId,
        source: engine_runtime::supervisor::NotReady,
    },
    #[error("the orchestrator did not see the engines ready")]
    NotSeenReady,
    #[error(transparent)]
    Config(#[from] llorch_profile::ConfigError),
    #[error("{what}: {source}")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
    /// A blocking step (a build, a claim, auto's probe) panicked or was cancelled.
    #[error("a background step failed: {0}")]
    Join(#[from] tokio::task::JoinError),
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
    report: llorch_io::report::Reporter,
    command: &str,
) -> Result<Stack, StackError> {
    let mut profile = profile.clone();
    profile.file.pool = pool.clone();
    let spec = llorch_profile::stack::Stack::from_profiles(vec![profile])?;
    let opts = PoolsOptions {
        report,
        ..Default::default()
    };
    start_pools(&spec, layout, cfg, &opts, command).await
}
