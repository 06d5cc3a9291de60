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
        let m = match read_manifest(&dir) {
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
        if let Some(i) = inputs {
            if serde_json::to_value(i).ok().as_ref() != Some(&m.inputs) {
                return Lookup::Stale("recorded inputs differ from the fingerprint's".into());
            }
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

    /// All entries with readable manifests, newest first.
    pub fn list(&self) -> Vec<(PathBuf, Manifest)> {
        let mut v: Vec<(PathBuf, Manifest)> = std::fs::read_dir(&self.dir)
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

pub fn read_manifest(dir: &Path) -> Result<Manifest, String> {
    let text = std::fs::read_to_string(dir.join("manifest.json")).map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| e.to_string())
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
pub fn gc(layout: &llorch_io::paths::Layout, keep: usize) -> Result<GcReport, String> {
    use llorch_io::fsx::FileLock;
    use llorch_io::paths::Bucket;
    let cache = ArtifactCache::new(&layout.cache);
    let mut r = GcReport::default();
    for (p, m) in cache.list().into_iter().skip(keep) {
        let lock = FileLock::try_exclusive(&layout.engine_lock(&m.fingerprint))
            .map_err(|e| format!("lock {}: {e}", layout.engine_lock(&m.fingerprint).display()))?;
        if lock.is_none() {
            r.kept_in_use.push(m.fingerprint);
            continue;
        }
        std::fs::remove_dir_all(&p).map_err(|e| format!("remove {}: {e}", p.display()))?;
        let _ = std::fs::remove_dir_all(layout.bucket(Bucket::Build).join(&m.fingerprint));
        r.removed.push(m.fingerprint);
    }
    // Staging dirs left by a build that was killed (Ctrl-C, power loss): never
    // mistaken for entries, but garbage once no build of that fingerprint holds the lock.
    for e in std::fs::read_dir(&cache.dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".staging-") else {
            continue;
        };
        let fp = rest.split('-').next().unwrap_or("");
        if FileLock::try_exclusive(&layout.engine_lock(fp))
            .map_err(|e| e.to_string())?
            .is_some()
        {
            std::fs::remove_dir_all(e.path())
                .map_err(|x| format!("remove {}: {x}", e.path().display()))?;
            r.stale_staging_removed += 1;
        }
    }
    Ok(r)
}
