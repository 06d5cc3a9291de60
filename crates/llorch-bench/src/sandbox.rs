//! `bench sandbox`: what the engine sandbox costs. The same engine (build,
//! model, flags, port choice) started by the lifecycle with `server.sandbox:
//! auto` and with `off`, alternating which goes first; per start a warm-up
//! request, then decode tokens/s and time to first token straight from
//! llama-server (the orchestrator is not involved in either).

use crate::{direct_completion, median, spread, Ctx};
use anyhow::Result;
use engine_provisioner::build::BuildOptions;
use engine_runtime::lifecycle;
use llorch_io::handoff::{Owner, ProcessIdentity};
use llorch_profile::SandboxMode;
use serde_json::{json, Value};

pub fn bench_sandbox(
    ctx: &Ctx,
    profile: Option<&str>,
    runs: usize,
    max_tokens: u32,
) -> Result<Value> {
    let p = ctx.profile(profile)?;
    let pool = crate::bench_pool(&p)?;
    let prep = llorch_stack::prepare(&p, &pool, &ctx.layout, &BuildOptions::quiet())?.engine;
    let owner = Owner::Supervised {
        supervisor: ProcessIdentity::current(),
        command: "cargo xtask bench sandbox".into(),
    };
    let rt = crate::runtime()?;
    let http = llorch_io::http::async_client();
    let prompt = "Write a long story about a lighthouse keeper:\n";
    let modes = [SandboxMode::Auto, SandboxMode::Off];
    let (mut rate, mut ttft) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    let mut active = String::new();
    for run in 0..runs {
        let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let mut pr = prep.clone();
            pr.sandbox = modes[i];
            let e = lifecycle::spawn(&pr, &ctx.layout, &owner)?;
            if i == 0 {
                active = e.sandbox.summary();
            }
            let r = rt.block_on(async {
                direct_completion(&http, &e.url, prompt, 8).await?;
                direct_completion(&http, &e.url, prompt, max_tokens).await
            });
            e.stop();
            let (t, d) = r?;
            ttft[i].push(t);
            rate[i].push(d);
        }
    }
    let (rs, ro) = (median(&mut rate[0]), median(&mut rate[1]));
    let (ts, to) = (median(&mut ttft[0]), median(&mut ttft[1]));
    Ok(json!({
        "sandbox": active,
        "decode_tok_per_s_sandboxed_median": rs,
        "decode_tok_per_s_sandboxed_spread": spread(&rate[0]),
        "decode_tok_per_s_unconfined_median": ro,
        "decode_tok_per_s_unconfined_spread": spread(&rate[1]),
        "ratio_decode_sandboxed_over_unconfined": rs / ro,
        "ttft_ms_sandboxed_median": ts,
        "ttft_ms_sandboxed_spread": spread(&ttft[0]),
        "ttft_ms_unconfined_median": to,
        "ttft_ms_unconfined_spread": spread(&ttft[1]),
        "ratio_ttft_sandboxed_over_unconfined": ts / to,
        "runs": runs,
        "max_tokens": max_tokens,
    }))
}
