//! `cargo xtask image …` and `cargo xtask k8s …`: an OCI image of the
//! fingerprinted engine and Kubernetes manifests for it (the work is
//! `llorch_deploy`'s; this module parses and prints).

use crate::{print_json, Ctx};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args)]
pub struct ImageCmd {
    #[command(subcommand)]
    cmd: ImageSub,
}

#[derive(Subcommand)]
enum ImageSub {
    /// Build an OCI image (an image layout directory) from the cached engine, this binary and
    /// their runtime closure; no base image, no daemon; the same inputs give the same digest
    Build(ImageBuildArgs),
}

#[derive(Args)]
struct Pools {
    /// Profile name (requirements/NAME.yaml) or path; repeat for one pool per profile (default: cpu)
    #[arg(long, short)]
    profile: Vec<String>,
    /// A stack file: one pool per entry
    #[arg(long, conflicts_with = "profile")]
    stack: Option<PathBuf>,
}

#[derive(Args)]
struct ImageBuildArgs {
    #[command(flatten)]
    pools: Pools,
    /// The image layout directory to write (replaced whole; default target/llorch-image)
    #[arg(long)]
    out: Option<PathBuf>,
    /// The tag recorded in the layout and pushed under (default: the first pool's id)
    #[arg(long)]
    tag: Option<String>,
    /// Also push it: oci://HOST[:PORT]/REPO[:TAG]
    #[arg(long)]
    to: Option<String>,
    /// Allow plain HTTP to a registry off loopback
    #[arg(long)]
    insecure: bool,
    /// Machine-readable output on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct K8sCmd {
    #[command(subcommand)]
    cmd: K8sSub,
}

#[derive(Subcommand)]
enum K8sSub {
    /// Write plain Kubernetes YAML per pool: Deployment, Service, PodDisruptionBudget,
    /// InferencePool and its endpoint picker's configuration
    Render(RenderArgs),
}

#[derive(Args)]
struct RenderArgs {
    #[command(flatten)]
    pools: Pools,
    /// The image the pods run (what `image build --to` printed), HOST[:PORT]/REPO:TAG or @sha256:…
    #[arg(long)]
    image: String,
    /// Mount the model from this OCI reference (`model push`) as an image volume
    /// (default: the PersistentVolumeClaim --model-claim)
    #[arg(long)]
    model_image: Option<String>,
    /// The PersistentVolumeClaim holding the model when no --model-image is given
    #[arg(long, default_value = "llorch-models")]
    model_claim: String,
    /// The model's file name in its volume (default: the name `model push` gives it, or model.gguf)
    #[arg(long)]
    model_file: Option<String>,
    /// Pods per pool (hosts serving it)
    #[arg(long, default_value_t = 1)]
    hosts: u32,
    #[arg(long)]
    namespace: Option<String>,
    /// Where to write the YAML (default target/llorch-k8s)
    #[arg(long)]
    out: Option<PathBuf>,
    /// Machine-readable output on stdout
    #[arg(long)]
    json: bool,
}

fn load(ctx: &Ctx, p: &Pools) -> Result<llorch_profile::stack::Stack> {
    crate::serve::stack_from(ctx, &p.profile, p.stack.as_deref(), None)
}

impl ImageCmd {
    pub fn run(self, ctx: &Ctx) -> Result<()> {
        match self.cmd {
            ImageSub::Build(a) => {
                let stack = load(ctx, &a.pools)?;
                let binary = std::env::current_exe().context("find this llorch binary")?;
                let tag = a
                    .tag
                    .clone()
                    .unwrap_or_else(|| stack.pools[0].id.to_string());
                let out = a
                    .out
                    .clone()
                    .unwrap_or_else(|| ctx.layout.root.join("target/llorch-image"));
                let built = llorch_deploy::image::build(
                    &ctx.layout,
                    &stack,
                    &llorch_deploy::image::ImageOptions {
                        out,
                        tag,
                        binary,
                        report: llorch_io::report::Reporter::quiet_if(a.json),
                    },
                )?;
                let pushed = match &a.to {
                    Some(to) => Some(llorch_deploy::push::push(&built.dir, to, a.insecure)?),
                    None => None,
                };
                if a.json {
                    return print_json(&serde_json::json!({"image": built, "pushed": pushed}));
                }
                println!(
                    "image {} ({}:{})",
                    built.digest,
                    built.dir.display(),
                    built.tag
                );
                for l in &built.layers {
                    println!(
                        "  layer {:<8} {:>9.1} MB  {} files  {}",
                        l.name,
                        l.size as f64 / 1e6,
                        l.files,
                        &l.digest[..19]
                    );
                }
                for p in &built.pools {
                    println!(
                        "  pool {}: engine {} ({}, pin {}), expects model sha256 {} at $LLORCH_MODEL",
                        p.id,
                        &p.fingerprint[..12],
                        p.backend,
                        p.pin,
                        &p.model_sha256[..12]
                    );
                }
                if let Some(p) = pushed {
                    println!("pushed {} ({})", p.reference, p.digest);
                }
                Ok(())
            }
        }
    }
}

impl K8sCmd {
    pub fn run(self, ctx: &Ctx) -> Result<()> {
        match self.cmd {
            K8sSub::Render(a) => {
                let stack = load(ctx, &a.pools)?;
                let out = a
                    .out
                    .clone()
                    .unwrap_or_else(|| ctx.layout.root.join("target/llorch-k8s"));
                let r = llorch_deploy::k8s::render(
                    &stack,
                    &llorch_deploy::k8s::RenderOptions {
                        image: a.image,
                        model_image: a.model_image,
                        claim: a.model_claim,
                        model_file: a.model_file,
                        hosts: a.hosts,
                        namespace: a.namespace,
                        out,
                    },
                )?;
                if a.json {
                    return print_json(&r);
                }
                println!(
                    "wrote {} object(s) to {}:",
                    r.objects.len(),
                    r.dir.display()
                );
                for o in &r.objects {
                    println!("  {o}");
                }
                println!("apply with: kubectl apply -f {}", r.dir.display());
                Ok(())
            }
        }
    }
}
