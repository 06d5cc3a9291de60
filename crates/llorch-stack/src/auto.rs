//! `slots: auto` and `replicas: auto`: a batched pool's slot count and
//! engines per device, chosen when the pool starts.
//!
//! The rule, in order:
//! 1. Memory decides what can run at all: an engine needs the model file,
//!    `slots` × the KV cache of one slot (each slot keeps its own context of
//!    `ctx_size` tokens: split KV, F16), and a fixed reserve (CUDA context and
//!    compute buffers, [`RESERVE_MIB_CUDA`]; [`RESERVE_MIB_CPU`] on a CPU),
//!    within [`BUDGET_SHARE`] of the device's free memory (a CPU: available
//!    RAM). A model that does not fit with one slot is refused with the sizes.
//! 2. A tune table that `cargo xtask bench tune --write` recorded for this
//!    engine fingerprint, model digest, device and MPS state chooses, among
//!    the measured configurations that fit and agree with any count written
//!    as a number: the one nearest the best at every client count measured
//!    (its worst share of the best fair tokens/s; unfair, fairness below
//!    [`MIN_FAIRNESS`], at any count: not chosen; [`TuneTable::pick`]). A
//!    table that cannot be read, whose digest does not match its rows, or
//!    whose values are out of range is ignored with a warning, never
//!    trusted.
//! 3. Without a table: one engine (several engines on one device paid off
//!    only where they were measured: under MPS, for a small model), and as
//!    many slots as fit, at most [`MAX_AUTO_SLOTS`] on a GPU and the core
//!    count on a CPU.

use crate::auto_table::TuneTable;
use llorch_profile::Concurrency;
use serde::Serialize;

/// Share of the free memory auto plans with (the rest absorbs what the
/// estimate does not count).
pub const BUDGET_SHARE: f64 = 0.9;
/// MiB each CUDA engine needs besides the model and the KV cache.
pub const RESERVE_MIB_CUDA: u64 = 768;
/// MiB each CPU engine needs besides the model and the KV cache.
pub const RESERVE_MIB_CPU: u64 = 256;
/// Most slots auto gives one engine without a tune table.
pub const MAX_AUTO_SLOTS: u32 = 64;
/// Configurations whose slowest client got less than this share of the
/// median client's tokens/s are never chosen from a table.
pub const MIN_FAIRNESS: f64 = 0.8;

/// The engine flag sets `bench tune --variants` measures beside slots ×
/// engines, by name: the profile's own flags (`split`: each slot its own KV
/// cache, flash attention as the pin decides, `auto` on CUDA), one KV cache
/// shared by all slots, flash attention off, an 8-bit KV cache, larger
/// batches. A table row may name only these.
pub const VARIANTS: &[(&str, &[&str])] = &[
    ("split", &[]),
    ("unified-kv", &["--kv-unified"]),
    ("no-flash-attn", &["--flash-attn", "off"]),
    (
        "q8-kv",
        &["--cache-type-k", "q8_0", "--cache-type-v", "q8_0"],
    ),
    (
        "batch-2048",
        &["--batch-size", "2048", "--ubatch-size", "2048"],
    ),
];

/// One spelling per engine flag a variant may set (`-fa` is `--flash-attn`).
fn canonical(flag: &str) -> &str {
    match flag {
        "-fa" => "--flash-attn",
        "-ctk" => "--cache-type-k",
        "-ctv" => "--cache-type-v",
        "-b" => "--batch-size",
        "-ub" => "--ubatch-size",
        "-kvu" => "--kv-unified",
        f => f,
    }
}

/// A variant's name for its flags (`split` for none).
pub fn variant_name(args: &[String]) -> &'static str {
    VARIANTS
        .iter()
        .find(|(_, a)| args == *a)
        .map_or("?", |(n, _)| n)
}

/// Where the pool will run, as auto sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Device {
    /// `cpu-<cores>c` or `cuda-sm<cc>-<total MiB>MiB`: part of the table's key.
    pub name: String,
    pub cuda: bool,
    /// MiB auto may plan with (already [`BUDGET_SHARE`] of what is free).
    pub budget_mib: u64,
    pub cores: u32,
    /// An MPS control daemon serves the GPU.
    pub mps: bool,
}

/// What one engine of the model needs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelNeeds {
    pub file_mib: u64,
    /// KV cache of one slot (`ctx_size` tokens), MiB.
    pub kv_mib_per_slot: f64,
}

impl ModelNeeds {
    /// From the GGUF header's layer and head counts and the context per slot.
    pub fn of(
        file_bytes: u64,
        header: &model_provisioner::gguf::GgufHeader,
        ctx_size: u32,
    ) -> Result<ModelNeeds, AutoError> {
        let arch = header.arch().unwrap_or("llama");
        let key = |k: &str| format!("{arch}.{k}");
        let get = |k: &str| header.uint(&key(k));
        let missing = |k: &str| AutoError::ModelShape(key(k));
        let layers = get("block_count").ok_or_else(|| missing("block_count"))?;
        let heads = get("attention.head_count").ok_or_else(|| missing("attention.head_count"))?;
        let kv_heads = get("attention.head_count_kv").unwrap_or(heads);
        let head_dim = match get("attention.key_length") {
            Some(d) => d,
            None => {
                let embd = get("embedding_length").ok_or_else(|| missing("embedding_length"))?;
                embd.checked_div(heads)
                    .ok_or_else(|| missing("attention.head_count"))?
            }
        };
        // K and V, F16, per token: 2 × layers × kv_heads × head_dim × 2 bytes.
        let per_token = 4.0 * layers as f64 * kv_heads as f64 * head_dim as f64;
        let kv = per_token * ctx_size as f64 / (1024.0 * 1024.0);
        if !kv.is_finite() || kv <= 0.0 {
            return Err(AutoError::ModelShape(key("attention.head_count_kv")));
        }
        Ok(ModelNeeds {
            file_mib: file_bytes.div_ceil(1024 * 1024),
            kv_mib_per_slot: kv,
        })
    }
}

/// What auto chose, and why (printed at start, shown in capabilities).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Choice {
    pub slots: u32,
    pub replicas: u32,
    /// Engine flags added to the profile's (a measured [`VARIANTS`] entry).
    pub args: Vec<String>,
    pub why: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AutoError {
    #[error("auto cannot measure the device or model: {0}")]
    Probe(String),
    #[error("auto cannot size the pool: the model file has no `{0}` (needed for its KV cache per slot); name slots and replicas")]
    ModelShape(String),
    #[error("auto: one engine with one slot needs {need} MiB (model {model} MiB, KV {kv:.0} MiB per slot, reserve {reserve} MiB) but {device} has {budget} MiB to plan with; free memory, lower server.ctx_size, or use a smaller model")]
    NoRoom {
        device: String,
        need: u64,
        model: u64,
        kv: f64,
        reserve: u64,
        budget: u64,
    },
    #[error("auto: {fixed} fixed by the profile or stack, and nothing else fits {device}'s {budget} MiB; lower it or use auto for both")]
    FixedDoesNotFit {
        fixed: String,
        device: String,
        budget: u64,
    },
}

/// MiB one engine of `slots` slots needs.
fn engine_mib(dev: &Device, m: &ModelNeeds, slots: u32) -> f64 {
    let reserve = if dev.cuda {
        RESERVE_MIB_CUDA
    } else {
        RESERVE_MIB_CPU
    };
    m.file_mib as f64 + slots as f64 * m.kv_mib_per_slot + reserve as f64
}

/// Whether `replicas` engines of `slots` slots fit the device.
fn fits(dev: &Device, m: &ModelNeeds, slots: u32, replicas: u32) -> bool {
    replicas as f64 * engine_mib(dev, m, slots) <= dev.budget_mib as f64
}

/// Choose the counts `c` leaves to auto.
pub fn choose(
    c: &Concurrency,
    dev: &Device,
    m: &ModelNeeds,
    table: Option<&TuneTable>,
    profile_args: &[String],
) -> Result<Choice, AutoError> {
    if !fits(dev, m, 1, 1) {
        let reserve = if dev.cuda {
            RESERVE_MIB_CUDA
        } else {
            RESERVE_MIB_CPU
        };
        return Err(AutoError::NoRoom {
            device: dev.name.clone(),
            need: engine_mib(dev, m, 1).ceil() as u64,
            model: m.file_mib,
            kv: m.kv_mib_per_slot,
            reserve,
            budget: dev.budget_mib,
        });
    }
    let slots_ok = |s: u32| c.auto.slots || s == c.slots;
    let replicas_ok = |r: u32| c.auto.replicas || r == c.replicas;
    if let Some(t) = table {
        // A flag the profile sets itself (in any spelling) is the profile's to decide.
        let set: Vec<&str> = profile_args
            .iter()
            .filter(|a| a.starts_with('-'))
            .map(|a| canonical(a.split('=').next().unwrap_or(a)))
            .collect();
        let args_ok = |args: &[String]| {
            args.iter()
                .filter(|a| a.starts_with('-'))
                .all(|a| !set.contains(&canonical(a)))
        };
        let pick = t.pick(|r| {
            slots_ok(r.slots)
                && replicas_ok(r.replicas)
                && args_ok(&r.args)
                && fits(dev, m, r.slots, r.replicas)
        });
        if let Some(p) = pick {
            return Ok(Choice {
                slots: p.slots,
                replicas: p.replicas,
                args: p.args.clone(),
                why: format!(
                    "measured by bench tune with flags `{}`: {}; the nearest to the best at every client count of {} configurations that fit {} ({} MiB)",
                    variant_name(&p.args),
                    p.describe(),
                    p.candidates,
                    dev.name,
                    dev.budget_mib
                ),
            });
        }
    }
    let replicas = if c.auto.replicas { 1 } else { c.replicas };
    let cap = if dev.cuda {
        MAX_AUTO_SLOTS
    } else {
        dev.cores.clamp(1, MAX_AUTO_SLOTS)
    };
    let slots = if c.auto.slots {
        (1..=cap)
            .rev()
            .find(|s| fits(dev, m, *s, replicas))
            .ok_or_else(|| AutoError::FixedDoesNotFit {
                fixed: format!("replicas: {replicas}"),
                device: dev.name.clone(),
                budget: dev.budget_mib,
            })?
    } else if fits(dev, m, c.slots, replicas) {
        c.slots
    } else {
        return Err(AutoError::FixedDoesNotFit {
            fixed: format!("slots: {}", c.slots),
            device: dev.name.clone(),
            budget: dev.budget_mib,
        });
    };
    let bound = if dev.cuda {
        format!("at most {MAX_AUTO_SLOTS}")
    } else {
        format!("one per core ({})", dev.cores)
    };
    Ok(Choice {
        slots,
        replicas,
        args: Vec::new(),
        why: format!(
            "no tune table for this engine, model and device: one engine{}, slots as many as fit {} MiB ({:.0} MiB of KV each), {bound}; `cargo xtask bench tune --write` measures instead",
            if c.auto.replicas { " (several engines per device pay off only where measured)" } else { "" },
            dev.budget_mib,
            m.kv_mib_per_slot
        ),
    })
}

/// The device a pool's engines will use, measured now: the first of its
/// `devices` (GPU 0 when it names none) through the GPU probe, or this
/// machine's available RAM and cores for a CPU pool.
pub fn measure_device(
    cuda: bool,
    devices: &[u32],
    probe: &llorch_io::gpu::GpuProbe,
) -> Result<Device, AutoError> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    if !cuda {
        let text =
            fs_err::read_to_string("/proc/meminfo").map_err(|e| AutoError::Probe(e.to_string()))?;
        let avail_kib = mem_available_kib(&text)
            .ok_or_else(|| AutoError::Probe("/proc/meminfo has no MemAvailable line".into()))?;
        return Ok(Device {
            name: format!("cpu-{cores}c"),
            cuda: false,
            budget_mib: ((avail_kib / 1024) as f64 * BUDGET_SHARE) as u64,
            cores,
            mps: false,
        });
    }
    let index = devices.first().copied().unwrap_or(0);
    let readings = probe.read().map_err(|e| AutoError::Probe(e.to_string()))?;
    let g = readings
        .iter()
        .find(|g| g.index == index)
        .ok_or_else(|| AutoError::Probe(format!("nvidia-smi lists no GPU {index}")))?;
    let caps = llorch_io::gpu::compute_caps(&probe.program).unwrap_or_default();
    let cap = caps
        .get(index as usize)
        .map(|c| c.replace('.', ""))
        .unwrap_or_else(|| "unknown".into());
    Ok(Device {
        name: format!("cuda-sm{cap}-{}MiB", g.total_mib),
        cuda: true,
        budget_mib: (g.free_mib as f64 * BUDGET_SHARE) as u64,
        cores,
        mps: llorch_io::gpu::mps_control_daemon().is_some(),
    })
}

/// `MemAvailable` of `/proc/meminfo`, KiB.
fn mem_available_kib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// Choose a pool's `auto` counts for the engine and model `prep` names,
/// with the tables kept in `tune_dir`: the choice, and a warning when a
/// tune table was found but not used.
pub fn resolve(
    tune_dir: &std::path::Path,
    pool: &llorch_profile::stack::StackPool,
    prep: &engine_runtime::flags::PreparedEngine,
    probe: &llorch_io::gpu::GpuProbe,
) -> Result<(Choice, Option<String>), AutoError> {
    let cuda = pool.profile.file.engine.backend == llorch_profile::Backend::Cuda;
    let dev = measure_device(cuda, &pool.devices, probe)?;
    let bytes = fs_err::metadata(&prep.model.path)
        .map_err(|e| AutoError::Probe(e.to_string()))?
        .len();
    let header = model_provisioner::gguf::read_header(&prep.model.path)
        .map_err(|e| AutoError::Probe(e.to_string()))?;
    let needs = ModelNeeds::of(bytes, &header, pool.profile.file.server.ctx_size)?;
    let path = crate::auto_table::table_path(tune_dir, &prep.fingerprint, &prep.model.digest, &dev);

    let (table, warning) =
        crate::auto_table::read_table(&path, &prep.fingerprint, &prep.model.digest, &dev);
    let mut choice = choose(
        &pool.concurrency,
        &dev,
        &needs,
        table.as_ref(),
        &pool.profile.file.server.extra_args,
    )?;
    // A table that was there but not trusted is part of why (also where the start is quiet).
    if let Some(w) = &warning {
        choice.why = format!("{w}; {}", choice.why);
    }
    Ok((choice, warning))
}

#[cfg(test)]
pub(crate) mod tests;
