//! Offline source bundles (`cargo xtask source bundle`).
//!
//! A bundle is a `.tar.gz` holding `llorch-bundle.json` (schema, pin name,
//! the pin's source identity, backend, and the sha256 of every file) and the
//! trimmed llama.cpp tree under `tree/`: only what building `llama-server`
//! for the profile's backend needs (no docs, tests, example models, or other
//! GPU backends), plus the llama SPM vocabulary that synthetic models use.
//!
//! On an offline host the build unpacks a bundle into the pin's own
//! `src-v1/<source-id>/` after checking it against the pin, before a single
//! file is written: its identity is the pin's, the digest of its file list
//! is the one the pin names for its backend (`bundle_trees` in
//! toolchains/llama.cpp.yaml), and every file hashes as listed (any edit,
//! addition or removal is refused, even with a recomputed manifest). So the
//! fingerprint is the same as with the pin's source.
//!
//! Why a pinned tree digest and not the pinned artifact itself: the default
//! pin's sdist is 75 MB, the trimmed tree for one backend about 13 MB; GPU
//! hosts are reached with at most 64 MiB of carried files.

use crate::fingerprint::SourceIdentity;
use llorch_io::fsx;
use llorch_io::io;
use llorch_io::paths::Layout;
use llorch_profile::{Backend, Pin, Profile};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const BUNDLE_SCHEMA: u32 = 1;
const MANIFEST: &str = "llorch-bundle.json";
pub const VOCAB_FOR_SYNTHETIC: &str = "models/ggml-vocab-llama-spm.gguf";

#[derive(Clone, Debug, Serialize, Deserialize)]
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
    for e in fs_err::read_dir(dir)? {
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

/// Why a bundle could not be made, or was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Not the bundle the pin names, or not a bundle at all: the reason
    /// names the member and what is wrong with it.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Io(#[from] llorch_io::IoError),
}

/// The files of `tree` a bundle for `backend` holds, each with its sha256.
pub fn tree_files(
    tree: &Path,
    backend: Backend,
) -> Result<(Vec<PathBuf>, BTreeMap<String, String>), BundleError> {
    let mut all = Vec::new();
    walk(tree, tree, &mut all).map_err(io("list the source tree"))?;
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
        let h = llorch_io::digest::sha256_file(&tree.join(p)).map_err(io("hash a source file"))?;
        files.insert(p.to_string_lossy().into_owned(), h);
    }
    Ok((kept, files))
}

/// Write a bundle of `tree` (the pin's fetched source) for `profile` to `out`.
pub fn create(profile: &Profile, tree: &Path, out: &Path) -> Result<BundleManifest, BundleError> {
    let backend = profile.file.engine.backend;
    let (kept, files) = tree_files(tree, backend)?;
    let manifest = BundleManifest {
        schema: BUNDLE_SCHEMA,
        pin: profile.pin_name.clone(),
        source: crate::source::identity(&profile.pin),
        backend,
        files,
    };
    let tmp = out.with_extension("partial");
    {
        let f = fs_err::File::create(&tmp).map_err(io("create the bundle"))?;
        let gz = flate2::write::GzEncoder::new(f, flate2::Compression::new(6));
        let mut tar = tar::Builder::new(gz);
        let json = serde_json::to_vec_pretty(&manifest).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(json.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, MANIFEST, json.as_slice())
            .map_err(io("write the bundle's manifest"))?;
        for p in &kept {
            tar.append_path_with_name(tree.join(p), Path::new("tree").join(p))
                .map_err(io(format!("add {} to the bundle", p.display())))?;
        }
        let gz = tar.into_inner().map_err(io("write the bundle"))?;
        gz.finish()
            .map_err(io("write the bundle"))?
            .sync_all()
            .map_err(io("sync the bundle"))?;
    }
    fs_err::rename(&tmp, out).map_err(io("rename the bundle into place"))?;
    Ok(manifest)
}

/// Verify a bundle against `pin` and make it the pin's source tree.
pub fn unpack_for_build(
    bundle: &Path,
    pin: &Pin,
    layout: &Layout,
    say: &dyn Fn(&str),
) -> Result<PathBuf, BundleError> {
    let id = crate::source::source_id(pin);
    let final_dir = layout.bucket(llorch_io::paths::Bucket::Src).join(&id);
    let _lock =
        fsx::FileLock::exclusive(&layout.source_lock(&id), || {}).map_err(io("lock the source"))?;
    let staging = fsx::staging_dir_for(&final_dir).map_err(io("create a staging dir"))?;
    say(&format!("verifying source bundle {}", bundle.display()));
    let manifest = verify_into(bundle, pin, staging.path())?;
    fs_err::write(
        staging.path().join("tree/.llorch-complete"),
        &manifest.source.id,
    )
    .map_err(io("mark the source complete"))?;
    fsx::commit_subdir(staging, Path::new("tree"), &final_dir)
        .map_err(io("rename the source into place"))?;
    Ok(final_dir)
}

/// The digest a pin names for a bundle's tree (`bundle_trees`): sha256 over
/// `"<sha256>  <path>\n"` for every file, in path order.
pub fn tree_digest(files: &BTreeMap<String, String>) -> String {
    let mut text = String::new();
    for (path, sha) in files {
        text.push_str(sha);
        text.push_str("  ");
        text.push_str(path);
        text.push('\n');
    }
    llorch_io::digest::sha256_bytes(text.as_bytes())
}

fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::Cpu => "cpu",
        Backend::Cuda => "cuda",
    }
}

/// The largest manifest read into memory.
const MAX_MANIFEST: u64 = 64 << 20;

/// Check `bundle` against `pin` without writing anything, then extract it
/// into `dest`. Checked, reading the archive as a stream: the manifest's
/// source identity is the pin's; the digest of its file list is the one the
/// pin names for its backend (`bundle_trees`), so a file edited together
/// with its manifest line is refused; every member is a regular file under
/// `tree/` whose bytes hash as listed; nothing is missing or unlisted. Only
/// then is it extracted (safely, `crate::extract::extract_tar_gz`) and, once
/// extracted, hashed again.
pub fn verify_into(bundle: &Path, pin: &Pin, dest: &Path) -> Result<BundleManifest, BundleError> {
    let shown = bundle.display();
    let m = verify_stream(bundle, pin).map_err(BundleError::Refused)?;
    crate::extract::extract_tar_gz(bundle, dest, None)?;
    for (rel, h) in &m.files {
        let actual = llorch_io::digest::sha256_file(&dest.join("tree").join(rel)).map_err(|e| {
            BundleError::Refused(format!("{shown}: `{rel}` missing after extraction ({e})"))
        })?;
        if &actual != h {
            return Err(BundleError::Refused(format!(
                "{shown}: `{rel}` changed while it was extracted"
            )));
        }
    }
    Ok(m)
}

/// The reason a bundle is refused, naming the member, as `Err`.
fn verify_stream(bundle: &Path, pin: &Pin) -> Result<BundleManifest, String> {
    use std::io::Read;
    let shown = bundle.display();
    let f = fs_err::File::open(bundle).map_err(|e| e.to_string())?;
    let mut a = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)));
    let mut manifest: Option<Vec<u8>> = None;
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for e in a.entries().map_err(|e| format!("{shown}: {e}"))? {
        let mut e = e.map_err(|e| format!("{shown}: {e}"))?;
        let path = e
            .path()
            .map_err(|e| format!("{shown}: member path: {e}"))?
            .to_string_lossy()
            .into_owned();
        let kind = e.header().entry_type();
        if path == MANIFEST {
            let mut buf = Vec::new();
            (&mut e)
                .take(MAX_MANIFEST)
                .read_to_end(&mut buf)
                .map_err(|e| format!("{shown}: {MANIFEST}: {e}"))?;
            manifest = Some(buf);
            continue;
        }
        let Some(rel) = path.strip_prefix("tree/") else {
            if path == "tree" || path == "tree/" {
                continue;
            }
            return Err(format!(
                "{shown}: unexpected member `{}` outside tree/",
                llorch_types::excerpt(&path, 80)
            ));
        };
        let rel = rel.trim_end_matches('/').to_string();
        match kind {
            tar::EntryType::Directory => continue,
            tar::EntryType::Regular | tar::EntryType::Continuous => {}
            other => {
                return Err(format!(
                    "{shown}: `{rel}` is a {other:?} entry; bundles hold regular files only"
                ))
            }
        }
        let sha = llorch_io::digest::sha256_reader(&mut e)
            .map_err(|e| format!("{shown}: read `{rel}`: {e}"))?;
        if seen.insert(rel.clone(), sha).is_some() {
            return Err(format!("{shown}: tampered bundle: `{rel}` appears twice"));
        }
    }
    let text = manifest
        .ok_or_else(|| format!("{shown}: not a llama-orch source bundle (no {MANIFEST})"))?;
    let m: BundleManifest =
        serde_json::from_slice(&text).map_err(|e| format!("{shown}: bad {MANIFEST}: {e}"))?;
    if m.schema != BUNDLE_SCHEMA {
        return Err(format!(
            "{shown}: bundle schema {} (want {BUNDLE_SCHEMA})",
            m.schema
        ));
    }
    let want = crate::source::identity(pin);
    if m.source != want {
        return Err(format!(
            "{shown}: bundle is of source {} {} (commit {}), but the pin is {} {} (commit {})\n  hint: make the bundle from the same pin: cargo xtask source bundle --profile <profile>",
            m.source.kind, m.source.id, m.source.commit, want.kind, want.id, want.commit
        ));
    }
    let backend = backend_name(m.backend);
    let digest = tree_digest(&m.files);
    match pin.bundle_trees.get(backend) {
        None => {
            return Err(format!(
                "{shown}: the pin names no bundle tree for backend `{backend}`, so this bundle cannot be checked against it\n  hint: on a machine that fetched the pin's source, `cargo xtask source bundle` prints the digest; add `bundle_trees: {{{backend}: {digest}}}` to the pin in toolchains/llama.cpp.yaml"
            ))
        }
        Some(p) if p != &digest => {
            return Err(format!(
                "{shown}: tampered or foreign bundle: its file list has digest {digest}, the pin's `bundle_trees.{backend}` is {p}"
            ))
        }
        Some(_) => {}
    }
    for (rel, h) in &m.files {
        match seen.get(rel) {
            None => return Err(format!("{shown}: tampered bundle: `{rel}` missing")),
            Some(a) if a != h => {
                return Err(format!(
                    "{shown}: tampered bundle: `{rel}` has sha256 {a}, manifest says {h}"
                ))
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = seen.keys().find(|k| !m.files.contains_key(*k)) {
        return Err(format!(
            "{shown}: tampered bundle: `{extra}` is not in its manifest"
        ));
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
