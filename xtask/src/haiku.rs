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
    pool: Option<llorch_types::PoolId>,
    /// Prove an orchestrator that runs already (an unpacked image's) instead: its URL
    /// (the token from LLORCH_API_TOKEN); needs --handoff
    #[arg(long, requires = "handoff", value_name = "URL")]
    against: Option<String>,
    /// The handoff file of the engine behind --against (`<runtime>/engines/<pool>.json`)
    #[arg(long, requires = "against", value_name = "FILE")]
    handoff: Option<std::path::PathBuf>,
}

impl HaikuCmd {
    pub fn run(self, ctx: &Ctx) -> Result<()> {
        if let (Some(url), Some(h)) = (&self.against, &self.handoff) {
            let output = if self.p.json {
                llorch_proof::Output::Json
            } else {
                llorch_proof::Output::Live
            };
            let token = std::env::var("LLORCH_API_TOKEN").ok();
            if !llorch_proof::cli_running(url, h, token, output)? {
                bail!("the haiku proof failed (see the checks above)");
            }
            return Ok(());
        }
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
