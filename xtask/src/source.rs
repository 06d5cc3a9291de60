//! `cargo xtask source bundle`: a compact, verified offline bundle of the pinned tree.

use crate::{print_json, Ctx};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args)]
pub struct SourceCmd {
    #[command(subcommand)]
    cmd: SourceSub,
}

#[derive(Subcommand)]
enum SourceSub {
    /// Write a bundle of the profile's pinned llama.cpp tree (only what building llama-server needs)
    Bundle {
        #[command(flatten)]
        p: crate::engine::ProfileArgs,
        /// Where to write the bundle (.tar.gz)
        #[arg(long)]
        out: PathBuf,
    },
    /// Check a bundle against a profile's pin without building
    Verify {
        #[command(flatten)]
        p: crate::engine::ProfileArgs,
        bundle: PathBuf,
    },
}

impl SourceCmd {
    pub fn run(self, ctx: &Ctx) -> Result<()> {
        match self.cmd {
            SourceSub::Bundle { p, out } => {
                let profile = ctx.profile(p.profile.as_deref())?;
                let tree = engine_provisioner::source::fetch(&profile.pin, &ctx.layout, &|m| {
                    llorch_io::info!("{m}")
                })?;
                let m = engine_provisioner::bundle::create(&profile, &tree, &out)
                    .context("write source bundle")?;
                let sha = llorch_io::digest::sha256_file(&out)?;
                let size = fs_err::metadata(&out)?.len();
                let tree = engine_provisioner::bundle::tree_digest(&m.files);
                let backend = serde_json::to_value(m.backend)?;
                let backend = backend.as_str().unwrap_or("cpu");
                let pinned = profile.pin.bundle_trees.get(backend);
                if p.json {
                    return print_json(&serde_json::json!({
                        "bundle": out, "sha256": sha, "size_bytes": size, "files": m.files.len(),
                        "pin": m.pin, "source": m.source, "backend": m.backend,
                        "tree_digest": tree, "pinned": pinned == Some(&tree),
                    }));
                }
                match pinned {
                    Some(d) if d == &tree => llorch_io::info!("  tree digest {tree}: the pin's bundle_trees.{backend}"),
                    Some(d) => llorch_io::warn!("warning: tree digest {tree}, but the pin's bundle_trees.{backend} is {d}: offline hosts will refuse this bundle"),
                    None => llorch_io::info!("note: offline hosts accept this bundle only if the pin names it; add to pin {} in toolchains/llama.cpp.yaml:\n    bundle_trees:\n      {backend}: {tree}", m.pin),
                }
                println!(
                    "wrote {} ({:.1} MB, {} files, sha256 {sha})\n  pin {} = {} {} (llama.cpp {})",
                    out.display(),
                    size as f64 / 1e6,
                    m.files.len(),
                    m.pin,
                    m.source.kind,
                    m.source.id,
                    m.source.commit
                );
                Ok(())
            }
            SourceSub::Verify { p, bundle } => {
                let profile = ctx.profile(p.profile.as_deref())?;
                let tmp = tempfile::tempdir()?;
                let m = engine_provisioner::bundle::verify_into(&bundle, &profile.pin, tmp.path())?;
                println!(
                    "ok: {} files match the manifest; source {} {}",
                    m.files.len(),
                    m.source.kind,
                    m.source.id
                );
                Ok(())
            }
        }
    }
}
