//! The engine's sandbox: what a spawned `llama-server` may touch.
//!
//! The engine is C++ compiled from upstream source and fed models and prompts
//! from anywhere; if it is ever exploited it must not have the user's full
//! rights. Without containers and without root, every engine gets, between
//! fork and exec:
//!
//! - resource limits: no core dumps, a bounded number of open files;
//! - `no_new_privs` (no set-user-ID gain, required by the two below);
//! - a Landlock ruleset: read the engine's directory, its one model blob, its
//!   API key file, the system's libraries (`/usr`, `/lib*`, `/opt`) and the
//!   few `/etc` files the loader reads, `/proc` and `/sys`; read and write
//!   `/dev/null` and the GPU's device nodes; execute only its own binary and
//!   the ELF loader; write nothing else. Network (ABI 4): bind its one TCP
//!   port, connect nowhere. Scopes (ABI 6): no signals to, and no abstract
//!   unix sockets of, processes outside the sandbox;
//! - a seccomp deny-list (`EPERM`): ptrace and cross-process memory, mounts
//!   and namespaces, bpf, kexec, modules, perf_event_open, io_uring, keyrings;
//!   socket families other than unix and TCP (no UDP, raw, netlink, packet;
//!   on a unix socket, every family but unix).
//!
//! Everything is prepared in the parent (the ruleset is a file descriptor,
//! the filters are compiled BPF); the child only makes system calls, which is
//! all that is safe between fork and exec. What the kernel supports decides
//! what is on (`auto`); `strict` refuses to start without all of it; `off`
//! applies nothing. [`Protections`] says exactly which parts are active, and
//! `doctor`, the start line and `/v1/capabilities` show it.

use llorch_profile::SandboxMode;
use seccompiler::BpfProgram;
use serde::Serialize;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

mod fs_rules;
pub mod isolate;
mod seccomp;
use fs_rules::{landlock_ruleset, own_proc_access, own_proc_rule};
use isolate::{EngineUser, Privilege};
use seccomp::{seccomp_filters, target_arch};

/// The most open files an engine may hold (it needs one per client
/// connection and a few per model; far below what an exploit would use to
/// exhaust the host).
pub const MAX_OPEN_FILES: u64 = 16_384;

/// What the kernel offers (read once per spawn; cheap system calls).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Support {
    /// Landlock ABI version, 0 when the kernel has no Landlock (or it is off).
    pub landlock_abi: u32,
    /// seccomp filters (`CONFIG_SECCOMP_FILTER`) on an architecture the
    /// filter is compiled for (x86_64, aarch64).
    pub seccomp: bool,
}

impl Support {
    pub fn detect() -> Support {
        // SAFETY: the version query takes no pointer (NULL, 0) and only returns a number.
        let abi = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<u8>(),
                0usize,
                1u32, // LANDLOCK_CREATE_RULESET_VERSION
            )
        };
        // SAFETY: PR_GET_SECCOMP reads this thread's mode; EINVAL without seccomp.
        let seccomp = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) } >= 0;
        Support {
            landlock_abi: u32::try_from(abi).unwrap_or(0),
            seccomp: seccomp && target_arch().is_some(),
        }
    }
}

/// Which protections an engine runs with (the start line, `doctor` and
/// `/v1/capabilities` print this, never a guess).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Protections {
    /// The profile's `server.sandbox`.
    pub mode: String,
    /// The kernel's Landlock ABI (0: none).
    pub landlock_abi: u32,
    /// Landlock file rules (ABI 1).
    pub filesystem: bool,
    /// Landlock TCP rules: bind the one port, connect nowhere (ABI 4).
    pub network: bool,
    /// Landlock device ioctls limited to the GPU nodes (ABI 5).
    pub ioctl: bool,
    /// Landlock scopes: signals and abstract unix sockets stay inside (ABI 6).
    pub scopes: bool,
    /// The seccomp deny-list.
    pub seccomp: bool,
    /// `no_new_privs`.
    pub no_new_privs: bool,
    /// Core dumps off, open files bounded.
    pub rlimits: bool,
    /// It listens on a unix socket and may bind or connect no TCP port.
    #[serde(default)]
    pub unix_socket: bool,
    /// A network namespace of its own, no interface up (root only).
    #[serde(default)]
    pub netns: bool,
    /// The user it runs as when that is not the orchestrator's (root:
    /// [`isolate::ENGINE_USER`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Running as root, why the network namespace or the dedicated user is
    /// not on (each says the fix); empty when not root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_isolated: Vec<String>,
}

/// Where the engine listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// Its one TCP port.
    Tcp(u16),
    /// A unix socket: the file llama-server creates (its directory is the
    /// one place the engine may create a file).
    Unix(PathBuf),
}

/// What root adds, decided before the spawn (see [`isolate`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RootPlan {
    pub privilege: Privilege,
    pub user: Option<EngineUser>,
}

impl RootPlan {
    pub fn detect() -> RootPlan {
        let privilege = Privilege::detect();
        RootPlan {
            privilege,
            user: if privilege.setuid {
                EngineUser::lookup()
            } else {
                None
            },
        }
    }

    /// Whether an engine under `listen` with `server.host` `host` listens
    /// on a unix socket: `unix`, or `auto` where it can have a namespace of
    /// its own (and its host is loopback). The one rule for the spawn and
    /// for what capabilities and `doctor` plan.
    pub fn listens_on_unix(&self, listen: llorch_profile::ListenMode, host: &str) -> bool {
        match listen {
            llorch_profile::ListenMode::Unix => true,
            llorch_profile::ListenMode::Tcp => false,
            llorch_profile::ListenMode::Auto => {
                self.privilege.netns && crate::flags::is_loopback(host)
            }
        }
    }
}

impl Protections {
    /// What an engine started now under `mode` runs with (the kernel's
    /// support; CPU and GPU engines alike).
    pub fn planned(
        mode: SandboxMode,
        listen: llorch_profile::ListenMode,
        host: &str,
    ) -> Protections {
        let root = RootPlan::detect();
        let unix = root.listens_on_unix(listen, host);
        let mut p = Protections::for_support(mode, Support::detect());
        p.isolate(mode, unix, &root, Ok(()));
        p
    }

    /// Add what the listening mode and root give: a unix socket, a network
    /// namespace, the dedicated user (`reach`: whether that user may reach
    /// the engine's files, else why not).
    fn isolate(
        &mut self,
        mode: SandboxMode,
        unix: bool,
        root: &RootPlan,
        reach: Result<(), String>,
    ) {
        self.unix_socket = unix;
        if mode == SandboxMode::Off {
            return;
        }
        let p = root.privilege;
        // A TCP engine needs the host's network: no namespace, by the profile's choice.
        self.netns = unix && p.netns;
        if p.setuid {
            match (&root.user, reach) {
                (Some(u), Ok(())) => self.user = Some(u.name.clone()),
                (Some(u), Err(why)) => self.not_isolated.push(format!(
                    "dedicated user `{}` ({why}: put the cache where that user may read it, LLORCH_CACHE_DIR)",
                    u.name
                )),
                (None, _) => self.not_isolated.push(format!(
                    "dedicated user (no user `{}`: `cargo xtask doctor --install` creates it)",
                    isolate::ENGINE_USER
                )),
            }
        }
    }

    fn for_support(mode: SandboxMode, s: Support) -> Protections {
        if mode == SandboxMode::Off {
            return Protections {
                mode: mode.as_str().into(),
                landlock_abi: s.landlock_abi,
                ..Default::default()
            };
        }
        Protections {
            mode: mode.as_str().into(),
            landlock_abi: s.landlock_abi,
            filesystem: s.landlock_abi >= 1,
            network: s.landlock_abi >= 4,
            ioctl: s.landlock_abi >= 5,
            scopes: s.landlock_abi >= 6,
            seccomp: s.seccomp,
            no_new_privs: true,
            rlimits: true,
            ..Default::default()
        }
    }

    /// Protections this mode wants that are not active, by name.
    pub fn missing(&self) -> Vec<&str> {
        if self.mode == "off" {
            return Vec::new();
        }
        let mut m = Vec::new();
        for (on, what) in [
            (
                self.filesystem,
                "Landlock file rules (Linux 5.13+, `lsm=landlock` at boot)",
            ),
            (self.network, "Landlock network rules (ABI 4, Linux 6.7+)"),
            (
                self.ioctl,
                "Landlock device ioctl rules (ABI 5, Linux 6.10+)",
            ),
            (
                self.scopes,
                "Landlock signal and socket scopes (ABI 6, Linux 6.12+)",
            ),
            (
                self.seccomp,
                "seccomp filters (CONFIG_SECCOMP_FILTER, x86_64 or aarch64)",
            ),
        ] {
            if !on {
                m.push(what);
            }
        }
        m.extend(self.not_isolated.iter().map(String::as_str));
        m
    }

    /// The summary of protections recorded as JSON (a handoff, capabilities).
    pub fn describe(v: &serde_json::Value) -> String {
        serde_json::from_value::<Protections>(v.clone())
            .map(|p| p.summary())
            .unwrap_or_else(|_| "sandbox: not recorded".into())
    }

    /// One line for the start and `doctor`: what is on and what is not.
    pub fn summary(&self) -> String {
        if self.mode == "off" {
            return "sandbox off (server.sandbox: off): the engine runs with your full rights"
                .into();
        }
        let mut on = Vec::new();
        if self.filesystem {
            let mut parts = vec!["files"];
            if self.network {
                parts.push("network");
            }
            if self.ioctl {
                parts.push("ioctl");
            }
            if self.scopes {
                parts.push("scopes");
            }
            on.push(format!(
                "landlock v{} ({})",
                self.landlock_abi,
                parts.join(", ")
            ));
        }
        if self.seccomp {
            on.push("seccomp".into());
        }
        on.push("no_new_privs".into());
        on.push("rlimits".into());
        if self.unix_socket {
            on.push("unix socket, no TCP".into());
        }
        if self.netns {
            on.push("own network namespace".into());
        }
        if let Some(u) = &self.user {
            on.push(format!("user {u}"));
        }
        let missing = self.missing();
        if missing.is_empty() {
            format!("sandbox {}: {}", self.mode, on.join(", "))
        } else {
            format!(
                "sandbox {}: {}; not on: {}",
                self.mode,
                on.join(", "),
                missing.join("; ")
            )
        }
    }
}

/// What one engine needs to reach.
#[derive(Clone, Debug)]
pub struct EngineAccess {
    /// The `llama-server` binary (its directory's parent is readable: `bin/`, `lib/`).
    pub binary: PathBuf,
    /// Single files it reads: the model blob, its API key file.
    pub read_files: Vec<PathBuf>,
    /// Where it listens.
    pub listen: Listen,
    /// The NVIDIA MPS pipe directory the engine's environment names (a
    /// pool's own daemon); `None`: the parent's `CUDA_MPS_PIPE_DIRECTORY`,
    /// else the default.
    pub mps_pipe: Option<PathBuf>,
    /// A GPU build (CUDA): as root, the dedicated user must be able to open
    /// the GPU's device nodes and share the machine's MPS daemon's user.
    pub gpu: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("server.sandbox is `strict` but this kernel lacks: {missing}\n  hint: run the engine on Linux 6.12 or newer with Landlock enabled (`lsm=…,landlock` on the kernel command line), or set `server.sandbox: auto` to start with what this kernel supports (`cargo xtask doctor` lists it)")]
    Strict { missing: String },
    #[error("sandbox: {what}: {err}\n  hint: set `server.sandbox: off` in the profile only to check whether the sandbox is the cause, and report it")]
    Build { what: String, err: String },
}

/// Changes to the sandbox for bisecting a program that fails in it (only
/// `sandbox-probe run` makes them, from `LLORCH_SANDBOX_PROBE_*`).
#[derive(Clone, Debug, Default)]
pub struct Diagnose {
    /// Parts left out: `landlock`, `seccomp`, `nnp` (with both of those),
    /// `net` (Landlock's TCP rules), `scopes` (its signal and abstract socket
    /// scopes), `ioctl` (Landlock's device ioctl rule), `procself` (the
    /// child's own `/proc/<pid>`), `denylist`, `socket`, `clone`, `clone3`
    /// (the seccomp filter's parts).
    pub without: Vec<String>,
    /// Extra directories or files readable, and readable and writable.
    pub read: Vec<PathBuf>,
    pub write: Vec<PathBuf>,
    /// Seccomp logs (the kernel's audit log) instead of refusing.
    pub log_only: bool,
}

impl Diagnose {
    pub fn without(&self, part: &str) -> bool {
        self.without.iter().any(|w| w == part)
    }
}

/// A prepared sandbox: applied to a command with [`Sandbox::apply_to`].
pub struct Sandbox {
    ruleset: Option<OwnedFd>,
    filters: Vec<BpfProgram>,
    nofile: libc::rlim_t,
    /// What the child may do in its own `/proc/<pid>` (0: nothing added;
    /// added in the child: see [`own_proc_rule`]).
    own_proc: u64,
    /// Root only: a network namespace of its own, the user and group to run as.
    netns: bool,
    user: Option<(u32, u32)>,
    pub protections: Protections,
}

/// Whether `user` may reach everything the engine reads (see
/// [`EngineUser::may_reach`]); the socket's directory is made its own.
fn reach(access: &EngineAccess, user: &EngineUser) -> Result<(), String> {
    reach_files(access, user).map_err(|e| e.to_string())?;
    if access.mps_pipe.is_some() {
        return Err(
            "an MPS daemon of the pool's own is run by root, and its clients must share its user"
                .into(),
        );
    }
    if access.gpu {
        let (devices, _) = fs_rules::gpu_paths(access.mps_pipe.as_deref());
        for d in devices.iter().filter(|d| !d.is_dir()) {
            user.may_use_device(d).map_err(|e| e.to_string())?;
        }
        if let Some(daemon) = llorch_io::gpu::mps_control_daemon() {
            use std::os::unix::fs::MetadataExt;
            let owner = fs_err::metadata(format!("/proc/{}", daemon.pid)).map(|m| m.uid());
            if owner.ok() != Some(user.uid) {
                return Err(format!(
                    "the machine's NVIDIA MPS control daemon (pid {}) does not run as {}, and MPS clients must share its user",
                    daemon.pid, user.name
                ));
            }
        }
    }
    Ok(())
}

fn reach_files(access: &EngineAccess, user: &EngineUser) -> Result<(), isolate::Unreachable> {
    user.may_reach(&access.binary, true)?;
    if let Some(dir) = fs_rules::engine_dir(&access.binary) {
        user.may_reach(dir, false)?;
    }
    for f in &access.read_files {
        user.may_reach(f, false)?;
    }
    if let Listen::Unix(sock) = &access.listen {
        if let Some(dir) = sock.parent() {
            // Its directory is chowned to the user; the ones above must be searchable.
            if let Some(run) = dir.parent() {
                user.may_reach(run, false)?;
            }
        }
    }
    Ok(())
}

impl Sandbox {
    /// Prepare the sandbox for `access` under `mode` on this kernel.
    pub fn build(mode: SandboxMode, access: &EngineAccess) -> Result<Sandbox, SandboxError> {
        Sandbox::build_on(
            mode,
            access,
            Support::detect(),
            &RootPlan::detect(),
            &Diagnose::default(),
        )
    }

    /// The sandbox with a bisection's changes (`sandbox-probe run` finds
    /// which rule a failing program needs with this; engines never do).
    pub fn build_diagnostic(
        mode: SandboxMode,
        access: &EngineAccess,
        diagnose: &Diagnose,
    ) -> Result<Sandbox, SandboxError> {
        let mut sandbox = Sandbox::build_on(
            mode,
            access,
            Support::detect(),
            &RootPlan::detect(),
            diagnose,
        )?;
        if diagnose.without("landlock") {
            sandbox.ruleset = None;
        }
        if diagnose.without("seccomp") {
            sandbox.filters.clear();
        }
        if diagnose.without("nnp") && sandbox.ruleset.is_none() && sandbox.filters.is_empty() {
            sandbox.protections.no_new_privs = false;
        }
        Ok(sandbox)
    }

    fn build_on(
        mode: SandboxMode,
        access: &EngineAccess,
        support: Support,
        root: &RootPlan,
        diagnose: &Diagnose,
    ) -> Result<Sandbox, SandboxError> {
        let mut protections = Protections::for_support(mode, support);
        let unix = matches!(access.listen, Listen::Unix(_));
        let reach = match &root.user {
            Some(u) => reach(access, u),
            None => Ok(()),
        };
        protections.isolate(mode, unix, root, reach);
        let missing = protections.missing();
        if mode == SandboxMode::Strict && !missing.is_empty() {
            return Err(SandboxError::Strict {
                missing: missing.join("; "),
            });
        }
        let mut sandbox = Sandbox {
            ruleset: None,
            filters: Vec::new(),
            nofile: 0,
            own_proc: if diagnose.without("procself") {
                0
            } else {
                own_proc_access(support.landlock_abi)
            },
            netns: protections.netns,
            user: match (&protections.user, &root.user) {
                (Some(_), Some(u)) => Some((u.uid, u.gid)),
                _ => None,
            },
            protections,
        };
        if mode == SandboxMode::Off {
            return Ok(sandbox);
        }
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct we pass.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        sandbox.nofile = limit.rlim_max.min(MAX_OPEN_FILES as libc::rlim_t);
        if sandbox.protections.filesystem {
            sandbox.ruleset = Some(landlock_ruleset(access, support.landlock_abi, diagnose)?);
        }
        if sandbox.protections.seccomp {
            sandbox.filters = seccomp_filters(diagnose, unix).map_err(|e| SandboxError::Build {
                what: "compile the seccomp filter".into(),
                err: e,
            })?;
        }
        Ok(sandbox)
    }

    /// The user and group the engine will run as, when not this process's (root).
    pub fn runs_as(&self) -> Option<(u32, u32)> {
        self.user
    }

    /// Apply the sandbox in the child between fork and exec (after any
    /// other `pre_exec` of `c`). The child makes only system calls.
    pub fn apply_to(self, c: &mut std::process::Command) {
        if self.protections.mode == "off" {
            return;
        }
        let no_new_privs = self.protections.no_new_privs;
        let Sandbox {
            ruleset,
            filters,
            nofile,
            own_proc,
            netns,
            user,
            ..
        } = self;
        use std::os::unix::process::CommandExt;
        // SAFETY: only async-signal-safe system calls run in the child
        // (setrlimit, unshare, set*id, prctl, landlock_restrict_self,
        // seccomp); nothing allocates.
        unsafe {
            c.pre_exec(move || {
                let fail = |r: libc::c_long| {
                    if r != 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                };
                let zero = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                let files = libc::rlimit {
                    rlim_cur: nofile,
                    rlim_max: nofile,
                };
                fail(libc::setrlimit(libc::RLIMIT_CORE, &zero) as libc::c_long)?;
                fail(libc::setrlimit(libc::RLIMIT_NOFILE, &files) as libc::c_long)?;
                isolate::enter(netns, user)?;
                if no_new_privs {
                    fail(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long)?;
                }
                if let Some(fd) = &ruleset {
                    if own_proc != 0 {
                        own_proc_rule(fd.as_raw_fd(), own_proc)?;
                    }
                    fail(libc::syscall(
                        libc::SYS_landlock_restrict_self,
                        fd.as_raw_fd(),
                        0u32,
                    ))?;
                }
                for f in &filters {
                    if seccompiler::apply_filter(f).is_err() {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
}

#[cfg(test)]
mod tests;
