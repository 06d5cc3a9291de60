//! Fixtures shared by the tests of several crates (a dev-dependency only;
//! `xtask/tests/tidy.rs` checks that the CLI never depends on it):
//!
//! * [`registry`]: a real OCI registry (`docker-registry`) on 127.0.0.1 and a
//!   proxy in front of it that can cut blob downloads.
//! * [`git`]: commits of a directory's files into a repository.
//! * [`gguf`]: small valid GGUF files.
//! * [`http`]: an HTTP server on 127.0.0.1 with fault injection.

pub mod gguf;
pub mod git;
pub mod http;
pub mod registry;
