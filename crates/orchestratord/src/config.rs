//! What the orchestrator is configured with, and the listening flags shared
//! by the `orchestratord` binary and `cargo xtask serve`.

use std::net::SocketAddr;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    pub addr: SocketAddr,
    pub api_token: Option<String>,
    pub queue_capacity: usize,
    pub max_body_bytes: usize,
    pub max_prompt_chars: usize,
    pub max_tokens_limit: u32,
    pub default_max_tokens: u32,
    pub default_seed: u64,
    pub health_interval: Duration,
    /// A stream that sees no frame from the engine for this long ends with
    /// `ENGINE_STALLED`, and the engine is restarted.
    pub stall_timeout: Duration,
    /// Extra `Host` names accepted (besides the bound address and, on
    /// loopback, `localhost`/`127.0.0.1`/`[::1]`): DNS-rebinding guard.
    pub allowed_hosts: Vec<String>,
    /// A connection that has not sent a complete request head within this is closed.
    pub header_read_timeout: Duration,
    /// How long a finished task stays readable (its stream can still be opened).
    pub retention: Duration,
    /// `/metrics` is served without the API token (counts and pool names
    /// only), for scrapers that send none: Prometheus, an inference
    /// gateway's endpoint picker.
    pub open_metrics: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_token: None,
            queue_capacity: 64,
            max_body_bytes: 256 * 1024,
            max_prompt_chars: 64 * 1024,
            max_tokens_limit: 4096,
            default_max_tokens: 128,
            default_seed: 42,
            health_interval: Duration::from_millis(200),
            stall_timeout: Duration::from_secs(20),
            allowed_hosts: Vec::new(),
            header_read_timeout: Duration::from_secs(10),
            retention: Duration::from_secs(600),
            open_metrics: false,
        }
    }
}

/// The listening options shared by `orchestratord` and `cargo xtask serve`.
#[derive(Clone, Debug, clap::Args)]
pub struct ListenArgs {
    /// Address to listen on (a non-loopback address needs an API token)
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Bearer token clients must send (required off loopback)
    #[arg(long, env = "LLORCH_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Tasks that may wait in the queue
    #[arg(long, default_value_t = 64)]
    pub queue_capacity: usize,
    /// Seconds without a frame from the engine before a stream ends with ENGINE_STALLED
    #[arg(long, default_value_t = 20)]
    pub stall_timeout_s: u64,
    /// Also accept requests whose `Host` is NAME (repeatable). On a loopback
    /// bind only the bound address, localhost, 127.0.0.1 and `[::1]` are
    /// accepted otherwise, so a web page cannot reach the API through DNS
    /// rebinding.
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<String>,
    /// Serve /metrics without the API token (it holds counts and pool names
    /// only): for Prometheus and an inference gateway's endpoint picker,
    /// which scrape without credentials
    #[arg(long, env = "LLORCH_OPEN_METRICS")]
    pub open_metrics: bool,
}

impl ListenArgs {
    pub fn config(&self) -> Config {
        Config {
            addr: self.addr,
            api_token: self.api_token.clone(),
            queue_capacity: self.queue_capacity,
            stall_timeout: Duration::from_secs(self.stall_timeout_s.clamp(1, 3600)),
            allowed_hosts: self
                .allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            open_metrics: self.open_metrics,
            ..Default::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("refusing to bind {0} without an API token: a non-loopback address is reachable from other machines\n  hint: set LLORCH_API_TOKEN (clients then send `Authorization: Bearer <token>`) or bind 127.0.0.1")]
    TokenRequired(SocketAddr),
    #[error("no pool to serve")]
    NoPools,
    #[error("pool `{0}` is listed twice; every pool needs its own id")]
    DuplicatePool(String),
    #[error("bind {addr}: {err}")]
    Bind {
        addr: SocketAddr,
        err: std::io::Error,
    },
}

impl Config {
    /// Configuration errors that need no engine: checked before anything is built or started.
    pub fn check(&self) -> Result<(), ServeError> {
        if !self.addr.ip().is_loopback() && self.api_token.as_deref().unwrap_or("").is_empty() {
            return Err(ServeError::TokenRequired(self.addr));
        }
        Ok(())
    }
}
