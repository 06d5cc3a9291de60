//! `cargo xtask bench`: the arguments, and the table (or JSON with
//! --json) of what `llorch-bench` measured. Nothing here asserts a time:
//! the figures go into notes and docs/bench.md.

use crate::{print_json, Ctx};
use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct BenchCmd {
    #[command(subcommand)]
    cmd: BenchSub,
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum BenchSub {
    /// Cold `engine build` vs a hand-run cmake with the same flags; cache-hit build time
    Build {
        #[arg(long, short)]
        profile: Option<String>,
        /// Skip the two cold builds (minutes each) and time only cache hits
        #[arg(long)]
        hits_only: bool,
        /// The compiler cache, in a scratch cache: a cold build; the same fingerprint after gc; the next pin
        #[arg(long)]
        incremental: bool,
        /// With --incremental: the release of the pin's package to use as the next pin (default: the newest)
        #[arg(long, requires = "incremental")]
        next: Option<String>,
    },
    /// sha256 throughput on 1 GiB; loopback download vs curl on the same file and server
    Model {
        /// File size in MiB
        #[arg(long, default_value_t = 1024)]
        mib: u64,
    },
    /// Spawn-to-ready through provision vs a direct spawn; no-op provision time
    Provision {
        #[arg(long, short)]
        profile: Option<String>,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Decode tokens/s through the orchestrator vs straight from llama-server; TTFT; cancel; queue memory
    Stream {
        #[arg(long, short)]
        profile: Option<String>,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long, default_value_t = 128)]
        max_tokens: u32,
    },
    /// The engine sandbox's cost: decode tokens/s and TTFT of the same engine sandboxed vs unconfined, alternating
    Sandbox {
        #[arg(long, short)]
        profile: Option<String>,
        #[arg(long, default_value_t = 6)]
        runs: usize,
        #[arg(long, default_value_t = 128)]
        max_tokens: u32,
    },
    /// Many pools: lazy-load overhead, a swap under max_loaded 1 vs a cold start; with --devices, two pools' aggregate decode vs hand-launched engines and one pool alone
    Pools {
        #[arg(long, short)]
        profile: Option<String>,
        #[arg(long, default_value_t = 7)]
        runs: usize,
        #[arg(long, default_value_t = 128)]
        max_tokens: u32,
        /// Two GPUs, one pool each (e.g. `0,1`): also measure aggregate decode tokens/s
        #[arg(long, value_delimiter = ',')]
        devices: Vec<u32>,
        /// Measure aggregate decode without GPUs too (two CPU pools share the cores)
        #[arg(long)]
        throughput: bool,
    },
    /// A registry: engine ready by pull vs a cold build; a fresh machine's first token with a registry hit
    Fleet {
        #[arg(long, short)]
        profile: Option<String>,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Skip the cold build (minutes) and measure only pulls and first tokens
        #[arg(long)]
        skip_build: bool,
    },
    /// Many streaming clients: aggregate tokens/s, TTFT and inter-token p99 through the orchestrator vs the same engines addressed directly
    Load {
        #[arg(long, short)]
        profile: Option<String>,
        /// Client counts, one row each
        #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
        clients: Vec<usize>,
        /// Engines serving the pool (exact: one slot each; batched: --slots each)
        #[arg(long)]
        replicas: Option<llorch_profile::Count>,
        /// exact or batched
        #[arg(long)]
        mode: Option<llorch_profile::Mode>,
        /// Slots of each batched engine
        #[arg(long)]
        slots: Option<llorch_profile::Count>,
        /// GPUs for the replicas (round robin)
        #[arg(long, value_delimiter = ',')]
        devices: Vec<u32>,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value_t = 64)]
        max_tokens: u32,
        /// Threads of each engine (replaces the profile's; replicas sharing a CPU: cores / replicas)
        #[arg(long)]
        threads: Option<u32>,
        /// Also measure, in every run, the same llama-server and model started by hand with its own defaults (-m, --host, --port only)
        #[arg(long)]
        vs_defaults: bool,
    },
    /// Sweep slots x engines per device for a batched pool through the orchestrator and print what `slots: auto` / `replicas: auto` would choose; --write records it where auto reads it
    Tune {
        #[arg(long, short)]
        profile: Option<String>,
        /// Client counts, one row each (auto chooses the configuration nearest the best at every count)
        #[arg(long, value_delimiter = ',', default_value = "16,64")]
        clients: Vec<usize>,
        /// Slot counts to try (default: 1,2,4 on a CPU; 8,16,32,64 on a GPU)
        #[arg(long, value_delimiter = ',')]
        slots: Vec<u32>,
        /// Engines per device to try (default: 1 on a CPU; 1,2,4 on a GPU)
        #[arg(long, value_delimiter = ',')]
        replicas: Vec<u32>,
        /// Engine flag sets to try: split (the profile's flags, the default), unified-kv, no-flash-attn, q8-kv, batch-2048
        #[arg(long, value_delimiter = ',')]
        variants: Vec<String>,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value_t = 256)]
        max_tokens: u32,
        /// Record the table in the cache, where `auto` reads it
        #[arg(long)]
        write: bool,
    },
    /// Many concurrent streaming clients (short, long, 10 % disconnecting) against a batched pool: every stream ends once, refusals are 429, nothing is left
    Soak {
        #[arg(long, short)]
        profile: Option<String>,
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 4)]
        slots: u32,
        #[arg(long, default_value_t = 256)]
        queue_capacity: usize,
    },
    /// The OpenAI API vs llama-server's own endpoints: streamed chat, a forced tool call, embeddings inputs/s; disconnect → slot idle
    Openai {
        #[arg(long, short)]
        profile: Option<String>,
        #[arg(long, default_value_t = 7)]
        runs: usize,
        #[arg(long, default_value_t = 128)]
        max_tokens: u32,
    },
}

impl BenchCmd {
    pub fn run(self, outer: &Ctx) -> Result<()> {
        let ctx = &llorch_bench::Ctx::new(outer.layout.clone());
        let res = match &self.cmd {
            BenchSub::Build {
                profile,
                hits_only,
                incremental,
                next,
            } => {
                if *incremental {
                    let say = |m: &str| llorch_io::info!("{m}");
                    let cand = engine_provisioner::pin::resolve(
                        &outer.layout,
                        next.as_deref(),
                        None,
                        &say,
                    )?;
                    let root = engine_provisioner::pin::candidate_root(&outer.layout, &cand.text)?;
                    llorch_bench::build::bench_incremental(
                        ctx,
                        profile.as_deref(),
                        llorch_bench::build::NextPin {
                            name: &cand.name,
                            root: root.path(),
                        },
                    )?
                } else {
                    llorch_bench::build::bench_build(ctx, profile.as_deref(), *hits_only)?
                }
            }
            BenchSub::Model { mib } => llorch_bench::single::bench_model(ctx, *mib)?,
            BenchSub::Provision { profile, runs } => {
                llorch_bench::single::bench_provision(ctx, profile.as_deref(), *runs)?
            }
            BenchSub::Stream {
                profile,
                runs,
                max_tokens,
            } => llorch_bench::single::bench_stream(ctx, profile.as_deref(), *runs, *max_tokens)?,
            BenchSub::Sandbox {
                profile,
                runs,
                max_tokens,
            } => llorch_bench::sandbox::bench_sandbox(ctx, profile.as_deref(), *runs, *max_tokens)?,
            BenchSub::Openai {
                profile,
                runs,
                max_tokens,
            } => llorch_bench::openai::bench_openai(ctx, profile.as_deref(), *runs, *max_tokens)?,
            BenchSub::Load {
                profile,
                clients,
                replicas,
                mode,
                slots,
                devices,
                runs,
                max_tokens,
                threads,
                vs_defaults,
            } => llorch_bench::load::bench_load(
                ctx,
                &llorch_bench::load::LoadArgs {
                    profile: profile.as_deref(),
                    clients,
                    keys: llorch_profile::ConcurrencyKeys {
                        mode: *mode,
                        slots: *slots,
                        replicas: *replicas,
                        affinity: None,
                    },
                    devices,
                    runs: *runs,
                    max_tokens: *max_tokens,
                    threads: *threads,
                    vs_defaults: *vs_defaults,
                },
            )?,
            BenchSub::Tune {
                profile,
                clients,
                slots,
                replicas,
                variants,
                runs,
                max_tokens,
                write,
            } => llorch_bench::tune::bench_tune(
                ctx,
                &llorch_bench::tune::TuneArgs {
                    profile: profile.as_deref(),
                    clients,
                    slots,
                    replicas,
                    variants,
                    runs: *runs,
                    max_tokens: *max_tokens,
                    write: *write,
                },
            )?,
            BenchSub::Soak {
                profile,
                clients,
                slots,
                queue_capacity,
            } => llorch_bench::soak::bench_soak(
                ctx,
                profile.as_deref(),
                *clients,
                *slots,
                *queue_capacity,
            )?,
            BenchSub::Fleet {
                profile,
                runs,
                skip_build,
            } => llorch_bench::fleet::bench_fleet(ctx, profile.as_deref(), *runs, *skip_build)?,
            BenchSub::Pools {
                profile,
                runs,
                max_tokens,
                devices,
                throughput,
            } => llorch_bench::pools::bench_pools(
                ctx,
                profile.as_deref(),
                *runs,
                *max_tokens,
                devices,
                *throughput,
            )?,
        };
        if self.json {
            return print_json(&res);
        }
        for (k, v) in res.as_object().unwrap() {
            println!("{k:<44} {v}");
        }
        Ok(())
    }
}
