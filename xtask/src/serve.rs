//! `cargo xtask serve`: provision, supervise (or attach to) the engines, run
//! the orchestrator in the foreground; SIGINT, SIGTERM or SIGHUP drain and
//! stop everything. Exits non-zero when an engine fails for good.
//!
//! One profile is a stack of one pool; several `--profile`s or `--stack
//! FILE` give one pool each, loaded at start or on demand, unloaded when
//! idle. A pool of one engine that `provision` started is attached to (see
//! `llorch_stack::stack`).

use crate::Ctx;
use anyhow::{bail, Context, Result};
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
    pool: Option<llorch_types::PoolId>,
    /// At most this many engines loaded at once (replaces the stack's max_loaded)
    #[arg(long)]
    max_loaded: Option<usize>,
    /// Unload a pool's engine after this many seconds without a task, 0 never (replaces the stack's values)
    #[arg(long)]
    idle_unload_s: Option<u64>,
    /// Engines serving the pool (replaces the profile's server.replicas); batched pools: a number or auto
    #[arg(long)]
    replicas: Option<llorch_profile::Count>,
    /// exact (one slot per engine, byte-identical results) or batched (N slots, results depend on load)
    #[arg(long)]
    mode: Option<llorch_profile::Mode>,
    /// Parallel slots of a batched engine (with --mode batched): a number or auto
    #[arg(long)]
    slots: Option<llorch_profile::Count>,
    /// How requests are spread over replicas: none (fewest queued + running) or prefix
    #[arg(long)]
    affinity: Option<llorch_profile::Affinity>,
    /// Serve the pool baked into this container image (its entrypoint): the engine from
    /// $LLORCH_ROOT/prebuilt, the model at $LLORCH_MODEL checked against the digest the image
    /// expects, on 0.0.0.0:$PORT with the token from LLORCH_API_TOKEN or LLORCH_API_TOKEN_FILE
    #[arg(long)]
    in_image: bool,
    #[command(flatten)]
    listen: orchestratord::ListenArgs,
}

/// One or more profiles (one pool each), or a stack file, as a stack; with
/// `keys`, the concurrency flags and `--pool` of a one-profile `serve`.
pub fn stack_from(
    ctx: &Ctx,
    profiles: &[String],
    stack: Option<&std::path::Path>,
    keys: Option<(
        &llorch_profile::ConcurrencyKeys,
        Option<&llorch_types::PoolId>,
    )>,
) -> Result<llorch_profile::stack::Stack> {
    if let Some(f) = stack {
        return Ok(llorch_profile::stack::Stack::load(f, &ctx.layout.root)?);
    }
    let names: Vec<Option<&str>> = if profiles.is_empty() {
        vec![None]
    } else {
        profiles.iter().map(|p| Some(p.as_str())).collect()
    };
    let mut ps = names
        .into_iter()
        .map(|n| ctx.profile(n))
        .collect::<Result<Vec<_>>>()?;
    if let Some((keys, pool)) = keys {
        // The flags over each profile's server section, checked like the profile.
        for p in &mut ps {
            let c = keys
                .over(p.file.server.concurrency_keys())
                .resolve()
                .map_err(|(key, m)| anyhow::anyhow!("--{key}: {m}"))?;
            p.file.server.set_concurrency(c);
        }
        if let (Some(id), [p]) = (pool, ps.as_mut_slice()) {
            p.file.pool = id.clone();
        }
    }
    Ok(llorch_profile::stack::Stack::from_profiles(ps)?)
}

/// In an image: listen on 0.0.0.0:$PORT (default 8080; 0: any free port, as
/// the line `serving … at` then says), the token from
/// `LLORCH_API_TOKEN` or the file `LLORCH_API_TOKEN_FILE` names (a mounted secret).
fn image_listen(cfg: &mut orchestratord::Config) -> Result<()> {
    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p.trim().parse().ok().with_context(|| {
            format!(
                "PORT=`{}` is not a port number (0-65535)",
                llorch_types::excerpt(&p, 16)
            )
        })?,
        Err(_) => llorch_deploy::image::DEFAULT_PORT,
    };
    cfg.addr = std::net::SocketAddr::from(([0, 0, 0, 0], port));
    if cfg.api_token.as_deref().unwrap_or("").is_empty() {
        if let Some(f) = std::env::var_os("LLORCH_API_TOKEN_FILE") {
            let t = fs_err::read_to_string(&f).context("read LLORCH_API_TOKEN_FILE")?;
            cfg.api_token = Some(t.trim().to_string()).filter(|t| !t.is_empty());
        }
    }
    Ok(())
}

/// In an image: the one pool to serve (`--pool`, else `LLORCH_POOL`, else
/// the only one), its model at `LLORCH_MODEL` (default /models/model.gguf)
/// with the digest the image expects, and the prebuilt engines' directory.
fn image_stack(
    ctx: &Ctx,
    pool: Option<&llorch_types::PoolId>,
) -> Result<(llorch_profile::stack::Stack, std::path::PathBuf)> {
    let root = &ctx.layout.root;
    let spec = llorch_deploy::spec::ImageSpec::read(root)?;
    let wanted = pool
        .map(|p| p.to_string())
        .or_else(|| std::env::var("LLORCH_POOL").ok().filter(|s| !s.is_empty()));
    let ip = spec.pool(wanted.as_deref())?;
    let mut profile = ctx.profile(Some(
        root.join(&ip.profile)
            .to_str()
            .context("the image root is not UTF-8")?,
    ))?;
    let model_path = std::env::var("LLORCH_MODEL")
        .unwrap_or_else(|_| llorch_deploy::image::DEFAULT_MODEL.to_string());
    let model = profile
        .file
        .model
        .as_mut()
        .context("the image's profile has no model section")?;
    // The image's digest, never the mounted file's own word for it.
    model.reference = format!("file:{model_path}");
    model.sha256 = Some(ip.model_sha256.clone());
    model.require_digest = true;
    profile.file.pool = llorch_types::PoolId::parse(&ip.id)?;
    let keys = llorch_profile::ConcurrencyKeys {
        mode: Some(
            ip.mode
                .parse()
                .map_err(|e| anyhow::anyhow!("image.json mode: {e}"))?,
        ),
        slots: Some(llorch_profile::Count::Fixed(ip.slots)),
        replicas: Some(llorch_profile::Count::Fixed(ip.replicas)),
        affinity: Some(
            ip.affinity
                .parse()
                .map_err(|e| anyhow::anyhow!("image.json affinity: {e}"))?,
        ),
    };
    let c = keys
        .resolve()
        .map_err(|(key, m)| anyhow::anyhow!("image.json {key}: {m}"))?;
    profile.file.server.set_concurrency(c);
    llorch_io::info!(
        "image: serving pool {} (engine {}, model {} expected to hash to {})",
        ip.id,
        &ip.fingerprint[..12.min(ip.fingerprint.len())],
        model_path,
        &ip.model_sha256[..12.min(ip.model_sha256.len())]
    );
    Ok((
        llorch_profile::stack::Stack::from_profiles(vec![profile])?,
        root.join(llorch_deploy::image::PREBUILT),
    ))
}

impl ServeCmd {
    pub fn run(self, ctx: &Ctx) -> Result<()> {
        let mut cfg = self.listen.config();
        if self.in_image {
            image_listen(&mut cfg)?;
        }
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
        if self.pool.is_some() && (self.stack.is_some() || self.profile.len() > 1) {
            bail!("--pool names the pool of one profile; a stack file gives each pool its id");
        }
        let mut prebuilt = None;
        let stack = if self.in_image {
            if self.stack.is_some() || !self.profile.is_empty() || overridden {
                bail!("--in-image serves the pool baked into the image; --profile, --stack and the concurrency flags do not apply");
            }
            let (stack, dir) = image_stack(ctx, self.pool.as_ref())?;
            prebuilt = Some(dir);
            stack
        } else {
            stack_from(
                ctx,
                &self.profile,
                self.stack.as_deref(),
                Some((&keys, self.pool.as_ref())),
            )?
        };
        let opts = llorch_stack::PoolsOptions {
            report: llorch_io::report::Reporter::PROCESS,
            idle_unload_s: self.idle_unload_s,
            max_loaded: self.max_loaded,
            prebuilt,
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
        llorch_io::warn!("warning: {w}");
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
        // What runs (`auto` counts are chosen at start).
        let replicas = ps.server.state.members(&p.group).len();
        // A pool of one engine that runs: where it is, and whether it is attached.
        let engine = match ps.links.iter().find(|(id, _)| id == &p.group) {
            Some((_, l)) if replicas == 1 => match orchestratord::EngineLink::current(&**l) {
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
            replicas,
            p.slots,
            c.mode.as_str(),
            if c.mode == llorch_profile::Mode::Batched {
                ": results depend on load"
            } else {
                ""
            }
        );
        let info = match p.link_state() {
            orchestratord::LinkState::Ready(e) => Some(e),
            _ => p.last_engine.lock().unwrap().clone(),
        };
        println!(
            "    {}",
            crate::provision::sandbox_line(info.and_then(|e| e.sandbox).as_ref())
        );
    }
    println!(
        "  try: curl -s {}/v1/chat/completions -H 'content-type: application/json' -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"max_tokens\":16}}'",
        ps.orchestrator_url(),
        stack.pools[0].id
    );
    let outcome = until_stopped(&ps.server.state, &mut stop).await;
    ps.stop(std::time::Duration::from_secs(30)).await;
    llorch_io::info!("stopped");
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
        sig = stop.recv() => { llorch_io::info!("{sig}: draining (up to 30 s)"); None }
        reason = all_failed => { eprintln!("error: every pool failed and will not be restarted:\n{reason}"); Some(reason) }
    }
}
