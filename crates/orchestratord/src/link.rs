//! Where the engine is right now. A supervisor moves it (restart on a new
//! port); a handoff file names it for engines that `provision` started.

use llorch_io::handoff::Handoff;
use serde::{Deserialize, Serialize};

/// What the orchestrator knows about the engine it fronts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EngineInfo {
    /// The pool this engine serves (tasks may name it: `pool`).
    pub pool: String,
    /// The engine build's fingerprint.
    #[serde(default)]
    pub fingerprint: String,
    /// llama-server's flags (those that change numerics feed OpenAI's `system_fingerprint`).
    #[serde(default)]
    pub flags: Vec<String>,
    pub url: String,
    pub engine: String,
    pub engine_version: String,
    pub model_ref: String,
    pub model_digest: String,
    pub ctx_max: Option<u64>,
    /// Parallel slots of the engine (`--parallel`): 1 in exact mode.
    pub slots: usize,
    /// Continuous batching with prompt-cache reuse (`mode: batched`): results depend on load.
    #[serde(default)]
    pub batched: bool,
    /// Sent as `Authorization: Bearer` to an engine that requires a key.
    #[serde(skip)]
    pub api_key: Option<String>,
    /// The protections the engine runs with (see `engine_runtime::sandbox`).
    #[serde(default)]
    pub sandbox: Option<serde_json::Value>,
}

/// Why an engine's handoff cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HandoffRefused {
    #[error(transparent)]
    Key(#[from] llorch_io::handoff::RunFileError),
    #[error(
        "the engine at {0} is off loopback but its handoff names no API key; refusing to use it"
    )]
    OffLoopbackWithoutKey(String),
}

impl EngineInfo {
    /// The engine's own HTTP API (its URL and key).
    pub fn server(&self) -> llorch_io::llama_server::LlamaServer {
        llorch_io::llama_server::LlamaServer::new(self.url.clone(), self.api_key.clone())
    }

    pub fn from_handoff(h: &Handoff) -> Result<EngineInfo, HandoffRefused> {
        let api_key = h.api_key()?;
        if api_key.is_none() && !url_is_loopback(&h.url) {
            return Err(HandoffRefused::OffLoopbackWithoutKey(h.url.clone()));
        }
        Ok(EngineInfo {
            pool: h.pool_id.to_string(),
            fingerprint: h.fingerprint.clone(),
            flags: h.flags.clone(),
            url: h.url.clone(),
            engine: h.engine.clone(),
            engine_version: h.engine_version.clone(),
            model_ref: h.model.reference.clone(),
            model_digest: h.model.digest.clone(),
            ctx_max: h.model.metadata["ctx_max"].as_u64(),
            slots: slots_of(&h.flags),
            batched: is_batched(&h.flags),
            api_key,
            sandbox: h.sandbox.clone(),
        })
    }

    /// `exact` or `batched`.
    pub fn mode(&self) -> &'static str {
        if self.batched {
            "batched"
        } else {
            "exact"
        }
    }

    /// What the engine's flags let it serve.
    pub fn serves(&self) -> Serves {
        serves(&self.flags)
    }
}

/// What a pool's engine serves: generation (chat, completions, messages,
/// responses) or, started with `--embeddings`, vectors (and rerank scores
/// with `--pooling rank`). llama-server serves one or the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serves {
    Generation,
    Embeddings,
    Rerank,
}

impl Serves {
    /// The endpoints of this kind of pool.
    pub fn endpoints(self) -> &'static [&'static str] {
        match self {
            Serves::Generation => &[
                "/v1/chat/completions",
                "/v1/completions",
                "/v1/messages",
                "/v1/responses",
                "/v1/tasks",
            ],
            Serves::Embeddings => &["/v1/embeddings"],
            Serves::Rerank => &["/v1/rerank"],
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Serves::Generation => "generation",
            Serves::Embeddings => "embeddings",
            Serves::Rerank => "rerank",
        }
    }
}

/// What llama-server's flags let it serve.
pub fn serves(flags: &[String]) -> Serves {
    let pooling = flags
        .iter()
        .position(|f| f == "--pooling")
        .and_then(|i| flags.get(i + 1));
    if flags.iter().any(|f| f == "--reranking" || f == "--rerank")
        || pooling.is_some_and(|p| p == "rank")
    {
        Serves::Rerank
    } else if flags
        .iter()
        .any(|f| f == "--embeddings" || f == "--embedding")
    {
        Serves::Embeddings
    } else {
        Serves::Generation
    }
}

/// The slot count llama-server's flags give (`--parallel N`; 1 when absent or odd).
pub fn slots_of(flags: &[String]) -> usize {
    flags
        .iter()
        .position(|f| f == "--parallel" || f == "-np")
        .and_then(|i| flags.get(i + 1))
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| (1..=1024).contains(n))
        .unwrap_or(1)
}

/// Whether the flags turn continuous batching on (`--cont-batching`; batched mode).
pub fn is_batched(flags: &[String]) -> bool {
    flags.iter().any(|f| f == "--cont-batching" || f == "-cb")
}

fn url_is_loopback(url: &str) -> bool {
    if llorch_io::llama_server::socket_of(url).is_some() {
        return true; // a unix socket: only this machine reaches it
    }
    let host = url
        .split("://")
        .nth(1)
        .unwrap_or("")
        .split('/')
        .next()
        .unwrap_or("");
    let host = host
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(host)
        .trim_matches(['[', ']']);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// The state of the engine behind a link.
// A short-lived value (read, matched, dropped); boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum LinkState {
    Ready(EngineInfo),
    /// Starting or restarting: tasks wait.
    Starting,
    /// Given up for good (the reason says why, with the engine's last log lines): tasks fail.
    Failed(String),
    /// No engine runs and none is wanted: a pool that loads on demand.
    Unloaded,
    /// Being stopped (idle, or to make room): its memory is not free yet.
    Unloading,
}

/// Why a pool could not be loaded now.
#[derive(Clone, Debug, PartialEq)]
pub enum LoadRefusal {
    /// Try again later (memory is being released by an unload under way).
    Wait(String),
    /// It cannot load now: its queued tasks fail with this reason.
    Fail(String),
}

/// What the scheduler knows when it asks a pool to load.
#[derive(Clone, Debug, Default)]
pub struct LoadContext {
    /// Another pool is unloading right now (its memory will come back).
    pub unloads_in_flight: bool,
}

pub trait EngineLink: Send + Sync + 'static {
    fn current(&self) -> LinkState;
    /// The engine stopped answering mid-stream: the owner should kill and restart it.
    fn report_stalled(&self) {}
    /// Whether this link starts and stops its engine when the scheduler asks
    /// ([`EngineLink::load`], [`EngineLink::unload`]). Such a pool admits tasks
    /// while it is unloaded or loading; they wait in its queue.
    fn loads_on_demand(&self) -> bool {
        false
    }
    /// Start the engine of an unloaded pool; `Ok` once the start is under way.
    /// May block briefly (a memory probe); called off the async runtime.
    fn load(&self, _ctx: &LoadContext) -> Result<(), LoadRefusal> {
        Err(LoadRefusal::Fail(
            "this pool's engine is not started by the orchestrator".into(),
        ))
    }
    /// Stop the engine (must not block); `current` says `Unloading`, then `Unloaded`.
    fn unload(&self) {}
    /// The engine's log file (the status page shows its tail).
    fn log_path(&self) -> Option<std::path::PathBuf> {
        None
    }
    /// The GPUs the engine is pinned to (empty: a CPU engine, or all GPUs).
    fn devices(&self) -> Vec<u32> {
        Vec::new()
    }
}

/// Follows `.runtime/engines/<pool>.json` (an engine that `provision` started).
pub struct HandoffLink(pub std::path::PathBuf);

impl EngineLink for HandoffLink {
    fn current(&self) -> LinkState {
        match Handoff::read(&self.0) {
            Ok(Some(h)) if h.process.is_running() => match EngineInfo::from_handoff(&h) {
                Ok(i) => LinkState::Ready(i),
                Err(e) => LinkState::Failed(e.to_string()),
            },
            _ => LinkState::Starting,
        }
    }
}

impl<F: Fn() -> Option<EngineInfo> + Send + Sync + 'static> EngineLink for F {
    fn current(&self) -> LinkState {
        match self() {
            Some(i) => LinkState::Ready(i),
            None => LinkState::Starting,
        }
    }
}

/// A link shared with its owner (who can also stop the engine at shutdown).
impl<T: EngineLink> EngineLink for std::sync::Arc<T> {
    fn current(&self) -> LinkState {
        (**self).current()
    }
    fn report_stalled(&self) {
        (**self).report_stalled()
    }
    fn loads_on_demand(&self) -> bool {
        (**self).loads_on_demand()
    }
    fn load(&self, ctx: &LoadContext) -> Result<(), LoadRefusal> {
        (**self).load(ctx)
    }
    fn unload(&self) {
        (**self).unload()
    }
    fn log_path(&self) -> Option<std::path::PathBuf> {
        (**self).log_path()
    }
    fn devices(&self) -> Vec<u32> {
        (**self).devices()
    }
}
