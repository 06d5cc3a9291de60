//! `cargo xtask`: the llama-orch command line. `main` parses flags, finds the
//! workspace and dispatches; each command lives in its own module and calls
//! into the library crates, which do the work.
// The doc comments of the commands are their `--help` text, written for a
// terminal (`oci://HOST[:PORT]/REPO`), not rustdoc links.
#![allow(rustdoc::broken_intra_doc_links)]

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod ci;
mod deploy;
mod doctor;
mod engine;
mod haiku;
mod model;
mod pin;
mod provision;
mod serve;
mod source;
mod status;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "llama-orch: build llama.cpp from source, fetch a model, serve it, stream real tokens",
    long_about = "llama-orch takes a machine from nothing to a serving LLM.\n\n\
        Profiles live in requirements/<name>.yaml (default: cpu); pinned llama.cpp revisions in\n\
        toolchains/llama.cpp.yaml. Everything is cached under cache/ (override with LLORCH_CACHE_DIR).\n\
        Set LLORCH_VERBOSE=1 to see every external command line.",
    version
)]
struct Cli {
    /// Print nothing but results and errors (no progress, no warnings)
    #[arg(long, short, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Also print every external command line (as LLORCH_VERBOSE=1 does)
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build, inspect and prune cached llama-server builds
    Engine(engine::EngineCmd),
    /// Side-by-side measurements: build, model, provision, stream, openai, pools, fleet, load, soak
    Bench(bench::BenchCmd),
    /// What CI runs: fmt check, clippy, rustdoc links, the default engine and model, then all tests
    Ci(ci::CiCmd),
    /// Report every tool a profile needs, found or not, and how to install what is missing
    Doctor(doctor::DoctorCmd),
    /// Build or reuse the engine, fetch the model, start llama-server, wait until ready, write the handoff
    Provision(provision::ProvisionCmd),
    /// Provision, supervise the engine and serve the orchestrator API until Ctrl-C
    Serve(serve::ServeCmd),
    /// The end-to-end proof: stream a haiku from the real engine and check it
    Haiku(haiku::HaikuCmd),
    /// Fetch, list, verify and evict models
    Model(model::ModelCmd),
    /// Offline source bundles of the pinned llama.cpp tree
    Source(source::SourceCmd),
    /// Follow upstream: `pin bump` builds, proves and records the next llama.cpp
    Pin(pin::PinCmd),
    /// Container images of the fingerprinted engine (OCI layout, pushed with --to)
    Image(deploy::ImageCmd),
    /// Kubernetes manifests: per pool a Deployment, Service, PodDisruptionBudget and InferencePool
    K8s(deploy::K8sCmd),
    /// What a running orchestrator is doing: pools, replicas, engines, the last requests
    Status(status::StatusCmd),
}

fn main() {
    // SIGINT stops every phase (a build, a fetch), also when inherited as ignored.
    llorch_io::signals::unignore_interrupt();
    let cli = Cli::parse();
    llorch_io::report::set(if cli.quiet {
        llorch_io::report::Level::Quiet
    } else if cli.verbose {
        llorch_io::report::Level::Verbose
    } else {
        llorch_io::report::Level::Normal
    });
    if let Err(e) = run(cli) {
        eprintln!("error: {}", render_error(&e));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let ctx = Ctx::discover()?;
    match cli.cmd {
        Command::Engine(c) => c.run(&ctx),
        Command::Doctor(c) => c.run(&ctx),
        Command::Ci(c) => c.run(&ctx),
        Command::Bench(c) => c.run(&ctx),
        Command::Source(c) => c.run(&ctx),
        Command::Model(c) => c.run(&ctx),
        Command::Provision(c) => c.run(&ctx),
        Command::Serve(c) => c.run(&ctx),
        Command::Haiku(c) => c.run(&ctx),
        Command::Pin(c) => c.run(&ctx),
        Command::Image(c) => c.run(&ctx),
        Command::K8s(c) => c.run(&ctx),
        Command::Status(c) => c.run(),
    }
}

/// The error and its causes, each once: library errors already embed their
/// cause in their message, so a cause whose text is already shown is skipped.
pub fn render_error(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

/// What every command gets: where the workspace, cache and run state are.
pub struct Ctx {
    pub layout: llorch_io::paths::Layout,
}

impl Ctx {
    fn discover() -> Result<Ctx> {
        Ok(Ctx {
            layout: llorch_io::paths::Layout::discover()?,
        })
    }

    pub fn profile(&self, name: Option<&str>) -> Result<llorch_profile::Profile> {
        Ok(llorch_profile::Profile::resolve(&self.layout.root, name)?)
    }
}

/// Print `value` as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
