//! The engine process: deterministic flags, port choice, spawn, readiness,
//! run files, stop.
//!
//! * Flags: the deterministic profile (`--parallel 1 --no-cont-batching
//!   --no-cache-prompt --no-webui --metrics`, fixed `--threads`, the
//!   profile's `--host`) is always applied (a pool declared `mode: batched`
//!   gets `--parallel N --cont-batching`, prompt caching and N times the
//!   context instead; an embedding pool `--embeddings --pooling P`); GPU-layer spellings are normalized to `--n-gpu-layers`,
//!   a CPU build forces 0. `extra_args` is an allow-list ([`ALLOWED_FLAGS`]):
//!   anything else is refused with the reason.
//! * Environment: the engine gets an allow-listed environment
//!   ([`ENV_ALLOWED`]); tokens (`HF_TOKEN`, `LLORCH_API_TOKEN`) and
//!   llama-server's own `LLAMA_ARG_*` overrides never reach it.
//! * An engine bound off loopback gets a generated API key, stored 0600 beside
//!   the handoff and passed with `--api-key-file` (not on the command line,
//!   where every user could read it).
//! * Readiness: `/health` answers 503 while the model loads and 200 when
//!   ready; we poll it with a short backoff and our own timeout. If the
//!   process exits first we report its status and the log tail; a failed
//!   bind moves on to the next port candidate.
//! * Run files: the [`RunRecord`] is written right after the spawn, the
//!   [`Handoff`] once ready. If either cannot be written the engine is
//!   stopped: nothing runs unrecorded.
//! * In use: the engine process inherits shared locks on its engine entry
//!   and its model blob (`Layout::engine_lock`, `Layout::blob_lock`), so gc
//!   can tell, from the kernel, that they are in use for exactly as long as
//!   the process lives.
//!
//! Architecture Invariant: a run file is acted on only while the process it
//! names has the same pid, start time and executable; a process merely named
//! `llama-server` is never signalled.

use llorch_io::fsx::FileLock;
use llorch_io::handoff::{
    EngineModel, Handoff, Owner, PoolId, ProcessIdentity, RunRecord, RUN_SCHEMA,
};
use llorch_io::paths::Layout;
use llorch_profile::{Backend, Profile};
use serde::{Deserialize, Serialize};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("server.extra_args: `{flag}` is not allowed: {why}")]
    ForbiddenFlag { flag: String, why: String },
    #[error("llama-server exited before it was ready ({status})\n--- last 40 lines of {log} ---\n{tail}\n--- end of log ---")]
    Exited {
        status: String,
        log: String,
        tail: String,
    },
    #[error("llama-server did not become ready within {secs}s (last /health: {last})\n  log: {log}\n  hint: a large model may need a longer server.ready_timeout_s in the profile")]
    Timeout {
        secs: u64,
        last: String,
        log: String,
    },
    #[error("no free port among {candidates}: {why}")]
    NoPort { candidates: String, why: String },
    #[error("pool `{pool}` already has an engine (pid {pid}, {owner}) at {url}\n  hint: stop it with `cargo xtask engine down --pool {pool}`{extra}, or use another pool (--pool NAME)")]
    PoolBusy {
        pool: PoolId,
        pid: u32,
        owner: String,
        url: String,
        extra: String,
    },
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error(transparent)]
    Dir(#[from] llorch_io::paths::DirError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
    let what = what.into();
    move |err| EngineError::Io { what, err }
}

/// Everything needed to start one engine replica.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PreparedEngine {
    pub binary: PathBuf,
    pub model: EngineModel,
    /// Server flags without `-m`, `--port` (chosen at spawn).
    pub flags: Vec<String>,
    pub env: Vec<(String, String)>,
    pub pool_id: PoolId,
    pub replica_id: String,
    pub fingerprint: String,
    pub host: String,
    pub ports: Vec<u16>,
    pub ready_timeout_s: u64,
    pub engine_version: String,
}

/// Flags `extra_args` may carry: they change neither the deterministic
/// profile nor where the model comes from. Everything else is refused.
pub const ALLOWED_FLAGS: &[(&str, bool)] = &[
    // (flag, takes a value)
    ("--batch-size", true),
    ("-b", true),
    ("--ubatch-size", true),
    ("-ub", true),
    ("--flash-attn", true),
    ("-fa", true),
    ("--cache-type-k", true),
    ("-ctk", true),
    ("--cache-type-v", true),
    ("-ctv", true),
    ("--no-mmap", false),
    ("--mlock", false),
    ("--split-mode", true),
    ("-sm", true),
    ("--tensor-split", true),
    ("-ts", true),
    ("--main-gpu", true),
    ("-mg", true),
    ("--temp", true),
    ("--top-k", true),
    ("--top-p", true),
    ("--min-p", true),
    ("--repeat-penalty", true),
    ("--n-predict", true),
    ("-n", true),
    ("--keep", true),
    ("--rope-freq-base", true),
    ("--rope-freq-scale", true),
    ("--rope-scaling", true),
    ("--timeout", true),
    ("--threads-batch", true),
    ("-tb", true),
    ("--numa", true),
    ("--no-warmup", false),
    ("--jinja", false),
    ("--chat-template", true),
];

/// Why a known flag is refused (shown to the user); anything not listed here
/// nor in [`ALLOWED_FLAGS`] is refused as unknown.
const REFUSED: &[(&[&str], &str)] = &[
    (
        &["--parallel", "-np"],
        "the engine runs with --parallel 1 (one slot, deterministic); for more slots set server.mode: batched and server.slots: N, or server.replicas: K for exact concurrency",
    ),
    (
        &["--cont-batching", "-cb"],
        "continuous batching is off (--no-cont-batching) for determinism; server.mode: batched turns it on",
    ),
    (&["--webui", "--ui"], "the web UI is off (--no-webui)"),
    (&["--no-metrics"], "metrics are always on (--metrics)"),
    (&["--host"], "set server.host in the profile instead"),
    (&["--port"], "set server.port in the profile instead"),
    (
        &["--threads", "-t"],
        "set server.threads in the profile instead",
    ),
    (
        &[
            "-m",
            "--model",
            "-mu",
            "--model-url",
            "-hf",
            "--hf-repo",
            "-hfr",
            "-hff",
            "--hf-file",
            "-dr",
            "--docker-repo",
            "-hft",
            "--hf-token",
        ],
        "the model comes from the profile's model section (verified by digest); the engine never fetches one itself",
    ),
    (
        &["--api-key", "--api-key-file"],
        "an engine bound off loopback gets a generated key automatically",
    ),
    (
        &["--ctx-size", "-c"],
        "set server.ctx_size in the profile instead",
    ),
];

/// The llama-server flags for a profile (without model and port).
pub fn server_flags(profile: &Profile) -> Result<Vec<String>, EngineError> {
    let s = &profile.file.server;
    let threads = if s.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    } else {
        s.threads
    };
    let mut ngl = s.n_gpu_layers;
    let mut extra = Vec::new();
    let mut it = s.extra_args.iter().peekable();
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with('-') => (n.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let shown = llorch_io::handoff::excerpt(&name, 40);
        if matches!(
            name.as_str(),
            "-ngl" | "--ngl" | "--gpu-layers" | "--n-gpu-layers"
        ) {
            let v = inline.or_else(|| it.next().cloned()).ok_or_else(|| {
                EngineError::ForbiddenFlag {
                    flag: shown.clone(),
                    why: "needs a number".into(),
                }
            })?;
            ngl = Some(v.parse().map_err(|_| EngineError::ForbiddenFlag {
                flag: format!("{shown} {}", llorch_io::handoff::excerpt(&v, 20)),
                why: "the layer count must be a number".into(),
            })?);
            continue;
        }
        if let Some((_, why)) = REFUSED
            .iter()
            .find(|(names, _)| names.contains(&name.as_str()))
        {
            return Err(EngineError::ForbiddenFlag {
                flag: shown,
                why: format!("it contradicts the enforced profile: {why}"),
            });
        }
        let Some((_, takes_value)) = ALLOWED_FLAGS.iter().find(|(f, _)| *f == name) else {
            return Err(EngineError::ForbiddenFlag {
                flag: shown,
                why: "it is not on the allow-list of flags that keep the deterministic profile and a verified model (see ALLOWED_FLAGS in engine-runtime)".into(),
            });
        };
        extra.push(name.clone());
        if *takes_value {
            let v = inline.or_else(|| it.next().cloned()).ok_or_else(|| {
                EngineError::ForbiddenFlag {
                    flag: shown.clone(),
                    why: "needs a value".into(),
                }
            })?;
            if v.len() > 256 || v.starts_with('-') && v.parse::<f64>().is_err() {
                return Err(EngineError::ForbiddenFlag {
                    flag: shown,
                    why: "its value is missing or too long".into(),
                });
            }
            extra.push(v);
        } else if inline.is_some() {
            return Err(EngineError::ForbiddenFlag {
                flag: shown,
                why: "takes no value".into(),
            });
        }
    }
    let ngl = match profile.file.engine.backend {
        Backend::Cpu => 0,
        Backend::Cuda => ngl.unwrap_or(999),
    };
    // Exact: one slot, no continuous batching. Batched: N slots with
    // continuous batching, each with the profile's context (llama-server
    // splits --ctx-size over its slots).
    let c = profile.concurrency();
    let (slots, batching, ctx) = match c.mode {
        llorch_profile::Mode::Exact => (1, "--no-cont-batching", s.ctx_size as u64),
        llorch_profile::Mode::Batched => (
            c.slots,
            "--cont-batching",
            s.ctx_size as u64 * c.slots as u64,
        ),
    };
    let mut f: Vec<String> = vec![
        "--host".into(),
        s.host.clone(),
        "--parallel".into(),
        slots.to_string(),
        batching.into(),
        "--no-webui".into(),
        "--metrics".into(),
        // The model's own chat template through llama-server's Jinja engine:
        // tool calls, structured output and the Anthropic and Responses
        // translations need it (the pin's default, written out so a pin
        // that changes its default changes nothing here).
        "--jinja".into(),
        "--threads".into(),
        threads.to_string(),
        "--ctx-size".into(),
        ctx.to_string(),
        "--n-gpu-layers".into(),
        ngl.to_string(),
        "--seed".into(),
        s.seed.to_string(),
    ];
    // Exact mode evaluates every prompt afresh, whichever endpoint a request
    // takes (llama-server's Anthropic translation drops a request's
    // `cache_prompt`): reusing a cached prefix can change the numbers.
    if c.mode == llorch_profile::Mode::Exact {
        f.push("--no-cache-prompt".into());
    }
    // An embedding pool: vectors (or rerank scores), not chat; mean pooling
    // unless the profile names another.
    if s.embeddings {
        let pooling = s.pooling.unwrap_or(llorch_profile::Pooling::Mean);
        f.extend([
            "--embeddings".into(),
            "--pooling".into(),
            pooling.as_str().into(),
        ]);
    }
    f.extend(extra);
    Ok(f)
}

/// Environment variables the engine may see (everything else is removed):
/// the system basics, locale, and the GPU runtime's own selectors.
pub const ENV_ALLOWED: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "CUDA_CACHE_PATH",
    "CUDA_MODULE_LOADING",
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
];

fn env_allowed(k: &str) -> bool {
    ENV_ALLOWED.contains(&k) || k.starts_with("LC_")
}

/// Assemble the engine for a profile from a built binary and a fetched model.
pub fn prepare(
    profile: &Profile,
    pool: &PoolId,
    binary: &Path,
    fingerprint: &str,
    engine_version: &str,
    model: EngineModel,
) -> Result<PreparedEngine, EngineError> {
    let host = &profile.file.server.host;
    let ports = match profile.file.server.port.candidates() {
        Ok(v) if v == [0] => vec![0],
        Ok(v) if v.len() == 1 => (v[0]..=v[0].saturating_add(9)).collect(),
        Ok(v) => v,
        Err(e) => {
            return Err(EngineError::NoPort {
                candidates: format!("{:?}", profile.file.server.port),
                why: e,
            })
        }
    };
    Ok(PreparedEngine {
        binary: binary.to_path_buf(),
        model,
        flags: server_flags(profile)?,
        env: Vec::new(),
        pool_id: pool.clone(),
        replica_id: "r0".into(),
        fingerprint: fingerprint.into(),
        host: host.clone(),
        ports,
        ready_timeout_s: profile.file.server.ready_timeout_s,
        engine_version: engine_version.into(),
    })
}

pub fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

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
            pid_file: layout.run_dir().join(format!("{pool}.pid")),
            log: layout.run_dir().join(format!("llamacpp-{pool}.log")),
            handoff: layout.engines_dir().join(format!("{pool}.json")),
            api_key: layout.engines_dir().join(format!("{pool}.key")),
        }
    }

    /// Create the run and runtime directories, refusing symlinks in them.
    pub fn ensure_dirs(&self, layout: &Layout) -> Result<(), EngineError> {
        layout.ensure_private_dir(&layout.run_dir())?;
        layout.ensure_private_dir(&layout.engines_dir())?;
        Ok(())
    }

    fn remove_all(&self) {
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

fn port_free(host: &str, port: u16) -> bool {
    std::net::TcpListener::bind((host, port)).is_ok()
}

fn any_free_port(host: &str) -> Result<u16, EngineError> {
    let l = std::net::TcpListener::bind((host, 0)).map_err(io(format!("bind {host}:0")))?;
    Ok(l.local_addr().map_err(io("local addr"))?.port())
}

/// A started, ready engine process.
#[derive(Debug)]
pub struct RunningEngine {
    pub child: Child,
    pub identity: ProcessIdentity,
    pub port: u16,
    pub url: String,
    pub ready_ms: u64,
    pub paths: RunPaths,
    pub metrics_ok: bool,
    pub api_key: Option<String>,
}

impl RunningEngine {
    pub fn pid(&self) -> u32 {
        self.identity.pid
    }
}

/// Spawn the engine, wait until `/health` is 200, write run record and handoff.
/// The caller holds the pool lock and has checked that the pool is free (or is its owner).
pub fn spawn(
    prep: &PreparedEngine,
    layout: &Layout,
    owner: &Owner,
) -> Result<RunningEngine, EngineError> {
    let paths = RunPaths::new(layout, &prep.pool_id);
    paths.ensure_dirs(layout)?;
    sweep_stale(layout);
    let api_key = if is_loopback(&prep.host) {
        let _ = std::fs::remove_file(&paths.api_key);
        None
    } else {
        Some(write_api_key(&paths.api_key)?)
    };
    let mut last_err = String::new();
    let mut tried = Vec::new();
    for &cand in &prep.ports {
        let port = if cand == 0 {
            any_free_port(&prep.host)?
        } else {
            cand
        };
        if cand != 0 && !port_free(&prep.host, port) {
            tried.push(format!("{port} (in use)"));
            continue;
        }
        match spawn_on(prep, layout, &paths, port, owner, api_key.as_deref()) {
            Ok(r) => return Ok(r),
            Err(SpawnFail::PortTaken(why)) => {
                tried.push(format!("{port} ({why})"));
                last_err = why;
            }
            Err(SpawnFail::Fatal(e)) => return Err(e),
        }
    }
    Err(EngineError::NoPort {
        candidates: tried.join(", "),
        why: last_err,
    })
}

/// A fresh 256-bit key, written 0600 (never through a symlink).
fn write_api_key(path: &Path) -> Result<String, EngineError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = format!(
        "llorch-{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io(format!("write {}", path.display())))?;
    f.write_all(key.as_bytes())
        .map_err(io(format!("write {}", path.display())))?;
    Ok(key)
}

enum SpawnFail {
    PortTaken(String),
    Fatal(EngineError),
}

fn open_log(path: &Path) -> Result<std::fs::File, EngineError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io(format!(
            "open engine log {} (a symlink is refused)",
            path.display()
        )))
}

fn write_run_file(path: &Path, json: &str) -> Result<(), EngineError> {
    llorch_io::fsx::write_atomic(path, json.as_bytes())
        .map_err(io(format!("write {}", path.display())))
}

fn spawn_on(
    prep: &PreparedEngine,
    layout: &Layout,
    paths: &RunPaths,
    port: u16,
    owner: &Owner,
    api_key: Option<&str>,
) -> Result<RunningEngine, SpawnFail> {
    let fatal = SpawnFail::Fatal;
    let log = open_log(&paths.log).map_err(fatal)?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    // In-use leases: shared locks the engine process inherits (see the module docs).
    let leases = [
        layout.engine_lock(&prep.fingerprint),
        layout.blob_lock(&prep.model.digest),
    ]
    .iter()
    .map(|p| FileLock::shared(p).map_err(io(format!("lock {}", p.display()))))
    .collect::<Result<Vec<_>, _>>()
    .map_err(fatal)?;
    for f in [&prep.binary, &prep.model.path] {
        if !f.is_file() {
            return Err(fatal(EngineError::Io {
                what: format!("{} is gone (collected while starting?)", f.display()),
                err: std::io::ErrorKind::NotFound.into(),
            }));
        }
    }
    let mut cmd = llorch_io::cmd::Cmd::new(&prep.binary)
        .arg("-m")
        .arg(&prep.model.path)
        .args(["--port", &port.to_string()])
        .args(prep.flags.iter());
    if api_key.is_some() {
        cmd = cmd.arg("--api-key-file").arg(&paths.api_key);
    }
    let mut c = cmd.to_std();
    c.env_clear();
    for (k, v) in std::env::vars_os() {
        if k.to_str().is_some_and(env_allowed) {
            c.env(k, v);
        }
    }
    for (k, v) in &prep.env {
        c.env(k, v);
    }
    c.stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| fatal(io("dup log")(e)))?)
        .stderr(log);
    let lease_fds: Vec<i32> = leases.iter().map(|l| l.raw_fd()).collect();
    let detached = matches!(owner, Owner::Detached);
    // SAFETY: only async-signal-safe calls (fcntl, prctl, setsid, setpgid) run in the child before exec.
    unsafe {
        c.pre_exec(move || {
            for fd in &lease_fds {
                let flags = libc::fcntl(*fd, libc::F_GETFD);
                libc::fcntl(*fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            }
            if detached {
                libc::setsid();
            } else {
                libc::setpgid(0, 0);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = c
        .spawn()
        .map_err(|e| fatal(io(format!("start {}", prep.binary.display()))(e)))?;
    drop(leases);
    let pid = child.id();
    let identity = match ProcessIdentity::of(pid) {
        Some(i) => i,
        None => {
            let _ = child.wait();
            return Err(fatal(EngineError::Exited {
                status: "exited at once".into(),
                log: paths.log.display().to_string(),
                tail: llorch_io::tail_lines(&paths.log, 40),
            }));
        }
    };
    let url = format!("http://{}:{port}", url_host(&prep.host));
    let started_at = llorch_io::now_rfc3339();
    let record = RunRecord {
        schema: RUN_SCHEMA,
        pool: prep.pool_id.clone(),
        process: identity.clone(),
        owner: owner.clone(),
        fingerprint: prep.fingerprint.clone(),
        port,
        started_at: started_at.clone(),
    };
    let kill = |child: &mut Child, e: EngineError| {
        terminate_child(child);
        paths.remove_all();
        SpawnFail::Fatal(e)
    };
    if let Err(e) = write_run_file(&paths.pid_file, &serde_json::to_string(&record).unwrap()) {
        return Err(kill(&mut child, e));
    }
    if let Err(e) = wait_ready(
        &mut child,
        &url,
        Duration::from_secs(prep.ready_timeout_s),
        &paths.log,
    ) {
        terminate_child(&mut child);
        let _ = std::fs::remove_file(&paths.pid_file);
        let new_log = read_from(&paths.log, log_start);
        if new_log.contains("couldn't bind") || new_log.contains("Address already in use") {
            return Err(SpawnFail::PortTaken("llama-server could not bind".into()));
        }
        return Err(fatal(e));
    }
    let ready_ms = started.elapsed().as_millis() as u64;
    let mut probe = llorch_io::http::probe_client().get(format!("{url}/metrics"));
    if let Some(k) = api_key {
        probe = probe.bearer_auth(k);
    }
    let metrics_ok = probe
        .send()
        .map(|r| r.status().is_success())
        .unwrap_or(false);
    if !metrics_ok {
        eprintln!("warning: {url}/metrics did not answer 200 (was the engine built without metrics support?)");
    }
    let handoff = Handoff {
        schema: RUN_SCHEMA,
        engine: "llamacpp".into(),
        engine_version: prep.engine_version.clone(),
        provisioning_mode: "source".into(),
        url: url.clone(),
        pool_id: prep.pool_id.clone(),
        replica_id: prep.replica_id.clone(),
        model: prep.model.clone(),
        flags: prep.flags.clone(),
        process: identity.clone(),
        owner: owner.clone(),
        fingerprint: prep.fingerprint.clone(),
        started_at,
        api_key_file: api_key.map(|_| paths.api_key.clone()),
    };
    if let Err(e) = write_run_file(
        &paths.handoff,
        &serde_json::to_string_pretty(&handoff).unwrap(),
    ) {
        return Err(kill(&mut child, e));
    }
    Ok(RunningEngine {
        child,
        identity,
        port,
        url,
        ready_ms,
        paths: paths.clone(),
        metrics_ok,
        api_key: api_key.map(String::from),
    })
}

fn url_host(host: &str) -> String {
    match host {
        "0.0.0.0" => "127.0.0.1".into(),
        "::" => "[::1]".into(),
        h if h.contains(':') => format!("[{h}]"),
        h => h.into(),
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let b = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&b[(offset as usize).min(b.len())..]).into_owned()
}

/// Poll `/health` until 200. Fails early if the child exits.
pub fn wait_ready(
    child: &mut Child,
    url: &str,
    timeout: Duration,
    log: &Path,
) -> Result<(), EngineError> {
    let client = llorch_io::http::probe_client();
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(5);
    let mut last;
    loop {
        if let Some(status) = child.try_wait().map_err(io("wait for llama-server"))? {
            return Err(EngineError::Exited {
                status: status.to_string(),
                log: log.display().to_string(),
                tail: llorch_io::tail_lines(log, 40),
            });
        }
        match client.get(format!("{url}/health")).send() {
            Ok(r) if r.status().as_u16() == 200 => return Ok(()),
            Ok(r) => last = format!("HTTP {}", r.status().as_u16()),
            Err(e) => {
                last = if e.is_connect() {
                    "connection refused".into()
                } else {
                    e.to_string()
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(EngineError::Timeout {
                secs: timeout.as_secs(),
                last,
                log: log.display().to_string(),
            });
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(10));
    }
}

/// Stop our own child: SIGTERM, 5 s, SIGKILL; always reaped.
/// Stop our own child: SIGTERM, up to 5 s, then SIGKILL. std owns the
/// child and is the only one that reaps it (`try_wait`/`wait`), so until it
/// does the pid stays a zombie of ours and cannot be reused: every signal
/// here reaches this engine and no other process.
fn terminate_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        // SAFETY: kill(2) on our unreaped child's pid (it cannot have been reused).
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut pause = Duration::from_millis(1);
        while let Ok(None) = child.try_wait() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
    let _ = child.wait();
}

/// What `stop_pool` did.
#[derive(Debug, PartialEq)]
pub enum Stopped {
    Engine(u32),
    Nothing,
}

/// Stop a pool's detached engine (under the pool lock). A supervised pool is
/// refused: its supervisor would restart the engine; stop the supervisor.
pub fn stop_pool(layout: &Layout, pool: &PoolId) -> Result<Stopped, EngineError> {
    let _lock = lock_pool(layout, pool, || {})?;
    let Some(run) = read_pool(layout, pool) else {
        return Ok(Stopped::Nothing);
    };
    if let Owner::Supervised { .. } = &run.record.owner {
        return Err(run.busy_error());
    }
    run.record.process.stop(Duration::from_secs(5));
    RunPaths::new(layout, pool).remove_all();
    Ok(Stopped::Engine(run.record.process.pid))
}

impl RunningEngine {
    /// Stop this engine (SIGTERM → 5 s → SIGKILL), remove its run files.
    pub fn stop(mut self) {
        terminate_child(&mut self.child);
        remove_run_files(&self.paths, &self.identity);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn profile_with(extra: &[&str], backend: Backend) -> Profile {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut p = Profile::resolve(&root, None).unwrap();
        p.file.server.extra_args = extra.iter().map(|s| s.to_string()).collect();
        p.file.server.threads = 3;
        p.file.engine.backend = backend;
        p
    }

    #[test]
    fn deterministic_profile_is_enforced() {
        let f = server_flags(&profile_with(&[], Backend::Cpu))
            .unwrap()
            .join(" ");
        for want in [
            "--parallel 1",
            "--no-cont-batching",
            "--no-cache-prompt",
            "--jinja",
            "--no-webui",
            "--metrics",
            "--threads 3",
            "--host 127.0.0.1",
            "--n-gpu-layers 0",
        ] {
            assert!(f.contains(want), "{want} missing from {f}");
        }
    }

    #[test]
    fn a_batched_pool_gets_its_slots_continuous_batching_and_their_context() {
        let mut p = profile_with(&[], Backend::Cpu);
        p.file.server.mode = Some(llorch_profile::Mode::Batched);
        p.file.server.slots = Some(4);
        let f = server_flags(&p).unwrap().join(" ");
        for want in ["--parallel 4", "--cont-batching", "--ctx-size 8192"] {
            assert!(f.contains(want), "{want} missing from {f}");
        }
        assert!(!f.contains("--no-cont-batching"), "{f}");
        assert!(!f.contains("--no-cache-prompt"), "{f}");
        // Replicas change nothing in one engine's flags.
        let mut p = profile_with(&[], Backend::Cpu);
        p.file.server.replicas = Some(3);
        assert_eq!(
            server_flags(&p).unwrap(),
            server_flags(&profile_with(&[], Backend::Cpu)).unwrap()
        );
    }

    #[test]
    fn an_embedding_pool_gets_its_pooling() {
        let mut p = profile_with(&[], Backend::Cpu);
        p.file.server.embeddings = true;
        let f = server_flags(&p).unwrap().join(" ");
        assert!(f.contains("--embeddings --pooling mean"), "{f}");
        p.file.server.pooling = Some(llorch_profile::Pooling::Rank);
        let f = server_flags(&p).unwrap().join(" ");
        assert!(f.contains("--embeddings --pooling rank"), "{f}");
        assert!(!server_flags(&profile_with(&[], Backend::Cpu))
            .unwrap()
            .contains(&"--embeddings".to_string()));
    }

    #[test]
    fn gpu_layer_spellings_normalize() {
        for spelling in [
            &["-ngl", "33"][..],
            &["--ngl", "33"],
            &["--gpu-layers", "33"],
            &["--gpu-layers=33"],
        ] {
            let f = server_flags(&profile_with(spelling, Backend::Cuda))
                .unwrap()
                .join(" ");
            assert!(f.contains("--n-gpu-layers 33"), "{f}");
            assert!(!f.contains("-ngl") && !f.contains("--gpu-layers"), "{f}");
        }
        let f = server_flags(&profile_with(&["-ngl", "33"], Backend::Cpu))
            .unwrap()
            .join(" ");
        assert!(f.contains("--n-gpu-layers 0"), "a CPU build forces 0: {f}");
    }

    #[test]
    fn extra_args_are_an_allow_list() {
        for bad in [
            "--parallel",
            "-np",
            "--cont-batching",
            "--webui",
            "--port",
            "-m",
            "-hfr",
            "--docker-repo",
            "--api-key",
        ] {
            let e = server_flags(&profile_with(&[bad, "4"], Backend::Cpu))
                .unwrap_err()
                .to_string();
            assert!(e.contains(bad) && e.contains("enforced profile"), "{e}");
        }
        for unknown in ["--model-draft", "--lora", "--some-future-flag"] {
            let e = server_flags(&profile_with(&[unknown, "x"], Backend::Cpu))
                .unwrap_err()
                .to_string();
            assert!(e.contains("allow-list"), "{e}");
        }
        let ok = server_flags(&profile_with(
            &["--temp", "0.5", "--flash-attn=on", "--no-mmap", "-b", "256"],
            Backend::Cpu,
        ))
        .unwrap()
        .join(" ");
        assert!(
            ok.ends_with("--temp 0.5 --flash-attn on --no-mmap -b 256"),
            "{ok}"
        );
        assert!(server_flags(&profile_with(&["--no-mmap=1"], Backend::Cpu)).is_err());
        assert!(server_flags(&profile_with(&["--temp"], Backend::Cpu)).is_err());
    }

    #[test]
    fn env_policy_keeps_no_secrets() {
        for k in [
            "HF_TOKEN",
            "LLORCH_API_TOKEN",
            "LLAMA_ARG_CONT_BATCHING",
            "AWS_SECRET_ACCESS_KEY",
        ] {
            assert!(!env_allowed(k), "{k}");
        }
        for k in ["PATH", "LC_ALL", "CUDA_VISIBLE_DEVICES"] {
            assert!(env_allowed(k), "{k}");
        }
    }
}
