//! The proof for people: the haiku streamed live, then each check.

use crate::{proof_pool, run};
use anyhow::Result;
use llorch_io::paths::Layout;
use llorch_profile::Profile;
use llorch_types::PoolId;

/// How [`cli`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// The haiku streamed token by token, then each check.
    Live,
    /// The report as JSON on stdout, nothing else there.
    Json,
    /// Nothing: a caller that prints its own report (`pin bump --json`).
    Quiet,
}

/// The proof with its output, as `cargo xtask haiku` shows it: for a
/// profile, run under its own pool. Returns whether the proof passed; an
/// error only when it could not run at all.
pub fn cli(profile: &Profile, pool: &PoolId, layout: &Layout, output: Output) -> Result<bool> {
    show(Subject::Profile(profile, pool, layout), output)
}

/// The proof against an orchestrator that runs already (an unpacked
/// container image's), with the engine its handoff file names.
pub fn cli_running(
    orchestrator: &str,
    handoff: &std::path::Path,
    token: Option<String>,
    output: Output,
) -> Result<bool> {
    show(Subject::Running(orchestrator, handoff, token), output)
}

enum Subject<'a> {
    Profile(&'a Profile, &'a PoolId, &'a Layout),
    Running(&'a str, &'a std::path::Path, Option<String>),
}

fn show(subject: Subject<'_>, output: Output) -> Result<bool> {
    use std::io::Write;
    let json = output != Output::Live;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let (false, Subject::Profile(profile, pool, _)) = (json, &subject) {
        llorch_io::info!(
            "provisioning profile `{}` under pool `{}` (engine build and model are cached after the first run)",
            profile.name,
            proof_pool(pool)
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
    let report = rt.block_on(async {
        match &subject {
            Subject::Profile(profile, pool, layout) => {
                run(
                    profile,
                    pool,
                    layout,
                    llorch_io::report::Reporter::quiet_if(json),
                    &on_token,
                )
                .await
            }
            Subject::Running(orch, handoff, token) => {
                let t = crate::Target::running(orch, handoff, token.clone())?;
                crate::prove(&t, &on_token).await
            }
        }
    })?;
    match output {
        Output::Json => {
            println!("{}", serde_json::to_string_pretty(&report)?);
            return Ok(report.passed);
        }
        Output::Quiet => return Ok(report.passed),
        Output::Live => {}
    }
    println!("\n--- end ---");
    for c in &report.checks {
        println!("  [{}] {}", if c.ok { "ok" } else { "FAIL" }, c.name);
        if !c.ok {
            println!("         {}", c.detail);
        }
    }
    println!(
        "  another nonce {} the text (reported only: at temperature 0 a small model may write the same haiku)",
        if report.other_nonce_text_differs {
            "changed"
        } else {
            "did not change"
        }
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
    if let Subject::Profile(_, _, layout) = subject {
        println!(
            "  summary: {}",
            layout.runtime.join("haiku/last.json").display()
        );
    }
    Ok(report.passed)
}
