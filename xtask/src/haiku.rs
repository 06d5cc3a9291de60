//! `cargo xtask haiku`: the end-to-end proof, streamed live.

use crate::{print_json, Ctx};
use anyhow::{bail, Result};
use clap::Args;
use std::io::Write;

#[derive(Args)]
pub struct HaikuCmd {
    #[command(flatten)]
    p: crate::engine::ProfileArgs,
}

impl HaikuCmd {
    pub fn run(self, ctx: &Ctx) -> Result<()> {
        let profile = ctx.profile(self.p.profile.as_deref())?;
        let json = self.p.json;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        if !json {
            eprintln!(
                "provisioning profile `{}` (engine build and model are cached after the first run)",
                profile.name
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
            &profile,
            &ctx.layout,
            json,
            &on_token,
        ))?;
        if json {
            print_json(&report)?;
        } else {
            println!("\n--- end ---");
            for c in &report.checks {
                println!("  [{}] {}", if c.ok { "ok" } else { "FAIL" }, c.name);
                if !c.ok {
                    println!("         {}", c.detail);
                }
            }
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
                ctx.layout.runtime.join("haiku/last.json").display()
            );
        }
        if !report.passed {
            bail!("the haiku proof failed (see the checks above)");
        }
        Ok(())
    }
}
