//! Preflight and `doctor`: which tools a profile needs, which are here (with
//! versions), and how to install the missing ones.
//!
//! The same [`Preflight`] backs `cargo xtask doctor` and the first step of
//! every build, so what doctor says is what the build will find. Tools are
//! looked up on an explicit search path ([`Toolbox`]) so tests can simulate
//! a machine without cmake.

use llorch_io::cmd::Cmd;
use llorch_profile::{Backend, Profile, SourceSpec};
use serde::Serialize;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where tools are looked up.
#[derive(Clone, Debug, Default)]
pub struct Toolbox {
    /// `None` = the process `PATH`.
    pub path: Option<OsString>,
}

impl Toolbox {
    pub fn find(&self, name: &str) -> Option<PathBuf> {
        match &self.path {
            Some(p) => which::which_in(name, Some(p), std::env::current_dir().ok()?).ok(),
            None => which::which(name).ok(),
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PackageManager {
    Pacman,
    AptGet,
    Dnf,
}

impl PackageManager {
    pub fn detect() -> Option<PackageManager> {
        let os = fs_err::read_to_string("/etc/os-release").unwrap_or_default();
        Self::from_os_release(&os)
    }

    pub fn from_os_release(text: &str) -> Option<PackageManager> {
        let mut ids = Vec::new();
        for line in text.lines() {
            if let Some(v) = line
                .strip_prefix("ID=")
                .or_else(|| line.strip_prefix("ID_LIKE="))
            {
                ids.extend(v.trim_matches('"').split_whitespace().map(str::to_string));
            }
        }
        for id in ids {
            match id.as_str() {
                "arch" | "cachyos" | "manjaro" | "endeavouros" => {
                    return Some(PackageManager::Pacman)
                }
                "debian" | "ubuntu" => return Some(PackageManager::AptGet),
                "fedora" | "rhel" | "centos" => return Some(PackageManager::Dnf),
                _ => {}
            }
        }
        None
    }

    /// The package providing `tool` for this manager.
    pub fn package_for(self, tool: &str) -> &'static str {
        use PackageManager::*;
        match (self, tool) {
            (_, "cmake") => "cmake",
            (Pacman, "ninja") => "ninja",
            (_, "ninja") => "ninja-build",
            (Pacman, "cc") | (Pacman, "c++") => "gcc",
            (AptGet, "cc") | (AptGet, "c++") => "build-essential",
            (Dnf, "cc") => "gcc",
            (Dnf, "c++") => "gcc-c++",
            (Pacman, "python3") => "python",
            (Pacman, "pip") => "python-pip",
            (_, "python3") => "python3",
            (_, "pip") => "python3-pip",
            (Pacman, "nvcc") => "cuda",
            (AptGet, "nvcc") => "nvidia-cuda-toolkit",
            (Dnf, "nvcc") => "cuda-toolkit",
            (_, "make") => "make",
            _ => "",
        }
    }

    /// The exact install command (prefixed with `sudo -n` when not root).
    pub fn install_command(self, packages: &[&str], as_root: bool) -> Vec<String> {
        let sudo: Vec<String> = if as_root {
            vec![]
        } else {
            vec!["sudo".into(), "-n".into()]
        };
        let tail: Vec<String> = match self {
            PackageManager::Pacman => ["pacman", "-S", "--needed", "--noconfirm"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            PackageManager::AptGet => ["apt-get", "install", "-y", "--no-install-recommends"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            PackageManager::Dnf => ["dnf", "install", "-y"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        };
        sudo.into_iter()
            .chain(tail)
            .chain(packages.iter().map(|s| s.to_string()))
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            PackageManager::Pacman => "pacman (Arch/CachyOS)",
            PackageManager::AptGet => "apt-get (Debian/Ubuntu)",
            PackageManager::Dnf => "dnf (Fedora)",
        }
    }
}

/// How to install `tool` on each supported distribution (for error messages).
pub fn install_hints(tool: &str) -> String {
    [
        PackageManager::Pacman,
        PackageManager::AptGet,
        PackageManager::Dnf,
    ]
    .iter()
    .map(|pm| {
        let cmd = pm.install_command(&[pm.package_for(tool)], false).join(" ");
        format!("    {}: {}", pm.name(), cmd)
    })
    .collect::<Vec<_>>()
    .join("\n")
}

#[derive(Clone, Debug, Serialize)]
pub struct ToolCheck {
    pub tool: String,
    pub required: bool,
    pub found: Option<String>,
    pub version: Option<String>,
    pub ok: bool,
    pub note: Option<String>,
    /// The command that installs it on this machine (when missing).
    pub install: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Preflight {
    pub profile: String,
    pub backend: Backend,
    pub package_manager: Option<PackageManager>,
    pub checks: Vec<ToolCheck>,
    pub cuda: Option<CudaReport>,
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CudaReport {
    pub nvcc: Option<String>,
    pub nvcc_version: Option<String>,
    pub cuda_root: Option<String>,
    pub host_compiler: Option<String>,
    pub host_compiler_ok: Option<bool>,
    pub gpus_compute_cap: Vec<String>,
    /// An NVIDIA MPS control daemon running here (several engines on one
    /// GPU share its SMs under it, instead of time-slicing).
    pub mps: Option<llorch_io::gpu::MpsDaemon>,
}

impl Preflight {
    pub fn missing_required(&self) -> Vec<&ToolCheck> {
        self.checks.iter().filter(|c| c.required && !c.ok).collect()
    }
    pub fn tool(&self, name: &str) -> Option<&ToolCheck> {
        self.checks.iter().find(|c| c.tool == name && c.ok)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("missing build tools for profile `{profile}`: {tools}\n{detail}")]
    Missing {
        profile: String,
        tools: String,
        detail: String,
    },
    #[error("installing {packages} with `{cmd}` failed: {source}")]
    InstallFailed {
        packages: String,
        cmd: String,
        source: Box<llorch_io::cmd::CmdError>,
    },
}

fn version_of(path: &Path, arg: &str) -> Option<String> {
    Cmd::new(path).arg(arg).read_any().ok().map(|(_, out)| out)
}

/// Parse the first `X.Y[.Z]` in text.
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    for word in text.split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')') {
        let w = word.trim_start_matches('V').trim_start_matches('v');
        let parts: Vec<&str> = w.split('.').collect();
        if parts.len() >= 2 {
            let nums: Vec<Option<u32>> = parts
                .iter()
                .take(3)
                .map(|p| {
                    p.split(|c: char| !c.is_ascii_digit())
                        .next()
                        .and_then(|d| d.parse().ok())
                })
                .collect();
            if let (Some(Some(a)), Some(Some(b))) = (nums.first(), nums.get(1)) {
                let c = nums.get(2).copied().flatten().unwrap_or(0);
                return Some((*a, *b, c));
            }
        }
    }
    None
}

pub fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Check everything `profile` needs. Never installs anything.
pub fn check(profile: &Profile, tb: &Toolbox) -> Preflight {
    let pm = PackageManager::detect();
    let mut checks = Vec::new();
    let mut warnings = Vec::new();
    let install_for = |tool: &str| -> Option<String> {
        pm.map(|pm| {
            pm.install_command(&[pm.package_for(tool)], is_root())
                .join(" ")
        })
    };

    checks.push(cmake_check(tb, &install_for));

    // C and C++ compilers: $CC/$CXX, else cc/gcc/clang.
    for (tool, env, candidates) in [
        ("cc", "CC", ["cc", "gcc", "clang"]),
        ("c++", "CXX", ["c++", "g++", "clang++"]),
    ] {
        let from_env = std::env::var(env).ok().filter(|s| !s.is_empty());
        let found = match &from_env {
            Some(c) => tb.find(c),
            None => candidates.iter().find_map(|c| tb.find(c)),
        };
        let version = found
            .as_ref()
            .and_then(|p| version_of(p, "--version"))
            .map(|s| first_line(&s));
        checks.push(ToolCheck {
            tool: tool.into(),
            required: true,
            ok: found.is_some(),
            found: found.map(|p| p.display().to_string()),
            version,
            note: from_env.map(|c| format!("from ${env}={c}")),
            install: None,
        });
    }
    for c in checks
        .iter_mut()
        .filter(|c| !c.ok && (c.tool == "cc" || c.tool == "c++"))
    {
        c.install = install_for(&c.tool);
    }

    checks.extend(generator_checks(tb, &install_for));

    checks.extend(python_checks(profile, tb, &install_for));

    let cuda = (profile.file.engine.backend == Backend::Cuda).then(|| {
        let report = crate::cuda::probe(tb, &profile.file.engine.cuda_archs, &mut warnings);
        checks.push(ToolCheck {
            tool: "nvcc".into(),
            required: true,
            ok: report.nvcc.is_some(),
            found: report.nvcc.clone(),
            version: report.nvcc_version.clone(),
            note: report.cuda_root.as_ref().map(|r| format!("CUDA root {r}")),
            install: report.nvcc.is_none().then(|| install_for("nvcc")).flatten(),
        });
        report
    });

    Preflight {
        profile: profile.name.clone(),
        backend: profile.file.engine.backend,
        package_manager: pm,
        checks,
        cuda,
        warnings,
    }
}

/// cmake 3.14 or newer.
fn cmake_check(tb: &Toolbox, install_for: &dyn Fn(&str) -> Option<String>) -> ToolCheck {
    // cmake >= 3.14
    let cmake = tb.find("cmake");
    let (ok, version, note) = match &cmake {
        Some(p) => {
            let v = version_of(p, "--version").map(|s| first_line(&s));
            let parsed = v.as_deref().and_then(parse_version);
            match parsed {
                Some(ver) if ver >= (3, 14, 0) => (true, v, None),
                Some(_) => (
                    false,
                    v,
                    Some("cmake 3.14 or newer is required".to_string()),
                ),
                None => (
                    false,
                    v,
                    Some("could not read the cmake version".to_string()),
                ),
            }
        }
        None => (false, None, None),
    };
    ToolCheck {
        tool: "cmake".into(),
        required: true,
        found: cmake.map(|p| p.display().to_string()),
        version,
        ok,
        note,
        install: (!ok).then(|| install_for("cmake")).flatten(),
    }
}

/// The generator: ninja, else make.
fn generator_checks(tb: &Toolbox, install_for: &dyn Fn(&str) -> Option<String>) -> Vec<ToolCheck> {
    let mut out = Vec::new();
    // Generator: ninja, else make.
    let ninja = tb.find("ninja");
    let make = tb.find("make");
    let ninja_version = ninja.as_ref().and_then(|p| version_of(p, "--version"));
    out.push(ToolCheck {
        tool: "ninja".into(),
        required: make.is_none(),
        ok: ninja.is_some(),
        found: ninja.as_ref().map(|p| p.display().to_string()),
        version: ninja_version.map(|s| first_line(&s)),
        note: (ninja.is_none() && make.is_some())
            .then(|| "optional: make will be used instead (slower incremental builds)".into()),
        install: ninja.is_none().then(|| install_for("ninja")).flatten(),
    });
    if ninja.is_none() {
        out.push(ToolCheck {
            tool: "make".into(),
            required: false,
            ok: make.is_some(),
            found: make.as_ref().map(|p| p.display().to_string()),
            version: make
                .as_ref()
                .and_then(|p| version_of(p, "--version"))
                .map(|s| first_line(&s)),
            note: None,
            install: None,
        });
    }

    out
}

/// python3 and pip, required for registry sources and `pypi:` model refs.
fn python_checks(
    profile: &Profile,
    tb: &Toolbox,
    install_for: &dyn Fn(&str) -> Option<String>,
) -> Vec<ToolCheck> {
    let mut out = Vec::new();
    // python3 + pip for registry sources (and `pypi:` model refs).
    let needs_pip = matches!(profile.pin.source, SourceSpec::PypiSdist { .. })
        || profile
            .file
            .model
            .as_ref()
            .is_some_and(|m| m.reference.starts_with("pypi:"));
    let py = tb.find("python3");
    let pip_version = py.as_ref().and_then(|p| {
        Cmd::new(p)
            .args(["-m", "pip", "--version"])
            .read()
            .ok()
            .map(|s| first_line(&s))
    });
    out.push(ToolCheck {
        tool: "python3".into(),
        required: needs_pip,
        ok: py.is_some(),
        found: py.as_ref().map(|p| p.display().to_string()),
        version: py
            .as_ref()
            .and_then(|p| version_of(p, "--version"))
            .map(|s| first_line(&s)),
        note: None,
        install: py.is_none().then(|| install_for("python3")).flatten(),
    });
    out.push(ToolCheck {
        tool: "pip".into(),
        required: needs_pip,
        ok: pip_version.is_some(),
        found: pip_version.as_ref().map(|_| "python3 -m pip".to_string()),
        version: pip_version.clone(),
        note: None,
        install: pip_version.is_none().then(|| install_for("pip")).flatten(),
    });

    out
}

/// Check, install what is missing when the profile allows it, check again.
pub fn ensure(
    profile: &Profile,
    tb: &Toolbox,
    log: impl Fn(&str),
) -> Result<Preflight, PreflightError> {
    let pf = check(profile, tb);
    let missing: Vec<String> = pf
        .missing_required()
        .iter()
        .map(|c| c.tool.clone())
        .collect();
    if missing.is_empty() {
        return Ok(pf);
    }
    let pm = pf.package_manager;
    if profile.file.allow_package_installs && tb.path.is_none() {
        if let Some(pm) = pm {
            let pkgs: Vec<&str> = missing
                .iter()
                .map(|t| pm.package_for(t))
                .filter(|p| !p.is_empty())
                .collect();
            if !pkgs.is_empty() {
                install(pm, &pkgs, &log)?;
                let pf = check(profile, tb);
                if pf.missing_required().is_empty() {
                    return Ok(pf);
                }
                return Err(missing_error(profile, &pf));
            }
        }
    }
    Err(missing_error(profile, &pf))
}

/// Install packages through the detected package manager (as root, or `sudo -n`).
pub fn install(
    pm: PackageManager,
    pkgs: &[&str],
    log: &impl Fn(&str),
) -> Result<(), PreflightError> {
    let root = is_root();
    let argv = pm.install_command(pkgs, root);
    let fail = |cmd: &[String], source| PreflightError::InstallFailed {
        packages: pkgs.join(" "),
        cmd: cmd.join(" "),
        source,
    };
    if pm == PackageManager::AptGet {
        let mut upd: Vec<String> = if root {
            vec![]
        } else {
            vec!["sudo".into(), "-n".into()]
        };
        upd.extend(["apt-get".into(), "update".into(), "-q".into()]);
        log(&format!("installing {}: {}", pkgs.join(" "), upd.join(" ")));
        Cmd::new(&upd[0])
            .args(&upd[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .read()
            .map_err(|e| fail(&upd, Box::new(e)))?;
    }
    log(&format!(
        "installing {}: {}",
        pkgs.join(" "),
        argv.join(" ")
    ));
    Cmd::new(&argv[0])
        .args(&argv[1..])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .read()
        .map_err(|e| fail(&argv, Box::new(e)))?;
    Ok(())
}

fn missing_error(profile: &Profile, pf: &Preflight) -> PreflightError {
    let missing = pf.missing_required();
    let mut detail = String::new();
    for c in &missing {
        let why = c.note.clone().unwrap_or_else(|| "not found on PATH".into());
        detail.push_str(&format!("  {}: {why}\n", c.tool));
        match &c.install {
            Some(cmd) if c.tool != "nvcc" => {
                detail.push_str(&format!("    install it with: {cmd}\n"))
            }
            // The CUDA toolkit's package differs most between distributions: show them all.
            _ => detail.push_str(&format!(
                "    install it with one of:\n{}\n",
                install_hints(&c.tool)
            )),
        }
    }
    if !profile.file.allow_package_installs {
        detail.push_str(&format!(
            "  (automatic installs are off: set `allow_package_installs: true` in {} to let llama-orch run this for you)",
            profile.path.display()
        ));
    }
    PreflightError::Missing {
        profile: profile.name.clone(),
        tools: missing
            .iter()
            .map(|c| c.tool.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        detail: detail.trim_end().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_detection() {
        assert_eq!(
            PackageManager::from_os_release("ID=cachyos\nID_LIKE=arch\n"),
            Some(PackageManager::Pacman)
        );
        assert_eq!(
            PackageManager::from_os_release("ID=debian\n"),
            Some(PackageManager::AptGet)
        );
        assert_eq!(
            PackageManager::from_os_release("ID=pop\nID_LIKE=\"ubuntu debian\"\n"),
            Some(PackageManager::AptGet)
        );
        assert_eq!(
            PackageManager::from_os_release("ID=fedora\n"),
            Some(PackageManager::Dnf)
        );
        assert_eq!(PackageManager::from_os_release("ID=plan9\n"), None);
    }

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("cmake version 3.25.1"), Some((3, 25, 1)));
        assert_eq!(
            parse_version("Cuda compilation tools, release 12.4, V12.4.131"),
            Some((12, 4, 0))
        );
        assert_eq!(
            parse_version("gcc (Debian 12.2.0-14) 12.2.0"),
            Some((12, 2, 0))
        );
    }

    #[test]
    fn install_commands() {
        let pm = PackageManager::Pacman;
        assert_eq!(
            pm.install_command(&["cmake"], true).join(" "),
            "pacman -S --needed --noconfirm cmake"
        );
        let pm = PackageManager::AptGet;
        assert_eq!(
            pm.install_command(&["ninja-build"], false).join(" "),
            "sudo -n apt-get install -y --no-install-recommends ninja-build"
        );
    }
}
