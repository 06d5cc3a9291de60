//! Offline source bundles (`cargo xtask source bundle`).
//!
//! A bundle is a `.tar.gz` holding `llorch-bundle.json` (schema, pin name,
//! the pin's source identity, backend, and the sha256 of every file) and the
//! trimmed llama.cpp tree under `tree/`: only what building `llama-server`
//! for the profile's backend needs (no docs, tests, example models, or other
//! GPU backends), plus the llama SPM vocabulary that synthetic models use.
//!
//! On an offline host the build unpacks a bundle into the pin's own
//! `src-v1/<source-id>/` after checking that its identity is the pin's and
//! that every file hashes as listed (any edit, addition or removal is
//! refused), so the fingerprint is the same as with the pin's source.

use crate::fingerprint::SourceIdentity;
use crate::profile::{Backend, Pin, Profile};
use llorch_io::fsx;
use llorch_io::paths::Layout;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const BUNDLE_SCHEMA: u32 = 1;
const MANIFEST: &str = "llorch-bundle.json";
pub const VOCAB_FOR_SYNTHETIC: &str = "models/ggml-vocab-llama-spm.gguf";

#[derive(Debug, Serialize, Deserialize)]
pub struct BundleManifest {
    pub schema: u32,
    pub pin: String,
    pub source: SourceIdentity,
    pub backend: Backend,
    pub files: BTreeMap<String, String>,
}

/// Whether a path (relative to the llama.cpp root) is needed to build llama-server.
pub fn keep(rel: &str, backend: Backend) -> bool {
    // `app/`, `scripts/` (ui-assets.cmake runs at build time) and `licenses/` are used by the build.
    const DROP_TOP: &[&str] = &[
        ".git",
        ".github",
        ".devops",
        "docs",
        "media",
        "examples",
        "tests",
        "benches",
        "pocs",
        "gguf-py",
        "conversion",
        "requirements",
        "ci",
        "skills",
        "grammars",
    ];
    let top = rel.split('/').next().unwrap_or("");
    if DROP_TOP.contains(&top) {
        return false;
    }
    if top == "models" {
        return rel == VOCAB_FOR_SYNTHETIC;
    }
    if let Some(rest) = rel.strip_prefix("ggml/src/ggml-") {
        let name = rest.split('/').next().unwrap_or("");
        // Directories of other backends; files directly in ggml/src (ggml-*.c) stay.
        if rest.contains('/') {
            let wanted: &[&str] = match backend {
                Backend::Cpu => &["cpu"],
                Backend::Cuda => &["cpu", "cuda"],
            };
            return wanted.contains(&name);
        }
    }
    true
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let ft = e.file_type()?;
        if ft.is_dir() {
            walk(root, &e.path(), out)?;
        } else if ft.is_file() {
            out.push(e.path().strip_prefix(root).unwrap().to_path_buf());
        }
    }
    Ok(())
}

/// Write a bundle of `tree` (the pin's fetched source) for `profile` to `out`.
pub fn create(profile: &Profile, tree: &Path, out: &Path) -> Result<BundleManifest, String> {
    let backend = profile.file.engine.backend;
    let mut all = Vec::new();
    walk(tree, tree, &mut all).map_err(|e| format!("list {}: {e}", tree.display()))?;
    all.sort();
    let mut files = BTreeMap::new();
    let kept: Vec<PathBuf> = all
        .into_iter()
        .filter(|p| {
            let s = p.to_string_lossy();
            s != ".llorch-complete" && keep(&s, backend)
        })
        .collect();
    for p in &kept {
        let h = llorch_io::digest::sha256_file(&tree.join(p)).map_err(|e| e.to_string())?;
        files.insert(p.to_string_lossy().into_owned(), h);
    }
    let manifest = BundleManifest {
        schema: BUNDLE_SCHEMA,
        pin: profile.pin_name.clone(),
        source: crate::source::identity(&profile.pin),
        backend,
        files,
    };
    let tmp = out.with_extension("partial");
    {
        let f =
            std::fs::File::create(&tmp).map_err(|e| format!("create {}: {e}", tmp.display()))?;
        let gz = flate2::write::GzEncoder::new(f, flate2::Compression::new(6));
        let mut tar = tar::Builder::new(gz);
        let json = serde_json::to_vec_pretty(&manifest).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(json.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, MANIFEST, json.as_slice())
            .map_err(|e| e.to_string())?;
        for p in &kept {
            tar.append_path_with_name(tree.join(p), Path::new("tree").join(p))
                .map_err(|e| format!("add {}: {e}", p.display()))?;
        }
        let gz = tar.into_inner().map_err(|e| e.to_string())?;
        gz.finish()
            .map_err(|e| e.to_string())?
            .sync_all()
            .map_err(|e| e.to_string())?;
    }
    std::fs::rename(&tmp, out).map_err(|e| e.to_string())?;
    Ok(manifest)
}

/// Verify a bundle against `pin` and make it the pin's source tree.
pub fn unpack_for_build(
    bundle: &Path,
    pin: &Pin,
    layout: &Layout,
    say: &dyn Fn(&str),
) -> Result<PathBuf, String> {
    let id = crate::source::source_id(pin);
    let final_dir = layout.bucket(llorch_io::paths::Bucket::Src).join(&id);
    let _lock = fsx::FileLock::exclusive(&layout.locks().join(format!("src-{id}.lock")), || {})
        .map_err(|e| e.to_string())?;
    let staging = fsx::staging_dir_for(&final_dir).map_err(|e| e.to_string())?;
    say(&format!("verifying source bundle {}", bundle.display()));
    let manifest = verify_into(bundle, pin, staging.path())?;
    std::fs::write(
        staging.path().join("tree/.llorch-complete"),
        &manifest.source.id,
    )
    .map_err(|e| e.to_string())?;
    fsx::commit_subdir(staging, Path::new("tree"), &final_dir).map_err(|e| e.to_string())?;
    Ok(final_dir)
}

/// Extract `bundle` into `dest` and check it: identity equals the pin's,
/// every listed file present with its hash, nothing unlisted.
pub fn verify_into(bundle: &Path, pin: &Pin, dest: &Path) -> Result<BundleManifest, String> {
    crate::source::extract_tar_gz(bundle, dest, None).map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(dest.join(MANIFEST)).map_err(|e| {
        format!(
            "{}: not a llama-orch source bundle ({MANIFEST}: {e})",
            bundle.display()
        )
    })?;
    let m: BundleManifest = serde_json::from_str(&text)
        .map_err(|e| format!("{}: bad {MANIFEST}: {e}", bundle.display()))?;
    if m.schema != BUNDLE_SCHEMA {
        return Err(format!(
            "{}: bundle schema {} (want {BUNDLE_SCHEMA})",
            bundle.display(),
            m.schema
        ));
    }
    let want = crate::source::identity(pin);
    if m.source != want {
        return Err(format!(
            "{}: bundle is of source {} {} (commit {}), but the pin is {} {} (commit {})\n  hint: make the bundle from the same pin: cargo xtask source bundle --profile <profile>",
            bundle.display(), m.source.kind, m.source.id, m.source.commit, want.kind, want.id, want.commit
        ));
    }
    let tree = dest.join("tree");
    let mut present = Vec::new();
    walk(&tree, &tree, &mut present).map_err(|e| e.to_string())?;
    for p in &present {
        let key = p.to_string_lossy();
        if !m.files.contains_key(key.as_ref()) {
            return Err(format!(
                "{}: tampered bundle: `{key}` is not in its manifest",
                bundle.display()
            ));
        }
    }
    for (rel, h) in &m.files {
        let actual = llorch_io::digest::sha256_file(&tree.join(rel)).map_err(|e| {
            format!(
                "{}: tampered bundle: `{rel}` missing ({e})",
                bundle.display()
            )
        })?;
        if &actual != h {
            return Err(format!(
                "{}: tampered bundle: `{rel}` has sha256 {actual}, manifest says {h}",
                bundle.display()
            ));
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_the_server_needs() {
        assert!(keep("CMakeLists.txt", Backend::Cpu));
        assert!(keep("tools/server/server.cpp", Backend::Cpu));
        assert!(keep("ggml/src/ggml.c", Backend::Cpu));
        assert!(keep("ggml/src/ggml-cpu/ggml-cpu.c", Backend::Cpu));
        assert!(!keep("ggml/src/ggml-cuda/mmq.cu", Backend::Cpu));
        assert!(keep("ggml/src/ggml-cuda/mmq.cu", Backend::Cuda));
        assert!(!keep("ggml/src/ggml-vulkan/x.cpp", Backend::Cuda));
        assert!(!keep("docs/build.md", Backend::Cpu));
        assert!(!keep("models/ggml-vocab-gpt-2.gguf", Backend::Cpu));
        assert!(keep(VOCAB_FOR_SYNTHETIC, Backend::Cpu));
        assert!(
            keep("scripts/ui-assets.cmake", Backend::Cpu),
            "run by the build"
        );
        assert!(
            keep("app/CMakeLists.txt", Backend::Cpu),
            "added by the top-level CMakeLists"
        );
    }
}
