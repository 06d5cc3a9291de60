//! `llorch-haiku`: the haiku proof with live output, standalone (the same
//! `llorch_proof::cli` that `cargo xtask haiku` calls), for hosts that run
//! prebuilt binaries (`docs/gpu/proof.sh`).

use anyhow::{bail, Result};

fn main() -> Result<()> {
    let mut profile_arg = None;
    let mut pool_arg = None;
    let mut json = false;
    let mut against = None;
    let mut handoff = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = true,
            "--profile" | "-p" => profile_arg = args.next(),
            s if s.starts_with("--profile=") => profile_arg = Some(s[10..].to_string()),
            "--pool" => pool_arg = args.next(),
            "--against" => against = args.next(),
            "--handoff" => handoff = args.next(),
            s if s.starts_with("--pool=") => pool_arg = Some(s[7..].to_string()),
            other => {
                bail!("unknown argument `{other}` (usage: llorch-haiku [--profile P] [--pool POOL] [--json], or llorch-haiku --against URL --handoff FILE [--json] with LLORCH_API_TOKEN)")
            }
        }
    }
    let output = if json {
        llorch_proof::Output::Json
    } else {
        llorch_proof::Output::Live
    };
    if against.is_some() || handoff.is_some() {
        let (Some(url), Some(h)) = (against, handoff) else {
            bail!("--against URL and --handoff FILE go together");
        };
        let token = std::env::var("LLORCH_API_TOKEN").ok();
        if !llorch_proof::cli_running(&url, std::path::Path::new(&h), token, output)? {
            eprintln!("error: the haiku proof failed (see the checks above)");
            std::process::exit(1);
        }
        return Ok(());
    }
    let layout = llorch_io::paths::Layout::discover()?;
    let profile = llorch_profile::Profile::resolve(&layout.root, profile_arg.as_deref())?;
    let pool = match pool_arg {
        Some(p) => llorch_types::PoolId::parse(&p)?,
        None => profile.pool().clone(),
    };
    if !llorch_proof::cli(&profile, &pool, &layout, output)? {
        eprintln!("error: the haiku proof failed (see the checks above)");
        std::process::exit(1);
    }
    Ok(())
}
