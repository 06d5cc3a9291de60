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

impl HaikuCmd {
    pub fn run(self, ctx: &Ctx) -> Result<()> {
        // Resolve the profile here so that a bad name fails before any compile.
        let profile = ctx.profile(self.p.profile.as_deref())?;
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
            .arg(&profile.path)
            .dir(&ctx.layout.root);
        if let Some(pool) = &self.pool {
            cmd = cmd.arg("--pool").arg(pool.as_str());
        }
        if self.p.json {
            cmd = cmd.arg("--json");
        }
        let status = cmd.to_std().status()?;
        if !status.success() {
            bail!("the haiku proof failed ({status})");
        }
        Ok(())
    }
}
