//! What a web page in a browser could send is refused (`Host` and content
//! type, `guard`); the API token off loopback (`auth`).

use crate::errors::ApiError;
use crate::{AppState, Shared};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

pub(crate) fn token_ok(st: &AppState, headers: &HeaderMap) -> bool {
    if st.cfg.api_token.is_none() {
        return true;
    }
    // `Authorization: Bearer <token>`, or Anthropic's `x-api-key: <token>`.
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .unwrap_or("");
    token_matches(st, got)
}

/// Whether `got` is the API token (constant-time; false when none is set).
pub(crate) fn token_matches(st: &AppState, got: &str) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let Some(want) = &st.cfg.api_token else {
        return false;
    };
    // Hash both so the comparison is constant-time whatever the lengths.
    let a = Sha256::digest(got.as_bytes());
    let b = Sha256::digest(want.as_bytes());
    a.ct_eq(&b).into()
}

pub(crate) async fn auth(
    State(st): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    let open =
        path == "/healthz" || path == "/readyz" || (st.cfg.open_metrics && path == "/metrics");
    // The page answers with its login form itself; its script, style and
    // login need no token. The status feed also takes the page's cookie.
    let page = matches!(
        path,
        "/status" | "/status/app.js" | "/status/app.css" | "/status/login"
    );
    let feed = path == "/v1/status" || path.starts_with("/v1/status/");
    let cookie_ok = feed
        && req.method() == axum::http::Method::GET
        && crate::status::authorized(&st, req.headers());
    if !open && !page && !cookie_ok && !token_ok(&st, req.headers()) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "missing or wrong `Authorization: Bearer <token>` (or `x-api-key: <token>`)",
        )
        .into_response();
    }
    next.run(req).await
}

/// The `Host` a request names, lowercased, without its port.
fn request_host(req: &axum::extract::Request) -> Option<String> {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))?;
    let raw = raw.trim().to_ascii_lowercase();
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or("").to_string()
    } else {
        raw.rsplit_once(':')
            .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
            .map(|(h, _)| h.to_string())
            .unwrap_or(raw)
    };
    Some(host)
}

/// Whether `host` may address this orchestrator (DNS-rebinding guard).
pub fn host_allowed(cfg: &crate::Config, host: &str) -> bool {
    if cfg.allowed_hosts.iter().any(|h| h == host) {
        return true;
    }
    let ip = cfg.addr.ip();
    if ip.is_loopback() {
        return matches!(host, "localhost" | "127.0.0.1" | "::1") || host == ip.to_string();
    }
    // Off loopback the token protects the API; names are checked only when configured.
    cfg.allowed_hosts.is_empty() || host == ip.to_string()
}

/// Refuse what a web page could send: a foreign `Host` (403) and, on
/// endpoints that change state, a body that is not `application/json` (415;
/// a cross-origin form or `text/plain` post cannot set that type without a
/// CORS preflight, which this server never approves).
pub(crate) async fn guard(
    State(st): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(host) = request_host(&req) {
        if !host_allowed(&st.cfg, &host) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "HOST_NOT_ALLOWED",
                format!(
                    "requests for host `{}` are not served here; pass --allowed-host {} if this name is yours",
                    llorch_types::excerpt(&host, 64),
                    llorch_types::excerpt(&host, 64)
                ),
            )
            .into_response();
        }
    }
    if req.method() == axum::http::Method::POST {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UNSUPPORTED_MEDIA_TYPE",
                "send `Content-Type: application/json`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Whether the client of a connection has hung up: set by a watcher that
/// peeks at the socket (end of stream), read by `client_gone`.
#[derive(Clone, Debug)]
pub struct ClientGone(pub tokio::sync::watch::Receiver<bool>);

impl ClientGone {
    /// Wait until the client has hung up (forever if it never does).
    pub async fn wait(&mut self) {
        loop {
            if *self.0.borrow() {
                return;
            }
            if self.0.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// Split off a watcher of `tcp`'s read side: when the peer closes its end
/// (a peek reads end of stream) or the socket fails, [`ClientGone`] says so.
/// hyper itself notices a hang-up only when it writes, so a handler that
/// waits for a whole non-streamed answer would otherwise run to its end.
pub(crate) fn watch_hang_up(
    tcp: tokio::net::TcpStream,
) -> std::io::Result<(
    tokio::net::TcpStream,
    ClientGone,
    tokio::task::JoinHandle<()>,
)> {
    let std = tcp.into_std()?;
    let peer = tokio::net::TcpStream::from_std(std.try_clone()?)?;
    let tcp = tokio::net::TcpStream::from_std(std)?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(async move {
        let mut b = [0u8; 1];
        loop {
            if peer.readable().await.is_err() {
                let _ = tx.send(true);
                return;
            }
            match peer.peek(&mut b).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send(true);
                    return;
                }
                // Bytes the server has not read yet (a pipelined request):
                // look again once it had time to read them.
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    });
    Ok((tcp, ClientGone(rx), watcher))
}

/// A handler whose client hung up before it answered is dropped: its task
/// is canceled (the `DisconnectGuard` it holds), so the engine stops work
/// nobody will read. Streamed answers are past this point once their head
/// is sent; a failed write ends them.
pub(crate) async fn client_gone(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(mut gone) = req.extensions().get::<ClientGone>().cloned() else {
        return next.run(req).await;
    };
    tokio::select! {
        r = next.run(req) => r,
        _ = gone.wait() => {
            // Nobody reads this; the connection is closed.
            StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_of_this_server_may_address_it() {
        let cfg = crate::Config::default();
        assert!(cfg.addr.ip().is_loopback());
        for ok in ["localhost", "127.0.0.1", "::1"] {
            assert!(host_allowed(&cfg, ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "127.0.0.1.evil.example",
            "localhost.evil",
            "",
        ] {
            assert!(!host_allowed(&cfg, bad), "{bad}");
        }
        let cfg = crate::Config {
            allowed_hosts: vec!["orch.internal".into()],
            ..Default::default()
        };
        assert!(host_allowed(&cfg, "orch.internal"));
        assert!(!host_allowed(&cfg, "other.internal"));
    }

    #[test]
    fn the_token_is_compared_whole() {
        let st = crate::AppState::new(
            crate::Config {
                api_token: Some("s3cret".into()),
                ..Default::default()
            },
            Vec::new(),
            Default::default(),
        );
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, v.parse().unwrap());
            m
        };
        assert!(token_ok(&st, &h("Bearer s3cret")));
        let mut k = HeaderMap::new();
        k.insert("x-api-key", "s3cret".parse().unwrap());
        assert!(token_ok(&st, &k));
        k.insert("x-api-key", "s3cre".parse().unwrap());
        assert!(!token_ok(&st, &k));
        for bad in ["Bearer s3cre", "Bearer s3cret2", "s3cret", "Basic s3cret"] {
            assert!(!token_ok(&st, &h(bad)), "{bad}");
        }
        assert!(!token_ok(&st, &HeaderMap::new()));
    }
}
