//! One pool's run state: where its files are ([`RunPaths`]), the pool lock,
//! who keeps it ([`PoolRun`], read under the lock; stale files removed,
//! never acted on), and removing files that still name a given process.

use crate::flags::PreparedEngine;
use crate::lifecycle::{io, EngineError};
use llorch_io::fsx::FileLock;
use llorch_io::handoff::{Handoff, Owner, ProcessIdentity, RunRecord};
use llorch_io::paths::Layout;
use llorch_types::PoolId;
use std::path::PathBuf;
use std::time::Duration;

/// Paths of one pool's run state.
#[derive(Clone, Debug)]
pub struct RunPaths {
    pub pid_file: PathBuf,
    pub log: PathBuf,
    pub handoff: PathBuf,
    pub api_key: PathBuf,
    /// The directory of its unix socket (`server.listen: unix`).
    pub socket_dir: PathBuf,
}

impl RunPaths {
    pub fn new(layout: &Layout, pool: &PoolId) -> RunPaths {
        RunPaths {
            pid_file: layout.pid_file(pool),
            log: layout.engine_log(pool),
            handoff: layout.handoff(pool),
            api_key: layout.api_key(pool),
            socket_dir: layout.engine_socket_dir(pool),
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
            let _ = fs_err::remove_file(p);
        }
        let _ = fs_err::remove_dir_all(&self.socket_dir);
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
    FileLock::exclusive(&p, on_wait).map_err(|e| io(format!("lock {}", p.display()))(e).into())
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

/// What differs between a running engine's handoff and what we would start.
pub fn differences(h: &Handoff, prep: &PreparedEngine) -> Vec<String> {
    let mut d = Vec::new();
    if h.fingerprint != prep.fingerprint {
        d.push(format!(
            "engine build {} → {}",
            &h.fingerprint[..12.min(h.fingerprint.len())],
            &prep.fingerprint[..12.min(prep.fingerprint.len())]
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

/// What a caller means to do with a pool; [`claim`] answers for all of them.
#[derive(Clone, Copy, Debug)]
pub enum Intent<'a> {
    /// Run an engine of its own under a supervisor (a stack's replica or
    /// GPU-pinned pool, a supervisor's start): only a free pool.
    Supervise,
    /// A stack's pool of one engine (`serve`, the proof, a bench): supervise
    /// an engine of its own, or attach to the detached engine `provision`
    /// started if it is this very engine.
    SuperviseOrAttach(&'a PreparedEngine),
    /// `provision`: a detached engine; one that runs and is this engine is
    /// reused (also when a supervisor keeps it), a different detached one is
    /// replaced, a different supervised one is refused.
    Provision(&'a PreparedEngine),
}

/// [`claim`]'s answer: what the caller may do. A pool kept by someone else
/// is an `Err` naming the owner and how to stop it.
#[derive(Debug)]
pub enum Claim {
    /// Nobody keeps the pool (stale run files were swept): start one.
    Free,
    /// A live engine that is the caller's engine: use it (`serve`: only a
    /// detached one; `provision`: whoever keeps it).
    Attach(Box<Handoff>),
    /// (`Provision` only) a live detached engine that differs: stop it, then
    /// start the caller's. `changes` says how it differs.
    Replace {
        run: Box<PoolRun>,
        changes: Vec<String>,
    },
}

/// Who may do what with `pool`, decided in one place for provision, serve,
/// stacks and supervisors. Call it under the pool lock when acting on the
/// answer (the run files may change otherwise).
pub fn claim(layout: &Layout, pool: &PoolId, intent: Intent<'_>) -> Result<Claim, EngineError> {
    let Some(run) = read_pool(layout, pool) else {
        return Ok(Claim::Free);
    };
    let running = match &run.handoff {
        Some(h) if run.engine_alive => h.clone(),
        // A supervisor between restarts, or an engine still starting.
        _ => return Err(run.busy_error()),
    };
    let prep = match intent {
        Intent::Supervise => return Err(run.busy_error()),
        Intent::SuperviseOrAttach(p) | Intent::Provision(p) => p,
    };
    let detached = matches!(run.record.owner, Owner::Detached);
    let changes = differences(&running, prep);
    match intent {
        // `provision` of the engine that runs, whoever keeps it: nothing to do.
        Intent::Provision(_) if changes.is_empty() => Ok(Claim::Attach(Box::new(running))),
        // A different one: replaced only if detached (a supervisor owns its own).
        Intent::Provision(_) if detached => Ok(Claim::Replace {
            run: Box::new(run),
            changes,
        }),
        // `serve` attaches only to what `provision` started, and only to the same engine.
        Intent::SuperviseOrAttach(_) if detached && changes.is_empty() => {
            Ok(Claim::Attach(Box::new(running)))
        }
        _ => Err(run.busy_error()),
    }
}

/// What `engine status` shows of a pool: whether an engine serves it and,
/// if one does, its process, URL, health, uptime (from the process's own
/// start time), model, fingerprint and busy slots, as llama-server answers
/// now.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PoolStatus {
    pub pool: PoolId,
    /// An engine is alive and has written its handoff.
    pub running: bool,
    /// Who keeps the pool (`None`: nobody).
    pub owner: Option<String>,
    #[serde(flatten)]
    pub engine: Option<EngineStatus>,
}

/// A running engine, as [`PoolStatus`] shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EngineStatus {
    pub pid: u32,
    pub url: String,
    /// `/health`'s HTTP status (`None`: no answer).
    pub health: Option<u16>,
    pub uptime_s: Option<u64>,
    pub model: llorch_io::handoff::EngineModel,
    pub fingerprint: String,
    pub slots_busy: Option<usize>,
    pub slots_total: Option<usize>,
    pub engine_version: String,
    pub started_at: String,
    pub flags: Vec<String>,
}

/// The pool's status: its run files read (stale ones removed, as
/// [`read_pool`] does), and a live engine asked for its health and slots.
pub fn pool_status(
    layout: &Layout,
    pool: &PoolId,
) -> Result<PoolStatus, llorch_io::handoff::RunFileError> {
    let run = read_pool(layout, pool);
    let owner = run.as_ref().map(|r| r.record.owner.describe());
    let live = run
        .filter(|r| r.engine_alive)
        .and_then(|r| r.handoff.map(|h| (r.record, h)));
    let Some((record, h)) = live else {
        return Ok(PoolStatus {
            pool: pool.clone(),
            running: false,
            owner,
            engine: None,
        });
    };
    let server = llorch_io::llama_server::LlamaServer::new(h.url.clone(), h.api_key()?);
    let client = llorch_io::http::probe_client();
    let health = server
        .get_blocking(&client, llorch_io::llama_server::Api::Health)
        .send()
        .map(|r| r.status().as_u16())
        .ok();
    let slots = server.slots_blocking(&client).ok();
    Ok(PoolStatus {
        pool: pool.clone(),
        running: true,
        owner,
        engine: Some(EngineStatus {
            pid: record.process.pid,
            url: h.url,
            health,
            uptime_s: record.process.uptime().map(|d| d.as_secs()),
            model: h.model,
            fingerprint: h.fingerprint,
            slots_busy: slots
                .as_ref()
                .map(|a| a.iter().filter(|s| s.is_processing).count()),
            slots_total: slots.as_ref().map(|a| a.len()),
            engine_version: h.engine_version,
            started_at: h.started_at,
            flags: h.flags,
        }),
    })
}

/// Read the pool's run files. Files that do not parse, or that name neither a
/// live engine nor a live supervisor, are stale: removed, never acted on.
pub fn read_pool(layout: &Layout, pool: &PoolId) -> Option<PoolRun> {
    let paths = RunPaths::new(layout, pool);
    let record = match RunRecord::read(&paths.pid_file) {
        Ok(Some(r)) if &r.pool == pool => r,
        Ok(None) => {
            let _ = fs_err::remove_file(&paths.handoff);
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
    let Ok(entries) = fs_err::read_dir(layout.run_dir()) else {
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
            let _ = fs_err::remove_file(&paths.handoff);
            let _ = fs_err::remove_file(&paths.api_key);
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
            let _ = fs_err::remove_file(&paths.handoff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llorch_io::handoff::{EngineModel, RUN_SCHEMA};

    fn prep(pool: &PoolId, fingerprint: &str) -> PreparedEngine {
        PreparedEngine {
            binary: PathBuf::from("/nonexistent/llama-server"),
            model: EngineModel {
                reference: "file:m.gguf".into(),
                path: PathBuf::from("/nonexistent/m.gguf"),
                digest: "0".repeat(64),
                metadata: serde_json::json!({}),
            },
            flags: vec!["--ctx-size".into(), "2048".into()],
            env: Vec::new(),
            pool_id: pool.clone(),
            replica_id: "r0".into(),
            fingerprint: fingerprint.into(),
            host: "127.0.0.1".into(),
            ports: vec![0],
            ready_timeout_s: 1,
            sandbox: llorch_profile::SandboxMode::Auto,
            listen: llorch_profile::ListenMode::Tcp,
            gpu: false,
            engine_version: "v".into(),
        }
    }

    /// Run files naming `process` (this test process stands in for a live
    /// engine) as the pool's engine, kept by `owner`, built as `p`.
    fn write_run(layout: &Layout, p: &PreparedEngine, process: ProcessIdentity, owner: Owner) {
        let paths = RunPaths::new(layout, &p.pool_id);
        paths.ensure_dirs(layout).unwrap();
        let record = RunRecord {
            schema: RUN_SCHEMA,
            pool: p.pool_id.clone(),
            process: process.clone(),
            owner: owner.clone(),
            fingerprint: p.fingerprint.clone(),
            port: 1,
            started_at: "now".into(),
        };
        let handoff = Handoff {
            schema: RUN_SCHEMA,
            engine: "llamacpp".into(),
            engine_version: "v".into(),
            provisioning_mode: "test".into(),
            url: "http://127.0.0.1:1".into(),
            pool_id: p.pool_id.clone(),
            replica_id: "r0".into(),
            model: p.model.clone(),
            flags: p.flags.clone(),
            process,
            owner,
            fingerprint: p.fingerprint.clone(),
            started_at: "now".into(),
            api_key_file: None,
            sandbox: None,
        };
        let write = |path: &std::path::Path, json: String| {
            llorch_io::fsx::write_atomic(path, json.as_bytes()).unwrap()
        };
        write(&paths.pid_file, serde_json::to_string(&record).unwrap());
        write(&paths.handoff, serde_json::to_string(&handoff).unwrap());
    }

    /// One answer for every caller: a free pool is free for all; a live
    /// detached engine is attached to when it is the caller's engine,
    /// replaced only by `provision` when it differs, refused otherwise; a
    /// live supervisor's engine is `provision`'s when it is the same engine
    /// and refused to everyone else; a dead owner's files are swept and the
    /// pool is free.
    #[test]
    fn claim_answers_every_caller_from_the_run_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let layout = Layout::at(root.clone(), root.join("cache"), root.join("rt"));
        let pool = PoolId::parse("claimed").unwrap();
        let mine = prep(&pool, "fp-a");
        let other = prep(&pool, "fp-b");
        let all = [
            Intent::Supervise,
            Intent::SuperviseOrAttach(&mine),
            Intent::Provision(&mine),
        ];
        for intent in all {
            assert!(matches!(claim(&layout, &pool, intent), Ok(Claim::Free)));
        }

        write_run(&layout, &mine, ProcessIdentity::current(), Owner::Detached);
        assert!(claim(&layout, &pool, Intent::Supervise).is_err());
        assert!(matches!(
            claim(&layout, &pool, Intent::SuperviseOrAttach(&mine)),
            Ok(Claim::Attach(h)) if h.fingerprint == "fp-a"
        ));
        assert!(matches!(
            claim(&layout, &pool, Intent::Provision(&mine)),
            Ok(Claim::Attach(_))
        ));
        match claim(&layout, &pool, Intent::Provision(&other)) {
            Ok(Claim::Replace { changes, .. }) => {
                assert!(changes[0].starts_with("engine build"), "{changes:?}")
            }
            other => panic!("{other:?}"),
        }
        let busy = claim(&layout, &pool, Intent::SuperviseOrAttach(&other)).unwrap_err();
        assert!(busy.to_string().contains("claimed"), "{busy}");

        let supervised = Owner::Supervised {
            supervisor: ProcessIdentity::current(),
            command: "serve".into(),
        };
        write_run(&layout, &mine, ProcessIdentity::current(), supervised);
        assert!(matches!(
            claim(&layout, &pool, Intent::Provision(&mine)),
            Ok(Claim::Attach(_))
        ));
        for intent in [
            Intent::Supervise,
            Intent::SuperviseOrAttach(&mine),
            Intent::Provision(&other),
        ] {
            assert!(claim(&layout, &pool, intent).is_err(), "{intent:?}");
        }

        // Neither the engine nor a supervisor lives: stale, swept, free.
        let mut dead = ProcessIdentity::current();
        dead.start_time += 1;
        let gone = Owner::Supervised {
            supervisor: dead.clone(),
            command: "serve".into(),
        };
        write_run(&layout, &mine, dead, gone);
        assert!(matches!(
            claim(&layout, &pool, Intent::Supervise),
            Ok(Claim::Free)
        ));
        assert!(!RunPaths::new(&layout, &pool).pid_file.exists(), "swept");
    }
}
