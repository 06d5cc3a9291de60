//! `cargo xtask serve`: provision, supervise the engine, run the
//! orchestrator in the foreground; Ctrl-C drains and stops everything.

use crate::Ctx;
use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct ServeCmd {
    #[command(flatten)]
    p: crate::engine::ProfileArgs,
    #[command(flatten)]
    listen: orchestratord::ListenArgs,
}

impl ServeCmd {
    pub fn run(self, ctx: &Ctx) -> Result<()> {
        let profile = ctx.profile(self.p.profile.as_deref())?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let cfg = self.listen.config();
            let stack = test_harness_e2e_haiku::start_stack(&profile, &ctx.layout, cfg, false).await?;
            println!(
                "serving {} at {} (engine {} supervised; Ctrl-C drains and stops everything)\n  try: curl -s {}/v1/tasks -d '{{\"prompt\":\"Hello\",\"max_tokens\":16}}'",
                stack.model_ref,
                stack.orchestrator_url(),
                stack.engine_url,
                stack.orchestrator_url()
            );
            tokio::signal::ctrl_c().await?;
            eprintln!("draining: no new tasks; waiting for running ones (up to 30 s)");
            stack.server.shutdown(std::time::Duration::from_secs(30)).await;
            tokio::task::spawn_blocking(move || stack.supervisor.stop()).await?;
            eprintln!("stopped");
            anyhow::Ok(())
        })
    }
}
