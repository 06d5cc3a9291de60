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

pub const BUCKET: &str = "engines-v1";
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
            dir: cache_root.join(BUCKET),
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
