//! `cargo xtask bench build`: what builds cost. A cold `engine build` vs a
//! hand-run CMake with the same flags, cache-hit times, and (`--incremental`)
//! the compiler cache: a cold build, the same fingerprint rebuilt after
//! `engine gc` with the compile cache warm, and a build of the next pin
//! after the current one, side by side in one scratch cache.

use crate::{median, time_cmd, Ctx};
use anyhow::Result;
use engine_provisioner::build::{self, BuildOptions};
use engine_provisioner::compile_cache::{self, CompileStats};
use llorch_io::cmd::Cmd;
use serde_json::{json, Value};
use std::time::Instant;

pub fn bench_build(ctx: &Ctx, profile: Option<&str>, hits_only: bool) -> Result<Value> {
    let p = ctx.profile(profile)?;
    let exe = std::env::current_exe()?;
    let mut out = serde_json::Map::new();
    // Make sure the real cache holds the build, then time cache hits of the built binary.
    engine_provisioner::build(&p, &ctx.layout, &BuildOptions::quiet())?;
    let mut hits = Vec::new();
    for _ in 0..7 {
        let mut c = Cmd::new(&exe).args(["engine", "build"]);
        if let Some(pr) = profile {
            c = c.args(["--profile", pr]);
        }
        hits.push(time_cmd(&c)? * 1000.0);
    }
    out.insert(
        "cache_hit_engine_build_ms_median".into(),
        json!(median(&mut hits)),
    );
    out.insert("cache_hit_engine_build_ms_all".into(), json!(hits));
    if hits_only {
        return Ok(Value::Object(out));
    }
    // Cold builds, side by side, no compiler cache for either, same jobs and flags.
    let tmp = tempfile::tempdir_in(&ctx.layout.cache)?;
    let jobs = engine_provisioner::compile::default_jobs();
    let cold_cache = tmp.path().join("cold");
    let layout = llorch_io::paths::Layout::at(
        ctx.layout.root.clone(),
        cold_cache.clone(),
        tmp.path().join("rt"),
    );
    // The source tree is fetched before timing: both sides build from the same tree.
    let tree = engine_provisioner::source::fetch(&p.pin, &ctx.layout, &|_| {})?;
    fs_err::create_dir_all(layout.bucket(llorch_io::paths::Bucket::Src))?;
    let id = engine_provisioner::source::source_id(&p.pin);
    Cmd::new("cp")
        .arg("-a")
        .arg(&tree)
        .arg(layout.bucket(llorch_io::paths::Bucket::Src).join(&id))
        .read()?;
    let plan = build::plan(&p, &engine_provisioner::preflight::Toolbox::default())?;
    let t = Instant::now();
    let b = engine_provisioner::build(
        &p,
        &layout,
        &BuildOptions {
            report: llorch_io::report::Reporter::QUIET,
            jobs: Some(jobs),
            compile_cache: Some(false),
            ..Default::default()
        },
    )?;
    let ours = t.elapsed().as_secs_f64();
    let hand_dir = tmp.path().join("hand");
    let hand_cfg = engine_provisioner::compile::configure_cmd(&p, &plan, &tree, &hand_dir);
    let hand_build = Cmd::new("cmake").arg("--build").arg(&hand_dir).args([
        "--target",
        build::TARGET,
        "-j",
        &jobs.to_string(),
    ]);
    let t = Instant::now();
    time_cmd(&hand_cfg)?;
    time_cmd(&hand_build)?;
    let hand = t.elapsed().as_secs_f64();
    out.insert("cold_engine_build_s".into(), json!(ours));
    out.insert("cold_hand_cmake_build_s".into(), json!(hand));
    out.insert("ratio_engine_build_over_hand".into(), json!(ours / hand));
    out.insert("jobs".into(), json!(jobs));
    out.insert("fingerprint".into(), json!(b.fingerprint));
    Ok(Value::Object(out))
}

/// Copy the pin's source tree (fetched into the real cache first) into a
/// scratch cache, so that no timed build downloads anything.
fn seed_source(
    ctx: &Ctx,
    p: &llorch_profile::Profile,
    layout: &llorch_io::paths::Layout,
) -> Result<()> {
    let tree =
        engine_provisioner::source::fetch(&p.pin, &ctx.layout, &|m| llorch_io::info!("{m}"))?;
    let dst = layout
        .bucket(llorch_io::paths::Bucket::Src)
        .join(engine_provisioner::source::source_id(&p.pin));
    fs_err::create_dir_all(layout.bucket(llorch_io::paths::Bucket::Src))?;
    if !dst.exists() {
        Cmd::new("cp").arg("-a").arg(&tree).arg(&dst).read()?;
    }
    Ok(())
}

fn stats_json(s: &Option<CompileStats>) -> Value {
    match s {
        Some(s) => json!({"hits": s.hits, "misses": s.misses, "requests": s.requests}),
        None => Value::Null,
    }
}

/// The pin after the current one, resolved by the caller (`pin bump`'s
/// resolution): its name and a workspace root whose pins file makes it the
/// default.
pub struct NextPin<'a> {
    pub name: &'a str,
    pub root: &'a std::path::Path,
}

pub fn bench_incremental(ctx: &Ctx, profile: Option<&str>, next: NextPin) -> Result<Value> {
    let p = ctx.profile(profile)?;
    let say = |m: &str| llorch_io::info!("{m}");
    let stem = p
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let p_next = llorch_profile::Profile::resolve(next.root, Some(&stem))?;
    let tmp = tempfile::Builder::new()
        .prefix("bench-incremental-")
        .tempdir_in(&ctx.layout.cache)?;
    let layout = llorch_io::paths::Layout::at(
        ctx.layout.root.clone(),
        tmp.path().join("cache"),
        tmp.path().join("rt"),
    );
    seed_source(ctx, &p, &layout)?;
    seed_source(ctx, &p_next, &layout)?;
    compile_cache::install(&layout, &say)?;
    let jobs = engine_provisioner::compile::default_jobs();
    let opts = BuildOptions {
        report: llorch_io::report::Reporter::QUIET,
        jobs: Some(jobs),
        compile_cache: Some(true),
        ..Default::default()
    };
    let timed = |what: &str,
                 prof: &llorch_profile::Profile|
     -> Result<(f64, engine_provisioner::BuildOutcome)> {
        say(&format!("bench: {what} ({})", prof.pin_name));
        let t = Instant::now();
        let b = engine_provisioner::build(prof, &layout, &opts)?;
        let s = t.elapsed().as_secs_f64();
        say(&format!(
            "bench: {what}: {s:.1}s, compiler cache {:?}",
            b.compile_cache
        ));
        Ok((s, b))
    };
    let (cold_s, cold) = timed("cold build, empty compiler cache", &p)?;
    engine_provisioner::cache::gc(&layout, 0)?;
    let (warm_s, warm) = timed("same fingerprint after engine gc, compiler cache warm", &p)?;
    let same_bytes = fs_err::read(&cold.binary)? == fs_err::read(&warm.binary)?;
    let (next_s, nxt) = timed("next pin after the current one", &p_next)?;
    if let Some(c) = compile_cache::CompileCache::for_layout(&layout, &Default::default()) {
        c.stop();
    }
    Ok(json!({
        "profile": p.name,
        "jobs": jobs,
        "pin": p.pin_name,
        "next_pin": next.name,
        "cold_s": cold_s,
        "cold_compiler_cache": stats_json(&cold.compile_cache),
        "warm_after_gc_s": warm_s,
        "warm_after_gc_over_cold": warm_s / cold_s,
        "warm_after_gc_compiler_cache": stats_json(&warm.compile_cache),
        "warm_same_bytes_as_cold": same_bytes,
        "next_pin_s": next_s,
        "next_pin_over_cold": next_s / cold_s,
        "next_pin_compiler_cache": stats_json(&nxt.compile_cache),
        "fingerprints": [cold.fingerprint, nxt.fingerprint],
    }))
}
