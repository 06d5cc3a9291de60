//! The engine process: deterministic flags, port choice, spawn, readiness,
//! run files, stop.
//!
//! * Flags: the deterministic profile (`--parallel 1 --no-cont-batching
//!   --no-cache-prompt --no-webui --metrics`, fixed `--threads`, the
//!   profile's `--host`) is always applied (a pool declared `mode: batched`
//!   gets `--parallel N --cont-batching`, prompt caching and N times the
//!   context instead; an embedding pool `--embeddings --pooling P`); GPU-layer spellings are normalized to `--n-gpu-layers`,
//!   a CPU build forces 0. `extra_args` is an allow-list ([`ALLOWED_FLAGS`](crate::flags::ALLOWED_FLAGS)):
//!   anything else is refused with the reason.
//! * Environment: the engine gets an allow-listed environment
//!   ([`ENV_ALLOWED`](crate::flags::ENV_ALLOWED)); tokens (`HF_TOKEN`, `LLORCH_API_TOKEN`) and
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
use llorch_io::handoff::{Handoff, Owner, ProcessIdentity, RunRecord, RUN_SCHEMA};
use llorch_io::llama_server::{Api, LlamaServer, UNIX_PREFIX};
use llorch_io::paths::Layout;
use llorch_types::PoolId;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::flags::env_allowed;

mod listen;
use crate::flags::{is_loopback, PreparedEngine};
use crate::run_state::{lock_pool, read_pool, remove_run_files, sweep_stale, RunPaths};
use crate::sandbox::Listen;
use listen::{any_free_port, port_free, socket_path, url_host, with_host};

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
    #[error("the engine socket {path} is {len} bytes long; a unix socket path may have at most {max}\n  hint: set LLORCH_CACHE_DIR to a shorter directory, or `server.listen: tcp` in the profile")]
    SocketPath {
        path: String,
        len: usize,
        max: usize,
    },
    #[error("pool `{pool}` already has an engine (pid {pid}, {owner}) at {url}\n  hint: stop it with `cargo xtask engine down --pool {pool}`{extra}, or use another pool (--pool NAME)")]
    PoolBusy {
        pool: PoolId,
        pid: u32,
        owner: String,
        url: String,
        extra: String,
    },
    #[error(transparent)]
    Io(#[from] llorch_io::IoError),
    #[error(transparent)]
    Dir(#[from] llorch_io::paths::DirError),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

pub(crate) use llorch_io::io;

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
    /// The protections it runs with (see [`crate::sandbox`]).
    pub sandbox: crate::sandbox::Protections,
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
    let unix = crate::sandbox::RootPlan::detect().listens_on_unix(prep.listen, &prep.host);
    if unix {
        let _ = fs_err::remove_file(&paths.api_key);
        let sock = socket_path(layout, &prep.pool_id)?;
        return spawn_on(prep, layout, &paths, &Listen::Unix(sock), owner, None).map_err(
            |e| match e {
                SpawnFail::Bind(why) => EngineError::Exited {
                    status: why,
                    log: paths.log.display().to_string(),
                    tail: llorch_io::tail_lines(&paths.log, 40),
                },
                SpawnFail::Fatal(e) => e,
            },
        );
    }
    let api_key = if is_loopback(&prep.host) {
        let _ = fs_err::remove_file(&paths.api_key);
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
        match spawn_on(
            prep,
            layout,
            &paths,
            &Listen::Tcp(port),
            owner,
            api_key.as_deref(),
        ) {
            Ok(r) => return Ok(r),
            Err(SpawnFail::Bind(why)) => {
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
    use fs_err::os::unix::fs::OpenOptionsExt;
    use std::io::Write;
    let key = format!(
        "llorch-{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    let _ = fs_err::remove_file(path);
    let mut f = fs_err::OpenOptions::new()
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
    /// llama-server said it could not bind (another process took the port).
    Bind(String),
    Fatal(EngineError),
}

fn open_log(path: &Path) -> Result<std::fs::File, EngineError> {
    use fs_err::os::unix::fs::OpenOptionsExt;
    fs_err::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map(std::fs::File::from)
        .map_err(|e| {
            io(format!(
                "open engine log {} (a symlink is refused)",
                path.display()
            ))(e)
            .into()
        })
}

fn write_run_file(path: &Path, json: &str) -> Result<(), EngineError> {
    llorch_io::fsx::write_atomic(path, json.as_bytes())
        .map_err(|e| io(format!("write {}", path.display()))(e).into())
}

fn spawn_on(
    prep: &PreparedEngine,
    layout: &Layout,
    paths: &RunPaths,
    listen: &Listen,
    owner: &Owner,
    api_key: Option<&str>,
) -> Result<RunningEngine, SpawnFail> {
    let fatal = SpawnFail::Fatal;
    let log = open_log(&paths.log).map_err(fatal)?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let leases = take_leases(prep, layout).map_err(fatal)?;
    let sandbox = sandbox_for(prep, paths, listen, api_key).map_err(fatal)?;
    let protections = sandbox.protections.clone();
    if prep.sandbox == llorch_profile::SandboxMode::Off {
        llorch_io::warn!("warning: pool {}: {}", prep.pool_id, protections.summary());
    }
    let started = Instant::now();
    let cmd = engine_command(prep, paths, listen, api_key);
    let mut child = launch(prep, &cmd, sandbox, log, &leases, owner).map_err(fatal)?;
    drop(leases);
    let Some(identity) = ProcessIdentity::of(child.id()) else {
        let _ = child.wait();
        return Err(fatal(EngineError::Exited {
            status: "exited at once".into(),
            log: paths.log.display().to_string(),
            tail: llorch_io::tail_lines(&paths.log, 40),
        }));
    };
    let url = match listen {
        Listen::Tcp(port) => format!("http://{}:{port}", url_host(&prep.host)),
        Listen::Unix(sock) => format!("{UNIX_PREFIX}{}", sock.display()),
    };
    let port = match listen {
        Listen::Tcp(p) => *p,
        Listen::Unix(_) => 0,
    };
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
    let timeout = Duration::from_secs(prep.ready_timeout_s);
    if let Err(e) = wait_ready(&mut child, &url, timeout, &paths.log) {
        terminate_child(&mut child);
        let _ = fs_err::remove_file(&paths.pid_file);
        let new_log = read_from(&paths.log, log_start);
        if new_log.contains("couldn't bind") || new_log.contains("Address already in use") {
            return Err(SpawnFail::Bind(format!("llama-server could not bind: {e}")));
        }
        return Err(fatal(e));
    }
    let ready_ms = started.elapsed().as_millis() as u64;
    let metrics_ok = LlamaServer::new(url.clone(), api_key.map(str::to_string))
        .get_blocking(&llorch_io::http::probe_client(), Api::Metrics)
        .send()
        .is_ok_and(|r| r.status().is_success());
    if !metrics_ok {
        llorch_io::warn!("warning: {url}/metrics did not answer 200 (was the engine built without metrics support?)");
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
        sandbox: serde_json::to_value(&protections).ok(),
    };
    let json = serde_json::to_string_pretty(&handoff).unwrap();
    if let Err(e) = write_run_file(&paths.handoff, &json) {
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
        sandbox: protections,
    })
}

/// The in-use leases (shared locks the engine process inherits, see the
/// module docs) on its build and model, which must still be there.
fn take_leases(prep: &PreparedEngine, layout: &Layout) -> Result<Vec<FileLock>, EngineError> {
    let leases = [
        layout.engine_lock(&prep.fingerprint),
        layout.blob_lock(&prep.model.digest),
    ]
    .iter()
    .map(|p| FileLock::shared(p).map_err(io(format!("lock {}", p.display()))))
    .collect::<Result<Vec<_>, _>>()?;
    for f in [&prep.binary, &prep.model.path] {
        if !f.is_file() {
            return Err(llorch_io::IoError::new(
                format!("{} is gone (collected while starting?)", f.display()),
                std::io::ErrorKind::NotFound.into(),
            )
            .into());
        }
    }
    Ok(leases)
}

/// llama-server's command line: the model, where it listens, the flags, its key.
fn engine_command(
    prep: &PreparedEngine,
    paths: &RunPaths,
    listen: &Listen,
    api_key: Option<&str>,
) -> llorch_io::cmd::Cmd {
    let cmd = llorch_io::cmd::Cmd::new(&prep.binary)
        .arg("-m")
        .arg(&prep.model.path);
    let cmd = match listen {
        Listen::Tcp(port) => cmd
            .args(["--port", &port.to_string()])
            .args(prep.flags.iter()),
        Listen::Unix(sock) => cmd.args(with_host(&prep.flags, &sock.display().to_string())),
    };
    match api_key {
        Some(_) => cmd.arg("--api-key-file").arg(&paths.api_key),
        None => cmd,
    }
}

/// The engine's sandbox; when it runs as another user (root's dedicated
/// one), that user is given its socket's directory and its key file.
fn sandbox_for(
    prep: &PreparedEngine,
    paths: &RunPaths,
    listen: &Listen,
    api_key: Option<&str>,
) -> Result<crate::sandbox::Sandbox, EngineError> {
    let mut read_files = vec![prep.model.path.clone()];
    if api_key.is_some() {
        read_files.push(paths.api_key.clone());
    }
    let sandbox = crate::sandbox::Sandbox::build(
        prep.sandbox,
        &crate::sandbox::EngineAccess {
            binary: prep.binary.clone(),
            read_files,
            listen: listen.clone(),
            mps_pipe: prep
                .env
                .iter()
                .find(|(k, _)| k == "CUDA_MPS_PIPE_DIRECTORY")
                .map(|(_, v)| std::path::PathBuf::from(v)),
            gpu: prep.gpu,
        },
    )?;
    if let Some((uid, gid)) = sandbox.runs_as() {
        let mut own = Vec::new();
        if let Listen::Unix(sock) = listen {
            own.extend(sock.parent().map(Path::to_path_buf));
        }
        if api_key.is_some() {
            own.push(paths.api_key.clone());
        }
        for p in own {
            std::os::unix::fs::chown(&p, Some(uid), Some(gid))
                .map_err(io(format!("chown {}", p.display())))?;
        }
    }
    Ok(sandbox)
}

/// Start the engine: only allowed environment, output to its log, the
/// leases inherited, its own process group (or session, detached), then the
/// sandbox last.
fn launch(
    prep: &PreparedEngine,
    cmd: &llorch_io::cmd::Cmd,
    sandbox: crate::sandbox::Sandbox,
    log: std::fs::File,
    leases: &[FileLock],
    owner: &Owner,
) -> Result<Child, EngineError> {
    let log_out = log.try_clone().map_err(io("dup log"))?;
    let lease_fds: Vec<i32> = leases.iter().map(|l| l.raw_fd()).collect();
    let detached = matches!(owner, Owner::Detached);
    cmd.spawn_with(|c| {
        c.env_clear();
        for (k, v) in std::env::vars_os() {
            if k.to_str().is_some_and(env_allowed) {
                c.env(k, v);
            }
        }
        for (k, v) in &prep.env {
            c.env(k, v);
        }
        c.stdin(Stdio::null()).stdout(log_out).stderr(log);
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
        // Last: the limits, namespace and user, no_new_privs, Landlock and seccomp.
        sandbox.apply_to(c);
    })
    .map_err(|e| io(format!("start {}", prep.binary.display()))(e).into())
}

fn read_from(path: &Path, offset: u64) -> String {
    let b = fs_err::read(path).unwrap_or_default();
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
        match LlamaServer::new(url, None)
            .get_blocking(&client, Api::Health)
            .send()
        {
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

/// Stop our own child and its process group (it leads one: `setpgid` or
/// `setsid` at spawn, so anything it started goes too): SIGTERM, up to 5 s,
/// then SIGKILL. std owns the child and is the only one that reaps it
/// (`try_wait`/`wait`), so until it does the pid stays a zombie of ours and
/// cannot be reused, nor can the group id it leads: every signal here
/// reaches this engine's group and no other process.
fn terminate_child(child: &mut Child) {
    let pid = child.id() as i32;
    if let Ok(None) = child.try_wait() {
        // SAFETY: kill(2) on our unreaped child's group, else the child alone.
        unsafe {
            if libc::kill(-pid, libc::SIGTERM) != 0 {
                libc::kill(pid, libc::SIGTERM);
            }
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut pause = Duration::from_millis(1);
        while let Ok(None) = child.try_wait() {
            if Instant::now() >= deadline {
                // SAFETY: the child is still unreaped: its group id is its own.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
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
