//! `cargo xtask bench fleet`: what a registry saves, side by side in one run
//! on this machine, against a real OCI registry server on 127.0.0.1
//! (`docker-registry`; `cargo xtask doctor --install --test-servers`).
//!
//! * Engine ready in a fresh cache: pulled from the registry (verified and
//!   installed) vs a cold build of the same fingerprint from the same source
//!   tree (ccache off).
//! * A fresh machine's first token: an empty cache, a profile whose engine
//!   registry and model ref point at the registry; from nothing to the first
//!   token of a haiku prompt through the orchestrator (pull engine, pull
//!   model, spawn, prompt). The Rust compile of the tool is not included.

use crate::{median, spread, Ctx};
use anyhow::{bail, Context, Result};
use engine_provisioner::build::{self, BuildOptions};
use llorch_io::cmd::{Cmd, KillOnDrop};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A registry server on a free loopback port, stopped on drop.
fn start_registry(dir: &std::path::Path) -> Result<(KillOnDrop, String)> {
    let bin = engine_provisioner::preflight::Toolbox::default()
        .find("docker-registry")
        .context("the OCI registry server `docker-registry` is not installed: run `cargo xtask doctor --install --test-servers`")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    fs_err::write(
        dir.join("config.yml"),
        format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n  secret: llorch-bench\n",
            dir.join("data").display()
        ),
    )?;
    let log = fs_err::File::create(dir.join("registry.log"))?;
    let child = KillOnDrop(
        Cmd::new(bin)
            .arg("serve")
            .arg(dir.join("config.yml"))
            .spawn(
                llorch_io::cmd::Io::File(log.try_clone()?.into()),
                llorch_io::cmd::Io::File(log.into()),
            )?,
    );
    let t0 = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        if t0.elapsed() > Duration::from_secs(10) {
            bail!(
                "the registry did not start (see {})",
                dir.join("registry.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, addr))
}

pub fn bench_fleet(
    ctx: &Ctx,
    profile: Option<&str>,
    runs: usize,
    skip_build: bool,
) -> Result<Value> {
    let p = ctx.profile(profile)?;
    let tmp = tempfile::tempdir_in(&ctx.layout.cache)?;
    let (_registry, addr) = start_registry(tmp.path())?;
    // This machine has the engine and the model (cache hits after the first time).
    let prep = llorch_stack::prepare(&p, p.pool(), &ctx.layout, &BuildOptions::quiet())?;
    let fp = prep.engine.fingerprint.clone();
    let engines_url = format!("oci://{addr}/llorch/engines");
    let reg = engine_provisioner::registry::EngineRegistry::new(&engines_url, false, false)?;
    let pushed = engine_provisioner::registry::push(&ctx.layout, &fp, &reg)?;
    let model = p.file.model.as_ref().context("the profile has no model")?;
    let model_to = format!("oci://{addr}/llorch/models:bench");
    model_provisioner::registry::push_model(
        &model_provisioner::ModelStore::new(&ctx.layout),
        &model.reference,
        &model_to,
    )?;
    // The other machine's profile: engine registry set, model from the registry.
    let text = fs_err::read_to_string(&p.path)?
        .replace(
            &format!("ref: {}", model.reference),
            &format!("ref: {model_to}"),
        )
        .replace(
            "engine:\n",
            &format!("engine:\n  registry:\n    url: {engines_url}\n"),
        );
    let fleet_file = tmp.path().join("fleet.yaml");
    fs_err::write(&fleet_file, text)?;
    let fleet = llorch_profile::Profile::load(
        &fleet_file,
        &ctx.layout.root.join("toolchains/llama.cpp.yaml"),
    )?;
    let fresh = |name: &str| {
        llorch_io::paths::Layout::at(
            ctx.layout.root.clone(),
            tmp.path().join(name).join("cache"),
            tmp.path().join(name).join("rt"),
        )
    };
    // Engine ready by pull, several fresh caches.
    let mut pulls = Vec::new();
    for i in 0..runs {
        let l = fresh(&format!("pull-{i}"));
        let t = Instant::now();
        let out = build::build(&fleet, &l, &BuildOptions::quiet())?;
        if out.cmake_invocations != 0 {
            bail!("the engine was built, not pulled: {:?}", out.reason);
        }
        pulls.push(t.elapsed().as_secs_f64());
    }
    // Fresh machine → first token, with a registry hit for engine and model.
    let rt = crate::runtime()?;
    let mut first = Vec::new();
    for i in 0..runs {
        let l = fresh(&format!("machine-{i}"));
        let pool = llorch_types::PoolId::parse(&format!("fleet-bench-{i}"))?;
        let t = Instant::now();
        let ms = rt.block_on(async {
            let cfg = orchestratord::Config {
                addr: "127.0.0.1:0".parse().unwrap(),
                ..Default::default()
            };
            let stack = llorch_stack::start_stack(
                &fleet,
                &pool,
                &l,
                cfg,
                llorch_io::report::Reporter::QUIET,
                "cargo xtask bench fleet",
            )
            .await?;
            let http = llorch_io::http::async_client();
            let body = json!({"prompt": "Write a haiku about rain.", "max_tokens": 8});
            let r = orchestratord::client::stream_task(
                &http,
                &stack.orchestrator_url(),
                &body,
                None,
                None,
            )
            .await?;
            let at = t.elapsed().as_secs_f64() - (r.total_ms - r.ttft_from_submit_ms) / 1000.0;
            stack.stop(Duration::from_secs(5)).await;
            if r.tokens.is_empty() {
                bail!("no token: {:?}", r.error);
            }
            anyhow::Ok(at)
        })?;
        first.push(ms);
    }
    let mut out = serde_json::Map::new();
    out.insert("engine_fingerprint".into(), json!(fp));
    out.insert(
        "engine_layer_mb".into(),
        json!(pushed.layer_bytes as f64 / 1e6),
    );
    out.insert(
        "engine_ready_by_pull_s_median".into(),
        json!(median(&mut pulls.clone())),
    );
    out.insert(
        "engine_ready_by_pull_s_spread".into(),
        json!(spread(&pulls)),
    );
    out.insert(
        "fresh_machine_first_token_s_median (registry hit)".into(),
        json!(median(&mut first.clone())),
    );
    out.insert(
        "fresh_machine_first_token_s_spread".into(),
        json!(spread(&first)),
    );
    if !skip_build {
        // A cold build of the same fingerprint from the same source tree, no compiler cache.
        let l = fresh("build");
        let tree = engine_provisioner::source::fetch(&p.pin, &ctx.layout, &|_| {})?;
        let src = l.bucket(llorch_io::paths::Bucket::Src);
        fs_err::create_dir_all(&src)?;
        Cmd::new("cp")
            .arg("-a")
            .arg(&tree)
            .arg(src.join(engine_provisioner::source::source_id(&p.pin)))
            .read()?;
        let t = Instant::now();
        let cold = BuildOptions {
            compile_cache: Some(false),
            ..BuildOptions::quiet()
        };
        let b = build::build(&p, &l, &cold)?;
        let build_s = t.elapsed().as_secs_f64();
        if b.fingerprint != fp {
            bail!("the cold build has another fingerprint ({})", b.fingerprint);
        }
        out.insert("engine_ready_by_cold_build_s".into(), json!(build_s));
        out.insert(
            "ratio_pull_over_cold_build".into(),
            json!(median(&mut pulls) / build_s),
        );
    }
    out.insert("runs".into(), json!(runs));
    Ok(Value::Object(out))
}
