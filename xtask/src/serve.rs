//! `cargo xtask serve`: provision, supervise (or attach to) the engines, run
//! the orchestrator in the foreground; SIGINT, SIGTERM or SIGHUP drain and
//! stop everything. Exits non-zero when an engine fails for good.
//!
//! One profile is a stack of one pool; several `--profile`s or `--stack
//! FILE` give one pool each, loaded at start or on demand, unloaded when
//! idle. A pool of one engine that `provision` started is attached to (see
//! `llorch_stack::stack`).

use crate::Ctx;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct ServeCmd {
    /// Profile name (requirements/NAME.yaml) or path; repeat for one pool per profile
    #[arg(long, short)]
    profile: Vec<String>,
    /// A stack file listing pools (profile, load: eager|lazy, idle_unload_s, keep_loaded, devices)
    #[arg(long, conflicts_with = "profile")]
    stack: Option<PathBuf>,
    /// Pool id (one profile only; default: the profile's `pool`)
    #[arg(long)]
    pool: Option<llorch_io::handoff::PoolId>,
    /// At most this many engines loaded at once (replaces the stack's max_loaded)
    #[arg(long)]
    max_loaded: Option<usize>,
    /// Unload a pool's engine after this many seconds without a task, 0 never (replaces the stack's values)
    #[arg(long)]
    idle_unload_s: Option<u64>,
    /// Exact engines serving the pool, each one slot (replaces the profile's server.replicas)
    #[arg(long)]
    replicas: Option<u32>,
    /// exact (one slot per engine, byte-identical results) or batched (N slots, results depend on load)
    #[arg(long)]
    mode: Option<llorch_profile::Mode>,
    /// Parallel slots of a batched engine (with --mode batched)
    #[arg(long)]
    slots: Option<u32>,
    /// How requests are spread over replicas: none (fewest queued + running) or prefix
    #[arg(long)]
    affinity: Option<llorch_profile::Affinity>,
    #[command(flatten)]
    listen: orchestratord::ListenArgs,
}

impl ServeCmd {
    pub fn run(self, ctx: &Ctx) -> Result<()> {
        let cfg = self.listen.config();
        // Refused before anything is built or started.
        cfg.check()?;
        if self.max_loaded == Some(0) {
            bail!("--max-loaded must be at least 1");
        }
        let keys = llorch_profile::ConcurrencyKeys {
            mode: self.mode,
            slots: self.slots,
            replicas: self.replicas,
            affinity: self.affinity,
        };
        let overridden = keys != llorch_profile::ConcurrencyKeys::default();
        if overridden && self.stack.is_some() {
            bail!("--replicas, --mode, --slots and --affinity set one profile's pool; in a stack file, set them per pool");
        }
        // The flags over each profile's server section, checked like the profile.
        let with_keys =
            |mut p: engine_provisioner::Profile| -> Result<engine_provisioner::Profile> {
                let c = keys
                    .over(p.file.server.concurrency_keys())
                    .resolve()
                    .map_err(|(key, m)| anyhow::anyhow!("--{key}: {m}"))?;
                p.file.server.set_concurrency(c);
                Ok(p)
            };
        if self.pool.is_some() && (self.stack.is_some() || self.profile.len() > 1) {
            bail!("--pool names the pool of one profile; a stack file gives each pool its id");
        }
        // One profile is a stack of one pool: every `serve` runs the same way.
        let stack = match &self.stack {
            Some(f) => llorch_profile::stack::Stack::load(f, &ctx.layout.root)?,
            None => {
                let names: Vec<Option<&str>> = if self.profile.is_empty() {
                    vec![None]
                } else {
                    self.profile.iter().map(|p| Some(p.as_str())).collect()
                };
                let mut profiles = names
                    .into_iter()
                    .map(|p| with_keys(ctx.profile(p)?))
                    .collect::<Result<Vec<_>>>()?;
                if let (Some(id), [p]) = (&self.pool, profiles.as_mut_slice()) {
                    p.file.pool = id.clone();
                }
                llorch_profile::stack::Stack::from_profiles(profiles)?
            }
        };
        let opts = llorch_stack::PoolsOptions {
            quiet: false,
            idle_unload_s: self.idle_unload_s,
            max_loaded: self.max_loaded,
            ..Default::default()
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(serve(stack, opts, ctx, cfg))
    }
}

async fn serve(
    stack: llorch_profile::stack::Stack,
    opts: llorch_stack::PoolsOptions,
    ctx: &Ctx,
    cfg: orchestratord::Config,
) -> Result<()> {
    for w in &stack.warnings {
        eprintln!("warning: {w}");
    }
    let ps =
        llorch_stack::start_pools(&stack, &ctx.layout, cfg, &opts, "cargo xtask serve").await?;
    // Caught from here on (not earlier: a stop during the build must stop it
    // at once), before anyone is told where we serve.
    let mut stop = llorch_io::signals::StopSignals::install();
    let n = stack.pools.len();
    println!(
        "serving {n} pool{} at {} (SIGINT/SIGTERM/SIGHUP drain and stop)",
        if n == 1 { "" } else { "s" },
        ps.orchestrator_url()
    );
    for (p, sp) in ps.server.state.heads().zip(&stack.pools) {
        let c = sp.concurrency;
        // A pool of one engine that runs: where it is, and whether it is attached.
        let engine = match ps.links.iter().find(|(id, _)| id == &p.group) {
            Some((_, l)) if c.replicas == 1 => match orchestratord::EngineLink::current(&**l) {
                orchestratord::LinkState::Ready(e) => format!(
                    "; engine {}{}",
                    e.url,
                    if l.is_attached() { ", attached" } else { "" }
                ),
                _ => String::new(),
            },
            _ => String::new(),
        };
        println!(
            "  pool {:<16} {:<9} {} ({}; {} x {} slot(s), {}{}{engine})",
            p.group.as_str(),
            orchestratord::api::group_state(&ps.server.state, &ps.server.state.members(&p.group)),
            p.aliases.join(", "),
            if p.policy.lazy { "lazy" } else { "eager" },
            c.replicas,
            c.slots,
            c.mode.as_str(),
            if c.mode == llorch_profile::Mode::Batched {
                ": results depend on load"
            } else {
                ""
            }
        );
    }
    println!(
        "  try: curl -s {}/v1/chat/completions -H 'content-type: application/json' -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"max_tokens\":16}}'",
        ps.orchestrator_url(),
        stack.pools[0].id
    );
    let outcome = until_stopped(&ps.server.state, &mut stop).await;
    ps.stop(std::time::Duration::from_secs(30)).await;
    eprintln!("stopped");
    if outcome.is_some() {
        bail!("nothing left to serve");
    }
    Ok(())
}

/// Serve until a stop signal (then drain) or until every pool has failed
/// for good (the reasons, one line per pool): `serve` of one pool and of a
/// stack end the same way.
async fn until_stopped(
    st: &orchestratord::AppState,
    stop: &mut llorch_io::signals::StopSignals,
) -> Option<String> {
    let all_failed = async {
        loop {
            if st
                .wait_until(std::time::Duration::from_secs(3600), |s| {
                    s.all_failed().is_some()
                })
                .await
            {
                return st.all_failed().unwrap_or_default();
            }
        }
    };
    tokio::select! {
        sig = stop.recv() => { eprintln!("{sig}: draining (up to 30 s)"); None }
        reason = all_failed => { eprintln!("error: every pool failed and will not be restarted:\n{reason}"); Some(reason) }
    }
}
