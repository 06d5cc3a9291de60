//! `cargo xtask pin bump`: follow upstream in one command. The next
//! llama.cpp is resolved as a new pin by `engine_provisioner::pin`; this
//! command builds the profile with it in a scratch workspace root, runs the
//! haiku proof on that engine, and only then has `toolchains/llama.cpp.yaml`
//! rewritten (atomically), with the new pin as the default. A failed step
//! writes nothing there (the engine it built stays in the cache, where gc
//! finds it).

use crate::{print_json, Ctx};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use engine_provisioner::build::BuildOptions;
use engine_provisioner::pin;
use llorch_profile::{PinsFile, Profile, SourceSpec};
use serde::Serialize;
use std::path::Path;

#[derive(Args)]
pub struct PinCmd {
    #[command(subcommand)]
    cmd: PinSub,
}

#[derive(Subcommand)]
enum PinSub {
    /// Move the default pin to the next llama.cpp: build it, prove it, then record it
    Bump(BumpArgs),
}

#[derive(Args)]
pub struct BumpArgs {
    /// This release of the default pin's sdist package (default: the newest on pip's index)
    #[arg(long, conflicts_with = "git")]
    pub to: Option<String>,
    /// A llama.cpp git revision (full commit id, tag or branch) from the git pin's URL
    #[arg(long)]
    pub git: Option<String>,
    /// The profile to build and prove (default: cpu)
    #[arg(long, short)]
    pub profile: Option<String>,
    /// Record the pin after the build, without the haiku proof
    #[arg(long)]
    pub skip_haiku: bool,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct BumpReport {
    from_pin: String,
    to_pin: String,
    from_commit: String,
    to_commit: String,
    source: serde_json::Value,
    bundle_trees: std::collections::BTreeMap<String, String>,
    profile: String,
    from_fingerprint: Option<String>,
    to_fingerprint: String,
    build_s: f64,
    compile_cache: Option<engine_provisioner::compile_cache::CompileStats>,
    haiku: &'static str,
    written: String,
}

impl PinCmd {
    pub fn run(self, ctx: &Ctx) -> Result<()> {
        match self.cmd {
            PinSub::Bump(a) => bump(ctx, &a),
        }
    }
}

fn bump(ctx: &Ctx, a: &BumpArgs) -> Result<()> {
    let reporter = llorch_io::report::Reporter::quiet_if(a.json);
    let say = |m: &str| reporter.info(m);
    let path = pin::pins_path(&ctx.layout);
    let original =
        fs_err::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let before = PinsFile::load(&path)?;
    let old = before.pins[&before.default].clone();
    let cand = pin::resolve(&ctx.layout, a.to.as_deref(), a.git.as_deref(), &say)?;
    // The candidate profile, built and proven with the candidate pins file
    // in a scratch workspace root (the real file is untouched until the end).
    let scratch = pin::candidate_root(&ctx.layout, &cand.text)?;
    let old_profile = ctx.profile(a.profile.as_deref())?;
    let profile = Profile::resolve(scratch.path(), Some(&profile_arg(&old_profile)))?;
    if profile.pin_name != cand.name {
        bail!(
            "profile `{}` names pin `{}` itself, so a new default pin would not change what it builds; bump with a profile that uses the default pin",
            profile.name,
            profile.pin_name
        );
    }
    let from_fp = engine_provisioner::build::plan(&old_profile, &Default::default())
        .ok()
        .map(|p| p.fingerprint);
    say(&format!(
        "building profile `{}` with pin {} (llama.cpp {})",
        profile.name,
        cand.name,
        &cand.pin.commit[..12]
    ));
    let nothing_written = |what: &str| format!("{what}; nothing written to {}", path.display());
    let built = engine_provisioner::build(
        &profile,
        &ctx.layout,
        &BuildOptions {
            report: reporter,
            ..Default::default()
        },
    )
    .with_context(|| {
        nothing_written(&format!(
            "build of profile `{}` with pin {} failed",
            profile.name, cand.name
        ))
    })?;
    let haiku = if a.skip_haiku {
        "skipped"
    } else {
        say("running the haiku proof on the new engine");
        if !prove(ctx, &profile, scratch.path(), a.json)? {
            bail!(nothing_written(&format!(
                "the haiku proof failed on pin {}",
                cand.name
            )));
        }
        "passed"
    };
    pin::record(&path, &original, &cand.text)?;
    let report = BumpReport {
        from_pin: before.default.clone(),
        to_pin: cand.name.clone(),
        from_commit: old.commit.clone(),
        to_commit: cand.pin.commit.clone(),
        source: serde_json::to_value(&cand.pin.source)?,
        bundle_trees: cand.pin.bundle_trees.clone(),
        profile: profile.name.clone(),
        from_fingerprint: from_fp,
        to_fingerprint: built.fingerprint.clone(),
        build_s: built.duration_s,
        compile_cache: built.compile_cache.clone(),
        haiku,
        written: path.display().to_string(),
    };
    if a.json {
        return print_json(&report);
    }
    render(&report, &cand.pin.source);
    Ok(())
}

/// The haiku proof on the engine just built, reading the pins of the
/// scratch root as the build did.
fn prove(ctx: &Ctx, profile: &Profile, scratch: &Path, quiet: bool) -> Result<bool> {
    let layout = llorch_io::paths::Layout::at(
        scratch.to_path_buf(),
        ctx.layout.cache.clone(),
        ctx.layout.runtime.clone(),
    );
    let output = if quiet {
        llorch_proof::Output::Quiet
    } else {
        llorch_proof::Output::Live
    };
    llorch_proof::cli(profile, profile.pool(), &layout, output)
}

fn render(report: &BumpReport, source: &SourceSpec) {
    println!("pin bumped: {} -> {}", report.from_pin, report.to_pin);
    println!(
        "  llama.cpp   {} -> {}",
        report.from_commit, report.to_commit
    );
    if let SourceSpec::PypiSdist {
        package,
        version,
        sha256,
        ..
    } = source
    {
        println!("  source      {package}=={version} sha256 {sha256}");
    }
    for (b, d) in &report.bundle_trees {
        println!("  bundle tree {b}: {d}");
    }
    println!(
        "  engine      {} -> {} ({:.0}s{})",
        report
            .from_fingerprint
            .as_deref()
            .map(|f| &f[..12])
            .unwrap_or("-"),
        &report.to_fingerprint[..12],
        report.build_s,
        match &report.compile_cache {
            Some(s) => format!(", compiler cache {} hits / {} misses", s.hits, s.misses),
            None => String::new(),
        }
    );
    println!("  haiku proof {}", report.haiku);
    println!("  written     {}", report.written);
}

/// How the scratch root finds the same profile: by name when it is one of
/// the workspace's, else by its path.
fn profile_arg(p: &Profile) -> String {
    p.path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|_| p.path.parent().is_some_and(|d| d.ends_with("requirements")))
        .unwrap_or_else(|| p.path.display().to_string())
}
