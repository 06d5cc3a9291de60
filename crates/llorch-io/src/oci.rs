//! OCI registries (the door for them, as `http` is for plain HTTP): strict
//! references, credentials, pushing an artifact, and pulls that are verified
//! and resumable. The protocol (token auth, uploads, manifests, ranges) is
//! `oci-client`'s; this module configures it (roots, timeouts, which hosts may
//! use plain HTTP) and checks everything it returns.
//!
//! * TLS by default; plain HTTP only for a loopback registry or when the
//!   caller says `insecure` (a profile's `engine.registry.insecure: true`).
//! * Credentials: `LLORCH_REGISTRY_USERNAME` + `LLORCH_REGISTRY_PASSWORD`, else
//!   the Docker config (`$DOCKER_CONFIG/config.json` or
//!   `~/.docker/config.json`, `auths.<host>.auth`), else anonymous. They are
//!   never printed.
//! * A pulled blob is written to a `.partial` file while its sha256 is
//!   computed; a broken transfer resumes from the bytes already there (an
//!   HTTP range), and the blob is accepted only if its digest and size are the
//!   descriptor's. A manifest is accepted only if its digest is the one asked
//!   for (a `@sha256:` reference).

use llorch_types::{is_sha256_hex, BadOciRef, OciRef};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest, OCI_IMAGE_MEDIA_TYPE};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Seek, Write};
use std::path::Path;
use std::time::Duration;

mod auth;
pub mod referrers;

use auth::extra_roots;
pub use auth::{credentials, docker_config_auth};

pub use oci_client::manifest::OciDescriptor as Descriptor;
pub use oci_client::manifest::OciImageManifest as ImageManifest;

/// The largest manifest or config blob accepted (they are small JSON).
pub const MAX_JSON_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error(transparent)]
    BadRef(#[from] BadOciRef),
    #[error("{what} at {reference}: {message}")]
    Registry {
        what: String,
        reference: String,
        message: String,
    },
    #[error("{what} at {reference} is not in the registry")]
    NotFound { what: String, reference: String },
    #[error("{what} from {reference}: sha256 {actual}, expected {expected}; nothing was kept")]
    Digest {
        what: String,
        reference: String,
        expected: String,
        actual: String,
    },
    #[error("{what} from {reference} is invalid: {why}")]
    Invalid {
        what: String,
        reference: String,
        why: String,
    },
    #[error(transparent)]
    Io(#[from] crate::IoError),
}

use crate::io;

/// A connection to one registry.
pub struct Registry {
    client: Client,
    auth: RegistryAuth,
    /// Reads (manifests, configs, layers): bounded while reading, redirects
    /// that never leave TLS off loopback ([`crate::http::registry_client`]).
    http: reqwest::Client,
    scheme: &'static str,
}

/// Run an async operation of oci-client to completion on its own thread and
/// runtime (callers are blocking code, possibly inside another runtime).
fn block<T: Send>(f: impl std::future::Future<Output = T> + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime")
                .block_on(f)
        })
        .join()
        .expect("the registry thread does not panic")
    })
}

/// What to do when a registry wants credentials (one sentence for every answer that says so).
/// The reference as `oci-client` names it (a digest before a tag; no
/// tag means `latest`).
fn reference(r: &OciRef) -> Reference {
    match (&r.tag, &r.digest) {
        (_, Some(d)) => Reference::with_digest(r.registry.clone(), r.repository.clone(), d.clone()),
        (Some(t), None) => Reference::with_tag(r.registry.clone(), r.repository.clone(), t.clone()),
        (None, None) => {
            Reference::with_tag(r.registry.clone(), r.repository.clone(), "latest".into())
        }
    }
}

fn credentials_hint(r: &OciRef) -> String {
    format!(
        "\n  hint: the registry wants credentials: set LLORCH_REGISTRY_USERNAME and LLORCH_REGISTRY_PASSWORD, or log in with `docker login {}` (~/.docker/config.json)",
        r.registry
    )
}

fn registry_err(what: &str, r: &OciRef, e: oci_client::errors::OciDistributionError) -> OciError {
    use oci_client::errors::OciDistributionError as E;
    let message = match &e {
        E::RequestError(re) => crate::http::error_chain(re),
        other => other.to_string(),
    };
    let not_found = matches!(&e, E::ImageManifestNotFoundError(_))
        || matches!(&e, E::ServerError { code: 404, .. })
        || message.contains("MANIFEST_UNKNOWN")
        || message.contains("BLOB_UNKNOWN");
    if not_found {
        return OciError::NotFound {
            what: what.into(),
            reference: r.to_string(),
        };
    }
    let unauthorized = matches!(
        &e,
        E::ServerError {
            code: 401 | 403,
            ..
        }
    ) || matches!(&e, E::UnauthorizedError { .. })
        || message.contains("UNAUTHORIZED")
        || message.contains("DENIED");
    let message = if unauthorized {
        format!("{message}{}", credentials_hint(r))
    } else {
        message
    };
    OciError::Registry {
        what: what.into(),
        reference: r.to_string(),
        message,
    }
}

impl Registry {
    /// Configure a client for `r`'s registry. Plain HTTP: loopback, or `insecure`.
    pub fn connect(r: &OciRef, insecure: bool) -> Result<Registry, OciError> {
        let protocol = if r.is_loopback() || insecure {
            ClientProtocol::HttpsExcept(vec![r.registry.clone()])
        } else {
            ClientProtocol::Https
        };
        let client = Client::new(ClientConfig {
            protocol,
            extra_root_certificates: extra_roots(),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            user_agent: crate::http::USER_AGENT,
            // One connection per operation: no stale keep-alive across a dying registry.
            max_concurrent_download: 1,
            max_concurrent_upload: 1,
            ..Default::default()
        });
        Ok(Registry {
            client,
            auth: credentials(&r.registry),
            http: crate::http::registry_client(),
            scheme: if r.is_loopback() || insecure {
                "http"
            } else {
                "https"
            },
        })
    }

    /// Upload `data` as a blob named by its sha256 (a registry that has it keeps one copy).
    pub fn push_blob(&self, r: &OciRef, data: &[u8]) -> Result<String, OciError> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
        let image = reference(r);
        block(async {
            self.client
                .auth(&image, &self.auth, oci_client::RegistryOperation::Push)
                .await
                .map_err(|e| registry_err("authentication for push", r, e))?;
            self.client
                .push_blob(&image, data, &digest)
                .await
                .map(|_| ())
                .map_err(|e| registry_err("blob upload", r, e))
        })?;
        Ok(digest)
    }

    /// Upload a file as a blob; it is mapped, not read into memory.
    pub fn push_file(&self, r: &OciRef, path: &Path) -> Result<(String, u64), OciError> {
        let f = fs_err::File::open(path).map_err(io("push a blob"))?;
        let len = f
            .metadata()
            .map_err(io(format!("stat {}", path.display())))?
            .len();
        if len == 0 {
            return Ok((self.push_blob(r, &[])?, 0));
        }
        // SAFETY: blobs pushed from are immutable files (store blobs and staged
        // archives, replaced only by rename), held under a lease while pushed.
        let map =
            unsafe { memmap2::Mmap::map(&f) }.map_err(io(format!("map {}", path.display())))?;
        Ok((self.push_blob(r, &map)?, len))
    }

    /// Push an artifact under `r`'s tag: its one layer (a file, mapped), its
    /// config blob, then the manifest naming both. A layer whose digest is not
    /// the one expected is refused before any manifest names it.
    pub fn push_artifact(&self, r: &OciRef, a: &Artifact<'_>) -> Result<PushedArtifact, OciError> {
        let (layer_digest, layer_bytes) = self.push_file(r, a.layer)?;
        if let Some(want) = a.expect_layer_digest {
            if want != layer_digest {
                return Err(OciError::Digest {
                    what: format!("layer {}", a.layer.display()),
                    reference: r.to_string(),
                    expected: want.to_string(),
                    actual: layer_digest,
                });
            }
        }
        let config_digest = self.push_blob(r, a.config)?;
        let manifest = OciImageManifest {
            schema_version: 2,
            media_type: Some(OCI_IMAGE_MEDIA_TYPE.into()),
            config: descriptor(
                a.config_media_type,
                config_digest,
                a.config.len() as u64,
                None,
            ),
            layers: vec![descriptor(
                a.layer_media_type,
                layer_digest.clone(),
                layer_bytes,
                (!a.layer_annotations.is_empty()).then(|| a.layer_annotations.clone()),
            )],
            subject: None,
            artifact_type: Some(a.artifact_type.into()),
            annotations: Some(a.annotations.clone()),
        };
        let manifest_digest = self.push_manifest(r, &manifest)?;
        Ok(PushedArtifact {
            manifest_digest,
            layer_digest,
            layer_bytes,
        })
    }

    /// Push a manifest under `r`'s tag; returns its digest.
    pub fn push_manifest(&self, r: &OciRef, m: &OciImageManifest) -> Result<String, OciError> {
        let image = reference(r);
        let manifest = OciManifest::Image(m.clone());
        block(async {
            self.client
                .auth(&image, &self.auth, oci_client::RegistryOperation::Push)
                .await
                .map_err(|e| registry_err("authentication for push", r, e))?;
            self.client
                .push_manifest(&image, &manifest)
                .await
                .map_err(|e| registry_err("manifest upload", r, e))
        })?;
        // The digest of what the registry now serves under the tag.
        let (_, digest) = self.pull_manifest(r)?;
        Ok(digest)
    }

    /// Push a manifest given as its exact bytes (an image built locally whose
    /// digest is already known) under `r`'s tag; the digest the registry
    /// serves must be the bytes' own.
    pub fn push_manifest_bytes(
        &self,
        r: &OciRef,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<String, OciError> {
        let image = reference(r);
        let want = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        let content_type =
            reqwest::header::HeaderValue::from_str(media_type).map_err(|e| OciError::Invalid {
                what: "manifest media type".into(),
                reference: r.to_string(),
                why: e.to_string(),
            })?;
        block(async {
            self.client
                .auth(&image, &self.auth, oci_client::RegistryOperation::Push)
                .await
                .map_err(|e| registry_err("authentication for push", r, e))?;
            self.client
                .push_manifest_raw(&image, bytes.to_vec(), content_type)
                .await
                .map_err(|e| registry_err("manifest upload", r, e))
        })?;
        let (_, digest) = self.pull_manifest(r)?;
        if digest != want {
            return Err(OciError::Digest {
                what: "the pushed manifest".into(),
                reference: r.to_string(),
                expected: want,
                actual: digest,
            });
        }
        Ok(digest)
    }

    /// `GET /v2/<repo>/<kind>/<name>` with the pull credentials (a bearer
    /// token from the registry's token service, through oci-client, or basic
    /// credentials), from `range_from` on. A non-2xx answer is an error
    /// (404: [`OciError::NotFound`]). Descriptors' alternate `urls` are never
    /// used: every byte comes from the registry named by the reference.
    async fn read(
        &self,
        r: &OciRef,
        what: &str,
        kind: &str,
        name: &str,
        accept: Option<&str>,
        range_from: Option<u64>,
    ) -> Result<reqwest::Response, OciError> {
        let image = reference(r);
        let token = self
            .client
            .auth(&image, &self.auth, oci_client::RegistryOperation::Pull)
            .await
            .map_err(|e| registry_err(what, r, e))?;
        let url = format!(
            "{}://{}/v2/{}/{kind}/{name}",
            self.scheme, r.registry, r.repository
        );
        let mut req = self.http.get(&url);
        if let Some(a) = accept {
            req = req.header(reqwest::header::ACCEPT, a);
        }
        req = match (token, &self.auth) {
            (Some(t), _) => req.bearer_auth(t),
            (None, RegistryAuth::Basic(u, p)) => req.basic_auth(u, Some(p)),
            _ => req,
        };
        if let Some(from) = range_from.filter(|f| *f > 0) {
            req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
        }
        let resp = req.send().await.map_err(|e| OciError::Registry {
            what: what.into(),
            reference: r.to_string(),
            message: crate::http::error_chain(&e),
        })?;
        let status = resp.status().as_u16();
        match status {
            200..=299 => Ok(resp),
            404 => Err(OciError::NotFound {
                what: what.into(),
                reference: r.to_string(),
            }),
            s => {
                let hint = if s == 401 || s == 403 {
                    credentials_hint(r)
                } else {
                    String::new()
                };
                Err(OciError::Registry {
                    what: what.into(),
                    reference: r.to_string(),
                    message: format!("HTTP {s}{hint}"),
                })
            }
        }
    }

    /// A small document (manifest, config) read with a bound while reading:
    /// whatever the registry says its size is, more than `limit` bytes is refused.
    async fn read_small(
        &self,
        r: &OciRef,
        what: &str,
        kind: &str,
        name: &str,
        accept: Option<&str>,
        limit: usize,
    ) -> Result<Vec<u8>, OciError> {
        use futures_util::StreamExt;
        let resp = self.read(r, what, kind, name, accept, None).await?;
        let mut body = resp.bytes_stream();
        let mut buf = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| OciError::Registry {
                what: what.into(),
                reference: r.to_string(),
                message: crate::http::error_chain(&e),
            })?;
            if buf.len() + chunk.len() > limit {
                return Err(OciError::Invalid {
                    what: what.into(),
                    reference: r.to_string(),
                    why: format!("more than {limit} bytes (the limit)"),
                });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf)
    }

    /// The image manifest at `r`, checked: its digest (against `r`'s, when it
    /// names one), size (bounded while reading) and shape.
    pub fn pull_manifest(&self, r: &OciRef) -> Result<(OciImageManifest, String), OciError> {
        let name = match (&r.digest, &r.tag) {
            (Some(d), _) => d.clone(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        };
        let raw = block(self.read_small(
            r,
            "manifest",
            "manifests",
            &name,
            Some(OCI_IMAGE_MEDIA_TYPE),
            MAX_JSON_BYTES,
        ))?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&raw)));
        if let Some(want) = &r.digest {
            if want != &digest {
                return Err(OciError::Digest {
                    what: "manifest".into(),
                    reference: r.to_string(),
                    expected: want.clone(),
                    actual: digest,
                });
            }
        }
        let m: OciImageManifest = serde_json::from_slice(&raw).map_err(|e| OciError::Invalid {
            what: "manifest".into(),
            reference: r.to_string(),
            why: e.to_string(),
        })?;
        for d in std::iter::once(&m.config).chain(&m.layers) {
            let ok = d.digest.strip_prefix("sha256:").is_some_and(is_sha256_hex) && d.size >= 0;
            if !ok {
                return Err(OciError::Invalid {
                    what: "manifest".into(),
                    reference: r.to_string(),
                    why: format!(
                        "descriptor `{}` (size {}) is not a sha256 digest with a size",
                        llorch_types::excerpt(&d.digest, 80),
                        d.size
                    ),
                });
            }
        }
        Ok((m, digest))
    }

    /// A small blob (config JSON) in memory, verified.
    pub fn pull_small(&self, r: &OciRef, d: &OciDescriptor) -> Result<Vec<u8>, OciError> {
        if d.size < 0 || d.size as usize > MAX_JSON_BYTES {
            return Err(OciError::Invalid {
                what: "config".into(),
                reference: r.to_string(),
                why: format!("size {} (the limit is {MAX_JSON_BYTES})", d.size),
            });
        }
        let buf = block(self.read_small(
            r,
            "config",
            "blobs",
            &d.digest,
            None,
            (d.size as usize).min(MAX_JSON_BYTES),
        ))?;
        check_digest("config", r, d, &buf)?;
        Ok(buf)
    }

    /// Fetch a blob into `partial` (resuming from what is there), verify its
    /// size and sha256 against `d`. A transfer that breaks is resumed up to
    /// `attempts` times; then the error is returned and the partial is kept.
    /// A digest mismatch removes the partial.
    pub fn pull_to_file(
        &self,
        r: &OciRef,
        d: &OciDescriptor,
        partial: &Path,
        attempts: u32,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<(), OciError> {
        use futures_util::StreamExt;
        let size = d.size as u64;
        if let Some(dir) = partial.parent() {
            fs_err::create_dir_all(dir).map_err(io("create the download dir"))?;
        }
        let mut last_err = None;
        for attempt in 0..attempts.max(1) {
            if attempt > 0 {
                std::thread::sleep(crate::http::backoff(attempt));
            }
            let mut f = crate::fsx::open_partial(partial)
                .map_err(io(format!("open {}", partial.display())))?;
            let mut have = f.metadata().map_err(io("stat partial"))?.len();
            if have > size {
                f.set_len(0).map_err(io("truncate partial"))?;
                have = 0;
            }
            if have == size {
                break;
            }
            let res: Result<(), OciError> = block(async {
                let resp = self
                    .read(r, "blob", "blobs", &d.digest, None, Some(have))
                    .await?;
                if have > 0 && resp.status().as_u16() != 206 {
                    // The registry ignored the range: start over.
                    f.set_len(0).map_err(io("truncate partial"))?;
                    have = 0;
                }
                f.seek(std::io::SeekFrom::Start(have))
                    .map_err(io("seek partial"))?;
                let mut stream = resp.bytes_stream();
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| OciError::Registry {
                        what: "blob transfer".into(),
                        reference: r.to_string(),
                        message: e.to_string(),
                    })?;
                    if have + chunk.len() as u64 > size {
                        return Err(OciError::Invalid {
                            what: "blob".into(),
                            reference: r.to_string(),
                            why: format!("more than the {size} bytes its descriptor names"),
                        });
                    }
                    f.write_all(&chunk).map_err(io("write partial"))?;
                    have += chunk.len() as u64;
                    progress(have, size);
                }
                Ok(())
            });
            f.sync_all().map_err(io("sync partial"))?;
            match res {
                Ok(()) => {
                    last_err = None;
                    let len = fs_err::metadata(partial).map_err(io("stat partial"))?.len();
                    if len == size {
                        break;
                    }
                    last_err = Some(OciError::Registry {
                        what: "blob transfer".into(),
                        reference: r.to_string(),
                        message: format!("ended after {len} of {size} bytes"),
                    });
                }
                Err(e @ OciError::Invalid { .. }) => {
                    let _ = fs_err::remove_file(partial);
                    return Err(e);
                }
                Err(e @ OciError::NotFound { .. }) => return Err(e),
                Err(e) => last_err = Some(e),
            }
        }
        if let Some(e) = last_err {
            return Err(e);
        }
        let actual = format!(
            "sha256:{}",
            crate::digest::sha256_file(partial).map_err(io("hash partial"))?
        );
        if actual != d.digest {
            let _ = fs_err::remove_file(partial);
            return Err(OciError::Digest {
                what: "blob".into(),
                reference: r.to_string(),
                expected: d.digest.clone(),
                actual,
            });
        }
        Ok(())
    }
}

fn check_digest(what: &str, r: &OciRef, d: &OciDescriptor, data: &[u8]) -> Result<(), OciError> {
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(data)));
    if actual != d.digest || data.len() as i64 != d.size {
        return Err(OciError::Digest {
            what: what.into(),
            reference: r.to_string(),
            expected: d.digest.clone(),
            actual,
        });
    }
    Ok(())
}

/// What [`Registry::push_artifact`] publishes: one config blob and one layer.
pub struct Artifact<'a> {
    pub artifact_type: &'a str,
    pub config_media_type: &'a str,
    pub config: &'a [u8],
    pub layer_media_type: &'a str,
    pub layer: &'a Path,
    pub layer_annotations: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// `sha256:…` the layer must hash to (a stored model's known digest).
    pub expect_layer_digest: Option<&'a str>,
}

/// What a push published.
#[derive(Debug)]
pub struct PushedArtifact {
    pub manifest_digest: String,
    pub layer_digest: String,
    pub layer_bytes: u64,
}

fn descriptor(
    media_type: &str,
    digest: String,
    size: u64,
    annotations: Option<BTreeMap<String, String>>,
) -> OciDescriptor {
    OciDescriptor {
        media_type: media_type.into(),
        digest,
        size: size as i64,
        urls: None,
        annotations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry on 127.0.0.1 that answers `/v2/` and then sends an endless
    /// manifest (or config): the read stops at the limit, memory stays bounded.
    #[test]
    fn an_endless_manifest_or_config_is_refused_while_reading() {
        use std::io::{BufRead, BufReader};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut w = c.try_clone().unwrap();
                    let mut line = String::new();
                    let mut rd = BufReader::new(c);
                    if rd.read_line(&mut line).is_err() {
                        return;
                    }
                    let mut h = String::new();
                    while rd.read_line(&mut h).is_ok_and(|n| n > 2) {
                        h.clear();
                    }
                    if line.starts_with("GET /v2/ ") {
                        let _ = w.write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        );
                        return;
                    }
                    // It claims a small size, then never stops.
                    let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\nconnection: close\r\n\r\n");
                    let chunk = vec![b' '; 64 * 1024];
                    while w.write_all(&chunk).is_ok() {}
                });
            }
        });
        let r = OciRef::parse(&format!("oci://127.0.0.1:{port}/x/y:t")).unwrap();
        let reg = Registry::connect(&r, false).unwrap();
        let e = reg.pull_manifest(&r).unwrap_err().to_string();
        assert!(e.contains("more than") && e.contains("limit"), "{e}");
        let d = OciDescriptor {
            media_type: "application/json".into(),
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 100,
            ..Default::default()
        };
        let e = reg.pull_small(&r, &d).unwrap_err().to_string();
        assert!(e.contains("more than 100 bytes"), "{e}");
    }

    #[test]
    fn redirects_never_leave_tls_off_loopback() {
        use crate::http::keeps_tls;
        let u = |s: &str| reqwest::Url::parse(s).unwrap();
        assert!(keeps_tls(true, &u("https://cdn.example/blob")));
        assert!(!keeps_tls(true, &u("http://cdn.example/blob")));
        assert!(!keeps_tls(true, &u("http://10.0.0.1/blob")));
        assert!(keeps_tls(true, &u("http://127.0.0.1:5000/blob")));
        assert!(keeps_tls(true, &u("http://[::1]:5000/blob")));
        assert!(keeps_tls(false, &u("http://cdn.example/blob")));
        assert!(!keeps_tls(false, &u("ftp://cdn.example/blob")));
    }
}
