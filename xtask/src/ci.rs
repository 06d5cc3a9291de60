//! `cargo xtask ci`: what CI runs. Formatting and lints, then the test
//! servers (an OCI registry) are installed if missing, the default
//! engine and model are made present once (so the tests share them through
//! the cache instead of racing to build), then every test of the workspace.

use crate::Ctx;
use anyhow::{bail, Result};
use clap::Args;
use llorch_io::cmd::Cmd;

#[derive(Args)]
pub struct CiCmd {
    /// Skip `cargo fmt --check`, clippy and the doc check
    #[arg(long)]
    no_lint: bool,
}

fn step(name: &str, cmd: Cmd, root: &std::path::Path) -> Result<()> {
    llorch_io::info!("==> {name}: {cmd}");
    let t = std::time::Instant::now();
    let status = cmd.clone().dir(root).status()?;
    if !status.success() {
        bail!("{name} failed ({status}): `{cmd}`");
    }
    llorch_io::info!("==> {name}: ok in {:.0}s", t.elapsed().as_secs_f64());
    Ok(())
}

/// `cargo` as a command of its own, without the variables `cargo run` gave
/// this process (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, …). A build script
/// that watches one of them (ring's watches `CARGO_MANIFEST_DIR`) would see
/// it change between `cargo xtask ci`'s test build and the user's next
/// `cargo xtask …`, and the two would keep recompiling ring, rustls,
/// reqwest and every crate above them for each other.
pub fn cargo(cargo: &str) -> Cmd {
    without_cargo_run_env(Cmd::new(cargo))
}

fn without_cargo_run_env(c: Cmd) -> Cmd {
    const SET_BY_CARGO_RUN: &[&str] = &[
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_BIN_NAME",
        "CARGO_CRATE_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
    ];
    std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with("CARGO_PKG_") || SET_BY_CARGO_RUN.contains(&k.as_str()))
        .fold(c, |c, k| c.env_remove(k))
}

impl CiCmd {
    pub fn run(self, ctx: &Ctx) -> Result<()> {
        let root = &ctx.layout.root;
        let cargo_exe = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let cargo = || cargo(&cargo_exe);
        disk_report(ctx);
        if !self.no_lint {
            step("fmt", cargo().args(["fmt", "--all", "--", "--check"]), root)?;
            step(
                "clippy",
                cargo().args([
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]),
                root,
            )?;
            // Doc comments that link to what moved or vanished fail here.
            step(
                "doc",
                cargo()
                    .args(["doc", "--workspace", "--no-deps"])
                    .env("RUSTDOCFLAGS", "-D warnings"),
                root,
            )?;
        }
        let xtask = std::env::current_exe()?;
        // Tests never inherit the user's LLORCH_* settings (a cache or
        // runtime directory elsewhere, a token): the engine the tests share is
        // built into this checkout's cache, where every test looks for it.
        // Kept: LLORCH_VERBOSE, and LLORCH_REQUIRE_SANDBOX (CI's: the sandbox
        // tests fail on a kernel that lacks a protection, not skip it).
        let isolated = |c: Cmd| -> Cmd {
            std::env::vars_os()
                .filter_map(|(k, _)| k.into_string().ok())
                .filter(|k| {
                    k.starts_with("LLORCH_")
                        && k != "LLORCH_VERBOSE"
                        && k != "LLORCH_REQUIRE_SANDBOX"
                })
                .fold(c, |c, k| c.env_remove(k))
        };
        // The servers tests start on 127.0.0.1 (an OCI registry): installed
        // through the package manager when missing, as build tools are.
        step(
            "test servers",
            Cmd::new(&xtask).args(["doctor", "--install", "--test-servers"]),
            root,
        )?;
        // The engine the user's own cache holds for the same fingerprint (a
        // `cargo xtask haiku` with LLORCH_CACHE_DIR elsewhere) is copied, checked
        // against its manifest, instead of compiled again.
        let mut engine = isolated(Cmd::new(&xtask).args(["engine", "build"]));
        if let Some(user) = std::env::var_os("LLORCH_CACHE_DIR")
            .map(std::path::PathBuf::from)
            .filter(|d| d.is_dir() && *d != root.join("cache"))
        {
            engine = engine.arg("--reuse-from").arg(user);
        }
        step("engine build (default profile)", engine, root)?;
        step(
            "model fetch (default profile)",
            isolated(Cmd::new(&xtask).args(["model", "fetch"])),
            root,
        )?;
        disk_report(ctx);
        step(
            "tests",
            isolated(cargo().args(["test", "--workspace", "--", "--test-threads", "2"])),
            root,
        )?;
        Ok(())
    }
}

/// What the run needs most besides time is disk: the test binaries, the
/// engine's build tree and the compiler cache. Said up front, so that a
/// linker that dies of a full disk (SIGBUS) is recognised in the log.
fn disk_report(ctx: &Ctx) {
    // Measured on a fresh clone: 2.1 GB of `target/` and 0.6 GB of cache
    // after the whole run; the rest is room for the tests' scratch caches.
    const NEEDED: u64 = 6 << 30;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| ctx.layout.root.join("target"));
    for (what, dir) in [("target", target), ("cache", ctx.layout.cache.clone())] {
        match llorch_io::fsx::free_space(&dir) {
            Ok(free) => {
                let gib = free as f64 / f64::from(1u32 << 30);
                llorch_io::info!("==> disk: {gib:.1} GiB free for {what} ({})", dir.display());
                if free < NEEDED {
                    llorch_io::warn!(
                        "warning: less than {} GiB free at {}: the test binaries, the engine \
                         build and the tests' scratch caches may not fit; a linker killed by \
                         SIGBUS ('ld terminated with signal 7') means the disk filled up",
                        NEEDED >> 30,
                        dir.display()
                    );
                }
            }
            Err(e) => llorch_io::info!("==> disk: free space at {} unknown: {e}", dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cargo_runs_without_what_cargo_run_set_for_this_process() {
        // `cargo test` sets these for the test process as `cargo run` does for xtask.
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
        let env = super::without_cargo_run_env(llorch_io::cmd::Cmd::new("env"))
            .read()
            .unwrap();
        let names: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
        assert!(!names.contains(&"CARGO_MANIFEST_DIR"), "{names:?}");
        assert!(
            !names.iter().any(|n| n.starts_with("CARGO_PKG_")),
            "{names:?}"
        );
        // What the user set stays (the toolchain, the cargo home).
        assert!(names.contains(&"PATH"));
    }
}
