//! `cargo xtask haiku`: the end-to-end proof, streamed live. The proof lives
//! in the e2e crate (`tests/e2e-haiku`), which the CLI does not depend on:
//! this runs its `llorch-haiku` binary through cargo, with the same profile.

use crate::Ctx;
use anyhow::{bail, Result};
use clap::Args;
use llorch_io::cmd::Cmd;

#[derive(Args)]
pub struct HaikuCmd {
    #[command(flatten)]
    p: crate::engine::ProfileArgs,
    /// Base pool id: the proof runs under `<pool>-haiku` (default: the profile's `pool`)
    #[arg(long)]
    pool: Option<llorch_io::handoff::PoolId>,
}

/// The proof's command (`cargo run` of `llorch-haiku` with `profile`), with
/// the user's environment rather than the one cargo sets for xtask.
pub fn proof_cmd(root: &std::path::Path, profile: &std::path::Path) -> Cmd {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Cmd::new(cargo)
        .args([
            "run",
            "-q",
            "-p",
            "test-harness-e2e-haiku",
            "--bin",
            "llorch-haiku",
            "--",
        ])
        .arg("--profile")
        .arg(profile)
        .dir(root);
    // `cargo xtask` runs us with the variables cargo sets for a package
    // (CARGO_MANIFEST_DIR, CARGO_PKG_*, …). Passed on, they change the
    // environment that build scripts (ring's) declared, so the inner cargo
    // rebuilt ring, rustls and reqwest, and the next `cargo xtask` rebuilt
    // them back: ~14 crates twice per run. Give the inner cargo the user's
    // environment instead.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || matches!(
                k.as_ref(),
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd = cmd.env_remove(k.as_ref());
        }
    }
    cmd
}

impl HaikuCmd {
    pub fn run(self, ctx: &Ctx) -> Result<()> {
        // Resolve the profile here so that a bad name fails before any compile.
        let profile = ctx.profile(self.p.profile.as_deref())?;
        let mut cmd = proof_cmd(&ctx.layout.root, &profile.path);
        if let Some(pool) = &self.pool {
            cmd = cmd.arg("--pool").arg(pool.as_str());
        }
        if self.p.json {
            cmd = cmd.arg("--json");
        }
        let status = cmd.status()?;
        if !status.success() {
            bail!("the haiku proof failed ({status})");
        }
        Ok(())
    }
}
