//! `server.mps: own`: an NVIDIA Multi-Process Service control daemon of the
//! pool's own, so its engines' kernels share the GPU instead of
//! time-slicing it (measured: four 16-slot engines under MPS gave 2.6× one
//! 64-slot engine on an H100, docs/gpu.md).
//!
//! The daemon's pipe and log directories are under the runtime directory
//! (`mps/<pool>/pipe`, `mps/<pool>/log`); the pool's engines find it through
//! `CUDA_MPS_PIPE_DIRECTORY`. It is started before the engines and stopped
//! after them ([`OwnMps`]'s drop). A daemon that llama-orch did not start —
//! any other pipe directory — is never started over or stopped: the pool is
//! refused, with the daemon's pid and how to use it instead.

use llorch_io::cmd::Cmd;
use llorch_io::gpu::MpsDaemon;
use llorch_io::paths::Layout;
use llorch_types::PoolId;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The MPS control program (on `PATH` with the NVIDIA driver).
pub const MPS_CONTROL: &str = "nvidia-cuda-mps-control";
/// How long the daemon may take to create its control pipe, and to exit.
const DAEMON_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum MpsError {
    #[error("pool {pool}: `mps: own`, but an NVIDIA MPS control daemon llama-orch did not start already runs (pid {pid}, pipe directory {pipe_dir}); llama-orch neither starts a second one nor stops it\n  hint: remove `mps: own` from the profile to let the engines join that daemon (they find it through CUDA_MPS_PIPE_DIRECTORY={pipe_dir}), or stop it first (`echo quit | CUDA_MPS_PIPE_DIRECTORY={pipe_dir} {MPS_CONTROL}`)")]
    Foreign {
        pool: String,
        pid: u32,
        pipe_dir: String,
    },
    #[error("pool {pool}: `mps: own` needs `{MPS_CONTROL}` (NVIDIA's driver utilities), which is not on PATH: {err}\n  hint: install the NVIDIA driver's utilities, or remove `mps: own` from the profile")]
    NotInstalled { pool: String, err: String },
    #[error("pool {pool}: `{MPS_CONTROL} -d` failed: {detail}\n  hint: its log is in {log}")]
    Start {
        pool: String,
        detail: String,
        log: String,
    },
    #[error("pool {pool}: {what} {path}: {err}")]
    Io {
        pool: String,
        what: &'static str,
        path: String,
        err: std::io::Error,
    },
}

/// Whether a daemon other than the one at `ours` serves this machine (the
/// first such, by pid).
pub fn foreign<'a>(daemons: &'a [MpsDaemon], ours: &Path) -> Option<&'a MpsDaemon> {
    daemons.iter().find(|d| Path::new(&d.pipe_dir) != ours)
}

/// The pipe and log directories of `pool`'s own daemon.
pub fn dirs(layout: &Layout, pool: &PoolId) -> (PathBuf, PathBuf) {
    let base = layout.runtime.join("mps").join(pool.as_str());
    (base.join("pipe"), base.join("log"))
}

/// A running MPS control daemon of a pool's own; stopped when dropped.
pub struct OwnMps {
    pool: PoolId,
    pub pipe_dir: PathBuf,
    pub log_dir: PathBuf,
    devices: Vec<u32>,
    pub pid: Option<u32>,
}

impl OwnMps {
    /// Start the pool's daemon for `devices` (empty: every GPU), after
    /// checking that no other daemon serves the machine. A daemon left at
    /// the pool's own pipe directory by an earlier run is stopped first.
    pub fn start(layout: &Layout, pool: &PoolId, devices: &[u32]) -> Result<OwnMps, MpsError> {
        let (pipe_dir, log_dir) = dirs(layout, pool);
        let running = llorch_io::gpu::mps_control_daemons();
        if let Some(d) = foreign(&running, &pipe_dir) {
            return Err(MpsError::Foreign {
                pool: pool.to_string(),
                pid: d.pid,
                pipe_dir: d.pipe_dir.clone(),
            });
        }
        let own = OwnMps {
            pool: pool.clone(),
            pipe_dir,
            log_dir,
            devices: devices.to_vec(),
            pid: None,
        };
        if running
            .iter()
            .any(|d| Path::new(&d.pipe_dir) == own.pipe_dir)
        {
            own.quit();
        }
        for d in [&own.pipe_dir, &own.log_dir] {
            create_private_dir(d).map_err(|err| MpsError::Io {
                pool: pool.to_string(),
                what: "create",
                path: d.display().to_string(),
                err,
            })?;
        }
        let (ok, _, err) =
            own.control()
                .arg("-d")
                .output()
                .map_err(|e| MpsError::NotInstalled {
                    pool: pool.to_string(),
                    err: e.to_string(),
                })?;
        if !ok {
            return Err(MpsError::Start {
                pool: pool.to_string(),
                detail: err.trim().to_string(),
                log: own.log_dir.display().to_string(),
            });
        }
        // Ready once it answers at its pipe directory.
        let started = Instant::now();
        let mut own = own;
        while own.pid.is_none() {
            own.pid = llorch_io::gpu::mps_control_daemons()
                .into_iter()
                .find(|d| Path::new(&d.pipe_dir) == own.pipe_dir)
                .map(|d| d.pid);
            if own.pid.is_none() && started.elapsed() > DAEMON_WAIT {
                return Err(MpsError::Start {
                    pool: pool.to_string(),
                    detail: format!(
                        "no daemon at {} after {}s",
                        own.pipe_dir.display(),
                        DAEMON_WAIT.as_secs()
                    ),
                    log: own.log_dir.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(own)
    }

    /// The environment the pool's engines get (they find the daemon by it).
    pub fn engine_env(&self) -> Vec<(String, String)> {
        vec![(
            "CUDA_MPS_PIPE_DIRECTORY".into(),
            self.pipe_dir.display().to_string(),
        )]
    }

    fn control(&self) -> Cmd {
        let mut c = Cmd::new(MPS_CONTROL)
            .env("CUDA_MPS_PIPE_DIRECTORY", &self.pipe_dir)
            .env("CUDA_MPS_LOG_DIRECTORY", &self.log_dir);
        if !self.devices.is_empty() {
            let list: Vec<String> = self.devices.iter().map(u32::to_string).collect();
            c = c.env("CUDA_VISIBLE_DEVICES", list.join(","));
        }
        c
    }

    /// `quit` to the daemon at this pipe directory; wait until it is gone.
    fn quit(&self) {
        use std::io::Write;
        let child = self.control().spawn_with(|c| {
            c.stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
        });
        if let Ok(mut child) = child {
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(b"quit\n");
            }
            let _ = child.wait();
        }
        let started = Instant::now();
        while llorch_io::gpu::mps_control_daemons()
            .iter()
            .any(|d| Path::new(&d.pipe_dir) == self.pipe_dir)
            && started.elapsed() < DAEMON_WAIT
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for OwnMps {
    fn drop(&mut self) {
        if self.pid.is_some() {
            self.quit();
            llorch_io::info!("pool {}: MPS control daemon stopped", self.pool);
        }
    }
}

/// A directory only its owner may enter (the daemon's pipes are its door).
fn create_private_dir(d: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs_err::create_dir_all(d)?;
    fs_err::set_permissions(d, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_at_another_pipe_directory_is_foreign_and_ours_is_not() {
        let ours = Path::new("/run/llorch/mps/p/pipe");
        let d = |pid, dir: &str| MpsDaemon {
            pid,
            pipe_dir: dir.into(),
        };
        assert!(foreign(&[], ours).is_none());
        assert!(foreign(&[d(7, "/run/llorch/mps/p/pipe")], ours).is_none());
        let system = [
            d(7, "/run/llorch/mps/p/pipe"),
            d(9, llorch_io::gpu::MPS_DEFAULT_PIPE_DIR),
        ];
        assert_eq!(foreign(&system, ours).map(|d| d.pid), Some(9));
        // Another pool's own daemon is foreign to this pool too.
        assert!(foreign(&[d(5, "/run/llorch/mps/q/pipe")], ours).is_some());
    }

    #[test]
    fn without_the_nvidia_tools_own_mps_is_refused_by_name() {
        if Cmd::new(MPS_CONTROL).arg("-h").output().is_ok() {
            return; // an NVIDIA host: the GPU run checks the real daemon (docs/gpu.md)
        }
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout {
            root: dir.path().into(),
            cache: dir.path().join("cache"),
            runtime: dir.path().join("rt"),
        };
        let pool = PoolId::parse("gpu-pool").unwrap();
        let e = OwnMps::start(&layout, &pool, &[0]).err().unwrap();
        let msg = e.to_string();
        assert!(
            msg.contains(MPS_CONTROL) && msg.contains("gpu-pool") && msg.contains("hint:"),
            "{msg}"
        );
    }
}
