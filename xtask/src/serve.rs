//! `cargo xtask serve`: provision, supervise (or attach to) the engine, run
//! the orchestrator in the foreground; SIGINT, SIGTERM or SIGHUP drain and
//! stop everything. Exits non-zero when the engine fails for good.

use crate::Ctx;
use anyhow::{bail, Result};
use clap::Args;
use orchestratord::LinkState;

#[derive(Args)]
pub struct ServeCmd {
    #[command(flatten)]
    p: crate::engine::ProfileArgs,
    /// Pool id (default: the profile's `pool`)
    #[arg(long)]
    pool: Option<llorch_io::handoff::PoolId>,
    #[command(flatten)]
    listen: orchestratord::ListenArgs,
}

impl ServeCmd {
    pub fn run(self, ctx: &Ctx) -> Result<()> {
        let profile = ctx.profile(self.p.profile.as_deref())?;
        let pool = self.pool.unwrap_or_else(|| profile.pool().clone());
        let cfg = self.listen.config();
        // Refused before anything is built or started.
        cfg.check()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let stack = llorch_stack::start_stack(&profile, &pool, &ctx.layout, cfg, false, "cargo xtask serve").await?;
            println!(
                "serving {} (pool {pool}) at {} (engine {}; SIGINT/SIGTERM/SIGHUP drain and stop)\n  try: curl -s {}/v1/tasks -H 'content-type: application/json' -d '{{\"prompt\":\"Hello\",\"max_tokens\":16}}'",
                stack.model_ref,
                stack.orchestrator_url(),
                stack.engine_url,
                stack.orchestrator_url()
            );
            let st = stack.server.state.clone();
            let failed = async {
                loop {
                    if let LinkState::Failed(r) = st.link_state() {
                        return r;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            };
            let outcome = tokio::select! {
                sig = llorch_io::signals::wait_for_stop() => { eprintln!("{sig}: draining (up to 30 s)"); None }
                reason = failed => { eprintln!("error: the engine of pool {pool} failed and will not be restarted:\n{reason}"); Some(reason) }
            };
            stack.stop(std::time::Duration::from_secs(30)).await;
            eprintln!("stopped");
            if outcome.is_some() {
                bail!("nothing left to serve");
            }
            anyhow::Ok(())
        })
    }
}
