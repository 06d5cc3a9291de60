//! Engine provisioning: pinned llama.cpp sources → CMake build →
//! fingerprinted, relocatable artifact cache → the engine process lifecycle.
//!
//! Read `ARCHITECTURE.md` at the workspace root for the map; each module has
//! its own theory of operation.

pub mod build;
pub mod bundle;
pub mod cache;
pub mod compile;
pub mod compile_cache;
pub mod compilers;
pub mod cuda;
pub mod error;
pub mod extract;
pub mod fingerprint;
pub mod git_https;
pub mod pin;
pub mod prebuilt;
pub mod preflight;
pub mod provenance;
pub mod registry;
pub mod reproduce;
pub mod source;

pub use build::{build, BuildOptions, BuildOutcome};
