//! The artifact cache: `cache/engines-v1/<fingerprint>/` holds `bin/`
//! (llama-server and any shared library it loads) and `manifest.json`.
//!
//! A lookup answers Fresh (manifest readable, fingerprint matches, every file
//! present with its recorded sha256), Stale (present but broken: the reason
//! says what) or Missing. Only Fresh entries are used.

use crate::fingerprint::BuildInputs;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const MANIFEST_SCHEMA: u32 = 1;

/// Why an entry cannot be used, or the cache could not be collected.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("nothing there")]
    Missing,
    /// Present but not what its manifest says; the reason names the file.
    #[error("{0}")]
    Stale(String),
    #[error("{}: {why}", path.display())]
    Manifest { path: PathBuf, why: String },
    /// Another cache has no entry of that fingerprint (`--reuse-from`).
    #[error("it has no engine of this fingerprint")]
    NotInOther,
    #[error("its recorded inputs differ from this fingerprint's")]
    InputsDiffer,
    #[error(transparent)]
    Io(#[from] llorch_io::IoError),
}
/// Beside `manifest.json` in an entry pulled from a registry: where it came from.
pub const ORIGIN_FILE: &str = "origin.json";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    pub fingerprint: String,
    pub inputs: serde_json::Value,
    /// Relative path → sha256.
    pub files: BTreeMap<String, String>,
    pub binary: String,
    pub version_output: String,
    pub built_at: String,
    pub configure_s: f64,
    pub build_s: f64,
    #[serde(default)]
    pub sass_archs: Vec<String>,
    #[serde(default)]
    pub profile: String,
    #[serde(default)]
    pub pin: String,
}

#[derive(Debug)]
pub enum Lookup {
    Fresh(Box<Manifest>),
    Stale(String),
    Missing,
}

#[derive(Clone, Debug)]
pub struct ArtifactCache {
    pub dir: PathBuf,
}

impl ArtifactCache {
    pub fn new(cache_root: &Path) -> ArtifactCache {
        ArtifactCache {
            dir: cache_root.join(llorch_io::paths::Bucket::Engines.dir_name()),
        }
    }

    pub fn entry(&self, fp: &str) -> PathBuf {
        self.dir.join(fp)
    }

    /// Check an entry without trusting it: manifest, fingerprint, every file's hash.
    pub fn lookup(&self, fp: &str, inputs: Option<&BuildInputs>) -> Lookup {
        let dir = self.entry(fp);
        if !dir.exists() {
            return Lookup::Missing;
        }
        check_dir(&dir, fp, inputs)
    }

    /// All entries with readable manifests, newest first.
    pub fn list(&self) -> Vec<(PathBuf, Manifest)> {
        let mut v: Vec<(PathBuf, Manifest)> = fs_err::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .filter_map(|p| read_manifest(&p).ok().map(|m| (p, m)))
            .collect();
        v.sort_by(|a, b| b.1.built_at.cmp(&a.1.built_at));
        v
    }
}

/// The check behind a lookup, on any directory (a pulled entry is checked
/// in its staging directory before it is renamed into place).
fn check_dir(dir: &Path, fp: &str, inputs: Option<&BuildInputs>) -> Lookup {
    let m = match read_manifest(dir) {
        Ok(m) => m,
        Err(e) => return Lookup::Stale(format!("manifest unreadable ({e})")),
    };
    if m.schema != MANIFEST_SCHEMA {
        return Lookup::Stale(format!(
            "manifest schema {} (want {MANIFEST_SCHEMA})",
            m.schema
        ));
    }
    if m.fingerprint != fp {
        return Lookup::Stale(format!("manifest says fingerprint {}", m.fingerprint));
    }
    // The recorded inputs must be the ones the fingerprint is the hash of:
    // an edited input (a pin, a flag) is caught by a plain lookup, not only
    // by a rebuild.
    let of_inputs = inputs_fingerprint(&m.inputs);
    if of_inputs != m.fingerprint {
        return Lookup::Stale(format!(
            "the manifest's recorded inputs hash to {}, not to its fingerprint {} (edited?)",
            &of_inputs[..12.min(of_inputs.len())],
            &m.fingerprint[..12.min(m.fingerprint.len())]
        ));
    }
    if let Some(i) = inputs {
        if serde_json::to_value(i).ok().as_ref() != Some(&m.inputs) {
            return Lookup::Stale("recorded inputs differ from the fingerprint's".into());
        }
    }
    if let Err(why) = check_layout(dir, &m) {
        return Lookup::Stale(why);
    }
    for (rel, want) in &m.files {
        let p = dir.join(rel);
        match llorch_io::digest::sha256_file(&p) {
            Ok(h) if &h == want => {}
            Ok(h) => return Lookup::Stale(format!("{rel}: sha256 {h}, manifest says {want}")),
            Err(e) => return Lookup::Stale(format!("{rel}: {e}")),
        }
    }
    Lookup::Fresh(Box::new(m))
}

/// The fingerprint a manifest's recorded inputs give: the sha256 of their
/// canonical JSON (serde_json's maps are sorted, so the text is canonical),
/// exactly as [`BuildInputs::fingerprint`] computes it when the entry is built.
pub fn inputs_fingerprint(inputs: &serde_json::Value) -> String {
    let text = serde_json::to_string(inputs).expect("a JSON value serializes");
    llorch_io::digest::sha256_bytes(text.as_bytes())
}

/// Check an entry outside the cache (a pull's staging directory) as a lookup would.
pub fn verify_entry(dir: &Path, fp: &str) -> Result<(), CacheError> {
    match check_dir(dir, fp, None) {
        Lookup::Fresh(_) => Ok(()),
        Lookup::Stale(why) => Err(CacheError::Stale(why)),
        Lookup::Missing => Err(CacheError::Missing),
    }
}

/// What a manifest may name: a non-empty file list that includes the binary,
/// every path relative and plain (no `..`, no root), every file a regular
/// file reached through real directories inside the entry (no symlink
/// anywhere), and no file in the entry that the manifest does not list. So a
/// manifest can never point the engine at something outside its entry, and
/// nothing unhashed sits next to the binary (where its loader looks).
fn check_layout(dir: &Path, m: &Manifest) -> Result<(), String> {
    use std::path::Component;
    if m.files.is_empty() {
        return Err("the manifest lists no files".into());
    }
    if !m.files.contains_key(&m.binary) {
        return Err(format!(
            "the manifest's binary `{}` is not among its hashed files",
            llorch_types::excerpt(&m.binary, 80)
        ));
    }
    for rel in m.files.keys() {
        let p = Path::new(rel);
        if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(format!(
                "the manifest names `{}`, which is not a plain path inside the entry",
                llorch_types::excerpt(rel, 80)
            ));
        }
        let mut cur = dir.to_path_buf();
        for c in p.components() {
            cur.push(c);
            let md = fs_err::symlink_metadata(&cur).map_err(|e| format!("{rel}: {e}"))?;
            if md.file_type().is_symlink() {
                return Err(format!("{rel}: {} is a symlink", cur.display()));
            }
        }
        if !fs_err::symlink_metadata(&cur).is_ok_and(|m| m.file_type().is_file()) {
            return Err(format!("{rel}: not a regular file"));
        }
    }
    let mut found = Vec::new();
    list_files(dir, dir, &mut found).map_err(|e| format!("cannot list the entry: {e}"))?;
    if let Some(extra) = found.iter().find(|f| {
        f.as_str() != "manifest.json"
            && f.as_str() != ORIGIN_FILE
            && f.as_str() != crate::provenance::FILE
            && f.as_str() != crate::provenance::REPRODUCED_FILE
            && !m.files.contains_key(f.as_str())
    }) {
        return Err(format!("{extra} is in the entry but not in its manifest"));
    }
    Ok(())
}

/// Every non-directory below `dir`, relative, `/`-separated (symlinks listed, not followed).
fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    for e in fs_err::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            list_files(root, &e.path(), out)?;
        } else {
            let rel = e.path();
            let rel = rel.strip_prefix(root).unwrap_or(&rel);
            out.push(rel.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

pub fn read_manifest(dir: &Path) -> Result<Manifest, CacheError> {
    let path = dir.join("manifest.json");
    let text = fs_err::read_to_string(&path).map_err(llorch_io::io("read the engine manifest"))?;
    serde_json::from_str(&text).map_err(|e| CacheError::Manifest {
        path,
        why: e.to_string(),
    })
}

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub removed: Vec<String>,
    pub kept_in_use: Vec<String>,
    pub stale_staging_removed: usize,
}

/// Delete all but the newest `keep` entries (and their build dirs). An entry
/// whose lock is held (a build writing it, or an engine process running it:
/// engines hold it shared) is never removed.
pub fn gc(layout: &llorch_io::paths::Layout, keep: usize) -> Result<GcReport, CacheError> {
    use llorch_io::fsx::FileLock;
    use llorch_io::io;
    use llorch_io::paths::Bucket;
    let cache = ArtifactCache::new(&layout.cache);
    let mut r = GcReport::default();
    for (p, m) in cache.list().into_iter().skip(keep) {
        let lock = FileLock::try_exclusive(&layout.engine_lock(&m.fingerprint))
            .map_err(io("lock the engine entry"))?;
        if lock.is_none() {
            r.kept_in_use.push(m.fingerprint);
            continue;
        }
        fs_err::remove_dir_all(&p).map_err(io("remove the engine entry"))?;
        let _ = fs_err::remove_dir_all(layout.bucket(Bucket::Build).join(&m.fingerprint));
        // The work dir, when it holds this build and no build is compiling there.
        let work = crate::compile::work_dir(layout);
        if fs_err::read_to_string(work.join("fingerprint")).is_ok_and(|f| f.trim() == m.fingerprint)
        {
            if let Ok(Some(_w)) = FileLock::try_exclusive(&layout.build_work_lock()) {
                let _ = fs_err::remove_dir_all(&work);
            }
        }
        r.removed.push(m.fingerprint);
    }
    // Staging dirs left by a build that was killed (Ctrl-C, power loss): never
    // mistaken for entries, but garbage once no build of that fingerprint holds the lock.
    for e in fs_err::read_dir(&cache.dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".staging-") else {
            continue;
        };
        let fp = rest.split('-').next().unwrap_or("");
        if FileLock::try_exclusive(&layout.engine_lock(fp))
            .map_err(io("lock the engine entry"))?
            .is_some()
        {
            fs_err::remove_dir_all(e.path()).map_err(io("remove a stale staging dir"))?;
            r.stale_staging_removed += 1;
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fingerprint of the test entries' recorded inputs (`null`).
    fn fp() -> String {
        inputs_fingerprint(&serde_json::Value::Null)
    }

    fn entry(
        files: &[(&str, &[u8])],
        binary: &str,
        listed: &[(&str, &[u8])],
    ) -> (tempfile::TempDir, ArtifactCache) {
        let d = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::new(d.path());
        let dir = cache.entry(&fp());
        fs_err::create_dir_all(dir.join("bin")).unwrap();
        for (rel, body) in files {
            fs_err::write(dir.join(rel), body).unwrap();
        }
        let m = Manifest {
            schema: MANIFEST_SCHEMA,
            fingerprint: fp(),
            inputs: serde_json::Value::Null,
            files: listed
                .iter()
                .map(|(r, b)| (r.to_string(), llorch_io::digest::sha256_bytes(b)))
                .collect(),
            binary: binary.into(),
            version_output: String::new(),
            built_at: String::new(),
            configure_s: 0.0,
            build_s: 0.0,
            sass_archs: vec![],
            profile: String::new(),
            pin: String::new(),
        };
        fs_err::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
        (d, cache)
    }

    fn stale(c: &ArtifactCache) -> String {
        match c.lookup(&fp(), None) {
            Lookup::Stale(why) => why,
            other => panic!("used: {other:?}"),
        }
    }

    #[test]
    fn a_sound_entry_is_fresh() {
        let (_d, c) = entry(
            &[("bin/llama-server", b"ELF")],
            "bin/llama-server",
            &[("bin/llama-server", b"ELF")],
        );
        assert!(matches!(c.lookup(&fp(), None), Lookup::Fresh(_)));
    }

    #[test]
    fn hostile_manifests_are_never_used() {
        let b: &[u8] = b"ELF";
        let (_d, c) = entry(&[("bin/llama-server", b)], "bin/llama-server", &[]);
        assert!(stale(&c).contains("no files"));
        let (_d, c) = entry(
            &[("bin/llama-server", b)],
            "/bin/sh",
            &[("bin/llama-server", b)],
        );
        assert!(stale(&c).contains("not among its hashed files"));
        let (_d, c) = entry(
            &[("bin/llama-server", b)],
            "/bin/sh",
            &[("bin/llama-server", b), ("/bin/sh", b)],
        );
        assert!(stale(&c).contains("not a plain path"), "{}", stale(&c));
        let (_d, c) = entry(
            &[("bin/llama-server", b)],
            "../x",
            &[("bin/llama-server", b), ("../x", b)],
        );
        assert!(stale(&c).contains("not a plain path"));
        // A listed file that is a symlink (to bytes that hash right).
        let (d, c) = entry(&[], "bin/llama-server", &[("bin/llama-server", b)]);
        fs_err::write(d.path().join("elsewhere"), b).unwrap();
        fs_err::os::unix::fs::symlink(
            d.path().join("elsewhere"),
            c.entry(&fp()).join("bin/llama-server"),
        )
        .unwrap();
        assert!(stale(&c).contains("symlink"));
        // A directory on the way that is a symlink.
        let (d, c) = entry(&[], "lib/llama-server", &[("lib/llama-server", b)]);
        fs_err::create_dir_all(d.path().join("real")).unwrap();
        fs_err::write(d.path().join("real/llama-server"), b).unwrap();
        fs_err::os::unix::fs::symlink(d.path().join("real"), c.entry(&fp()).join("lib")).unwrap();
        assert!(stale(&c).contains("symlink"));
        // An unlisted library next to the binary.
        let (_d, c) = entry(
            &[("bin/llama-server", b), ("bin/libevil.so", b"x")],
            "bin/llama-server",
            &[("bin/llama-server", b)],
        );
        assert!(stale(&c).contains("libevil.so"));
    }

    #[test]
    fn a_manifest_whose_inputs_were_edited_is_stale_without_a_rebuild() {
        let b: &[u8] = b"ELF";
        let (_d, c) = entry(
            &[("bin/llama-server", b)],
            "bin/llama-server",
            &[("bin/llama-server", b)],
        );
        let path = c.entry(&fp()).join("manifest.json");
        let mut m: Manifest = serde_json::from_slice(&fs_err::read(&path).unwrap()).unwrap();
        m.inputs = serde_json::json!({"cmake_flags": ["-DGGML_NATIVE=ON"]});
        fs_err::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
        let why = stale(&c);
        assert!(why.contains("recorded inputs hash to"), "{why}");
    }
}
