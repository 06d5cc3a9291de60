//! Shared by this crate's test files: pinned Python client packages.

/// Install pinned Python packages with pip (from the configured package
/// index) into `target/python-<name>` once per machine (under a file lock;
/// a half-installed directory is never used), and return that directory for
/// `PYTHONPATH`.
pub fn python_packages(name: &str, pins: &[&str]) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("target").join(format!("python-{name}"));
    let _lock =
        llorch_io::fsx::FileLock::exclusive(&root.join("target/python-sdk.lock"), || {}).unwrap();
    let want = pins.join("\n");
    if std::fs::read_to_string(dir.join(".complete"))
        .ok()
        .as_deref()
        != Some(want.as_str())
    {
        let staging = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&staging);
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
        std::fs::write(staging.join(".complete"), &want).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&staging, &dir).unwrap();
    }
    dir
}
