//! Beyond one machine: an OCI image built from the fingerprinted engine
//! ([`image`]), and Kubernetes manifests whose InferencePool's endpoint
//! picker routes on llama-orch's own gauges ([`k8s`]).
//!
//! This crate reads the engine cache, profiles and stack files and writes
//! through the doors (`llorch_io`); it never depends on the orchestrator or
//! the runtime. The image's entrypoint is the same `serve` users run.
//!
//! Module map: [`layer`] (deterministic tar.gz layers), [`closure`] (the
//! shared libraries `ldd` names), [`image`] (the OCI layout, its config,
//! `/opt/llorch/image.json`, push), [`k8s`] (Deployment, Service,
//! PodDisruptionBudget, InferencePool and its endpoint picker's config),
//! [`names`] (DNS-1123 names), [`spec`] (`image.json`), [`push`] (to a
//! registry, byte for byte).

pub mod closure;
pub mod image;
pub mod k8s;
pub mod layer;
pub mod names;
pub mod push;
pub mod spec;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("`{0}` is not a plain absolute path in an image")]
    BadPath(String),
    #[error("{0} is added twice to an image layer with different contents")]
    Conflict(String),
    #[error("{} is a link or a special file; an image layer holds regular files and directories only", .0.display())]
    NotRegular(PathBuf),
    #[error("ldd {binary}: {why}")]
    Ldd { binary: String, why: String },
    #[error("{binary} needs {library}, which ldd cannot find on this machine\n  hint: install the package that provides it (or set LD_LIBRARY_PATH), then build the image again")]
    MissingLibrary { binary: String, library: String },
    #[error("{key} = `{value}`: {why}")]
    BadName {
        key: String,
        value: String,
        why: String,
    },
    #[error("profile {0} has no `model:` section; an image serves a model it can verify")]
    NoModel(String),
    #[error("{path}: {why}")]
    Spec { path: String, why: String },
    #[error("this image has no pool `{pool}`; it serves: {pools}")]
    NoSuchPool { pool: String, pools: String },
    #[error("YAML: {0}")]
    Yaml(String),
    #[error(transparent)]
    Build(#[from] engine_provisioner::error::BuildError),
    #[error(transparent)]
    Model(#[from] model_provisioner::error::ModelError),
    #[error(transparent)]
    Oci(#[from] llorch_io::oci::OciError),
    #[error(transparent)]
    Io(#[from] llorch_io::IoError),
}
