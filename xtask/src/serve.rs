//! `cargo xtask serve`: provision, supervise the engine, run the
//! orchestrator in the foreground; Ctrl-C drains and stops everything.

use crate::Ctx;
use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct ServeCmd {
    #[command(flatten)]
    p: crate::engine::ProfileArgs,
    /// Orchestrator address (a non-loopback address needs LLORCH_API_TOKEN)
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: std::net::SocketAddr,
    /// Bearer token clients must send (required off loopback)
    #[arg(long, env = "LLORCH_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Tasks that may wait in the queue
    #[arg(long, default_value_t = 64)]
    queue_capacity: usize,
}

impl ServeCmd {
    pub fn run(self, ctx: &Ctx) -> Result<()> {
        let profile = ctx.profile(self.p.profile.as_deref())?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let cfg = orchestratord::Config {
                addr: self.addr,
                api_token: self.api_token.clone(),
                queue_capacity: self.queue_capacity,
                ..Default::default()
            };
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
