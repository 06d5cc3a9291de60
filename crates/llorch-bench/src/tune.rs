//! `cargo xtask bench tune`: the sweep that `slots: auto` and
//! `replicas: auto` read.
//!
//! For a profile's batched pool it measures every configuration of slots ×
//! engines on the device that fits its memory (the rule of
//! `llorch_stack::auto`), through the orchestrator, with the same streaming
//! clients as `bench load` (distinct prompts, `ignore_eos`, a warm-up wave of
//! the full client count first). Runs alternate: each run starts every
//! configuration once, in the reverse order of the run before. It prints
//! median tokens/s with its spread, TTFT p99 and fairness per configuration
//! and client count, and the configuration auto would choose; `--write`
//! records the table where auto reads it (keyed by engine fingerprint, model
//! digest, device and MPS state).

use crate::load::{load_stack, start, wave, Wave};
use crate::{median, pct, spread, Ctx};
use anyhow::{bail, Result};
use llorch_profile::{ConcurrencyKeys, Count, Mode};
use llorch_stack::auto;
use llorch_stack::auto_table::{self, TuneRow};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

pub struct TuneArgs<'a> {
    pub profile: Option<&'a str>,
    pub clients: &'a [usize],
    /// Slot counts to try (empty: 1, 2, 4 on a CPU; 8, 16, 32, 64 on a GPU).
    pub slots: &'a [u32],
    /// Engines per device to try (empty: 1 on a CPU; 1, 2, 4 on a GPU).
    pub replicas: &'a [u32],
    /// Engine flag sets to try, by [`auto::VARIANTS`] name (empty: `split`,
    /// the profile's own flags).
    pub variants: &'a [String],
    pub runs: usize,
    pub max_tokens: u32,
    /// Record the table where `auto` reads it.
    pub write: bool,
}

/// Slots, engines, and a flag set (name, flags).
type Config = (u32, u32, (&'static str, &'static [&'static str]));

/// What one configuration gave at one client count, over the runs.
#[derive(Default)]
struct Samples {
    tok_per_s: Vec<f64>,
    ttft: Vec<f64>,
    fairness: Vec<f64>,
    errors: usize,
}

pub fn bench_tune(ctx: &Ctx, a: &TuneArgs) -> Result<Value> {
    if a.clients.is_empty() || a.runs == 0 {
        bail!("bench tune needs at least one client count and one run");
    }
    let profile = ctx.profile(a.profile)?;
    let cuda = profile.file.engine.backend == llorch_profile::Backend::Cuda;
    let slots: Vec<u32> = match (a.slots.is_empty(), cuda) {
        (false, _) => a.slots.to_vec(),
        (true, false) => vec![1, 2, 4],
        (true, true) => vec![8, 16, 32, 64],
    };
    let replicas: Vec<u32> = match (a.replicas.is_empty(), cuda) {
        (false, _) => a.replicas.to_vec(),
        (true, false) => vec![1],
        (true, true) => vec![1, 2, 4],
    };
    let variants = flag_sets(a.variants)?;
    let probe = llorch_io::gpu::GpuProbe::default();
    let device = auto::measure_device(cuda, &[], &probe)?;
    let mut configs: Vec<Config> = Vec::new();
    for &v in &variants {
        for &k in &replicas {
            for &s in &slots {
                configs.push((s, k, v));
            }
        }
    }
    let mut samples: BTreeMap<(Config, usize), Samples> = BTreeMap::new();
    let mut key: Option<(String, String)> = None;
    let rt = crate::runtime()?;
    for run in 0..a.runs {
        let mut order = configs.clone();
        if run % 2 == 1 {
            order.reverse();
        }
        for &(s, k, v) in &order {
            llorch_io::info!(
                "run {}/{}: {s} slots x {k} engine(s), flags {}",
                run + 1,
                a.runs,
                v.0
            );
            let measured = rt.block_on(measure_config(ctx, a, s, k, v.1))?;
            let (base, rows) = measured;
            if let Some(b) = base {
                key.get_or_insert((b.fingerprint, b.model_digest));
            }
            for (n, w) in rows {
                let e = samples.entry(((s, k, v), n)).or_default();
                e.tok_per_s.push(w.tok_per_s);
                e.ttft.extend(w.ttft);
                e.fairness.push(w.fairness);
                e.errors += w.errors;
            }
        }
    }
    let (out_rows, table_rows) = summarize(samples);
    let Some((fingerprint, model_digest)) = key else {
        bail!("no configuration started an engine");
    };
    let table = auto_table::TuneTable::new(
        &fingerprint,
        &model_digest,
        &device,
        a.max_tokens,
        table_rows,
    );
    let best = table.pick(|_| true);
    match &best {
        Some(b) => llorch_io::info!(
            "auto would choose {} slots x {} engine(s), flags {}, here: {}",
            b.slots,
            b.replicas,
            auto::variant_name(&b.args),
            b.describe()
        ),
        None => llorch_io::info!(
            "no configuration was fair (fairness >= {}) at every client count: auto would not use this table",
            auto::MIN_FAIRNESS
        ),
    }
    let path = auto_table::table_path(
        &auto_table::tune_dir(&ctx.layout),
        &fingerprint,
        &model_digest,
        &device,
    );
    if a.write {
        auto_table::write_table(&path, &table)?;
        llorch_io::info!("recorded for slots/replicas: auto: {}", path.display());
    }
    Ok(json!({
        "device": device.name,
        "mps": device.mps,
        "budget_mib": device.budget_mib,
        "fingerprint": fingerprint,
        "model_digest": model_digest,
        "runs": a.runs,
        "max_tokens": a.max_tokens,
        "rows": out_rows,
        "recommended": best.map(|b| json!({
            "slots": b.slots, "replicas": b.replicas, "flags": auto::variant_name(&b.args), "args": b.args, "score": b.score,
            "at": b.at.iter().map(|(n, t, best)| json!({"clients": n, "tok_per_s": t, "best_tok_per_s": best})).collect::<Vec<_>>(),
        })),
        "table": if a.write { Some(path.display().to_string()) } else { None },
    }))
}

/// The flag sets `--variants` names (none: the profile's own, `split`).
fn flag_sets(names: &[String]) -> Result<Vec<(&'static str, &'static [&'static str])>> {
    let mut variants: Vec<(&'static str, &'static [&'static str])> = Vec::new();
    for name in names {
        match auto::VARIANTS.iter().find(|(n, _)| n == name) {
            Some(v) => variants.push(*v),
            None => bail!(
                "--variants: no flag set named {name:?}; known: {}",
                auto::VARIANTS
                    .iter()
                    .map(|(n, f)| format!(
                        "{n} ({})",
                        if f.is_empty() {
                            "the profile's flags".into()
                        } else {
                            f.join(" ")
                        }
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    if variants.is_empty() {
        variants.push(auto::VARIANTS[0]);
    }
    Ok(variants)
}

/// Start one configuration (`slots` × `engines`), warm it and measure each
/// client count through the orchestrator. A configuration that does not
/// start (too big for the device) gives no engine and no rows.
async fn measure_config(
    ctx: &Ctx,
    a: &TuneArgs<'_>,
    s: u32,
    k: u32,
    args: &[&str],
) -> Result<(Option<orchestratord::link::EngineInfo>, Vec<(usize, Wave)>)> {
    let keys = ConcurrencyKeys {
        mode: Some(Mode::Batched),
        slots: Some(Count::Fixed(s)),
        replicas: Some(Count::Fixed(k)),
        affinity: None,
    };
    let (stack, _) = load_stack(ctx, a.profile, keys, &[], None, args, "tune")?;
    let ps = match start(ctx, &stack, 4096, "cargo xtask bench tune").await {
        Ok(ps) => ps,
        Err(e) => {
            llorch_io::info!("  {s} slots x {k} engine(s) did not start: {e:#}");
            return Ok((None, Vec::new()));
        }
    };
    let id = stack.pools[0].id.to_string();
    let base = ps.link(&id).map(|l| l.base.clone());
    let orch = ps.orchestrator_url();
    let body = json!({"model": id, "stream": true, "temperature": 0, "ignore_eos": true});
    let via = vec![(orch.clone(), body)];
    let http = llorch_io::http::async_client();
    let mut rows = Vec::new();
    for &n in a.clients {
        wave(&http, &via, n, 16).await;
        rows.push((n, wave(&http, &via, n, a.max_tokens).await));
    }
    ps.stop(Duration::from_secs(5)).await;
    Ok((base, rows))
}

/// Per configuration and client count: the printed line, the JSON row, and
/// (without errors) the table row auto may choose.
fn summarize(samples: BTreeMap<(Config, usize), Samples>) -> (Vec<Value>, Vec<TuneRow>) {
    let mut table_rows = Vec::new();
    let mut out_rows = Vec::new();
    for (((s, k, (name, args)), n), mut v) in samples {
        let tps = median(&mut v.tok_per_s.clone());
        let fair = median(&mut v.fairness);
        let ttft_p99 = pct(&v.ttft, 0.99);
        llorch_io::info!(
            "{s:>4} slots x {k} engine(s), {name:<13} {n:>4} clients: {tps:.0} tok/s ({}), TTFT p99 {ttft_p99:.0} ms, fairness {fair:.2}, errors {}",
            spread(&v.tok_per_s),
            v.errors
        );
        out_rows.push(json!({
            "slots": s, "replicas": k, "flags": name, "args": args, "clients": n,
            "tok_per_s_median": tps, "tok_per_s_spread": spread(&v.tok_per_s),
            "ttft_ms_p99": ttft_p99, "fairness_median": fair, "errors": v.errors,
        }));
        if v.errors == 0 && tps.is_finite() && tps > 0.0 {
            table_rows.push(TuneRow {
                slots: s,
                replicas: k,
                args: args.iter().map(|a| a.to_string()).collect(),
                clients: n as u32,
                tok_per_s: tps,
                ttft_ms_p99: if ttft_p99.is_finite() { ttft_p99 } else { 0.0 },
                fairness: if fair.is_finite() { fair } else { 0.0 },
            });
        }
    }
    (out_rows, table_rows)
}
