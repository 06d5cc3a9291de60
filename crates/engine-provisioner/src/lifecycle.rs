//! The engine process: deterministic flags, port choice, spawn, readiness,
//! PID file, handoff, stop.
//!
//! * Flags: the deterministic profile (`--parallel 1 --no-cont-batching
//!   --no-webui --metrics`, fixed `--threads`, loopback `--host`) is always
//!   applied; GPU-layer spellings are normalized to `--n-gpu-layers`, a CPU
//!   build forces 0, and profile flags that contradict the enforced ones are
//!   refused.
//! * Readiness: `/health` answers 503 while the model loads and 200 when
//!   ready; we poll it with a short backoff and our own timeout. If the
//!   process exits first we report its status and the log tail; a failed
//!   bind moves on to the next port candidate.
//! * Stop: SIGTERM to the process group, up to 5 s grace, then SIGKILL.
//!
//! Architecture Invariant: a PID file is acted on only if the PID's command
//! line is still `llama-server`; otherwise it is stale and removed.

use crate::profile::{Backend, Profile};
use llorch_io::paths::Layout;
use serde::{Deserialize, Serialize};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("profile flag `{flag}` contradicts the enforced deterministic profile: {why}")]
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
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
    let what = what.into();
    move |err| EngineError::Io { what, err }
}

/// The model as the engine side needs it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EngineModel {
    #[serde(rename = "ref")]
    pub reference: String,
    pub path: PathBuf,
    pub digest: String,
    pub metadata: serde_json::Value,
}

/// Everything needed to start one engine replica.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PreparedEngine {
    pub binary: PathBuf,
    pub model: EngineModel,
    /// Server flags without `-m`, `--port` (chosen at spawn).
    pub flags: Vec<String>,
    pub env: Vec<(String, String)>,
    pub pool_id: String,
    pub replica_id: String,
    pub fingerprint: String,
    pub host: String,
    pub ports: Vec<u16>,
    pub ready_timeout_s: u64,
    pub engine_version: String,
}

const ENFORCED: &[(&[&str], &str)] = &[
    (
        &["--parallel", "-np"],
        "the engine always runs with --parallel 1 (one slot, deterministic)",
    ),
    (
        &["--cont-batching", "-cb"],
        "continuous batching is off (--no-cont-batching) for determinism",
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
        &["-m", "--model", "-mu", "--model-url", "-hf", "--hf-repo"],
        "the model comes from the profile's model section",
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
        if matches!(
            name.as_str(),
            "-ngl" | "--ngl" | "--gpu-layers" | "--n-gpu-layers"
        ) {
            let v = inline.or_else(|| it.next().cloned()).ok_or_else(|| {
                EngineError::ForbiddenFlag {
                    flag: name.clone(),
                    why: "needs a number".into(),
                }
            })?;
            ngl = Some(v.parse().map_err(|_| EngineError::ForbiddenFlag {
                flag: format!("{name} {v}"),
                why: "the layer count must be a number".into(),
            })?);
            continue;
        }
        if let Some((_, why)) = ENFORCED
            .iter()
            .find(|(names, _)| names.contains(&name.as_str()))
        {
            return Err(EngineError::ForbiddenFlag {
                flag: a.clone(),
                why: why.to_string(),
            });
        }
        extra.push(a.clone());
    }
    let ngl = match profile.file.engine.backend {
        Backend::Cpu => 0,
        Backend::Cuda => ngl.unwrap_or(999),
    };
    let mut f: Vec<String> = vec![
        "--host".into(),
        s.host.clone(),
        "--parallel".into(),
        "1".into(),
        "--no-cont-batching".into(),
        "--no-webui".into(),
        "--metrics".into(),
        "--threads".into(),
        threads.to_string(),
        "--ctx-size".into(),
        s.ctx_size.to_string(),
        "--n-gpu-layers".into(),
        ngl.to_string(),
        "--seed".into(),
        s.seed.to_string(),
    ];
    f.extend(extra);
    Ok(f)
}

/// Assemble the engine for a profile from a built binary and a fetched model.
pub fn prepare(
    profile: &Profile,
    binary: &Path,
    fingerprint: &str,
    engine_version: &str,
    model: EngineModel,
) -> Result<PreparedEngine, EngineError> {
    let host = &profile.file.server.host;
    if !is_loopback(host) {
        eprintln!(
            "warning: profile {} binds the engine to {host}, not loopback",
            profile.name
        );
    }
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
        pool_id: profile.pool().to_string(),
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
}

impl RunPaths {
    pub fn new(layout: &Layout, pool: &str) -> RunPaths {
        RunPaths {
            pid_file: layout.run_dir().join(format!("{pool}.pid")),
            log: layout.run_dir().join(format!("llamacpp-{pool}.log")),
            handoff: layout.engines_dir().join(format!("{pool}.json")),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PidFile {
    pub pid: u32,
    pub started_at: String,
    pub fingerprint: String,
    pub port: u16,
}

/// The handoff file other processes (orchestratord) bind to.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Handoff {
    pub engine: String,
    pub engine_version: String,
    pub provisioning_mode: String,
    pub url: String,
    pub pool_id: String,
    pub replica_id: String,
    pub model: EngineModel,
    pub flags: Vec<String>,
    pub pid: u32,
    pub fingerprint: String,
    pub started_at: String,
}

impl Handoff {
    pub fn read(path: &Path) -> Option<Handoff> {
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    }
}

/// A started, ready engine process.
#[derive(Debug)]
pub struct RunningEngine {
    pub child: Child,
    pub pid: u32,
    pub port: u16,
    pub url: String,
    pub ready_ms: u64,
    pub paths: RunPaths,
    pub metrics_ok: bool,
}

/// Whether `pid` is alive and is a llama-server (not a recycled PID).
pub fn is_engine_pid(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let argv0 = c.split(|b| *b == 0).next().unwrap_or(&[]);
            String::from_utf8_lossy(argv0).ends_with("llama-server")
        })
        .unwrap_or(false)
        && !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

/// Remove a PID file whose process is gone or is another program. Returns
/// the live engine PID if the file is valid.
pub fn check_pid_file(paths: &RunPaths) -> Option<PidFile> {
    let text = std::fs::read_to_string(&paths.pid_file).ok()?;
    let pf: Option<PidFile> = serde_json::from_str(&text).ok();
    match pf {
        Some(pf) if is_engine_pid(pf.pid) => Some(pf),
        _ => {
            let _ = std::fs::remove_file(&paths.pid_file);
            let _ = std::fs::remove_file(&paths.handoff);
            None
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

/// How the child relates to us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// Dies with the calling thread's process (supervised, foreground).
    Supervised,
    /// Own session; outlives `provision` until `engine down`.
    Detached,
}

/// Spawn the engine, wait until `/health` is 200, write PID file and handoff.
pub fn spawn(
    prep: &PreparedEngine,
    layout: &Layout,
    attach: Attach,
) -> Result<RunningEngine, EngineError> {
    let paths = RunPaths::new(layout, &prep.pool_id);
    std::fs::create_dir_all(layout.run_dir()).map_err(io("create run dir"))?;
    check_pid_file(&paths);
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
        match spawn_on(prep, &paths, port, attach) {
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

enum SpawnFail {
    PortTaken(String),
    Fatal(EngineError),
}

fn spawn_on(
    prep: &PreparedEngine,
    paths: &RunPaths,
    port: u16,
    attach: Attach,
) -> Result<RunningEngine, SpawnFail> {
    let fatal = SpawnFail::Fatal;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log)
        .map_err(|e| fatal(io(format!("open {}", paths.log.display()))(e)))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut cmd = llorch_io::cmd::Cmd::new(&prep.binary)
        .arg("-m")
        .arg(&prep.model.path)
        .args(["--port", &port.to_string()])
        .args(prep.flags.iter());
    for (k, v) in &prep.env {
        cmd = cmd.env(k, v);
    }
    let mut c = cmd.to_std();
    c.stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| fatal(io("dup log")(e)))?)
        .stderr(log);
    match attach {
        Attach::Supervised => {
            c.process_group(0);
            // SAFETY: prctl is async-signal-safe; runs in the child before exec.
            unsafe {
                c.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        Attach::Detached => {
            // SAFETY: setsid is async-signal-safe; runs in the child before exec.
            unsafe {
                c.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
        }
    }
    let started = Instant::now();
    let mut child = c
        .spawn()
        .map_err(|e| fatal(io(format!("start {}", prep.binary.display()))(e)))?;
    let pid = child.id();
    let url = format!("http://{}:{port}", url_host(&prep.host));
    let started_at = llorch_io::now_rfc3339();
    let pf = PidFile {
        pid,
        started_at: started_at.clone(),
        fingerprint: prep.fingerprint.clone(),
        port,
    };
    let _ = llorch_io::fsx::write_atomic(
        &paths.pid_file,
        serde_json::to_string(&pf).unwrap().as_bytes(),
    );
    match wait_ready(
        &mut child,
        &url,
        Duration::from_secs(prep.ready_timeout_s),
        &paths.log,
    ) {
        Ok(()) => {}
        Err(e) => {
            let _ = std::fs::remove_file(&paths.pid_file);
            terminate_child(&mut child);
            let new_log = read_from(&paths.log, log_start);
            if new_log.contains("couldn't bind") || new_log.contains("Address already in use") {
                return Err(SpawnFail::PortTaken("llama-server could not bind".into()));
            }
            return Err(fatal(e));
        }
    }
    let ready_ms = started.elapsed().as_millis() as u64;
    let metrics_ok = llorch_io::http::probe_client()
        .get(format!("{url}/metrics"))
        .send()
        .map(|r| r.status().is_success())
        .unwrap_or(false);
    if !metrics_ok {
        eprintln!("warning: {url}/metrics did not answer 200 (was the engine built without metrics support?)");
    }
    let handoff = Handoff {
        engine: "llamacpp".into(),
        engine_version: prep.engine_version.clone(),
        provisioning_mode: "source".into(),
        url: url.clone(),
        pool_id: prep.pool_id.clone(),
        replica_id: prep.replica_id.clone(),
        model: prep.model.clone(),
        flags: prep.flags.clone(),
        pid,
        fingerprint: prep.fingerprint.clone(),
        started_at,
    };
    llorch_io::fsx::write_atomic(
        &paths.handoff,
        serde_json::to_string_pretty(&handoff).unwrap().as_bytes(),
    )
    .map_err(|e| fatal(io("write handoff")(e)))?;
    Ok(RunningEngine {
        child,
        pid,
        port,
        url,
        ready_ms,
        paths: paths.clone(),
        metrics_ok,
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

fn terminate_child(child: &mut Child) {
    stop_pid(child.id(), Duration::from_secs(5));
    let _ = child.wait();
}

/// SIGTERM the process group of `pid` (and `pid`), wait up to `grace`, then SIGKILL.
pub fn stop_pid(pid: u32, grace: Duration) -> bool {
    let p = pid as i32;
    // SAFETY: plain signal sends; errors (ESRCH) are fine.
    unsafe {
        libc::kill(-p, libc::SIGTERM);
        libc::kill(p, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe {
        libc::kill(-p, libc::SIGKILL);
        libc::kill(p, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    !alive(pid)
}

fn alive(pid: u32) -> bool {
    // Reap if it is our child; then check existence (zombies count as gone).
    unsafe {
        let mut st = 0;
        libc::waitpid(pid as i32, &mut st, libc::WNOHANG);
    }
    std::path::Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid)
}

/// Stop the pool's engine (from its PID file), remove PID file and handoff.
pub fn stop_pool(layout: &Layout, pool: &str) -> Option<u32> {
    let paths = RunPaths::new(layout, pool);
    let pf = check_pid_file(&paths);
    if let Some(pf) = &pf {
        stop_pid(pf.pid, Duration::from_secs(5));
    }
    let _ = std::fs::remove_file(&paths.pid_file);
    let _ = std::fs::remove_file(&paths.handoff);
    pf.map(|p| p.pid)
}

impl RunningEngine {
    /// Stop this engine (SIGTERM → 5 s → SIGKILL), remove PID file and handoff.
    pub fn stop(mut self) {
        terminate_child(&mut self.child);
        remove_run_files(&self.paths, self.pid);
    }
}

/// Remove PID file and handoff if they still describe `pid`.
pub fn remove_run_files(paths: &RunPaths, pid: u32) {
    let ours = |p: &Path| {
        std::fs::read_to_string(p)
            .map(|t| {
                t.contains(&format!("\"pid\":{pid}")) || t.contains(&format!("\"pid\": {pid}"))
            })
            .unwrap_or(false)
    };
    if ours(&paths.pid_file) {
        let _ = std::fs::remove_file(&paths.pid_file);
    }
    if ours(&paths.handoff) {
        let _ = std::fs::remove_file(&paths.handoff);
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
    fn contradicting_flags_are_refused() {
        for bad in [
            "--parallel",
            "-np",
            "--cont-batching",
            "--webui",
            "--port",
            "-m",
        ] {
            let e = server_flags(&profile_with(&[bad, "4"], Backend::Cpu))
                .unwrap_err()
                .to_string();
            assert!(e.contains(bad) && e.contains("enforced"), "{e}");
        }
        assert!(server_flags(&profile_with(&["--temp", "0.5"], Backend::Cpu)).is_ok());
    }
}
