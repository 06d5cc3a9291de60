//! Run state of a pool, typed: who runs its engine, and how to reach it.
//!
//! * `cache/run/<pool>.pid` ([`RunRecord`]) is written right after the engine
//!   is spawned (before it is ready), so a crash during start-up still leaves
//!   a record to clean up.
//! * `.runtime/engines/<pool>.json` ([`Handoff`]) is written once the engine
//!   is ready; the orchestrator follows it.
//!
//! Both name the engine process by [`ProcessIdentity`]: pid, start time (field
//! 22 of `/proc/<pid>/stat`, clock ticks since boot) and executable. A
//! record is acted on only while all three still match: a recycled pid, or a
//! process that merely has the same name, is never signalled.
//!
//! Run files are parsed as typed JSON; a file that does not parse is stale.

use llorch_types::PoolId;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const RUN_SCHEMA: u32 = 2;

/// Who a process is: pid, start time and executable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`: start time in clock ticks since boot.
    pub start_time: u64,
    pub exe: PathBuf,
}

/// Start time (field 22) and state (field 3) of `pid` from `/proc/<pid>/stat`.
fn stat_of(pid: u32) -> Option<(u64, char)> {
    let s = fs_err::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 is index 19.
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state))
}

fn exe_of(pid: u32) -> Option<PathBuf> {
    let p = fs_err::read_link(format!("/proc/{pid}/exe")).ok()?;
    // A replaced or deleted binary reads as "<path> (deleted)"; it is still that program.
    let s = p.to_string_lossy();
    Some(match s.strip_suffix(" (deleted)") {
        Some(t) => PathBuf::from(t),
        None => p,
    })
}

impl ProcessIdentity {
    /// The identity of a live process, or `None` if it is gone (or a zombie).
    pub fn of(pid: u32) -> Option<ProcessIdentity> {
        let (start_time, state) = stat_of(pid)?;
        if state == 'Z' || state == 'X' {
            return None;
        }
        Some(ProcessIdentity {
            pid,
            start_time,
            exe: exe_of(pid)?,
        })
    }

    pub fn current() -> ProcessIdentity {
        ProcessIdentity::of(std::process::id()).expect("our own /proc entry is readable")
    }

    /// How long the process has run: the system's uptime less its start time
    /// (in clock ticks since boot); `None` if either cannot be read.
    pub fn uptime(&self) -> Option<Duration> {
        let up: f64 = fs_err::read_to_string("/proc/uptime")
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        // SAFETY: sysconf reads a constant of the system.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks <= 0 {
            return None;
        }
        let started = self.start_time as f64 / ticks as f64;
        Some(Duration::from_secs_f64((up - started).max(0.0)))
    }

    /// Whether the process this names is still running (pid, start time and executable all match).
    pub fn is_running(&self) -> bool {
        self.pid > 0 && ProcessIdentity::of(self.pid).as_ref() == Some(self)
    }

    /// A pidfd for this pid (it names that one process even if the pid is
    /// reused later); `None` when the pid is gone or cannot be opened.
    fn pidfd(&self) -> Option<std::os::fd::OwnedFd> {
        use rustix::process::{pidfd_open, Pid, PidfdFlags};
        let pid = Pid::from_raw(i32::try_from(self.pid).ok()?)?;
        pidfd_open(pid, PidfdFlags::empty()).ok()
    }

    /// Send `sig` only if the identity still matches. Uses a pidfd opened
    /// before the check, so the pid cannot be recycled between the check and
    /// the signal.
    pub fn signal(&self, sig: i32) -> bool {
        let (Some(fd), Some(sig)) = (self.pidfd(), rustix::process::Signal::from_named_raw(sig))
        else {
            return false;
        };
        self.is_running() && rustix::process::pidfd_send_signal(&fd, sig).is_ok()
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; true once the process is gone.
    /// Does nothing to a process whose identity does not match.
    pub fn stop(&self, grace: Duration) -> bool {
        if !self.is_running() {
            return true;
        }
        self.signal(libc::SIGTERM);
        if self.wait_gone(grace) {
            return true;
        }
        self.signal(libc::SIGKILL);
        self.wait_gone(Duration::from_secs(5))
    }

    /// Wait until the process has exited, woken by its pidfd (readable once
    /// it has terminated), not by polling. It reaps nothing: this waits for
    /// processes found through run files; a child of ours belongs to its
    /// `std::process::Child`, which reaps it.
    fn wait_gone(&self, within: Duration) -> bool {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let deadline = Instant::now() + within;
        let Some(fd) = self.pidfd() else {
            return !self.is_running();
        };
        loop {
            if !self.is_running() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            let timeout = Timespec::try_from(left).ok();
            if let Ok(n) = poll(&mut fds, timeout.as_ref()) {
                if n > 0 {
                    // Terminated: a zombie until its parent reaps it, which
                    // `is_running` already counts as gone (no executable).
                    return true;
                }
            }
        }
    }
}

/// Who keeps a pool's engine running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Owner {
    /// Started by `provision`; runs until `engine down`.
    Detached,
    /// Started and restarted by a supervisor (`serve`, `engine up --foreground`, `haiku`), which
    /// stops it when it exits.
    Supervised {
        supervisor: ProcessIdentity,
        command: String,
    },
}

impl Owner {
    /// Whether the owner is still there (a detached engine owns itself).
    pub fn is_alive(&self) -> bool {
        match self {
            Owner::Detached => true,
            Owner::Supervised { supervisor, .. } => supervisor.is_running(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Owner::Detached => "started detached by `cargo xtask provision`".into(),
            Owner::Supervised {
                supervisor,
                command,
            } => format!("supervised by `{command}` (pid {})", supervisor.pid),
        }
    }
}

/// `cache/run/<pool>.pid`: the engine process of a pool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRecord {
    pub schema: u32,
    pub pool: PoolId,
    pub process: ProcessIdentity,
    pub owner: Owner,
    pub fingerprint: String,
    pub port: u16,
    pub started_at: String,
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

/// `.runtime/engines/<pool>.json`: what a client of the engine needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handoff {
    pub schema: u32,
    pub engine: String,
    pub engine_version: String,
    pub provisioning_mode: String,
    pub url: String,
    pub pool_id: PoolId,
    pub replica_id: String,
    pub model: EngineModel,
    pub flags: Vec<String>,
    pub process: ProcessIdentity,
    pub owner: Owner,
    pub fingerprint: String,
    pub started_at: String,
    /// File holding the key the engine requires (engines bound off loopback); 0600.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// The protections the engine runs with (`engine_runtime::sandbox::Protections`).
    #[serde(default)]
    pub sandbox: Option<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunFileError {
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("{path}: not a valid run file ({err}); it is stale and will be replaced")]
    Parse { path: String, err: String },
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, RunFileError> {
    let text = match fs_err::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(RunFileError::Io {
                path: path.display().to_string(),
                err,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| RunFileError::Parse {
            path: path.display().to_string(),
            err: e.to_string(),
        })
}

impl RunRecord {
    pub fn read(path: &Path) -> Result<Option<RunRecord>, RunFileError> {
        read_json(path)
    }
}

impl Handoff {
    pub fn read(path: &Path) -> Result<Option<Handoff>, RunFileError> {
        read_json(path)
    }

    /// The engine's API key, if it requires one.
    pub fn api_key(&self) -> Result<Option<String>, RunFileError> {
        let Some(p) = &self.api_key_file else {
            return Ok(None);
        };
        fs_err::read_to_string(p)
            .map(|s| Some(s.trim().to_string()))
            .map_err(|err| RunFileError::Io {
                path: p.display().to_string(),
                err,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_ids() {
        for ok in ["default", "a", "gpu-0", "x_y", &"a".repeat(64)] {
            assert!(PoolId::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "A",
            "-a",
            "_a",
            "a/b",
            "a.b",
            "a b",
            &"a".repeat(65),
            "é",
        ] {
            assert!(PoolId::parse(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<PoolId>("\"../../etc\"").is_err());
        // Replica run ids: only `.r<k>` with k from 1 to 63, on a valid base.
        let p = PoolId::parse("chat").unwrap();
        assert_eq!(p.replica(0), p);
        assert_eq!(p.replica(3).as_str(), "chat.r3");
        assert_eq!(PoolId::parse("chat.r3").unwrap(), p.replica(3));
        assert!(p.replica(3).is_replica() && !p.is_replica());
        assert_eq!(p.replica(63).base(), "chat");
        for bad in [
            "chat.r0", "chat.r64", "chat.r", "chat.r01", ".r1", "a.r1.r2", "a.x1", "A.r1",
        ] {
            assert!(PoolId::parse(bad).is_err(), "{bad}");
        }
    }

    /// `stop` ends a process found by identity: SIGTERM, and SIGKILL after
    /// the grace when SIGTERM is ignored; woken by the pidfd, it reaps
    /// nothing (the `Child` below does), and a stale identity is left alone.
    #[test]
    fn stop_terminates_kills_after_grace_and_spares_another_identity() {
        use crate::cmd::{Cmd, Io};
        let identity_of = |child: &std::process::Child| {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Some(id) = ProcessIdentity::of(child.id()) {
                    return id;
                }
                assert!(Instant::now() < deadline, "no /proc entry");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let mut polite = Cmd::new("sleep")
            .args(["30"])
            .spawn(Io::Null, Io::Null)
            .unwrap();
        let id = identity_of(&polite);
        let mut stale = id.clone();
        stale.start_time += 1;
        assert!(
            !stale.signal(libc::SIGTERM),
            "a stale identity is not signalled"
        );
        assert!(
            id.is_running(),
            "the stale identity's signal reached the process"
        );
        let t = Instant::now();
        assert!(id.stop(Duration::from_secs(10)));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(!polite.wait().unwrap().success());

        let mut stubborn = Cmd::new("sh")
            .args([
                "-c",
                "trap '' TERM; echo trapped; while :; do sleep 1; done",
            ])
            .spawn(Io::Piped, Io::Null)
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(stubborn.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line, "trapped\n", "the trap is set before the signal");
        let id = identity_of(&stubborn);
        let t = Instant::now();
        assert!(id.stop(Duration::from_millis(300)));
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(stubborn.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert!(id.stop(Duration::from_secs(1)), "gone is gone");
    }

    #[test]
    fn identity_of_self_and_of_nothing() {
        let me = ProcessIdentity::current();
        assert!(me.is_running());
        let mut other = me.clone();
        other.start_time += 1;
        assert!(
            !other.is_running(),
            "a different start time is another process"
        );
        let mut other = me.clone();
        other.exe = "/usr/bin/llama-server".into();
        assert!(
            !other.is_running(),
            "a different executable is another process"
        );
        assert!(!other.signal(0), "never signalled");
        assert!(ProcessIdentity::of(u32::MAX - 1).is_none());
    }

    #[test]
    fn uptime_counts_from_the_process_start() {
        let me = ProcessIdentity::current();
        let t0 = std::time::Instant::now();
        let a = me.uptime().expect("our uptime");
        let child = crate::cmd::KillOnDrop(
            crate::cmd::Cmd::new("sleep")
                .arg("30")
                .spawn(crate::cmd::Io::Null, crate::cmd::Io::Null)
                .unwrap(),
        );
        let c = ProcessIdentity::of(child.id()).unwrap().uptime().unwrap();
        // The child started after this process (tick resolution: 10 ms at
        // most), and no later than now.
        assert!(
            c <= a + t0.elapsed() + Duration::from_millis(20),
            "{c:?} {a:?}"
        );
    }

    #[test]
    fn run_records_round_trip_and_garbage_is_stale() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.pid");
        let r = RunRecord {
            schema: RUN_SCHEMA,
            pool: PoolId::parse("p").unwrap(),
            process: ProcessIdentity::current(),
            owner: Owner::Supervised {
                supervisor: ProcessIdentity::current(),
                command: "serve".into(),
            },
            fingerprint: "f".into(),
            port: 1,
            started_at: "t".into(),
        };
        fs_err::write(&p, serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(RunRecord::read(&p).unwrap(), Some(r));
        fs_err::write(&p, "{\"pid\": 1}").unwrap();
        assert!(matches!(
            RunRecord::read(&p),
            Err(RunFileError::Parse { .. })
        ));
        assert_eq!(RunRecord::read(&d.path().join("none")).unwrap(), None);
    }
}
