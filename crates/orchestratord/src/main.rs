//! `orchestratord`: serve the v1 API in front of an engine that
//! `cargo xtask provision` started (found through its handoff file).
//! SIGINT, SIGTERM and SIGHUP drain: running tasks finish (up to 30 s), every
//! stream ends with a terminal event.

use anyhow::{Context, Result};
use clap::Parser;
use llorch_types::PoolId;
use orchestratord::HandoffLink;
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "llama-orch orchestrator: admission, SSE token streaming, cancel, metrics")]
struct Args {
    /// Handoff file of the engine (default: .runtime/engines/<pool>.json of this workspace)
    #[arg(long)]
    handoff: Option<PathBuf>,
    /// Pool whose handoff to follow
    #[arg(long, default_value = "default")]
    pool: PoolId,
    #[command(flatten)]
    listen: orchestratord::ListenArgs,
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let handoff = match a.handoff {
        Some(h) => h,
        None => llorch_io::paths::Layout::discover()?.handoff(&a.pool),
    };
    if !handoff.is_file() {
        eprintln!("warning: {} does not exist yet; start an engine with `cargo xtask provision` (the orchestrator answers 503 until then)", handoff.display());
    }
    let srv = orchestratord::start_pools(
        a.listen.config(),
        vec![orchestratord::PoolSpec::new(
            a.pool.clone(),
            Box::new(HandoffLink(handoff.clone())),
        )],
        Default::default(),
    )
    .await
    .context("start orchestratord")?;
    // Caught before anyone is told where we listen.
    let mut stop = llorch_io::signals::StopSignals::install();
    eprintln!(
        "orchestratord listening on http://{} (engine from {})",
        srv.addr,
        handoff.display()
    );
    let sig = stop.recv().await;
    eprintln!("{sig}: draining");
    srv.shutdown(std::time::Duration::from_secs(30)).await;
    Ok(())
}
