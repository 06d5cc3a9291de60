//! How an engine is linked to the orchestrator ([`EngineLink`]).
//!
//! * [`ProvisionedLink`]: the detached engine `provision` started, attached
//!   to: the orchestrator follows its handoff, and if that engine dies it is
//!   started again through `provision` (the same path, under the pool lock).
//! * [`ManagedLink`]: a stack's engine (a pool's, or a replica's): its
//!   supervisor started and stopped when the scheduler asks, pinned to its
//!   GPUs with their free memory checked first; or a [`ProvisionedLink`].

use engine_provisioner::BuildOptions;
use engine_runtime::flags::PreparedEngine;
use engine_runtime::run_state::RunPaths;
use engine_runtime::supervisor::{EngineState, RestartPolicy, Supervisor};
use llorch_io::paths::Layout;
use llorch_profile::Profile;
use llorch_types::PoolId;
use orchestratord::{EngineInfo, EngineLink, HandoffLink, LinkState, LoadContext, LoadRefusal};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

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
        sandbox: serde_json::to_value(engine_runtime::sandbox::Protections::planned(
            prep.sandbox,
            prep.listen,
            &prep.host,
        ))
        .ok(),
    }
}

/// Follows a detached engine's handoff; starts it again through `provision` when it is gone.
pub struct ProvisionedLink {
    handoff: HandoffLink,
    log: std::path::PathBuf,
    reviving: Arc<AtomicBool>,
    revive: Arc<dyn Fn() + Send + Sync>,
}

impl ProvisionedLink {
    /// Follow `pool`'s handoff; when its engine is gone, `provision` it again from `profile`.
    pub fn new(profile: &Profile, pool: &PoolId, layout: &Layout) -> ProvisionedLink {
        let (p, l, id) = (profile.clone(), layout.clone(), pool.clone());
        ProvisionedLink {
            handoff: HandoffLink(RunPaths::new(layout, pool).handoff),
            log: RunPaths::new(layout, pool).log,
            reviving: Arc::new(AtomicBool::new(false)),
            revive: Arc::new(move || {
                if let Err(e) = crate::provision::provision(&p, &id, &l, &BuildOptions::quiet()) {
                    llorch_io::info!("could not start the engine of pool {id} again: {e}");
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

    fn log_path(&self) -> Option<std::path::PathBuf> {
        Some(self.log.clone())
    }
    fn report_stalled(&self) {
        // A hung detached engine: stop it (identity-checked); the next look revives it.
        if let Ok(Some(h)) = llorch_io::handoff::Handoff::read(&self.handoff.0) {
            h.process.signal(9); // SIGKILL: a stopped process ignores SIGTERM
        }
    }
}

/// Memory a pool needs on its GPUs beyond the model file: CUDA context,
/// compute buffers and the KV cache of a modest context. A stack file's
/// `memory_mib` replaces the estimate.
pub const GPU_OVERHEAD_MIB: u64 = 1024;

use llorch_io::gpu::{GpuMemory, GpuProbe, PROBE_FRESH};

/// A pool's engine, started and stopped when the scheduler asks; or the
/// detached engine `provision` started, attached to (never started or
/// stopped here).
pub struct ManagedLink {
    pub base: EngineInfo,
    pub(crate) prep: PreparedEngine,
    layout: Layout,
    command: String,
    policy: RestartPolicy,
    /// GPUs the engine is pinned to (empty: CPU, or all GPUs).
    pub devices: Vec<u32>,
    /// MiB the pool needs on each of its devices.
    pub needs_mib: u64,
    probe: GpuProbe,
    pub(crate) sup: Mutex<Option<Supervisor>>,
    pub(crate) unloading: Arc<Unloading>,
    pub(crate) attached: Option<ProvisionedLink>,
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
            unloading: Arc::default(),
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
        if self.unloading.get() {
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

    fn log_path(&self) -> Option<std::path::PathBuf> {
        match &self.attached {
            Some(a) => a.log_path(),
            None => Some(RunPaths::new(&self.layout, &self.prep.pool_id).log),
        }
    }

    fn devices(&self) -> Vec<u32> {
        self.devices.clone()
    }

    fn unload(&self) {
        if self.attached.is_some() {
            return;
        }
        self.unloading.set(true);
        let sup = self.sup.lock().unwrap().take();
        let flag = self.unloading.clone();
        std::thread::spawn(move || {
            if let Some(s) = sup {
                s.stop();
            }
            flag.set(false);
        });
    }
}

/// Whether an unload is under way; [`Stack::stop`](crate::Stack::stop)
/// waits for its end on a condition variable, not by polling.
#[derive(Default)]
pub(crate) struct Unloading {
    busy: Mutex<bool>,
    done: Condvar,
}

impl Unloading {
    fn set(&self, busy: bool) {
        *self.busy.lock().unwrap() = busy;
        if !busy {
            self.done.notify_all();
        }
    }

    fn get(&self) -> bool {
        *self.busy.lock().unwrap()
    }

    /// Until no unload is under way, or `deadline`.
    pub(crate) fn wait_done(&self, deadline: Instant) {
        let mut busy = self.busy.lock().unwrap();
        while *busy {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return;
            };
            busy = self.done.wait_timeout(busy, left).unwrap().0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llorch_io::handoff::EngineModel;
    use llorch_types::PoolId;

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
            sandbox: llorch_profile::SandboxMode::Auto,
            listen: llorch_profile::ListenMode::Tcp,
            gpu: false,
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
