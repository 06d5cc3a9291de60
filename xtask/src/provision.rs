//! `cargo xtask provision`: build, fetch, start detached, wait until ready, write the handoff.

use crate::{print_json, Ctx};
use anyhow::Result;
use clap::Args;
use engine_provisioner::build::BuildOptions;

#[derive(Args)]
pub struct ProvisionCmd {
    #[command(flatten)]
    p: crate::engine::ProfileArgs,
    /// Pool id (default: the profile's `pool`)
    #[arg(long)]
    pool: Option<llorch_types::PoolId>,
}

impl ProvisionCmd {
    pub fn from_profile(p: crate::engine::ProfileArgs, pool: Option<llorch_types::PoolId>) -> Self {
        ProvisionCmd { p, pool }
    }

    pub fn run(self, ctx: &Ctx) -> Result<()> {
        let profile = ctx.profile(self.p.profile.as_deref())?;
        let pool = self.pool.unwrap_or_else(|| profile.pool().clone());
        let opts = BuildOptions {
            report: llorch_io::report::Reporter::quiet_if(self.p.json),
            ..Default::default()
        };
        let out = llorch_stack::provision(&profile, &pool, &ctx.layout, &opts)?;
        if self.p.json {
            return print_json(&out);
        }
        match out.action.as_str() {
            "already_running" => println!(
                "attached: pool {} already runs an engine with the same build, model and flags at {} (pid {}, {})",
                out.pool_id, out.url, out.pid, out.owner
            ),
            a => {
                if !out.changes.is_empty() {
                    println!("{a}: {}", out.changes.join("; "));
                }
                println!(
                    "engine for pool {} ready at {} (pid {}, ready in {} ms)\n  {}\n  handoff: {}\n  log: {}\n  stop it with: cargo xtask engine down --pool {}",
                    out.pool_id,
                    out.url,
                    out.pid,
                    out.ready_ms.unwrap_or(0),
                    sandbox_line(out.sandbox.as_ref()),
                    out.handoff,
                    out.log,
                    out.pool_id
                )
            }
        }
        Ok(())
    }
}

/// The engine's protections, one line (an engine started with the sandbox
/// off was also warned about on stderr when it started).
pub fn sandbox_line(recorded: Option<&serde_json::Value>) -> String {
    recorded
        .map(engine_runtime::sandbox::Protections::describe)
        .unwrap_or_else(|| {
            "sandbox: not recorded (an engine started by an older llama-orch)".into()
        })
}
