//! A stack: pools behind one orchestrator, in this process. Every `serve`
//! (one profile is a stack of one pool, see [`start_stack`](crate::stack::start_stack)),
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

use crate::prepare::{self, Prepared};
use crate::stack::{engine_info, ProvisionedLink, StackError};
use engine_provisioner::BuildOptions;
use engine_runtime::lifecycle::{self, PreparedEngine};
use engine_runtime::supervisor::{EngineState, RestartPolicy, Supervisor};
use llorch_io::paths::Layout;
use llorch_profile::stack::LoadPolicy;
use orchestratord::{
    Config, EngineInfo, EngineLink, LinkState, LoadContext, LoadRefusal, PoolPolicy, PoolSpec,
    SchedulerConfig,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Memory a pool needs on its GPUs beyond the model file: CUDA context,
/// compute buffers and the KV cache of a modest context. A stack file's
/// `memory_mib` replaces the estimate.
pub const GPU_OVERHEAD_MIB: u64 = 1024;

pub use llorch_io::gpu::{GpuMemory, GpuProbe, PROBE_FRESH};

/// A pool's engine, started and stopped when the scheduler asks; or the
/// detached engine `provision` started, attached to (never started or
/// stopped here).
pub struct ManagedLink {
    pub base: EngineInfo,
    prep: PreparedEngine,
    layout: Layout,
    command: String,
    policy: RestartPolicy,
    /// GPUs the engine is pinned to (empty: CPU, or all GPUs).
    pub devices: Vec<u32>,
    /// MiB the pool needs on each of its devices.
    pub needs_mib: u64,
    probe: GpuProbe,
    sup: Mutex<Option<Supervisor>>,
    unloading: Arc<AtomicBool>,
    attached: Option<ProvisionedLink>,
}

impl ManagedLink {
    pub fn new(
        mut prep: PreparedEngine,
        layout: Layout,
        command: &str,
        devices: Vec<u32>,
        memory_mib: Option<u64>,
        probe: GpuProbe,
    ) -> ManagedLink {
        if !devices.is_empty() {
            let list: Vec<String> = devices.iter().map(u32::to_string).collect();
            prep.env
                .push(("CUDA_VISIBLE_DEVICES".into(), list.join(",")));
        }
        let model_mib = fs_err::metadata(&prep.model.path)
            .map(|m| m.len().div_ceil(1 << 20))
            .unwrap_or(0);
        let per_device = (model_mib / devices.len().max(1) as u64) + GPU_OVERHEAD_MIB;
        ManagedLink {
            base: engine_info(&prep),
            prep,
            layout,
            command: command.into(),
            policy: RestartPolicy::default(),
            devices,
            needs_mib: memory_mib.unwrap_or(per_device),
            probe,
            sup: Mutex::new(None),
            unloading: Arc::new(AtomicBool::new(false)),
            attached: None,
        }
    }

    /// Whether this link follows a detached engine `provision` started.
    pub fn is_attached(&self) -> bool {
        self.attached.is_some()
    }

    /// Whether the memory the pool needs is free on its devices now: a recent
    /// reading ([`PROBE_FRESH`], kept current by [`start_pools`]' monitor) that
    /// says it fits, else a fresh one.
    fn check_memory(&self, ctx: &LoadContext) -> Result<(), LoadRefusal> {
        if self.devices.is_empty() {
            return Ok(());
        }
        if let Some(g) = self.probe.recent(PROBE_FRESH) {
            if self.fits(&g, ctx).is_ok() {
                return Ok(());
            }
        }
        let gpus = self
            .probe
            .read()
            .map_err(|e| LoadRefusal::Fail(format!("cannot read GPU memory: {e}")))?;
        self.fits(&gpus, ctx)
    }

    fn fits(&self, gpus: &[GpuMemory], ctx: &LoadContext) -> Result<(), LoadRefusal> {
        for d in &self.devices {
            let Some(g) = gpus.iter().find(|g| g.index == *d) else {
                return Err(LoadRefusal::Fail(format!(
                    "pool {} is pinned to GPU {d}, but nvidia-smi lists GPUs {:?}",
                    self.prep.pool_id,
                    gpus.iter().map(|g| g.index).collect::<Vec<_>>()
                )));
            };
            if g.free_mib < self.needs_mib {
                let why = format!(
                    "GPU {d} has {} MiB free of {} MiB; pool {} needs about {} MiB there",
                    g.free_mib, g.total_mib, self.prep.pool_id, self.needs_mib
                );
                return Err(if ctx.unloads_in_flight {
                    LoadRefusal::Wait(format!("{why} (waiting for an unload to release memory)"))
                } else {
                    LoadRefusal::Fail(format!(
                        "{why}; free memory on that GPU (stop other processes, or set max_loaded) or set the pool's memory_mib"
                    ))
                });
            }
        }
        Ok(())
    }

    /// Stop the engine now and wait (shutdown). An attached engine keeps running.
    pub fn stop(&self) {
        let sup = self.sup.lock().unwrap().take();
        if let Some(s) = sup {
            s.stop();
        }
    }

    /// What the engine runs (binary, model, flags, environment).
    pub fn prepared(&self) -> &PreparedEngine {
        &self.prep
    }

    /// Spawn to `/health` 200 of the running engine, milliseconds.
    pub fn ready_ms(&self) -> Option<u64> {
        match self.sup.lock().unwrap().as_ref()?.state() {
            EngineState::Ready { ready_ms, .. } => Some(ready_ms),
            _ => None,
        }
    }

    pub fn engine_pid(&self) -> Option<u32> {
        if let Some(a) = &self.attached {
            return a.engine_pid();
        }
        match self.sup.lock().unwrap().as_ref()?.state() {
            EngineState::Ready { pid, .. } => Some(pid),
            _ => None,
        }
    }
}

impl EngineLink for ManagedLink {
    fn current(&self) -> LinkState {
        if let Some(a) = &self.attached {
            return a.current();
        }
        if self.unloading.load(Ordering::SeqCst) {
            return LinkState::Unloading;
        }
        let g = self.sup.lock().unwrap();
        let Some(sup) = g.as_ref() else {
            return LinkState::Unloaded;
        };
        match sup.state() {
            EngineState::Ready { url, api_key, .. } => LinkState::Ready(EngineInfo {
                url,
                api_key,
                ..self.base.clone()
            }),
            EngineState::Failed { reason } => LinkState::Failed(reason),
            EngineState::Stopped => LinkState::Unloaded,
            _ => LinkState::Starting,
        }
    }

    fn report_stalled(&self) {
        if let Some(a) = &self.attached {
            return a.report_stalled();
        }
        if let Some(s) = self.sup.lock().unwrap().as_ref() {
            s.state_handle().request_restart();
        }
    }

    fn loads_on_demand(&self) -> bool {
        self.attached.is_none()
    }

    fn load(&self, ctx: &LoadContext) -> Result<(), LoadRefusal> {
        if self.attached.is_some() || self.sup.lock().unwrap().is_some() {
            return Ok(());
        }
        // Probed without holding the lock (`current` must stay quick).
        self.check_memory(ctx)?;
        let mut g = self.sup.lock().unwrap();
        if g.is_some() {
            return Ok(());
        }
        let sup = Supervisor::start(
            self.prep.clone(),
            self.layout.clone(),
            self.policy.clone(),
            &self.command,
        )
        .map_err(|e| LoadRefusal::Fail(e.to_string()))?;
        *g = Some(sup);
        Ok(())
    }

    fn unload(&self) {
        if self.attached.is_some() {
            return;
        }
        self.unloading.store(true, Ordering::SeqCst);
        let sup = self.sup.lock().unwrap().take();
        let flag = self.unloading.clone();
        std::thread::spawn(move || {
            if let Some(s) = sup {
                s.stop();
            }
            flag.store(false, Ordering::SeqCst);
        });
    }
}

/// An orchestrator and the engines of its pools, in this process: what
/// `serve`, the proof and the benches run against.
pub struct Stack {
    pub server: orchestratord::Server,
    /// Each engine (a pool's replicas one by one), by run id, in the stack's order.
    pub links: Vec<(llorch_io::handoff::PoolId, Arc<ManagedLink>)>,
}

impl Stack {
    pub fn orchestrator_url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// The first pool's engine as it runs now (URL, key, build, model):
    /// what a stack of one pool serves.
    pub fn engine(&self) -> Result<EngineInfo, StackError> {
        let (id, link) = self
            .links
            .first()
            .ok_or_else(|| StackError::Other("the stack has no pool".into()))?;
        match link.current() {
            LinkState::Ready(e) => Ok(e),
            other => Err(StackError::Other(format!(
                "pool {id} has no engine ready ({other:?})"
            ))),
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
        let links = self.links;
        let _ = tokio::task::spawn_blocking(move || {
            for (_, l) in &links {
                l.stop();
            }
            // Unloads under way finish too.
            let deadline = Instant::now() + Duration::from_secs(30);
            while links
                .iter()
                .any(|(_, l)| l.unloading.load(Ordering::SeqCst))
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .await;
    }
}

/// Options of [`start_pools`] that are not in the stack file.
#[derive(Clone, Debug, Default)]
pub struct PoolsOptions {
    pub quiet: bool,
    pub probe: GpuProbe,
    /// Replaces every pool's `idle_unload_s` (seconds; 0: never).
    pub idle_unload_s: Option<u64>,
    /// Replaces the stack's `max_loaded`.
    pub max_loaded: Option<usize>,
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
    let eager: u32 = stack
        .pools
        .iter()
        .filter(|p| p.load == LoadPolicy::Eager)
        .map(|p| p.concurrency.replicas)
        .sum();
    if let Some(m) = max_loaded {
        if eager as usize > m {
            return Err(StackError::Other(format!(
                "{eager} engines load at start (replicas count one by one) but max_loaded is {m}; mark some pools `load: lazy` or raise max_loaded"
            )));
        }
    }
    // Engines left by a previous run that crashed: swept before anything starts.
    {
        let l = layout.clone();
        let _ = tokio::task::spawn_blocking(move || lifecycle::sweep_stale(&l)).await;
    }
    let mut specs = Vec::new();
    let mut links = Vec::new();
    // Which links load at start (eager pools: every replica).
    let mut eager_links = Vec::new();
    for p in &stack.pools {
        let (prof, l2, id, quiet) = (p.profile.clone(), layout.clone(), p.id.clone(), opts.quiet);
        let Prepared { engine: prep, .. } = tokio::task::spawn_blocking(move || {
            prepare::prepare(
                &prof,
                &id,
                &l2,
                &BuildOptions {
                    quiet,
                    ..Default::default()
                },
            )
        })
        .await
        .map_err(|e| StackError::Other(e.to_string()))??;
        let c = p.concurrency;
        let idle = match opts.idle_unload_s {
            Some(0) => None,
            Some(s) => Some(s),
            None => p.idle_unload_s,
        };
        // One engine per replica: the same build, model and flags, its own run id and devices.
        for k in 0..c.replicas as usize {
            let run_id = p.id.replica(k);
            let mut rprep = prep.clone();
            rprep.pool_id = run_id.clone();
            rprep.replica_id = format!("r{k}");
            let devices = p
                .replica_devices
                .get(k)
                .cloned()
                .unwrap_or_else(|| p.devices.clone());
            // A pool of one engine may be the detached one `provision` started.
            let attachable = c.replicas == 1 && devices.is_empty();
            let claimed = {
                let (l, id, rp) = (layout.clone(), run_id.clone(), rprep.clone());
                tokio::task::spawn_blocking(move || {
                    let intent = if attachable {
                        lifecycle::Intent::SuperviseOrAttach(&rp)
                    } else {
                        lifecycle::Intent::Supervise
                    };
                    lifecycle::claim(&l, &id, intent)
                })
                .await
                .map_err(|e| StackError::Other(e.to_string()))??
            };
            let mut link = ManagedLink::new(
                rprep,
                layout.clone(),
                command,
                devices,
                p.memory_mib,
                opts.probe.clone(),
            );
            if let lifecycle::Claim::Attach(h) = claimed {
                if !opts.quiet {
                    eprintln!(
                        "attaching to the engine that `provision` started for pool {run_id} (pid {}); it keeps running after this exits",
                        h.process.pid
                    );
                }
                link.attached = Some(ProvisionedLink::new(&p.profile, &run_id, layout));
            }
            let link = Arc::new(link);
            // Nothing here starts or stops an attached engine: it is loaded, and stays.
            let eager = p.load == LoadPolicy::Eager || link.is_attached();
            let mut base = link.base.clone();
            // Capabilities and aliases name the pool, not the replica's run id.
            base.pool = p.id.to_string();
            specs.push(PoolSpec {
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
                eager_links.push((run_id.clone(), link.clone()));
            }
            links.push((run_id, link));
        }
    }
    // GPU pools that are unloaded keep a recent memory reading (one probe a
    // second for all GPUs), so a load on demand does not wait for nvidia-smi.
    if links.iter().any(|(_, l)| !l.devices.is_empty()) {
        let watched: Vec<std::sync::Weak<ManagedLink>> = links
            .iter()
            .filter(|(_, l)| !l.devices.is_empty())
            .map(|(_, l)| Arc::downgrade(l))
            .collect();
        let probe = opts.probe.clone();
        std::thread::Builder::new()
            .name("gpu-memory".into())
            .spawn(move || loop {
                std::thread::sleep(PROBE_FRESH / 2);
                let live: Vec<Arc<ManagedLink>> =
                    watched.iter().filter_map(|w| w.upgrade()).collect();
                if live.is_empty() {
                    return;
                }
                if live.iter().any(|l| l.current() == LinkState::Unloaded) {
                    let _ = probe.read();
                }
            })
            .map_err(|e| StackError::Other(format!("start the GPU memory monitor: {e}")))?;
    }
    // Eager pools: start them all (every replica), then wait for each.
    let loads = eager_links;
    let started = tokio::task::spawn_blocking(move || -> Result<(), String> {
        for (id, l) in &loads {
            l.load(&LoadContext::default()).map_err(|r| match r {
                LoadRefusal::Wait(m) | LoadRefusal::Fail(m) => {
                    format!("pool {id} cannot start: {m}")
                }
            })?;
        }
        for (id, l) in &loads {
            let timeout = Duration::from_secs(l.prep.ready_timeout_s + 10);
            // Waited on through a handle: the link stays readable meanwhile.
            let handle = l.sup.lock().unwrap().as_ref().map(|s| s.state_handle());
            if let Some(h) = handle {
                h.wait_ready(timeout)
                    .map_err(|e| format!("pool {id}: {e}"))?;
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| StackError::Other(e.to_string()))?;
    if let Err(e) = started {
        for (_, l) in &links {
            l.stop();
        }
        return Err(StackError::Other(e));
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
    // Wait until the orchestrator has seen every eager engine healthy.
    if !server
        .state
        .wait_until(Duration::from_secs(10), |s| s.is_ready())
        .await
    {
        return Err(StackError::Other(
            "the orchestrator did not see the engines ready".into(),
        ));
    }
    Ok(Stack { server, links })
}

#[cfg(test)]
mod tests {
    use super::*;
    use llorch_io::handoff::{EngineModel, PoolId};

    /// A pool pinned to GPU 0 of a stand-in `nvidia-smi` that reports `free` MiB.
    fn pinned(dir: &std::path::Path, free: u64) -> ManagedLink {
        let smi = dir.join(format!("nvidia-smi-{free}"));
        fs_err::write(
            &smi,
            format!("#!/bin/sh\necho '0, {free}, 81559'\necho '1, 81000, 81559'\n"),
        )
        .unwrap();
        let mut perm = fs_err::metadata(&smi).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        fs_err::set_permissions(&smi, perm).unwrap();
        let model = dir.join("m.gguf");
        fs_err::write(&model, vec![0u8; 3 << 20]).unwrap();
        let prep = PreparedEngine {
            binary: dir.join("llama-server"),
            model: EngineModel {
                reference: "file:m.gguf".into(),
                path: model,
                digest: "0".repeat(64),
                metadata: serde_json::json!({}),
            },
            flags: Vec::new(),
            env: Vec::new(),
            pool_id: PoolId::parse("gpu-pool").unwrap(),
            replica_id: "r0".into(),
            fingerprint: "f".into(),
            host: "127.0.0.1".into(),
            ports: vec![0],
            ready_timeout_s: 1,
            engine_version: "v".into(),
        };
        let root = dir.to_path_buf();
        let layout = Layout::at(root.clone(), root.join("cache"), root.join("rt"));
        ManagedLink::new(
            prep,
            layout,
            "test",
            vec![0],
            None,
            GpuProbe::new(smi.display().to_string()),
        )
    }

    #[test]
    fn a_gpu_pool_is_pinned_and_a_load_that_cannot_fit_waits_or_fails_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let l = pinned(dir.path(), 700);
        assert!(l
            .prep
            .env
            .contains(&("CUDA_VISIBLE_DEVICES".into(), "0".into())));
        // 3 MiB model + the overhead.
        assert_eq!(l.needs_mib, 3 + GPU_OVERHEAD_MIB);
        match l.load(&LoadContext::default()) {
            Err(LoadRefusal::Fail(m)) => {
                assert!(m.contains("GPU 0 has 700 MiB free of 81559 MiB"), "{m}");
                assert!(m.contains("needs about 1027 MiB"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(l.current(), LinkState::Unloaded);
        match l.load(&LoadContext {
            unloads_in_flight: true,
        }) {
            Err(LoadRefusal::Wait(m)) => assert!(m.contains("waiting for an unload"), "{m}"),
            other => panic!("{other:?}"),
        }
        // A recent reading that says "fits" is used without probing again;
        // one that says "does not fit" is always taken again.
        let smi = dir.path().join("nvidia-smi-70000");
        let l = pinned(dir.path(), 70000);
        assert_eq!(l.check_memory(&LoadContext::default()), Ok(()));
        fs_err::remove_file(&smi).unwrap();
        assert_eq!(l.check_memory(&LoadContext::default()), Ok(()));
        let tight = pinned(dir.path(), 700);
        tight.check_memory(&LoadContext::default()).unwrap_err();
        fs_err::remove_file(dir.path().join("nvidia-smi-700")).unwrap();
        match tight.check_memory(&LoadContext::default()) {
            Err(LoadRefusal::Fail(m)) => assert!(m.contains("cannot read GPU memory"), "{m}"),
            other => panic!("{other:?}"),
        }
        // A probe that is missing is a clear failure, not a guess.
        let mut l = pinned(dir.path(), 70000);
        l.probe = GpuProbe::new(dir.path().join("absent").display().to_string());
        match l.load(&LoadContext::default()) {
            Err(LoadRefusal::Fail(m)) => assert!(m.contains("cannot read GPU memory"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
