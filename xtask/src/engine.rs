//! `cargo xtask engine …`: build, explain, verify, ls, push, pull, gc, up, down, status, logs.

use crate::{print_json, Ctx};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use engine_provisioner::build::{self, BuildOptions};
use engine_provisioner::cache::ArtifactCache;
use engine_runtime::lifecycle::{self, Stopped};
use engine_runtime::run_state::RunPaths;
use llorch_types::PoolId;
use std::path::PathBuf;

#[derive(Args)]
pub struct EngineCmd {
    #[command(subcommand)]
    cmd: EngineSub,
}

#[derive(Subcommand)]
enum EngineSub {
    /// Build llama-server for a profile, or reuse the cached build with the same inputs
    Build(BuildArgs),
    /// Say which inputs differ from the closest cached build (why a rebuild would happen)
    Explain(ProfileArgs),
    /// List cached builds
    Ls(JsonArg),
    /// Publish the profile's cached engine to an OCI registry, tagged with its fingerprint
    Push {
        #[command(flatten)]
        p: ProfileArgs,
        /// oci://HOST[:PORT]/REPO (default: LLORCH_ENGINE_REGISTRY or the profile's engine.registry)
        #[arg(long)]
        to: Option<String>,
        /// Allow plain HTTP to a registry off loopback
        #[arg(long)]
        insecure: bool,
        /// Sign the engine's provenance with this private key (from `engine keygen`) and attach
        /// it in the registry (default: LLORCH_SIGNING_KEY)
        #[arg(long)]
        sign_key: Option<std::path::PathBuf>,
    },
    /// Fetch the profile's engine from an OCI registry, verify it and install it into the cache
    Pull {
        #[command(flatten)]
        p: ProfileArgs,
        /// oci://HOST[:PORT]/REPO (default: LLORCH_ENGINE_REGISTRY or the profile's engine.registry)
        #[arg(long)]
        from: Option<String>,
        /// Allow plain HTTP to a registry off loopback
        #[arg(long)]
        insecure: bool,
        /// Refuse an engine whose provenance is not signed by this public key
        /// (default: LLORCH_TRUSTED_KEY)
        #[arg(long)]
        trusted_key: Option<std::path::PathBuf>,
    },
    /// Make an Ed25519 key pair for signing pushed engines: PATH.key (mode 0600) and PATH.pub
    Keygen {
        /// Where: PATH.key and PATH.pub (an existing key is never replaced)
        path: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check the profile's cached engine against its manifest; --rebuild: rebuild it from the pinned
    /// source in scratch directories (no compiler cache) and compare every file, byte for byte
    Verify {
        #[command(flatten)]
        b: BuildArgs,
        /// Rebuild from source and compare (exit 1 if any byte differs)
        #[arg(long)]
        rebuild: bool,
        /// Pull the engine from this registry first (oci://HOST[:PORT]/REPO), then verify it
        #[arg(long)]
        from: Option<String>,
        /// Allow plain HTTP to a registry off loopback
        #[arg(long)]
        insecure: bool,
    },
    /// Delete all but the newest N cached builds (and their build directories)
    Gc(GcArgs),
    /// Start the pool's engine (like `provision`); --foreground supervises it until Ctrl-C
    Up {
        #[command(flatten)]
        p: ProfileArgs,
        /// Pool id (default: the profile's `pool`)
        #[arg(long)]
        pool: Option<PoolId>,
        /// Stay in the foreground, restart the engine if it crashes or hangs, stop it on Ctrl-C
        #[arg(long)]
        foreground: bool,
    },
    /// Stop the pool's engine (SIGTERM, 5 s grace, SIGKILL)
    Down(PoolArgs),
    /// Show pid, URL, health, uptime, model, fingerprint and busy slots
    Status(PoolArgs),
    /// Print the engine log
    Logs {
        #[command(flatten)]
        pool: PoolArgs,
        /// Keep printing new lines
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(Args)]
pub struct PoolArgs {
    /// Pool id (default: the default profile's pool)
    #[arg(long)]
    pub pool: Option<PoolId>,
    #[arg(long)]
    pub json: bool,
}

impl PoolArgs {
    pub fn pool(&self, ctx: &Ctx) -> Result<PoolId> {
        match &self.pool {
            Some(p) => Ok(p.clone()),
            None => Ok(ctx.profile(None)?.pool().clone()),
        }
    }
}

#[derive(Args)]
pub struct ProfileArgs {
    /// Profile name (requirements/NAME.yaml) or path to a profile file
    #[arg(long, short)]
    pub profile: Option<String>,
    /// Machine-readable output on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub p: ProfileArgs,
    /// Parallel build jobs (default: the number of CPUs)
    #[arg(long, short)]
    pub jobs: Option<usize>,
    /// Build from this verified offline source bundle instead of fetching the pin's source
    #[arg(long, env = "LLORCH_SOURCE_BUNDLE")]
    pub source_bundle: Option<PathBuf>,
    /// Take this fingerprint's engine from another cache directory when it has one
    /// (copied and checked against its manifest; nothing is written there)
    #[arg(long, value_name = "CACHE_DIR")]
    pub reuse_from: Option<PathBuf>,
}

#[derive(Args)]
struct JsonArg {
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GcArgs {
    /// How many of the newest builds to keep
    #[arg(long, default_value_t = 2)]
    keep: usize,
    #[arg(long)]
    json: bool,
}

impl EngineCmd {
    pub fn run(self, ctx: &Ctx) -> Result<()> {
        match self.cmd {
            EngineSub::Build(a) => build_cmd(ctx, &a),
            EngineSub::Push {
                p,
                to,
                insecure,
                sign_key,
            } => push(ctx, &p, to.as_deref(), insecure, sign_key),
            EngineSub::Keygen { path, json } => {
                let k = engine_provisioner::provenance::keygen(&path)?;
                if json {
                    return print_json(&k);
                }
                println!(
                    "key {}\n  private: {} (mode 0600; keep it on the builder)\n  public:  {} (give it to the hosts that pull: LLORCH_TRUSTED_KEY)",
                    k.key_id,
                    k.private_key.display(),
                    k.public_key.display()
                );
                Ok(())
            }
            EngineSub::Pull {
                p,
                from,
                insecure,
                trusted_key,
            } => pull(ctx, &p, from.as_deref(), insecure, trusted_key),
            EngineSub::Verify {
                b,
                rebuild,
                from,
                insecure,
            } => verify(ctx, &b, rebuild, from.as_deref(), insecure),
            EngineSub::Explain(a) => explain(ctx, &a),
            EngineSub::Ls(a) => ls(ctx, &a),
            EngineSub::Up {
                p,
                pool,
                foreground,
            } => up(ctx, p, pool, foreground),
            EngineSub::Down(a) => {
                let pool = a.pool(ctx)?;
                match lifecycle::stop_pool(&ctx.layout, &pool)? {
                    Stopped::Engine(pid) => println!("stopped engine for pool {pool} (pid {pid})"),
                    Stopped::Nothing => println!("no engine running for pool {pool}"),
                }
                Ok(())
            }
            EngineSub::Status(a) => status(ctx, &a),
            EngineSub::Logs { pool, follow } => {
                let paths = RunPaths::new(&ctx.layout, &pool.pool(ctx)?);
                let mut f = fs_err::File::open(&paths.log)
                    .with_context(|| format!("no log at {}", paths.log.display()))?;
                std::io::copy(&mut f, &mut std::io::stdout())?;
                if follow {
                    loop {
                        std::thread::sleep(std::time::Duration::from_millis(200));
                        std::io::copy(&mut f, &mut std::io::stdout())?;
                    }
                }
                Ok(())
            }
            EngineSub::Gc(a) => gc(ctx, &a),
        }
    }
}

/// `engine build`: build or reuse, and say which.
fn build_cmd(ctx: &Ctx, a: &BuildArgs) -> Result<()> {
    let out = build_engine(ctx, a)?;
    if a.p.json {
        print_json(&out)?;
    } else {
        if out.cache_hit {
            println!(
                "cache hit: {} (fingerprint {}), no CMake run ({:.0} ms)",
                out.binary.display(),
                &out.fingerprint[..12],
                out.duration_s * 1000.0
            );
        } else {
            println!(
                "built: {} (fingerprint {})",
                out.binary.display(),
                &out.fingerprint[..12]
            );
        }
        println!("{}", out.version);
    }
    Ok(())
}

/// `engine push`: the cached engine to a registry, signed when a key is given.
fn push(
    ctx: &Ctx,
    p: &ProfileArgs,
    to: Option<&str>,
    insecure: bool,
    sign_key: Option<std::path::PathBuf>,
) -> Result<()> {
    let profile = ctx.profile(p.profile.as_deref())?;
    let mut reg = registry_for(&profile, to, insecure)?;
    if sign_key.is_some() {
        reg.signing_key = sign_key;
    }
    let ex = build::explain(&profile, &ctx.layout, &Default::default())?;
    let pushed = engine_provisioner::registry::push(&ctx.layout, &ex.fingerprint, &reg)?;
    if p.json {
        return print_json(&pushed);
    }
    println!(
        "pushed engine {} to {} ({:.1} MB, {:.1}s)\n  manifest {}\n  provenance: {}",
        &ex.fingerprint[..12],
        pushed.reference,
        pushed.layer_bytes as f64 / 1e6,
        pushed.seconds,
        pushed.manifest_digest,
        match &pushed.signed_by {
            Some(k) => format!("signed by key {k}, attached as a referrer"),
            None => "not signed (pass --sign-key or set LLORCH_SIGNING_KEY)".into(),
        }
    );
    Ok(())
}

/// `engine pull`: the profile's engine from a registry, verified.
fn pull(
    ctx: &Ctx,
    p: &ProfileArgs,
    from: Option<&str>,
    insecure: bool,
    trusted_key: Option<std::path::PathBuf>,
) -> Result<()> {
    let profile = ctx.profile(p.profile.as_deref())?;
    let mut reg = registry_for(&profile, from, insecure)?;
    if trusted_key.is_some() {
        reg.trusted_key = trusted_key;
    }
    let pulled = build::pull(&profile, &ctx.layout, &reg, &|m: &str| {
        if !p.json {
            llorch_io::info!("{m}")
        }
    })?;
    if p.json {
        return print_json(&pulled);
    }
    match pulled {
        None => println!("already cached: nothing to pull"),
        Some(x) => println!(
            "pulled {} ({:.1} MB, {:.1}s), verified; installed at {}\n  signature: {}",
            x.reference,
            x.layer_bytes as f64 / 1e6,
            x.seconds,
            x.dir.display(),
            x.signature
        ),
    }
    Ok(())
}

/// `engine explain`: the fingerprint, and why it is or is not cached.
fn explain(ctx: &Ctx, a: &ProfileArgs) -> Result<()> {
    let profile = ctx.profile(a.profile.as_deref())?;
    let ex = build::explain(&profile, &ctx.layout, &Default::default())?;
    if a.json {
        return print_json(&ex);
    }
    println!("profile {} → fingerprint {}", ex.profile, ex.fingerprint);
    if ex.cached {
        println!("cached: `engine build` would reuse it without running CMake");
        if let Some(o) = &ex.origin {
            println!(
                "  pulled from {} ({}) at {}",
                o.registry, o.manifest_digest, o.pulled_at
            );
        } else {
            println!("  built on this machine");
        }
        return Ok(());
    }
    if let Some(r) = &ex.stale_reason {
        println!("a cached entry exists but is corrupt ({r}): it would be rebuilt");
    }
    match &ex.closest {
        None => println!("no cached builds: `engine build` would build from scratch"),
        Some(fp) => {
            println!(
                "not cached; closest cached build is {} and differs in:",
                &fp[..12]
            );
            for c in &ex.changes {
                println!("  {}: cached {} → wanted {}", c.input, c.cached, c.wanted);
            }
        }
    }
    Ok(())
}

/// `engine ls`: the cached builds.
fn ls(ctx: &Ctx, a: &JsonArg) -> Result<()> {
    let cache = ArtifactCache::new(&ctx.layout.cache);
    let list = cache.list();
    if a.json {
        let v: Vec<_> = list
            .iter()
            .map(|(p, m)| {
                serde_json::json!({
                    "fingerprint": m.fingerprint, "path": p, "profile": m.profile, "pin": m.pin,
                    "built_at": m.built_at, "build_s": m.build_s, "version": m.version_output,
                    "sass_archs": m.sass_archs, "size_bytes": llorch_io::fsx::dir_size(p),
                })
            })
            .collect();
        return print_json(&v);
    }
    if list.is_empty() {
        println!("no cached builds in {}", cache.dir.display());
    }
    for (p, m) in list {
        println!(
            "{}  {:<22} {:<26} {:>6.1} MB  built {} in {:.0}s",
            &m.fingerprint[..12],
            m.profile,
            m.pin,
            llorch_io::fsx::dir_size(&p) as f64 / 1e6,
            m.built_at,
            m.build_s
        );
    }
    Ok(())
}

/// `engine up`: detached (as `provision`), or supervised in the foreground until a signal.
fn up(ctx: &Ctx, p: ProfileArgs, pool: Option<PoolId>, foreground: bool) -> Result<()> {
    if !foreground {
        return crate::provision::ProvisionCmd::from_profile(p, pool).run(ctx);
    }
    let profile = ctx.profile(p.profile.as_deref())?;
    let pool = pool.unwrap_or_else(|| profile.pool().clone());
    let prep =
        llorch_stack::prepare(&profile, &pool, &ctx.layout, &BuildOptions::default())?.engine;
    // Caught from here on: a stop sent right after "ready" is never lost.
    let stop = llorch_io::signals::BlockingStop::install();
    let sup = engine_runtime::Supervisor::start(
        prep,
        ctx.layout.clone(),
        Default::default(),
        "cargo xtask engine up --foreground",
    )?;
    let url = sup.wait_ready(std::time::Duration::from_secs(
        profile.file.server.ready_timeout_s + 5,
    ))?;
    println!("engine for pool {pool} ready at {url} (supervised; SIGINT/SIGTERM/SIGHUP stop it)");
    let sig = stop.wait();
    llorch_io::info!("{sig}: stopping engine");
    sup.stop();
    Ok(())
}

/// `engine gc`: keep the newest builds and those in use.
fn gc(ctx: &Ctx, a: &GcArgs) -> Result<()> {
    let r = engine_provisioner::cache::gc(&ctx.layout, a.keep)?;
    if a.json {
        return print_json(&r);
    }
    for fp in &r.kept_in_use {
        println!(
            "kept {}: in use by a running engine or a build",
            &fp[..12.min(fp.len())]
        );
    }
    if r.stale_staging_removed > 0 {
        println!(
            "removed {} leftover staging dir(s) of interrupted builds",
            r.stale_staging_removed
        );
    }
    println!(
        "removed {} cached build(s), kept the newest {}",
        r.removed.len(),
        a.keep
    );
    Ok(())
}

pub fn build_engine(ctx: &Ctx, a: &BuildArgs) -> Result<engine_provisioner::BuildOutcome> {
    let profile = ctx.profile(a.p.profile.as_deref())?;
    let opts = BuildOptions {
        jobs: a.jobs,
        source_bundle: a.source_bundle.clone(),
        reuse_from: a.reuse_from.clone(),
        report: llorch_io::report::Reporter::PROCESS,
        ..Default::default()
    };
    engine_provisioner::build(&profile, &ctx.layout, &opts).context("build llama-server")
}

fn status(ctx: &Ctx, a: &PoolArgs) -> Result<()> {
    let pool = a.pool(ctx)?;
    let st = engine_runtime::run_state::pool_status(&ctx.layout, &pool)?;
    if a.json {
        return print_json(&st);
    }
    let owner = st.owner.as_deref().unwrap_or("nobody");
    let Some(e) = &st.engine else {
        match &st.owner {
            Some(_) => println!("pool {pool}: no engine ready; {owner} (restarting?)"),
            None => {
                println!("pool {pool}: no engine running (start one with `cargo xtask provision`)")
            }
        }
        return Ok(());
    };
    println!("pool {pool}: pid {} at {} ({owner})", e.pid, e.url);
    println!(
        "  health:      {}",
        e.health
            .map(|c| if c == 200 {
                "ready (200)".to_string()
            } else {
                format!("{c}")
            })
            .unwrap_or("no answer".into())
    );
    println!(
        "  uptime:      {}s (started {})",
        e.uptime_s.unwrap_or(0),
        e.started_at
    );
    println!(
        "  model:       {} (sha256 {})",
        e.model.reference,
        &e.model.digest[..12]
    );
    println!("  fingerprint: {}", e.fingerprint);
    println!(
        "  slots busy:  {}/{}",
        e.slots_busy.unwrap_or(0),
        e.slots_total.unwrap_or(0)
    );
    Ok(())
}

/// The registry a push or pull talks to: the flag, else the configured one.
fn registry_for(
    profile: &llorch_profile::Profile,
    url: Option<&str>,
    insecure: bool,
) -> Result<engine_provisioner::registry::EngineRegistry> {
    use engine_provisioner::registry::EngineRegistry;
    match url {
        Some(u) => Ok(EngineRegistry::new(u, false, insecure)?),
        None => EngineRegistry::configured(profile)?.context(
            "no registry: pass --to/--from oci://HOST[:PORT]/REPO, set LLORCH_ENGINE_REGISTRY, or add engine.registry.url to the profile",
        ),
    }
}

/// `engine verify [--rebuild] [--from oci://…]`.
fn verify(
    ctx: &Ctx,
    b: &BuildArgs,
    rebuild: bool,
    from: Option<&str>,
    insecure: bool,
) -> Result<()> {
    let profile = ctx.profile(b.p.profile.as_deref())?;
    let report = llorch_io::report::Reporter::quiet_if(b.p.json);
    let say = |m: &str| report.info(m);
    if let Some(from) = from {
        let reg = registry_for(&profile, Some(from), insecure)?;
        build::pull(&profile, &ctx.layout, &reg, &say)?;
    }
    if !rebuild {
        let ex = build::explain(&profile, &ctx.layout, &Default::default())?;
        let dir = ArtifactCache::new(&ctx.layout.cache).entry(&ex.fingerprint);
        let ok = engine_provisioner::cache::verify_entry(&dir, &ex.fingerprint);
        if b.p.json {
            print_json(
                &serde_json::json!({"fingerprint": ex.fingerprint, "dir": dir, "ok": ok.is_ok(), "problem": ok.as_ref().err().map(|e| e.to_string())}),
            )?;
        } else if let Err(why) = &ok {
            llorch_io::info!(
                "engine {} at {}: {why}",
                &ex.fingerprint[..12],
                dir.display()
            );
        } else {
            println!(
                "engine {} matches its manifest ({})",
                &ex.fingerprint[..12],
                dir.display()
            );
        }
        if ok.is_err() {
            std::process::exit(1);
        }
        return Ok(());
    }
    let opts = BuildOptions {
        jobs: b.jobs,
        source_bundle: b.source_bundle.clone(),
        report,
        ..Default::default()
    };
    let r = engine_provisioner::reproduce::rebuild(&profile, &ctx.layout, &opts)?;
    if b.p.json {
        print_json(&r)?;
    } else if r.reproduced {
        println!(
            "reproduced: engine {} rebuilt from source in {:.0}s, {} file(s) identical byte for byte ({})",
            &r.fingerprint[..12],
            r.rebuild_s,
            r.files.len(),
            r.cached.display()
        );
    } else {
        llorch_io::info!(
            "NOT reproduced: engine {} ({}) differs from its rebuild:",
            &r.fingerprint[..12],
            r.cached.display()
        );
        for f in r.files.iter().filter(|f| !f.same) {
            let ranges: Vec<String> = f
                .ranges
                .iter()
                .map(|(a, b)| format!("{a:#x}..{b:#x}"))
                .collect();
            llorch_io::info!(
                "  {}: {} vs {} bytes, {} byte(s) differ{}{}",
                f.file,
                f.cached_bytes.map_or("missing".into(), |n| n.to_string()),
                f.rebuilt_bytes.map_or("missing".into(), |n| n.to_string()),
                f.differing_bytes,
                if ranges.is_empty() { "" } else { " at " },
                ranges.join(", ")
            );
        }
        for n in &r.notes {
            llorch_io::info!("  note: {n}");
        }
    }
    if !r.reproduced {
        std::process::exit(1);
    }
    Ok(())
}
