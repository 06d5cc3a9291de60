//! What building an engine can fail with.

use crate::{preflight, source};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Preflight(#[from] preflight::PreflightError),
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error("{step} failed for profile `{profile}`: {source}\n  nothing was added to the cache")]
    Step {
        step: &'static str,
        profile: String,
        source: Box<llorch_io::cmd::CmdError>,
    },
    #[error("{tool} not found (run `cargo xtask doctor --profile {profile}`)")]
    ToolMissing { tool: String, profile: String },
    #[error(transparent)]
    Tool(#[from] Box<llorch_io::cmd::CmdError>),
    #[error("the build finished but {0} is missing")]
    NoOutput(String),
    #[error("the built llama-server is not relocatable: `{line}`\n  full ldd output:\n{ldd}")]
    NotRelocatable { line: String, ldd: String },
    #[error("`llama-server --version` failed:\n{0}")]
    NoVersion(String),
    #[error("engine registry of profile {profile}: {source}")]
    RegistryConfig {
        profile: String,
        source: Box<llorch_io::oci::OciError>,
    },
    #[error(transparent)]
    Registry(#[from] Box<crate::registry::RegistryError>),
    #[error("the cached engine {fingerprint} of profile `{profile}` is corrupt ({why}); nothing to compare\n  hint: `cargo xtask engine build --profile {profile}` replaces it")]
    CachedCorrupt {
        fingerprint: String,
        profile: String,
        why: String,
    },
    #[error("no cached engine of fingerprint {fingerprint} for profile `{profile}`: nothing to compare\n  hint: build it (`cargo xtask engine build --profile {profile}`) or pull it (`cargo xtask engine pull --profile {profile}`) first")]
    NotCached {
        fingerprint: String,
        profile: String,
    },
    #[error(transparent)]
    Io(#[from] llorch_io::IoError),
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error(transparent)]
    Bundle(#[from] crate::bundle::BundleError),
    #[error("CUDA: {0}")]
    CudaCheck(#[from] crate::cuda::CudaError),
    /// The compiler cache a CUDA build runs nvcc under could not start.
    #[error("CUDA: {0}")]
    CompileCache(#[from] crate::compile_cache::CompileCacheError),
    #[error(transparent)]
    Flag(#[from] llorch_profile::FlagError),
    #[error(transparent)]
    Prebuilt(#[from] crate::prebuilt::PrebuiltError),
}
