//! What a profile file holds (`requirements/<name>.yaml`), as typed and
//! strict serde structures: the engine (backend, archs, flags, registry),
//! the model, the server flags and the haiku proof's options. Validation
//! that needs several fields at once is `Profile::resolve`'s.

use crate::{Affinity, Concurrency, ConcurrencyKeys, Count, Mode};
use llorch_types::PoolId;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Cpu,
    Cuda,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    pub schema: u32,
    pub pool: PoolId,
    pub engine: EngineSpec,
    #[serde(default)]
    pub allow_package_installs: bool,
    #[serde(default)]
    pub model: Option<ModelSpec>,
    #[serde(default)]
    pub server: ServerSpec,
    #[serde(default)]
    pub haiku: HaikuSpec,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSpec {
    /// Pin name in `toolchains/llama.cpp.yaml`; the file's default when absent.
    #[serde(default)]
    pub pin: Option<String>,
    pub backend: Backend,
    /// CUDA architectures (`86`, `90`, or `native` when written explicitly).
    #[serde(default)]
    pub cuda_archs: Vec<String>,
    /// Extra `-DKEY=VALUE` flags.
    #[serde(default)]
    pub cmake_flags: Vec<String>,
    #[serde(default = "default_build_type")]
    pub build_type: String,
    /// An OCI repository that shares built engines (pulled before building,
    /// pushed after when `push: true`). Not a build input.
    #[serde(default)]
    pub registry: Option<RegistrySpec>,
}

/// `engine.registry` of a profile.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySpec {
    /// `oci://HOST[:PORT]/REPO` (no tag: engines are tagged with their fingerprint).
    pub url: String,
    /// Push engines this machine builds.
    #[serde(default)]
    pub push: bool,
    /// Allow plain HTTP to a registry that is not on loopback.
    #[serde(default)]
    pub insecure: bool,
}

fn default_build_type() -> String {
    "Release".into()
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    #[serde(rename = "ref")]
    pub reference: String,
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub require_digest: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum PortSpec {
    Number(u16),
    Range(String),
}

impl Default for PortSpec {
    fn default() -> Self {
        PortSpec::Number(0)
    }
}

/// A port range a profile names that is not one.
#[derive(Debug, thiserror::Error)]
#[error("port `{spec}`: {why}")]
pub struct PortError {
    pub spec: String,
    pub why: &'static str,
}

impl PortSpec {
    /// Candidate ports in order; `[0]` means "any free port".
    pub fn candidates(&self) -> Result<Vec<u16>, PortError> {
        match self {
            PortSpec::Number(n) => Ok(vec![*n]),
            PortSpec::Range(s) => {
                let bad = |why| PortError {
                    spec: s.clone(),
                    why,
                };
                let (a, b) = s
                    .split_once('-')
                    .ok_or_else(|| bad("expected a number or a range like 8080-8090"))?;
                let a: u16 = a.trim().parse().map_err(|_| bad("bad start"))?;
                let b: u16 = b.trim().parse().map_err(|_| bad("bad end"))?;
                if a == 0 || b < a {
                    return Err(bad("range must be ascending and above 0"));
                }
                Ok((a..=b).collect())
            }
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default)]
    pub port: PortSpec,
    /// Fixed thread count; 0 means "physical cores of this machine", resolved once at spawn.
    #[serde(default)]
    pub threads: u32,
    #[serde(default = "default_ctx")]
    pub ctx_size: u32,
    #[serde(default)]
    pub n_gpu_layers: Option<i32>,
    /// Extra llama-server flags (checked against the enforced deterministic profile).
    #[serde(default)]
    pub extra_args: Vec<String>,
    #[serde(default = "default_ready_timeout")]
    pub ready_timeout_s: u64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `exact` (default: one slot per engine) or `batched` (see [`concurrency`](crate::concurrency)).
    #[serde(default)]
    pub mode: Option<Mode>,
    /// Parallel slots of a batched engine.
    #[serde(default)]
    pub slots: Option<Count>,
    /// Engines of the same build, model and flags serving the pool.
    #[serde(default)]
    pub replicas: Option<Count>,
    /// How requests are spread over replicas (`none` or `prefix`).
    #[serde(default)]
    pub affinity: Option<Affinity>,
    /// An embedding pool: the engine runs with `--embeddings` and serves
    /// `/v1/embeddings` (and `/v1/rerank` with `pooling: rank`), not chat.
    #[serde(default)]
    pub embeddings: bool,
    /// How token vectors become one vector (`--pooling`); needs `embeddings: true`.
    #[serde(default)]
    pub pooling: Option<Pooling>,
    /// How the engine is confined (Landlock, seccomp, no_new_privs, limits):
    /// `auto` (default: every protection this kernel has), `strict` (refuse
    /// to start without all of them) or `off` (loud: full user rights).
    #[serde(default)]
    pub sandbox: SandboxMode,
    /// NVIDIA MPS: `system` (default: engines join a control daemon the
    /// machine runs, if any; none is started) or `own` (llama-orch starts a
    /// daemon of its own for the pool's GPUs and stops it with the pool).
    #[serde(default)]
    pub mps: MpsMode,
    /// Where the engine listens: `auto` (default: a unix socket in its own
    /// network namespace where llama-orch may make one, i.e. as root; else
    /// `host`:`port`), `tcp` (`host`:`port`) or `unix` (a socket under the
    /// run directory and no TCP at all).
    #[serde(default)]
    pub listen: ListenMode,
}

/// `server.listen`: how the orchestrator reaches the engine.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ListenMode {
    /// A unix socket in its own network namespace where that can be made
    /// (root with `CAP_SYS_ADMIN`, a loopback `host`); else TCP.
    #[default]
    Auto,
    /// `server.host`:`server.port`.
    Tcp,
    /// A unix socket: the engine may not bind or connect any TCP port.
    Unix,
}

impl ListenMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ListenMode::Auto => "auto",
            ListenMode::Tcp => "tcp",
            ListenMode::Unix => "unix",
        }
    }
}

/// `server.mps`: whose NVIDIA Multi-Process Service the pool's engines use.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MpsMode {
    /// The machine's daemon where one runs (llama-orch never starts or stops it).
    #[default]
    System,
    /// A daemon of the pool's own: pipe and log directories under the runtime
    /// directory, started before its engines, stopped after them; refused
    /// when another daemon already serves the machine.
    Own,
}

impl MpsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MpsMode::System => "system",
            MpsMode::Own => "own",
        }
    }
}

/// `server.sandbox`: how a spawned engine is confined.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SandboxMode {
    /// Every protection the kernel supports; the start line says which.
    #[default]
    Auto,
    /// All protections or no start.
    Strict,
    /// None: the engine runs with the user's full rights (warned at start).
    Off,
}

impl SandboxMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxMode::Auto => "auto",
            SandboxMode::Strict => "strict",
            SandboxMode::Off => "off",
        }
    }
}

/// llama-server's `--pooling` values.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    None,
    Mean,
    Cls,
    Last,
    /// A reranking model's score: the pool serves `/v1/rerank`.
    Rank,
}

impl Pooling {
    pub fn as_str(self) -> &'static str {
        match self {
            Pooling::None => "none",
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Last => "last",
            Pooling::Rank => "rank",
        }
    }
}

impl ServerSpec {
    /// The concurrency keys as written.
    pub fn concurrency_keys(&self) -> ConcurrencyKeys {
        ConcurrencyKeys {
            mode: self.mode,
            slots: self.slots,
            replicas: self.replicas,
            affinity: self.affinity,
        }
    }

    /// Set the keys (a stack file's values, already resolved).
    pub fn set_concurrency(&mut self, c: Concurrency) {
        let k = c.keys();
        self.mode = k.mode;
        self.slots = k.slots;
        self.replicas = k.replicas;
        self.affinity = k.affinity;
    }
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_ctx() -> u32 {
    2048
}
fn default_ready_timeout() -> u64 {
    120
}
fn default_seed() -> u64 {
    42
}

impl Default for ServerSpec {
    fn default() -> Self {
        ServerSpec {
            host: default_host(),
            port: PortSpec::default(),
            threads: 0,
            ctx_size: default_ctx(),
            n_gpu_layers: None,
            extra_args: Vec::new(),
            ready_timeout_s: default_ready_timeout(),
            seed: default_seed(),
            mode: None,
            slots: None,
            replicas: None,
            affinity: None,
            embeddings: false,
            pooling: None,
            sandbox: SandboxMode::Auto,
            mps: MpsMode::System,
            listen: ListenMode::Auto,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HaikuSpec {
    #[serde(default)]
    pub require_minute_word: bool,
    #[serde(default)]
    pub max_tokens: Option<u32>,
}
