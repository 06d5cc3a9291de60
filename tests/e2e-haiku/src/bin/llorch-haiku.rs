//! `llorch-haiku`: the haiku proof with live output (what `cargo xtask haiku` runs).

use anyhow::{bail, Result};
use std::io::Write;

fn main() -> Result<()> {
    let mut profile_arg = None;
    let mut pool_arg = None;
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = true,
            "--profile" | "-p" => profile_arg = args.next(),
            s if s.starts_with("--profile=") => profile_arg = Some(s[10..].to_string()),
            "--pool" => pool_arg = args.next(),
            s if s.starts_with("--pool=") => pool_arg = Some(s[7..].to_string()),
            other => {
                bail!("unknown argument `{other}` (usage: llorch-haiku [--profile P] [--pool POOL] [--json])")
            }
        }
    }
    let layout = llorch_io::paths::Layout::discover()?;
    let profile = llorch_profile::Profile::resolve(&layout.root, profile_arg.as_deref())?;
    let pool = match pool_arg {
        Some(p) => llorch_io::handoff::PoolId::parse(&p)?,
        None => profile.pool().clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if !json {
        eprintln!(
            "provisioning profile `{}` under pool `{}` (engine build and model are cached after the first run)",
            profile.name,
            test_harness_e2e_haiku::proof_pool(&pool)
        );
    }
    let streamed = std::sync::atomic::AtomicBool::new(false);
    let on_token = |t: &str| {
        if !json {
            if !streamed.swap(true, std::sync::atomic::Ordering::Relaxed) {
                println!("--- haiku, streamed token by token from llama-server ---");
            }
            print!("{t}");
            let _ = std::io::stdout().flush();
        }
    };
    let report = rt.block_on(test_harness_e2e_haiku::run(
        &profile, &pool, &layout, json, &on_token,
    ))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("\n--- end ---");
        for c in &report.checks {
            println!("  [{}] {}", if c.ok { "ok" } else { "FAIL" }, c.name);
            if !c.ok {
                println!("         {}", c.detail);
            }
        }
        println!(
            "  another nonce {} the text (reported only: at temperature 0 a small model may write the same haiku)",
            if report.other_nonce_text_differs { "changed" } else { "did not change" }
        );
        println!(
            "  minute word `{}`: {}{}",
            report.minute_word,
            if report.minute_word_present {
                "present"
            } else {
                "absent"
            },
            if report.minute_word_required {
                ""
            } else {
                " (reported only: this profile's model is not asked to follow it)"
            }
        );
        println!(
            "  {} tokens, decode {:.0} ms, first token after {:.0} ms; engine {}; model {}",
            report.tokens_out,
            report.decode_ms,
            report.time_to_first_token_ms,
            report.engine_version.lines().next().unwrap_or(""),
            report.model_ref
        );
        println!(
            "  summary: {}",
            layout.runtime.join("haiku/last.json").display()
        );
    }
    if !report.passed {
        eprintln!("error: the haiku proof failed (see the checks above)");
        std::process::exit(1);
    }
    Ok(())
}
