//! Fixtures shared by the tests of several crates (a dev-dependency only;
//! `xtask/tests/tidy.rs` checks that the CLI never depends on it):
//!
//! * [`registry`]: a real OCI registry (`docker-registry`) on 127.0.0.1 and a
//!   proxy in front of it that can cut blob downloads.
//! * [`git`]: commits of a directory's files into a repository.
//! * [`gguf`]: small valid GGUF files.
//! * [`http`]: an HTTP server on 127.0.0.1 with fault injection.
//! * [`python_packages`]: pinned Python packages (an SDK, a validator)
//!   installed once per machine into `target/python-<name>`.
//! * [`workspace_root`], [`layout`], [`workspace_layout`]: where the tests
//!   find the workspace and its shared cache, never through the user's
//!   `LLORCH_*` variables (`tidy.rs` refuses `Layout::from_root` and
//!   `Layout::discover` in tests, and copies of the root's computation).

pub mod gguf;
pub mod git;
pub mod http;
pub mod registry;

use llorch_io::paths::Layout;
use std::path::{Path, PathBuf};

/// The workspace root: `Cargo.toml`, `requirements/`, `toolchains/`, and
/// the `cache/` the test suite shares (one engine build per machine).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root")
}

/// The workspace's own cache (`<root>/cache`) with the runtime directory
/// `rt`: what a test that shares the built engine and fetched models uses.
pub fn layout(rt: &Path) -> Layout {
    let root = workspace_root();
    Layout::at(root.clone(), root.join("cache"), rt.to_path_buf())
}

/// The workspace's own cache and runtime directories, as the CLI uses them
/// when no `LLORCH_*` variable is set.
pub fn workspace_layout() -> Layout {
    layout(&workspace_root().join(".runtime"))
}

/// Install pinned Python packages with pip (from the configured package
/// index) into `target/python-<name>` once per machine (under a file lock;
/// a half-installed directory is never used), and return that directory for
/// `PYTHONPATH`.
pub fn python_packages(name: &str, pins: &[&str]) -> std::path::PathBuf {
    let root = workspace_root();
    let dir = root.join("target").join(format!("python-{name}"));
    let _lock =
        llorch_io::fsx::FileLock::exclusive(&root.join("target/python-sdk.lock"), || {}).unwrap();
    let want = pins.join("\n");
    if fs_err::read_to_string(dir.join(".complete"))
        .ok()
        .as_deref()
        != Some(want.as_str())
    {
        let staging = dir.with_extension("partial");
        let _ = fs_err::remove_dir_all(&staging);
        llorch_io::cmd::Cmd::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&staging)
            .args(pins.iter().copied())
            .read()
            .unwrap_or_else(|e| panic!("installing {pins:?} with pip: {e}"));
        fs_err::write(staging.join(".complete"), &want).unwrap();
        let _ = fs_err::remove_dir_all(&dir);
        fs_err::rename(&staging, &dir).unwrap();
    }
    dir
}
