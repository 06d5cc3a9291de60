//! The Landlock half of the engine sandbox: which paths an engine may read,
//! write, execute and ioctl, and the one TCP port it binds (none when it
//! listens on a unix socket: then its socket's directory), as a ruleset
//! built in the parent (its file descriptor is all the child needs).

use super::{Diagnose, EngineAccess, Listen, SandboxError};
use landlock::{
    Access, AccessFs, AccessNet, BitFlags, NetPort, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, Scope, ABI,
};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// System directories an engine reads (libraries, loader configuration,
/// process and device information), where they exist.
const READ_DIRS: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/opt",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/vulkan",
    "/etc/OpenCL",
    "/proc",
    "/sys",
];
const READ_FILES: &[&str] = &[
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.preload",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/dev/urandom",
    "/dev/random",
    "/dev/zero",
];
/// ELF loaders (execute right: the kernel opens the interpreter for exec).
const LOADERS: &[&str] = &[
    "/lib64/ld-linux-x86-64.so.2",
    "/lib/ld-linux-aarch64.so.1",
    "/lib/ld-linux-x86-64.so.2",
];

/// GPU device nodes (NVIDIA, DRM render nodes for Vulkan, AMD's KFD), read,
/// written and ioctl'd; `/dev/shm` and the MPS pipe directory where an NVIDIA
/// device is present (CUDA's inter-process state, MPS clients).
pub(super) fn gpu_paths(mps_pipe: Option<&Path>) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut devices = Vec::new();
    let mut shared = Vec::new();
    if let Ok(rd) = fs_err::read_dir("/dev") {
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("nvidia") || name == "dri" || name == "kfd" {
                devices.push(e.path());
            }
        }
    }
    devices.sort();
    if devices
        .iter()
        .any(|d| d.to_string_lossy().contains("nvidia"))
    {
        shared.push(PathBuf::from("/dev/shm"));
        let pipe = mps_pipe
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("CUDA_MPS_PIPE_DIRECTORY").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(llorch_io::gpu::MPS_DEFAULT_PIPE_DIR));
        shared.push(pipe);
    }
    (devices, shared)
}

fn build_err(what: impl Into<String>) -> impl FnOnce(landlock::RulesetError) -> SandboxError {
    let what = what.into();
    move |e| SandboxError::Build {
        what,
        err: e.to_string(),
    }
}

/// Rights on `path`, narrowed to those a file can carry when it is not a directory.
fn rule(path: &Path, rights: BitFlags<AccessFs>, abi: ABI) -> Option<PathBeneath<PathFd>> {
    let fd = PathFd::new(path).ok()?;
    let is_dir = fs_err::metadata(path).map(|m| m.is_dir()).unwrap_or(false);
    let rights = if is_dir {
        rights
    } else {
        rights & AccessFs::from_file(abi)
    };
    Some(PathBeneath::new(fd, rights))
}

/// The directory of an engine's build: `<entry>` of `<entry>/bin/llama-server`,
/// else the binary's own directory; never `/` or a top-level directory (a
/// binary in `/usr/bin` or `/bin` reads its libraries through the system
/// rules, not the whole tree).
pub(super) fn engine_dir(binary: &Path) -> Option<&Path> {
    let parent = binary.parent()?;
    let dir = if parent.file_name().is_some_and(|n| n == "bin") {
        parent.parent()?
    } else {
        parent
    };
    (dir.components().count() > 2).then_some(dir)
}

pub(super) fn landlock_ruleset(
    access: &EngineAccess,
    kernel_abi: u32,
    diagnose: &Diagnose,
) -> Result<OwnedFd, SandboxError> {
    // The newest ABI this code knows what to grant for; the crate narrows it
    // to the kernel's (best effort), and `Protections` reports the kernel's.
    let abi = ABI::V6;
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let exec = AccessFs::ReadFile | AccessFs::Execute;
    let device = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev;
    let scratch = AccessFs::from_all(abi) & !AccessFs::Execute;
    let handled = if diagnose.without("ioctl") {
        AccessFs::from_all(abi) & !AccessFs::IoctlDev
    } else {
        AccessFs::from_all(abi)
    };
    // A rule grants only rights the ruleset handles.
    let device = device & handled;
    let scratch = scratch & handled;
    let net = kernel_abi >= 4 && !diagnose.without("net");
    let mut rs = Ruleset::default()
        .handle_access(handled)
        .map_err(build_err("handle file access"))?;
    if net {
        rs = rs
            .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)
            .map_err(build_err("handle TCP access"))?;
    }
    if kernel_abi >= 6 && !diagnose.without("scopes") {
        rs = rs
            .scope(Scope::AbstractUnixSocket | Scope::Signal)
            .map_err(build_err("scope signals and sockets"))?;
    }
    let mut created = rs.create().map_err(build_err("create the ruleset"))?;
    let mut rules: Vec<PathBeneath<PathFd>> = Vec::new();
    if let Some(dir) = engine_dir(&access.binary) {
        rules.extend(rule(dir, read, abi));
    }
    rules.extend(rule(&access.binary, exec, abi));
    for f in &access.read_files {
        rules.extend(rule(f, read, abi));
    }
    for d in READ_DIRS.iter().chain(READ_FILES) {
        rules.extend(rule(Path::new(d), read, abi));
    }
    for l in LOADERS {
        rules.extend(rule(Path::new(l), exec, abi));
    }
    rules.extend(rule(
        Path::new("/dev/null"),
        AccessFs::ReadFile | AccessFs::WriteFile,
        abi,
    ));
    let (devices, shared) = gpu_paths(access.mps_pipe.as_deref());
    for d in &devices {
        rules.extend(rule(d, device | AccessFs::ReadDir, abi));
    }
    for d in &shared {
        rules.extend(rule(d, scratch, abi));
    }
    if let Listen::Unix(sock) = &access.listen {
        if let Some(dir) = sock.parent() {
            rules.extend(rule(dir, AccessFs::MakeSock.into(), abi));
        }
    }
    for d in &diagnose.read {
        rules.extend(rule(d, read, abi));
    }
    for d in &diagnose.write {
        rules.extend(rule(d, scratch, abi));
    }
    for r in rules {
        created = created.add_rule(r).map_err(build_err("add a file rule"))?;
    }
    if let (true, Listen::Tcp(port)) = (net, &access.listen) {
        created = created
            .add_rule(NetPort::new(*port, AccessNet::BindTcp))
            .map_err(build_err(format!("allow binding port {port}")))?;
    }
    let fd: Option<OwnedFd> = created.into();
    fd.ok_or_else(|| SandboxError::Build {
        what: "create the ruleset".into(),
        err: "the kernel gave no Landlock ruleset".into(),
    })
}

/// `struct landlock_path_beneath_attr` (packed, as the kernel reads it).
#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The rights on its own `/proc/<pid>`: read, write, and truncate where the
/// kernel handles it (ABI 3; `fopen(…, "wb")` truncates).
pub(super) fn own_proc_access(abi: u32) -> u64 {
    const WRITE_FILE: u64 = 1 << 1;
    const READ_FILE: u64 = 1 << 2;
    const READ_DIR: u64 = 1 << 3;
    const TRUNCATE: u64 = 1 << 14;
    let base = WRITE_FILE | READ_FILE | READ_DIR;
    if abi >= 3 {
        base | TRUNCATE
    } else {
        base
    }
}

/// In the child, before `landlock_restrict_self`: let it read and write its
/// own `/proc/<pid>` (its threads' names: CUDA names its threads through
/// `/proc/self/task/<tid>/comm` and fails to initialise when that write is
/// refused; measured on an H100, docs/gpu.md). Only the child knows its pid,
/// so the rule is added here, to the ruleset the parent built (the
/// parent never uses that ruleset again). The `O_PATH` descriptor is left
/// open across exec: it keeps the procfs inode the rule names alive. Only
/// system calls, nothing allocates.
pub(super) fn own_proc_rule(ruleset: std::os::fd::RawFd, access: u64) -> std::io::Result<()> {
    const RULE_PATH_BENEATH: libc::c_long = 1;
    // SAFETY: a constant NUL-terminated path; plain system calls.
    unsafe {
        let fd = libc::open(c"/proc/self".as_ptr(), libc::O_PATH | libc::O_DIRECTORY);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let attr = PathBeneathAttr {
            allowed_access: access,
            parent_fd: fd,
        };
        let r = libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset,
            RULE_PATH_BENEATH,
            &attr as *const PathBeneathAttr,
            0u32,
        );
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
