//! `orchestratord`: serve the v1 API in front of an engine that
//! `cargo xtask provision` started (found through its handoff file).

use anyhow::{Context, Result};
use clap::Parser;
use orchestratord::{Config, HandoffLink};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "llama-orch orchestrator: admission, SSE token streaming, cancel, metrics")]
struct Args {
    /// Handoff file of the engine (default: .runtime/engines/<pool>.json of this workspace)
    #[arg(long)]
    handoff: Option<PathBuf>,
    /// Pool whose handoff to follow
    #[arg(long, default_value = "default")]
    pool: String,
    /// Address to listen on (a non-loopback address needs an API token)
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: std::net::SocketAddr,
    /// Bearer token clients must send (required off loopback)
    #[arg(long, env = "LLORCH_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Tasks that may wait in the queue
    #[arg(long, default_value_t = 64)]
    queue_capacity: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let handoff = match a.handoff {
        Some(h) => h,
        None => llorch_io::paths::Layout::discover()?
            .engines_dir()
            .join(format!("{}.json", a.pool)),
    };
    if !handoff.is_file() {
        eprintln!("warning: {} does not exist yet; start an engine with `cargo xtask provision` (the orchestrator answers 503 until then)", handoff.display());
    }
    let cfg = Config {
        addr: a.addr,
        api_token: a.api_token,
        queue_capacity: a.queue_capacity,
        ..Default::default()
    };
    let srv = orchestratord::start(cfg, Box::new(HandoffLink(handoff.clone())))
        .await
        .context("start orchestratord")?;
    eprintln!(
        "orchestratord listening on http://{} (engine from {})",
        srv.addr,
        handoff.display()
    );
    tokio::signal::ctrl_c().await?;
    eprintln!("draining");
    srv.shutdown(std::time::Duration::from_secs(30)).await;
    Ok(())
}
