//! git over https through the HTTP door: a libgit2 smart subtransport that
//! sends git's smart-HTTP requests with `llorch_io::http` (reqwest with
//! rustls and the webpki roots, plus any `SSL_CERT_FILE` bundle).
//!
//! Why not libgit2's own https: `git2`'s `https` feature links OpenSSL (the
//! system's `libssl-dev`, which a fresh machine does not have before this
//! workspace can even compile, or a vendored OpenSSL built from source).
//! The rest of the project already speaks TLS through rustls; git does too.
//! Fetch only (`git-upload-pack`); push is refused.

use git2::transport::{Service, SmartSubtransport, SmartSubtransportStream, Transport};
use std::io::{Read, Write};
use std::sync::OnceLock;
use std::time::Duration;

/// libgit2 refused to register the transport (its message).
#[derive(Clone, Debug, thiserror::Error)]
#[error("cannot install the https transport for git: {0}")]
pub struct TransportError(String);

/// Install the transport for `https://` URLs (once per process).
pub fn install() -> Result<(), TransportError> {
    static DONE: OnceLock<Result<(), TransportError>> = OnceLock::new();
    DONE.get_or_init(|| {
        // SAFETY: called once, guarded by the OnceLock, before the first
        // git operation that needs it; the factory is 'static.
        unsafe {
            git2::transport::register("https", |remote| {
                // One client per remote: its requests share connections.
                // Per-read stall timeout, no limit on the whole transfer (large packs).
                let client = llorch_io::http::download_client(Duration::from_secs(60));
                Transport::smart(remote, true, Https { client })
            })
        }
        .map_err(|e| TransportError(e.message().to_string()))
    })
    .clone()
}

struct Https {
    client: reqwest::blocking::Client,
}

impl SmartSubtransport for Https {
    fn action(
        &self,
        url: &str,
        action: Service,
    ) -> Result<Box<dyn SmartSubtransportStream>, git2::Error> {
        let (post, url, expect) = match action {
            Service::UploadPackLs => (
                false,
                format!("{url}/info/refs?service=git-upload-pack"),
                "application/x-git-upload-pack-advertisement",
            ),
            Service::UploadPack => (
                true,
                format!("{url}/git-upload-pack"),
                "application/x-git-upload-pack-result",
            ),
            Service::ReceivePackLs | Service::ReceivePack => {
                return Err(git2::Error::from_str(
                    "llama-orch only fetches over https; pushing is not supported",
                ))
            }
        };
        Ok(Box::new(Stream {
            client: self.client.clone(),
            post,
            url,
            expect,
            body: Vec::new(),
            resp: None,
        }))
    }

    fn close(&self) -> Result<(), git2::Error> {
        Ok(())
    }
}

/// One request: what git writes is the POST body; the first read sends it.
struct Stream {
    client: reqwest::blocking::Client,
    post: bool,
    url: String,
    expect: &'static str,
    body: Vec<u8>,
    resp: Option<reqwest::blocking::Response>,
}

impl Stream {
    fn send(&mut self) -> std::io::Result<reqwest::blocking::Response> {
        let req = if self.post {
            self.client
                .post(&self.url)
                .header("content-type", "application/x-git-upload-pack-request")
                .header("accept", self.expect)
                .body(std::mem::take(&mut self.body))
        } else {
            self.client.get(&self.url)
        };
        let resp = req.send().map_err(|e| {
            std::io::Error::other(format!(
                "{}: {}",
                self.url,
                llorch_io::http::error_chain(&e)
            ))
        })?;
        let status = resp.status();
        if !status.is_success() {
            return Err(std::io::Error::other(format!(
                "{} answered {status}",
                self.url
            )));
        }
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !ct.starts_with(self.expect) {
            return Err(std::io::Error::other(format!(
                "{} answered `{ct}`, not `{}`: not a smart-HTTP git server (dumb HTTP is not supported)",
                self.url, self.expect
            )));
        }
        Ok(resp)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.resp.is_none() {
            self.resp = Some(self.send()?);
        }
        self.resp.as_mut().expect("sent above").read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.body.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
