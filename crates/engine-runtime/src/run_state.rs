//! One pool's run state: where its files are ([`RunPaths`]), the pool lock,
//! who keeps it ([`PoolRun`], read under the lock; stale files removed,
//! never acted on), and removing files that still name a given process.

use crate::lifecycle::{io, EngineError};
use llorch_io::fsx::FileLock;
use llorch_io::handoff::{Handoff, Owner, PoolId, ProcessIdentity, RunRecord};
use llorch_io::paths::Layout;
use std::path::PathBuf;
use std::time::Duration;

/// Paths of one pool's run state.
#[derive(Clone, Debug)]
pub struct RunPaths {
    pub pid_file: PathBuf,
    pub log: PathBuf,
    pub handoff: PathBuf,
    pub api_key: PathBuf,
}

impl RunPaths {
    pub fn new(layout: &Layout, pool: &PoolId) -> RunPaths {
        RunPaths {
            pid_file: layout.pid_file(pool),
            log: layout.engine_log(pool),
            handoff: layout.handoff(pool),
            api_key: layout.api_key(pool),
        }
    }

    /// Create the run and runtime directories, refusing symlinks in them.
    pub fn ensure_dirs(&self, layout: &Layout) -> Result<(), EngineError> {
        layout.ensure_private_dir(&layout.run_dir())?;
        layout.ensure_private_dir(&layout.engines_dir())?;
        Ok(())
    }

    pub(crate) fn remove_all(&self) {
        for p in [&self.pid_file, &self.handoff, &self.api_key] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The exclusive lock that orders every start, stop and ownership decision of one pool.
pub fn lock_pool(
    layout: &Layout,
    pool: &PoolId,
    on_wait: impl FnOnce(),
) -> Result<FileLock, EngineError> {
    layout.ensure_private_dir(&layout.locks())?;
    let p = layout.pool_lock(pool);
    FileLock::exclusive(&p, on_wait).map_err(io(format!("lock {}", p.display())))
}

/// What runs for a pool now (read under its lock).
#[derive(Clone, Debug)]
pub struct PoolRun {
    pub record: RunRecord,
    pub handoff: Option<Handoff>,
    /// The engine process named by the record is alive (pid, start time, executable match).
    pub engine_alive: bool,
}

impl PoolRun {
    /// Someone keeps this pool: a live detached engine, or a live supervisor (even between restarts).
    pub fn is_taken(&self) -> bool {
        match &self.record.owner {
            Owner::Detached => self.engine_alive,
            Owner::Supervised { supervisor, .. } => supervisor.is_running(),
        }
    }

    pub fn busy_error(&self) -> EngineError {
        let extra = match &self.record.owner {
            Owner::Supervised { supervisor, .. } => format!(
                " (or stop its supervisor, pid {}, with Ctrl-C or `kill {}`)",
                supervisor.pid, supervisor.pid
            ),
            Owner::Detached => String::new(),
        };
        EngineError::PoolBusy {
            pool: self.record.pool.clone(),
            pid: self.record.process.pid,
            owner: self.record.owner.describe(),
            url: self
                .handoff
                .as_ref()
                .map(|h| h.url.clone())
                .unwrap_or_else(|| "(starting)".into()),
            extra,
        }
    }
}

/// Read the pool's run files. Files that do not parse, or that name neither a
/// live engine nor a live supervisor, are stale: removed, never acted on.
pub fn read_pool(layout: &Layout, pool: &PoolId) -> Option<PoolRun> {
    let paths = RunPaths::new(layout, pool);
    let record = match RunRecord::read(&paths.pid_file) {
        Ok(Some(r)) if &r.pool == pool => r,
        Ok(None) => {
            let _ = std::fs::remove_file(&paths.handoff);
            return None;
        }
        _ => {
            paths.remove_all();
            return None;
        }
    };
    let handoff = Handoff::read(&paths.handoff)
        .ok()
        .flatten()
        .filter(|h| h.process == record.process);
    let run = PoolRun {
        engine_alive: record.process.is_running(),
        record,
        handoff,
    };
    if !run.is_taken() {
        // A detached engine that is gone, or a supervisor that died: the engine
        // of a dead supervisor died with it (parent-death signal), but make sure.
        if run.engine_alive {
            run.record.process.stop(Duration::from_secs(5));
        }
        paths.remove_all();
        return None;
    }
    Some(run)
}

/// Clean the run records of every pool that nobody keeps any more (a
/// detached engine that died, a supervisor that was killed). Each pool is
/// checked under its own lock, taken without waiting: a pool being started
/// or stopped right now is left to its owner. Logs stay (they are the
/// diagnostics of what happened). Called on every spawn, so records of
/// one-off pools do not pile up.
pub fn sweep_stale(layout: &Layout) {
    let Ok(entries) = std::fs::read_dir(layout.run_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pool) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".pid"))
            .and_then(|n| PoolId::parse(n).ok())
        else {
            continue;
        };
        if let Ok(Some(_lock)) = FileLock::try_exclusive(&layout.pool_lock(&pool)) {
            let _ = read_pool(layout, &pool);
        }
    }
}

/// Remove the handoff and key of an engine that is gone (if they name it),
/// keeping its run record: the owner keeps the pool while it restarts.
pub fn remove_handoff(paths: &RunPaths, identity: &ProcessIdentity) {
    if let Ok(Some(h)) = Handoff::read(&paths.handoff) {
        if &h.process == identity {
            let _ = std::fs::remove_file(&paths.handoff);
            let _ = std::fs::remove_file(&paths.api_key);
        }
    }
}

/// Remove run files that still describe `identity` (typed comparison).
pub fn remove_run_files(paths: &RunPaths, identity: &ProcessIdentity) {
    if let Ok(Some(r)) = RunRecord::read(&paths.pid_file) {
        if &r.process == identity {
            paths.remove_all();
        }
    }
    if let Ok(Some(h)) = Handoff::read(&paths.handoff) {
        if &h.process == identity {
            let _ = std::fs::remove_file(&paths.handoff);
        }
    }
}
