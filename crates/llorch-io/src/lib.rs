//! The doors to the outside world, shared by every llama-orch crate.
//!
//! * [`cmd`]: the one way to run a process (logs the command line, scopes
//!   directory and environment, turns failure into an error with the log tail).
//! * [`http`]: the one HTTP client configuration (timeouts, user agent, retry policy).
//! * [`fsx`]: atomic writes, staging directories and advisory locks.
//! * [`digest`]: streaming sha256.
//! * [`paths`]: where the workspace, the cache and the run state live.
//! * [`gpu`]: every `nvidia-smi` reading (memory, compute capability, driver CUDA).
//! * [`llama_server`]: llama-server's own HTTP API (endpoints, keys, `/slots`, `/metrics`).
//! * [`report`]: the one way libraries print (progress, warnings, detail), under `--quiet`/`--verbose`.
//!
//! Tests point these doors at local servers and repositories; nothing else in
//! the workspace opens sockets or spawns build tools on its own.

pub mod cmd;
pub mod digest;
pub mod download;
pub mod fsx;
pub mod gpu;
pub mod handoff;
pub mod http;
pub mod llama_server;
pub mod oci;
pub mod paths;
pub mod report;
pub mod signals;

/// An I/O failure and what was being done: the one shape of every crate's
/// `Io` error variant. File-system calls go through `fs_err` (clippy's
/// `disallowed-methods` enforces it), so `source` already names the path.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct IoError {
    pub what: String,
    pub source: std::io::Error,
}

impl IoError {
    pub fn new(what: impl Into<String>, source: std::io::Error) -> Self {
        Self {
            what: what.into(),
            source,
        }
    }
}

/// `.map_err(io("what was being done"))?` into any error that holds an
/// [`IoError`] (`#[error(transparent)] Io(#[from] IoError)`).
pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> IoError {
    let what = what.into();
    move |source| IoError { what, source }
}

/// Current UTC time as RFC 3339 (`2026-11-25T20:31:02Z`).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Last `n` lines of a text file (lossy UTF-8); empty when unreadable.
pub fn tail_lines(path: &std::path::Path, n: usize) -> String {
    let Ok(bytes) = fs_err::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}
