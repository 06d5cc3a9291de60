//! llama-server's own HTTP API, spelled in one place: the endpoints this
//! workspace calls, requests that carry the engine's key, and typed readings
//! of what comes back (`/slots`, `/metrics`), parsed strictly. Used by the
//! orchestrator's adapter and health loop, the runtime's readiness wait,
//! `provision`, `engine status`, the benches and the haiku proof.
//!
//! Async callers pass their `reqwest::Client`, blocking callers their
//! `reqwest::blocking::Client` (both from [`crate::http`]): this module
//! builds requests and reads answers, it keeps no connection of its own.

use serde::Deserialize;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// The most of a `/slots` or `/metrics` answer read: both are small (a
/// slot is a few KiB, the metrics a few dozen lines); an answer that does
/// not end is an error, not memory.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// A reading of llama-server that failed; each names the URL.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("{url}: {source}")]
    Read { url: String, source: std::io::Error },
    #[error("{url} answered {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("{url} answered more than {MAX_BODY_BYTES} bytes")]
    TooLarge { url: String },
    #[error("unexpected /slots answer: {0}")]
    Slots(String),
    #[error("{url} has no {name}")]
    NoMetric { url: String, name: String },
}

fn http_err(url: &str) -> impl FnOnce(reqwest::Error) -> ServerError + '_ {
    move |source| ServerError::Http {
        url: url.into(),
        source,
    }
}

/// An answer's body, read up to [`MAX_BODY_BYTES`].
async fn body_capped(mut r: reqwest::Response, url: &str) -> Result<Vec<u8>, ServerError> {
    let mut body = Vec::new();
    while let Some(chunk) = r.chunk().await.map_err(http_err(url))? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(ServerError::TooLarge { url: url.into() });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// An answer's body (blocking), read up to [`MAX_BODY_BYTES`].
fn body_capped_blocking(r: reqwest::blocking::Response, url: &str) -> Result<Vec<u8>, ServerError> {
    let mut body = Vec::new();
    r.take(MAX_BODY_BYTES as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|source| ServerError::Read {
            url: url.into(),
            source,
        })?;
    if body.len() > MAX_BODY_BYTES {
        return Err(ServerError::TooLarge { url: url.into() });
    }
    Ok(body)
}

/// The llama-server endpoints the workspace uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// `GET /health`: 200 once the model is loaded (no key needed).
    Health,
    /// `GET /slots`: each slot and whether it is processing.
    Slots,
    /// `POST /completion`: llama-server's native completion (streamed or not).
    Completion,
    /// `POST /apply-template`: the model's chat template applied to messages.
    ApplyTemplate,
    /// `GET /metrics`: Prometheus text (`--metrics`).
    Metrics,
    /// `POST /detokenize`: token ids back to text.
    Detokenize,
}

impl Api {
    pub fn path(self) -> &'static str {
        match self {
            Api::Health => "/health",
            Api::Slots => "/slots",
            Api::Completion => "/completion",
            Api::ApplyTemplate => "/apply-template",
            Api::Metrics => "/metrics",
            Api::Detokenize => "/detokenize",
        }
    }
}

/// One llama-server: its base URL and the key it requires, if any.
///
/// An engine that listens on a unix socket (no TCP at all: see
/// `engine_runtime::sandbox`) is named `unix:<absolute path of the socket>`;
/// its requests go through a client bound to that socket
/// ([`LlamaServer::client`]), with `localhost` as the URL's host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LlamaServer {
    pub url: String,
    pub api_key: Option<String>,
}

/// The prefix that names an engine on a unix socket.
pub const UNIX_PREFIX: &str = "unix:";

/// The socket of an engine named `unix:/path` (`None`: a TCP engine).
pub fn socket_of(url: &str) -> Option<&Path> {
    url.strip_prefix(UNIX_PREFIX)
        .map(Path::new)
        .filter(|p| p.is_absolute())
}

/// The HTTP URL of `path` on the engine named `url` (`http://localhost…`
/// for a unix-socket engine: the socket is the client's, see [`client_for`]).
pub fn http_url(url: &str, path: &str) -> String {
    match socket_of(url) {
        Some(_) => format!("http://localhost{path}"),
        None => format!("{}{path}", url.trim_end_matches('/')),
    }
}

/// Clients bound to one engine socket each, kept for the process's life:
/// a socket's path is stable per pool and replica (`run/<pool>.d/`), so
/// this holds one client per engine the process has talked to. They are
/// never dropped (a blocking client must not be dropped inside an async
/// runtime), and a reqwest client is a handle, cheap to clone.
static ASYNC_UNIX: Mutex<Vec<(PathBuf, reqwest::Client)>> = Mutex::new(Vec::new());
static BLOCKING_UNIX: Mutex<Vec<(PathBuf, reqwest::blocking::Client)>> = Mutex::new(Vec::new());

fn cached<C: Clone>(
    cache: &Mutex<Vec<(PathBuf, C)>>,
    socket: &Path,
    make: impl FnOnce() -> C,
) -> C {
    let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, client)) = c.iter().find(|(p, _)| p == socket) {
        return client.clone();
    }
    let client = make();
    c.push((socket.to_path_buf(), client.clone()));
    client
}

/// The async client for the engine named `url`: `http` itself for a TCP
/// engine; for a unix-socket engine, one bound to its socket with the
/// loopback settings of [`crate::http::async_client`].
pub fn client_for(url: &str, http: &reqwest::Client) -> reqwest::Client {
    match socket_of(url) {
        None => http.clone(),
        Some(s) => cached(&ASYNC_UNIX, s, || crate::http::unix_async_client(s)),
    }
}

/// The blocking client for the engine named `url`: `http` for a TCP
/// engine; for a unix-socket engine, one bound to its socket with the
/// settings of [`crate::http::probe_client`] (short timeouts).
pub fn blocking_client_for(
    url: &str,
    http: &reqwest::blocking::Client,
) -> reqwest::blocking::Client {
    match socket_of(url) {
        None => http.clone(),
        Some(s) => cached(&BLOCKING_UNIX, s, || crate::http::unix_probe_client(s)),
    }
}

impl LlamaServer {
    pub fn new(url: impl Into<String>, api_key: Option<String>) -> LlamaServer {
        LlamaServer {
            url: url.into(),
            api_key,
        }
    }

    /// The endpoint's full URL.
    pub fn endpoint(&self, api: Api) -> String {
        http_url(&self.url, api.path())
    }

    /// The full URL of any path of this engine (the OpenAI-compatible
    /// endpoints the orchestrator relays).
    pub fn url_for(&self, path: &str) -> String {
        http_url(&self.url, path)
    }

    /// The client that reaches this engine (see [`client_for`]).
    pub fn client(&self, http: &reqwest::Client) -> reqwest::Client {
        client_for(&self.url, http)
    }

    /// `method path` (async), with the key when the engine has one.
    pub fn request(
        &self,
        http: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        self.authed(self.client(http).request(method, self.url_for(path)))
    }

    /// `GET` (async), with the key when the engine has one.
    pub fn get(&self, http: &reqwest::Client, api: Api) -> reqwest::RequestBuilder {
        self.authed(self.client(http).get(self.endpoint(api)))
    }

    /// `POST` (async), with the key when the engine has one.
    pub fn post(&self, http: &reqwest::Client, api: Api) -> reqwest::RequestBuilder {
        self.authed(self.client(http).post(self.endpoint(api)))
    }

    /// `GET` (blocking), with the key when the engine has one.
    pub fn get_blocking(
        &self,
        http: &reqwest::blocking::Client,
        api: Api,
    ) -> reqwest::blocking::RequestBuilder {
        let rb = blocking_client_for(&self.url, http).get(self.endpoint(api));
        match &self.api_key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    /// Add the engine's key to a request for another of its endpoints
    /// (the OpenAI-compatible ones the orchestrator relays).
    pub fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    /// Whether `/health` answers 200 within `timeout`.
    pub async fn healthy(&self, http: &reqwest::Client, timeout: Duration) -> bool {
        self.get(http, Api::Health)
            .timeout(timeout)
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 200)
    }

    /// Whether `/health` answers 200 (blocking).
    pub fn healthy_blocking(&self, http: &reqwest::blocking::Client) -> bool {
        self.get_blocking(http, Api::Health)
            .send()
            .is_ok_and(|r| r.status().as_u16() == 200)
    }

    /// The slots, as `/slots` reports them now.
    pub async fn slots(
        &self,
        http: &reqwest::Client,
        timeout: Duration,
    ) -> Result<Vec<Slot>, ServerError> {
        let url = self.endpoint(Api::Slots);
        let r = self
            .get(http, Api::Slots)
            .timeout(timeout)
            .send()
            .await
            .map_err(http_err(&url))?;
        if !r.status().is_success() {
            return Err(ServerError::Status {
                status: r.status(),
                url,
            });
        }
        parse_slots(&body_capped(r, &url).await?)
    }

    /// The slots (blocking).
    pub fn slots_blocking(
        &self,
        http: &reqwest::blocking::Client,
    ) -> Result<Vec<Slot>, ServerError> {
        let url = self.endpoint(Api::Slots);
        let r = self
            .get_blocking(http, Api::Slots)
            .send()
            .map_err(http_err(&url))?;
        if !r.status().is_success() {
            return Err(ServerError::Status {
                status: r.status(),
                url,
            });
        }
        parse_slots(&body_capped_blocking(r, &url)?)
    }

    /// One counter or gauge of `/metrics`.
    pub async fn metric(&self, http: &reqwest::Client, name: &str) -> Result<f64, ServerError> {
        let url = self.endpoint(Api::Metrics);
        let r = self
            .get(http, Api::Metrics)
            .send()
            .await
            .map_err(http_err(&url))?;
        let body = body_capped(r, &url).await?;
        metric(&String::from_utf8_lossy(&body), name).ok_or_else(|| ServerError::NoMetric {
            url,
            name: name.into(),
        })
    }
}

/// One slot of `/slots`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Slot {
    pub id: u32,
    pub is_processing: bool,
    /// The slot's context size in tokens (its share of the KV cache).
    #[serde(default)]
    pub n_ctx: u64,
    /// Tokens the slot's KV cache holds for its current (or last) task:
    /// prompt and generated tokens (llama-server's `prompt.tokens`).
    #[serde(default)]
    pub n_prompt_tokens: u64,
}

/// KV-cache use of a slot list: tokens held by the slots that are
/// processing, and the tokens all slots can hold. An idle slot's retained
/// prefix (a batched engine's prompt cache) is free for the next task, so it
/// does not count as used.
pub fn kv_use(slots: &[Slot]) -> (u64, u64) {
    let held = slots
        .iter()
        .filter(|s| s.is_processing)
        .map(|s| s.n_prompt_tokens.min(s.n_ctx))
        .fold(0u64, u64::saturating_add);
    let capacity = slots
        .iter()
        .map(|s| s.n_ctx)
        .fold(0u64, u64::saturating_add);
    (held, capacity)
}

/// `/slots`' body: an array of slots, each with its `id`, `is_processing`
/// and, where given, `n_ctx` and `n_prompt_tokens` (other fields ignored);
/// at most 4,096 of them.
pub fn parse_slots(body: &[u8]) -> Result<Vec<Slot>, ServerError> {
    let slots: Vec<Slot> =
        serde_json::from_slice(body).map_err(|e| ServerError::Slots(e.to_string()))?;
    if slots.len() > 4096 {
        return Err(ServerError::Slots(format!("{} slots listed", slots.len())));
    }
    Ok(slots)
}

/// No slot is processing.
pub fn all_idle(slots: &[Slot]) -> bool {
    slots.iter().all(|s| !s.is_processing)
}

/// The value of the sample `name` (no labels) in Prometheus text, e.g.
/// `llamacpp:tokens_predicted_total`.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(char::is_whitespace)?;
        (n == name).then(|| v.split_whitespace().next()?.parse::<f64>().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An engine (or something on its port) that answers `/slots` with a
    /// body that never ends: the read stops at the cap with an error.
    #[test]
    fn an_endless_slots_answer_is_refused_at_the_cap() {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut req = [0u8; 1024];
                let _ = std::io::Read::read(&mut s, &mut req);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n[");
                let chunk = vec![b' '; 64 * 1024];
                while s.write_all(&chunk).is_ok() {}
            }
        });
        let e = LlamaServer::new(url, None)
            .slots_blocking(&crate::http::probe_client())
            .unwrap_err();
        assert!(matches!(e, ServerError::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("more than"), "{e}");
    }

    #[test]
    fn slots_and_metrics_are_read_strictly() {
        let s = parse_slots(
            br#"[{"id":0,"is_processing":false,"n_ctx":2048},{"id":1,"is_processing":true}]"#,
        )
        .unwrap();
        assert_eq!(s.len(), 2);
        assert!(!all_idle(&s) && all_idle(&s[..1]));
        for bad in [
            &b"{}"[..],
            br#"[{"id":0}]"#,
            br#"[{"id":-1,"is_processing":false}]"#,
            b"not json",
        ] {
            assert!(
                parse_slots(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let text = "# HELP llamacpp:tokens_predicted_total x\n# TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total 42\nllamacpp:tokens_predicted_total_other 7\n";
        assert_eq!(metric(text, "llamacpp:tokens_predicted_total"), Some(42.0));
        assert_eq!(metric(text, "llamacpp:tokens"), None);
        assert_eq!(metric("llamacpp:x nan?", "llamacpp:x"), None);
        let s = LlamaServer::new("http://127.0.0.1:8080/", Some("k".into()));
        assert_eq!(
            s.endpoint(Api::ApplyTemplate),
            "http://127.0.0.1:8080/apply-template"
        );
    }

    #[test]
    fn kv_use_counts_processing_slots_only_and_never_overflows() {
        let s = parse_slots(
            br#"[{"id":0,"is_processing":true,"n_ctx":1024,"n_prompt_tokens":300},
                 {"id":1,"is_processing":false,"n_ctx":1024,"n_prompt_tokens":900},
                 {"id":2,"is_processing":true,"n_ctx":1024,"n_prompt_tokens":5000}]"#,
        )
        .unwrap();
        // 300 + min(5000, 1024): a slot never holds more than its context.
        assert_eq!(kv_use(&s), (1324, 3072));
        assert_eq!(kv_use(&[]), (0, 0));
        let huge = format!(
            r#"[{{"id":0,"is_processing":true,"n_ctx":{m},"n_prompt_tokens":{m}}},{{"id":1,"is_processing":true,"n_ctx":{m},"n_prompt_tokens":{m}}}]"#,
            m = u64::MAX
        );
        assert_eq!(
            kv_use(&parse_slots(huge.as_bytes()).unwrap()),
            (u64::MAX, u64::MAX)
        );
        assert!(parse_slots(br#"[{"id":0,"is_processing":true,"n_ctx":-5}]"#).is_err());
    }
}
