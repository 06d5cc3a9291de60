//! `cargo xtask haiku`: the end-to-end proof, streamed live (the library
//! `llorch-proof`, called in this process).

use crate::Ctx;
use anyhow::{bail, Result};
use clap::Args;

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
        let profile = ctx.profile(self.p.profile.as_deref())?;
        let pool = self.pool.unwrap_or_else(|| profile.pool().clone());
        let output = if self.p.json {
            llorch_proof::Output::Json
        } else {
            llorch_proof::Output::Live
        };
        if !llorch_proof::cli(&profile, &pool, &ctx.layout, output)? {
            bail!("the haiku proof failed (see the checks above)");
        }
        Ok(())
    }
}
