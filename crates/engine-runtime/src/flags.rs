//! The engine's command line and environment: the deterministic flag
//! profile, the `extra_args` allow-list ([`ALLOWED_FLAGS`]), the environment
//! allow-list ([`ENV_ALLOWED`]), and [`prepare`], which turns a profile and
//! a built engine into a [`PreparedEngine`]. (Split out of `lifecycle`;
//! its module comment has the policy.)

use crate::lifecycle::EngineError;
use llorch_io::handoff::EngineModel;
use llorch_profile::{Backend, Profile};
use llorch_types::PoolId;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything needed to start one engine replica.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PreparedEngine {
    pub binary: PathBuf,
    pub model: EngineModel,
    /// Server flags without `-m`, `--port` (chosen at spawn; a unix-socket
    /// engine's `--host` is its socket, set at spawn).
    pub flags: Vec<String>,
    pub env: Vec<(String, String)>,
    pub pool_id: PoolId,
    pub replica_id: String,
    pub fingerprint: String,
    pub host: String,
    pub ports: Vec<u16>,
    pub ready_timeout_s: u64,
    pub engine_version: String,
    /// How the engine is confined (`server.sandbox`; see [`crate::sandbox`]).
    pub sandbox: llorch_profile::SandboxMode,
    /// Where it listens (`server.listen`).
    pub listen: llorch_profile::ListenMode,
    /// A GPU build (CUDA): the sandbox limits itself (see [`crate::sandbox`]).
    pub gpu: bool,
}

/// Flags `extra_args` may carry: they change neither the deterministic
/// profile nor where the model comes from. Everything else is refused.
pub const ALLOWED_FLAGS: &[(&str, bool)] = &[
    // (flag, takes a value)
    ("--batch-size", true),
    ("-b", true),
    ("--ubatch-size", true),
    ("-ub", true),
    ("--flash-attn", true),
    ("-fa", true),
    ("--cache-type-k", true),
    ("-ctk", true),
    ("--cache-type-v", true),
    ("-ctv", true),
    ("--kv-unified", false),
    ("-kvu", false),
    ("--no-mmap", false),
    ("--mlock", false),
    ("--split-mode", true),
    ("-sm", true),
    ("--tensor-split", true),
    ("-ts", true),
    ("--main-gpu", true),
    ("-mg", true),
    ("--temp", true),
    ("--top-k", true),
    ("--top-p", true),
    ("--min-p", true),
    ("--repeat-penalty", true),
    ("--n-predict", true),
    ("-n", true),
    ("--keep", true),
    ("--rope-freq-base", true),
    ("--rope-freq-scale", true),
    ("--rope-scaling", true),
    ("--timeout", true),
    ("--threads-batch", true),
    ("-tb", true),
    ("--numa", true),
    ("--no-warmup", false),
    ("--jinja", false),
    ("--chat-template", true),
];

/// Why a known flag is refused (shown to the user); anything not listed here
/// nor in [`ALLOWED_FLAGS`] is refused as unknown.
const REFUSED: &[(&[&str], &str)] = &[
    (
        &["--parallel", "-np"],
        "the engine runs with --parallel 1 (one slot, deterministic); for more slots set server.mode: batched and server.slots: N, or server.replicas: K for exact concurrency",
    ),
    (
        &["--cont-batching", "-cb"],
        "continuous batching is off (--no-cont-batching) for determinism; server.mode: batched turns it on",
    ),
    (&["--webui", "--ui"], "the web UI is off (--no-webui)"),
    (&["--no-metrics"], "metrics are always on (--metrics)"),
    (&["--host"], "set server.host in the profile instead"),
    (&["--port"], "set server.port in the profile instead"),
    (
        &["--threads", "-t"],
        "set server.threads in the profile instead",
    ),
    (
        &[
            "-m",
            "--model",
            "-mu",
            "--model-url",
            "-hf",
            "--hf-repo",
            "-hfr",
            "-hff",
            "--hf-file",
            "-dr",
            "--docker-repo",
            "-hft",
            "--hf-token",
        ],
        "the model comes from the profile's model section (verified by digest); the engine never fetches one itself",
    ),
    (
        &["--api-key", "--api-key-file"],
        "an engine bound off loopback gets a generated key automatically",
    ),
    (
        &["--ctx-size", "-c"],
        "set server.ctx_size in the profile instead",
    ),
];

/// `server.extra_args` checked against the allow-list (each refusal says
/// why), and the GPU layer count they may set.
fn checked_extra_args(
    extra_args: &[String],
    n_gpu_layers: Option<i32>,
) -> Result<(Vec<String>, Option<i32>), EngineError> {
    let mut ngl = n_gpu_layers;
    let mut extra = Vec::new();
    let mut it = extra_args.iter().peekable();
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with('-') => (n.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let shown = llorch_types::excerpt(&name, 40);
        if matches!(
            name.as_str(),
            "-ngl" | "--ngl" | "--gpu-layers" | "--n-gpu-layers"
        ) {
            let v = inline.or_else(|| it.next().cloned()).ok_or_else(|| {
                EngineError::ForbiddenFlag {
                    flag: shown.clone(),
                    why: "needs a number".into(),
                }
            })?;
            ngl = Some(v.parse().map_err(|_| EngineError::ForbiddenFlag {
                flag: format!("{shown} {}", llorch_types::excerpt(&v, 20)),
                why: "the layer count must be a number".into(),
            })?);
            continue;
        }
        if let Some((_, why)) = REFUSED
            .iter()
            .find(|(names, _)| names.contains(&name.as_str()))
        {
            return Err(EngineError::ForbiddenFlag {
                flag: shown,
                why: format!("it contradicts the enforced profile: {why}"),
            });
        }
        let Some((_, takes_value)) = ALLOWED_FLAGS.iter().find(|(f, _)| *f == name) else {
            return Err(EngineError::ForbiddenFlag {
                flag: shown,
                why: "it is not on the allow-list of flags that keep the deterministic profile and a verified model (see ALLOWED_FLAGS in engine-runtime)".into(),
            });
        };
        extra.push(name.clone());
        if *takes_value {
            let v = inline.or_else(|| it.next().cloned()).ok_or_else(|| {
                EngineError::ForbiddenFlag {
                    flag: shown.clone(),
                    why: "needs a value".into(),
                }
            })?;
            if v.len() > 256 || v.starts_with('-') && v.parse::<f64>().is_err() {
                return Err(EngineError::ForbiddenFlag {
                    flag: shown,
                    why: "its value is missing or too long".into(),
                });
            }
            extra.push(v);
        } else if inline.is_some() {
            return Err(EngineError::ForbiddenFlag {
                flag: shown,
                why: "takes no value".into(),
            });
        }
    }
    Ok((extra, ngl))
}

/// The llama-server flags for a profile (without model and port).
pub fn server_flags(profile: &Profile) -> Result<Vec<String>, EngineError> {
    let s = &profile.file.server;
    let threads = if s.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    } else {
        s.threads
    };
    let (extra, ngl) = checked_extra_args(&s.extra_args, s.n_gpu_layers)?;
    let ngl = match profile.file.engine.backend {
        Backend::Cpu => 0,
        Backend::Cuda => ngl.unwrap_or(999),
    };
    // Exact: one slot, no continuous batching. Batched: N slots with
    // continuous batching, each with the profile's context (llama-server
    // splits --ctx-size over its slots).
    let c = profile.concurrency();
    let (slots, batching, ctx) = match c.mode {
        llorch_profile::Mode::Exact => (1, "--no-cont-batching", s.ctx_size as u64),
        llorch_profile::Mode::Batched => (
            c.slots,
            "--cont-batching",
            s.ctx_size as u64 * c.slots as u64,
        ),
    };
    let mut f: Vec<String> = vec![
        "--host".into(),
        s.host.clone(),
        "--parallel".into(),
        slots.to_string(),
        batching.into(),
        "--no-webui".into(),
        "--metrics".into(),
        // The model's own chat template through llama-server's Jinja engine:
        // tool calls, structured output and the Anthropic and Responses
        // translations need it (the pin's default, written out so a pin
        // that changes its default changes nothing here).
        "--jinja".into(),
        "--threads".into(),
        threads.to_string(),
        "--ctx-size".into(),
        ctx.to_string(),
        "--n-gpu-layers".into(),
        ngl.to_string(),
        "--seed".into(),
        s.seed.to_string(),
    ];
    // Exact mode evaluates every prompt afresh, whichever endpoint a request
    // takes (llama-server's Anthropic translation drops a request's
    // `cache_prompt`): reusing a cached prefix can change the numbers.
    if c.mode == llorch_profile::Mode::Exact {
        f.push("--no-cache-prompt".into());
    }
    // An embedding pool: vectors (or rerank scores), not chat; mean pooling
    // unless the profile names another.
    if s.embeddings {
        let pooling = s.pooling.unwrap_or(llorch_profile::Pooling::Mean);
        f.extend([
            "--embeddings".into(),
            "--pooling".into(),
            pooling.as_str().into(),
        ]);
    }
    f.extend(extra);
    Ok(f)
}

/// Environment variables the engine may see (everything else is removed):
/// the system basics, locale, and the GPU runtime's own selectors.
pub const ENV_ALLOWED: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "CUDA_CACHE_PATH",
    "CUDA_MODULE_LOADING",
    // Where a system NVIDIA MPS daemon listens (its clients find it by this).
    "CUDA_MPS_PIPE_DIRECTORY",
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
];

pub(crate) fn env_allowed(k: &str) -> bool {
    ENV_ALLOWED.contains(&k) || k.starts_with("LC_")
}

/// Assemble the engine for a profile from a built binary and a fetched model.
pub fn prepare(
    profile: &Profile,
    pool: &PoolId,
    binary: &Path,
    fingerprint: &str,
    engine_version: &str,
    model: EngineModel,
) -> Result<PreparedEngine, EngineError> {
    let host = &profile.file.server.host;
    let ports = match profile.file.server.port.candidates() {
        Ok(v) if v == [0] => vec![0],
        Ok(v) if v.len() == 1 => (v[0]..=v[0].saturating_add(9)).collect(),
        Ok(v) => v,
        Err(e) => {
            return Err(EngineError::NoPort {
                candidates: format!("{:?}", profile.file.server.port),
                why: e.to_string(),
            })
        }
    };
    Ok(PreparedEngine {
        binary: binary.to_path_buf(),
        model,
        flags: server_flags(profile)?,
        env: Vec::new(),
        pool_id: pool.clone(),
        replica_id: "r0".into(),
        fingerprint: fingerprint.into(),
        host: host.clone(),
        ports,
        ready_timeout_s: profile.file.server.ready_timeout_s,
        sandbox: profile.file.server.sandbox,
        listen: profile.file.server.listen,
        gpu: profile.file.engine.backend != llorch_profile::Backend::Cpu,
        engine_version: engine_version.into(),
    })
}

pub fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile_with(extra: &[&str], backend: Backend) -> Profile {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut p = Profile::resolve(&root, None).unwrap();
        p.file.server.extra_args = extra.iter().map(|s| s.to_string()).collect();
        p.file.server.threads = 3;
        p.file.engine.backend = backend;
        p
    }

    #[test]
    fn deterministic_profile_is_enforced() {
        let f = server_flags(&profile_with(&[], Backend::Cpu))
            .unwrap()
            .join(" ");
        for want in [
            "--parallel 1",
            "--no-cont-batching",
            "--no-cache-prompt",
            "--jinja",
            "--no-webui",
            "--metrics",
            "--threads 3",
            "--host 127.0.0.1",
            "--n-gpu-layers 0",
        ] {
            assert!(f.contains(want), "{want} missing from {f}");
        }
    }

    #[test]
    fn a_batched_pool_gets_its_slots_continuous_batching_and_their_context() {
        let mut p = profile_with(&[], Backend::Cpu);
        p.file.server.mode = Some(llorch_profile::Mode::Batched);
        p.file.server.slots = Some(llorch_profile::Count::Fixed(4));
        let f = server_flags(&p).unwrap().join(" ");
        for want in ["--parallel 4", "--cont-batching", "--ctx-size 8192"] {
            assert!(f.contains(want), "{want} missing from {f}");
        }
        assert!(!f.contains("--no-cont-batching"), "{f}");
        assert!(!f.contains("--no-cache-prompt"), "{f}");
        // Replicas change nothing in one engine's flags.
        let mut p = profile_with(&[], Backend::Cpu);
        p.file.server.replicas = Some(llorch_profile::Count::Fixed(3));
        assert_eq!(
            server_flags(&p).unwrap(),
            server_flags(&profile_with(&[], Backend::Cpu)).unwrap()
        );
    }

    #[test]
    fn an_embedding_pool_gets_its_pooling() {
        let mut p = profile_with(&[], Backend::Cpu);
        p.file.server.embeddings = true;
        let f = server_flags(&p).unwrap().join(" ");
        assert!(f.contains("--embeddings --pooling mean"), "{f}");
        p.file.server.pooling = Some(llorch_profile::Pooling::Rank);
        let f = server_flags(&p).unwrap().join(" ");
        assert!(f.contains("--embeddings --pooling rank"), "{f}");
        assert!(!server_flags(&profile_with(&[], Backend::Cpu))
            .unwrap()
            .contains(&"--embeddings".to_string()));
    }

    #[test]
    fn gpu_layer_spellings_normalize() {
        for spelling in [
            &["-ngl", "33"][..],
            &["--ngl", "33"],
            &["--gpu-layers", "33"],
            &["--gpu-layers=33"],
        ] {
            let f = server_flags(&profile_with(spelling, Backend::Cuda))
                .unwrap()
                .join(" ");
            assert!(f.contains("--n-gpu-layers 33"), "{f}");
            assert!(!f.contains("-ngl") && !f.contains("--gpu-layers"), "{f}");
        }
        let f = server_flags(&profile_with(&["-ngl", "33"], Backend::Cpu))
            .unwrap()
            .join(" ");
        assert!(f.contains("--n-gpu-layers 0"), "a CPU build forces 0: {f}");
    }

    #[test]
    fn extra_args_are_an_allow_list() {
        for bad in [
            "--parallel",
            "-np",
            "--cont-batching",
            "--webui",
            "--port",
            "-m",
            "-hfr",
            "--docker-repo",
            "--api-key",
        ] {
            let e = server_flags(&profile_with(&[bad, "4"], Backend::Cpu))
                .unwrap_err()
                .to_string();
            assert!(e.contains(bad) && e.contains("enforced profile"), "{e}");
        }
        for unknown in ["--model-draft", "--lora", "--some-future-flag"] {
            let e = server_flags(&profile_with(&[unknown, "x"], Backend::Cpu))
                .unwrap_err()
                .to_string();
            assert!(e.contains("allow-list"), "{e}");
        }
        let ok = server_flags(&profile_with(
            &["--temp", "0.5", "--flash-attn=on", "--no-mmap", "-b", "256"],
            Backend::Cpu,
        ))
        .unwrap()
        .join(" ");
        assert!(
            ok.ends_with("--temp 0.5 --flash-attn on --no-mmap -b 256"),
            "{ok}"
        );
        assert!(server_flags(&profile_with(&["--no-mmap=1"], Backend::Cpu)).is_err());
        assert!(server_flags(&profile_with(&["--temp"], Backend::Cpu)).is_err());
    }

    #[test]
    fn env_policy_keeps_no_secrets() {
        for k in [
            "HF_TOKEN",
            "LLORCH_API_TOKEN",
            "LLAMA_ARG_CONT_BATCHING",
            "AWS_SECRET_ACCESS_KEY",
        ] {
            assert!(!env_allowed(k), "{k}");
        }
        for k in ["PATH", "LC_ALL", "CUDA_VISIBLE_DEVICES"] {
            assert!(env_allowed(k), "{k}");
        }
    }
}
