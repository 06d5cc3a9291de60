//! The HTTP door: one client configuration (connect and read timeouts, a
//! user agent, proxies from the environment) and one retry policy.
//! Loopback clients (engine, orchestrator) never use a proxy.
#![allow(clippy::disallowed_methods)] // this is the door

use std::time::Duration;

pub const USER_AGENT: &str = concat!("llama-orch/", env!("CARGO_PKG_VERSION"));

/// An error with its causes, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Extra trusted roots for clients that leave the machine: the PEM bundle
/// named by `SSL_CERT_FILE` (a corporate proxy's CA, a private registry's),
/// on top of the built-in webpki roots. An unreadable or empty bundle is
/// ignored with a warning, never a silent downgrade: the built-in roots stay.
/// Parsed once per value of `SSL_CERT_FILE` (a system bundle holds ~150
/// certificates, and a client is built per download).
fn extra_roots() -> Vec<reqwest::Certificate> {
    type Cached = Option<(Option<std::ffi::OsString>, Vec<reqwest::Certificate>)>;
    static ROOTS: std::sync::Mutex<Cached> = std::sync::Mutex::new(None);
    let var = std::env::var_os("SSL_CERT_FILE");
    let mut cached = ROOTS.lock().unwrap_or_else(|e| e.into_inner());
    match &*cached {
        Some((v, roots)) if *v == var => roots.clone(),
        _ => {
            let roots = read_extra_roots(var.as_deref());
            *cached = Some((var, roots.clone()));
            roots
        }
    }
}

fn read_extra_roots(path: Option<&std::ffi::OsStr>) -> Vec<reqwest::Certificate> {
    let Some(path) = path else {
        return Vec::new();
    };
    match fs_err::read(path).map(|pem| reqwest::Certificate::from_pem_bundle(&pem)) {
        Ok(Ok(certs)) if !certs.is_empty() => certs,
        Ok(Ok(_)) => {
            crate::warn!(
                "warning: SSL_CERT_FILE={} holds no certificate; ignored",
                std::path::Path::new(&path).display()
            );
            Vec::new()
        }
        Ok(Err(e)) => {
            crate::warn!(
                "warning: SSL_CERT_FILE={}: {e}; ignored",
                std::path::Path::new(&path).display()
            );
            Vec::new()
        }
        Err(e) => {
            crate::warn!(
                "warning: cannot read SSL_CERT_FILE={}: {e}; ignored",
                std::path::Path::new(&path).display()
            );
            Vec::new()
        }
    }
}

fn with_roots(mut b: reqwest::blocking::ClientBuilder) -> reqwest::blocking::ClientBuilder {
    for c in extra_roots() {
        b = b.add_root_certificate(c);
    }
    b
}

/// Blocking client for provisioning (downloads, health polls).
pub fn blocking_client() -> reqwest::blocking::Client {
    with_roots(reqwest::blocking::Client::builder())
        .user_agent(USER_AGENT)
        .connect_timeout(Duration::from_secs(10))
        .timeout(None)
        .build()
        .expect("reqwest client configuration is static")
}

/// Blocking client for large downloads: no limit on the whole transfer, but
/// connecting, the response head and every single read must each finish
/// within `stall` (reqwest's blocking timeout applies per operation), so a
/// server that stops sending mid-body is noticed and the download resumes.
pub fn download_client(stall: Duration) -> reqwest::blocking::Client {
    with_roots(reqwest::blocking::Client::builder())
        .redirect(tls_keeping_redirects())
        .user_agent(USER_AGENT)
        .connect_timeout(Duration::from_secs(10).min(stall))
        .timeout(stall)
        .build()
        .expect("reqwest client configuration is static")
}

/// Short-timeout blocking client for local probes (`/health`, `/metrics`).
/// Connections are not reused (see [`async_client`]).
pub fn probe_client() -> reqwest::blocking::Client {
    probe_builder()
        .build()
        .expect("reqwest client configuration is static")
}

/// The probe clients' configuration: short timeouts, no proxy, no reuse.
fn probe_builder() -> reqwest::blocking::ClientBuilder {
    reqwest::blocking::Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(Duration::from_millis(500))
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .no_proxy()
}

/// Async client for loopback HTTP: the orchestrator's engine adapter and
/// health loop, and clients of the orchestrator.
///
/// Connections are not reused. llama-server (cpp-httplib) may close a
/// keep-alive connection right after a response without saying so (idle
/// timeout, a handler that ends the connection), and a request sent on such
/// a connection fails with "connection closed before message completed":
/// seen as spurious engine crashes and readiness flaps under load. A fresh
/// loopback connection per request costs well under a millisecond.
pub fn async_client() -> reqwest::Client {
    loopback_builder()
        .build()
        .expect("reqwest client configuration is static")
}

/// [`async_client`] bound to a unix socket: every request goes to the
/// engine listening there, whatever the URL's host.
pub fn unix_async_client(socket: &std::path::Path) -> reqwest::Client {
    loopback_builder()
        .unix_socket(socket)
        .build()
        .expect("reqwest client configuration is static")
}

/// [`blocking_client`] (no limit on the whole answer) bound to a unix socket.
pub fn unix_blocking_client(socket: &std::path::Path) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(Duration::from_secs(10))
        .timeout(None)
        .unix_socket(socket)
        .build()
        .expect("reqwest client configuration is static")
}

/// [`probe_client`] bound to a unix socket.
pub fn unix_probe_client(socket: &std::path::Path) -> reqwest::blocking::Client {
    probe_builder()
        .unix_socket(socket)
        .build()
        .expect("reqwest client configuration is static")
}

/// The loopback clients' configuration: no proxy, no connection reuse, no Nagle.
fn loopback_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(Duration::from_secs(2))
        .pool_max_idle_per_host(0)
        .no_proxy()
        .tcp_nodelay(true)
}

/// [`async_client`] that sends `Authorization: Bearer <token>` with every
/// request (a client of an orchestrator bound off loopback).
pub fn async_client_with_token(token: Option<&str>) -> reqwest::Client {
    let Some(t) = token.filter(|t| !t.is_empty()) else {
        return async_client();
    };
    let mut headers = reqwest::header::HeaderMap::new();
    if let Ok(mut v) = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")) {
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    loopback_builder()
        .default_headers(headers)
        .build()
        .expect("reqwest client configuration is static")
}

/// Whether `to` may be followed from a chain that was on HTTPS: a transfer
/// never leaves TLS for plain HTTP, except to a loopback address.
pub fn keeps_tls(from_https: bool, to: &reqwest::Url) -> bool {
    let host = to.host_str().unwrap_or("").trim_matches(['[', ']']);
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    to.scheme() == "https" || (to.scheme() == "http" && (!from_https || loopback))
}

/// Redirects that keep the transfer's security ([`keeps_tls`]), at most 10.
/// (reqwest drops `Authorization` on a redirect to another host, so
/// credentials never follow one.)
pub fn tls_keeping_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|a| {
        if a.previous().len() >= 10 {
            return a.error("more than 10 redirects");
        }
        let from_https = a.previous().iter().any(|u| u.scheme() == "https");
        if keeps_tls(from_https, a.url()) {
            a.follow()
        } else {
            let to = a.url().to_string();
            a.error(format!(
                "refused a redirect from HTTPS to {} (a transfer never leaves TLS off loopback)",
                llorch_types::excerpt(&to, 120)
            ))
        }
    })
}

/// Async client for reading from OCI registries: the extra roots,
/// timeouts, and redirects that never leave TLS off loopback.
pub fn registry_client() -> reqwest::Client {
    let mut b = reqwest::Client::builder();
    for c in extra_roots() {
        b = b.add_root_certificate(c);
    }
    b.user_agent(USER_AGENT)
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .redirect(tls_keeping_redirects())
        .build()
        .expect("reqwest client configuration is static")
}

/// Backoff for attempt `n` (0-based): 0.5 s doubling, capped at 8 s.
pub fn backoff(attempt: u32) -> Duration {
    let ms = 500u64.saturating_mul(1u64 << attempt.min(4));
    Duration::from_millis(ms.min(8_000))
}

/// Whether a status is worth retrying (server trouble or rate limiting).
pub fn is_transient_status(code: u16) -> bool {
    code == 408 || code == 429 || (500..=599).contains(&code)
}

/// Blocking client that does not follow redirects (the hub's `HEAD` tells the
/// file digest before it redirects).
pub fn no_redirect_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .user_agent(USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client configuration is static")
}

/// Why a request on an owned connection failed.
#[derive(Debug, thiserror::Error)]
pub enum OwnedError {
    #[error("`{0}` is not an http:// URL with a host and port")]
    Url(String),
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP to {addr}: {source}")]
    Http { addr: String, source: hyper::Error },
    #[error("request to {addr}: {why}")]
    Request { addr: String, why: String },
}

/// An answer on a connection of its own ([`post_owned`]): its status and
/// body; dropping it (or the future that gets it) closes the connection.
pub struct OwnedResponse {
    pub status: u16,
    body: hyper::body::Incoming,
    conn: tokio::task::JoinHandle<()>,
}

impl OwnedResponse {
    /// The next piece of the body; `None` at its end.
    pub async fn chunk(&mut self) -> Option<Result<Vec<u8>, String>> {
        use http_body_util::BodyExt;
        loop {
            match self.body.frame().await? {
                Ok(f) => match f.into_data() {
                    Ok(d) => return Some(Ok(d.to_vec())),
                    Err(_) => continue, // trailers
                },
                Err(e) => return Some(Err(error_chain(&e))),
            }
        }
    }
}

impl Drop for OwnedResponse {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// Aborts the connection task when the request is dropped before its answer.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// POST `body` (JSON) to `path` of a loopback server on a connection of its
/// own (TCP, or the unix socket of a `unix:/path` engine), with
/// `Authorization: Bearer <key>` when given. Dropping the future or the
/// [`OwnedResponse`] closes that connection at once: a server that watches
/// for hang-ups (llama-server, for an answer it has not sent yet) stops the
/// work. A pooled client keeps a connection whose answer nobody awaits open
/// until that answer ends.
pub async fn post_owned(
    base: &str,
    path: &str,
    key: Option<&str>,
    body: Vec<u8>,
) -> Result<OwnedResponse, OwnedError> {
    let connect_err = |addr: &str| {
        let addr = addr.to_string();
        move |source| OwnedError::Connect { addr, source }
    };
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
    if let Some(sock) = crate::llama_server::socket_of(base) {
        let addr = base.to_string();
        let io = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::UnixStream::connect(sock),
        )
        .await
        .map_err(|_| connect_err(&addr)(timed_out()))?
        .map_err(connect_err(&addr))?;
        return send_owned_on(io, &addr, "localhost", path, key, body).await;
    }
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let uri: hyper::Uri = url.parse().map_err(|_| OwnedError::Url(url.clone()))?;
    let (host, port) = match (uri.host(), uri.port_u16(), uri.scheme_str()) {
        (Some(h), Some(p), Some("http")) => (h.trim_matches(['[', ']']).to_string(), p),
        _ => return Err(OwnedError::Url(url)),
    };
    let addr = format!("{host}:{port}");
    let tcp = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| connect_err(&addr)(timed_out()))?
    .map_err(connect_err(&addr))?;
    let _ = tcp.set_nodelay(true);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    send_owned_on(tcp, &addr, &addr, path, key, body).await
}

/// The request of [`post_owned`] on a connected stream (`addr` names it in errors).
async fn send_owned_on<IO>(
    io: IO,
    addr: &str,
    host: &str,
    path: &str,
    key: Option<&str>,
    body: Vec<u8>,
) -> Result<OwnedResponse, OwnedError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let addr = addr.to_string();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|source| OwnedError::Http {
                addr: addr.clone(),
                source,
            })?;
    let mut guard = AbortOnDrop(Some(tokio::spawn(async move {
        let _ = conn.await;
    })));
    let mut req = hyper::Request::post(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, USER_AGENT);
    if let Some(k) = key {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let req = req
        .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
        .map_err(|e| OwnedError::Request {
            addr: addr.clone(),
            why: e.to_string(),
        })?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|source| OwnedError::Http {
            addr: addr.clone(),
            source,
        })?;
    let conn = guard
        .0
        .take()
        .expect("the connection task is held until now");
    Ok(OwnedResponse {
        status: resp.status().as_u16(),
        body: resp.into_body(),
        conn,
    })
}
