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
    eprintln!("==> {name}: {cmd}");
    let t = std::time::Instant::now();
    let status = cmd.clone().dir(root).status()?;
    if !status.success() {
        bail!("{name} failed ({status}): `{cmd}`");
    }
    eprintln!("==> {name}: ok in {:.0}s", t.elapsed().as_secs_f64());
    Ok(())
}

impl CiCmd {
    pub fn run(self, ctx: &Ctx) -> Result<()> {
        let root = &ctx.layout.root;
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        disk_report(ctx);
        if !self.no_lint {
            step(
                "fmt",
                Cmd::new(&cargo).args(["fmt", "--all", "--", "--check"]),
                root,
            )?;
            step(
                "clippy",
                Cmd::new(&cargo).args([
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
                Cmd::new(&cargo)
                    .args(["doc", "--workspace", "--no-deps"])
                    .env("RUSTDOCFLAGS", "-D warnings"),
                root,
            )?;
        }
        let exe = std::env::current_exe()?;
        // Tests never inherit the user's LLORCH_* settings (a cache or
        // runtime directory elsewhere, a token): the engine the tests share is
        // built into this checkout's cache, where every test looks for it.
        let isolated = |c: Cmd| -> Cmd {
            std::env::vars_os()
                .filter_map(|(k, _)| k.into_string().ok())
                .filter(|k| k.starts_with("LLORCH_") && k != "LLORCH_VERBOSE")
                .fold(c, |c, k| c.env_remove(k))
        };
        // The servers tests start on 127.0.0.1 (an OCI registry): installed
        // through the package manager when missing, as build tools are.
        step(
            "test servers",
            Cmd::new(&exe).args(["doctor", "--install", "--test-servers"]),
            root,
        )?;
        // The engine the user's own cache holds for the same fingerprint (a
        // `cargo xtask haiku` with LLORCH_CACHE_DIR elsewhere) is copied, checked
        // against its manifest, instead of compiled again.
        let mut engine = isolated(Cmd::new(&exe).args(["engine", "build"]));
        if let Some(user) = std::env::var_os("LLORCH_CACHE_DIR")
            .map(std::path::PathBuf::from)
            .filter(|d| d.is_dir() && *d != root.join("cache"))
        {
            engine = engine.arg("--reuse-from").arg(user);
        }
        step("engine build (default profile)", engine, root)?;
        step(
            "model fetch (default profile)",
            isolated(Cmd::new(&exe).args(["model", "fetch"])),
            root,
        )?;
        disk_report(ctx);
        step(
            "tests",
            isolated(Cmd::new(&cargo).args(["test", "--workspace", "--", "--test-threads", "2"])),
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
                eprintln!("==> disk: {gib:.1} GiB free for {what} ({})", dir.display());
                if free < NEEDED {
                    eprintln!(
                        "warning: less than {} GiB free at {}: the test binaries, the engine \
                         build and the tests' scratch caches may not fit; a linker killed by \
                         SIGBUS ('ld terminated with signal 7') means the disk filled up",
                        NEEDED >> 30,
                        dir.display()
                    );
                }
            }
            Err(e) => eprintln!("==> disk: free space at {} unknown: {e}", dir.display()),
        }
    }
}
