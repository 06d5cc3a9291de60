//! `cargo xtask engine …`: build, explain, ls, gc.

use crate::{print_json, Ctx};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use engine_provisioner::build::{self, BuildOptions};
use engine_provisioner::cache::ArtifactCache;
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
    /// Delete all but the newest N cached builds (and their build directories)
    Gc(GcArgs),
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
            EngineSub::Build(a) => {
                let out = build_engine(ctx, &a)?;
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
                        println!("built: {} (fingerprint {})", out.binary.display(), &out.fingerprint[..12]);
                    }
                    println!("{}", out.version);
                }
                Ok(())
            }
            EngineSub::Explain(a) => {
                let profile = ctx.profile(a.profile.as_deref())?;
                let ex = build::explain(&profile, &ctx.layout, &Default::default())?;
                if a.json {
                    return print_json(&ex);
                }
                println!("profile {} → fingerprint {}", ex.profile, ex.fingerprint);
                if ex.cached {
                    println!("cached: `engine build` would reuse it without running CMake");
                    return Ok(());
                }
                if let Some(r) = &ex.stale_reason {
                    println!("a cached entry exists but is corrupt ({r}): it would be rebuilt");
                }
                match &ex.closest {
                    None => println!("no cached builds: `engine build` would build from scratch"),
                    Some(fp) => {
                        println!("not cached; closest cached build is {} and differs in:", &fp[..12]);
                        for c in &ex.changes {
                            println!("  {}: cached {} → wanted {}", c.input, c.cached, c.wanted);
                        }
                    }
                }
                Ok(())
            }
            EngineSub::Ls(a) => {
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
            EngineSub::Gc(a) => {
                let cache = ArtifactCache::new(&ctx.layout.cache);
                let mut removed = Vec::new();
                for (p, m) in cache.list().into_iter().skip(a.keep) {
                    let lock = llorch_io::fsx::FileLock::try_exclusive(
                        &ctx.layout.locks().join(format!("engine-{}.lock", m.fingerprint)),
                    )?;
                    if lock.is_none() {
                        eprintln!("skipping {}: in use by a build", &m.fingerprint[..12]);
                        continue;
                    }
                    std::fs::remove_dir_all(&p).with_context(|| format!("remove {}", p.display()))?;
                    let _ = std::fs::remove_dir_all(ctx.layout.cache.join("build-v1").join(&m.fingerprint));
                    removed.push(m.fingerprint);
                }
                if a.json {
                    return print_json(&serde_json::json!({ "removed": removed }));
                }
                println!("removed {} cached build(s), kept the newest {}", removed.len(), a.keep);
                Ok(())
            }
        }
    }
}

pub fn build_engine(ctx: &Ctx, a: &BuildArgs) -> Result<engine_provisioner::BuildOutcome> {
    let profile = ctx.profile(a.p.profile.as_deref())?;
    let opts = BuildOptions {
        jobs: a.jobs,
        source_bundle: a.source_bundle.clone(),
        quiet: false,
        ..Default::default()
    };
    Ok(engine_provisioner::build(&profile, &ctx.layout, &opts).context("build llama-server")?)
}
