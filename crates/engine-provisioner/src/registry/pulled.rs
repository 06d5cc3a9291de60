//! The steps of [`super::pull`]: what the registry says of an engine checked
//! against what this machine computed, its archive unpacked and checked like
//! a local build, and where it came from recorded beside it.

use super::signing::verify_pulled;
use super::{
    runnable_here, EngineRegistry, Origin, RegistryError, ANN_FINGERPRINT, CONFIG_MEDIA_TYPE,
    LAYER_MEDIA_TYPE, MAX_LAYER_BYTES,
};
use crate::cache::{self, Manifest};
use llorch_io::cmd::Cmd;
use llorch_io::oci::{Descriptor, Registry};
use llorch_io::{fsx, io};
use llorch_types::excerpt;
use llorch_types::OciRef;
use sha2::Digest;
use std::path::Path;

/// An engine artifact whose manifest, config and signature were checked.
pub(super) struct Artifact {
    pub reference: String,
    pub manifest_digest: String,
    pub layer: Descriptor,
    /// The config blob: the entry's `manifest.json`, byte for byte.
    config: Vec<u8>,
    engine: Manifest,
    /// The verified provenance statement and the key that signed it.
    signed: Option<(serde_json::Value, String)>,
}

impl Artifact {
    /// The manifest (config type, fingerprint annotation, one layer of the
    /// engine type and a bounded size), the config (the fingerprint and the
    /// build inputs this machine computed), whether it can run here, and its
    /// signature when a trusted key is set.
    pub fn check(
        client: &Registry,
        r: &OciRef,
        fp: &str,
        inputs: &serde_json::Value,
        reg: &EngineRegistry,
    ) -> Result<Artifact, RegistryError> {
        let reference = r.to_string();
        let reject = |why: String| RegistryError::Rejected {
            reference: reference.clone(),
            why,
        };
        let (m, manifest_digest) = client.pull_manifest(r)?;
        let ann = m.annotations.clone().unwrap_or_default();
        if m.config.media_type != CONFIG_MEDIA_TYPE {
            return Err(reject(format!(
                "its config is `{}`, not an engine manifest",
                excerpt(&m.config.media_type, 80)
            )));
        }
        if ann.get(ANN_FINGERPRINT).map(String::as_str) != Some(fp) {
            return Err(reject("its fingerprint annotation is not the tag's".into()));
        }
        let [layer] = m.layers.as_slice() else {
            return Err(reject(format!("{} layers, not one", m.layers.len())));
        };
        if layer.media_type != LAYER_MEDIA_TYPE || layer.size > MAX_LAYER_BYTES {
            return Err(reject(format!(
                "its layer is `{}` of {} bytes",
                excerpt(&layer.media_type, 80),
                layer.size
            )));
        }
        let config = client.pull_small(r, &m.config)?;
        let engine: Manifest = serde_json::from_slice(&config)
            .map_err(|e| reject(format!("its engine manifest does not parse: {e}")))?;
        if engine.fingerprint != fp {
            return Err(reject(format!(
                "its engine manifest names fingerprint {}",
                excerpt(&engine.fingerprint, 80)
            )));
        }
        if &engine.inputs != inputs {
            return Err(reject(
                "its recorded build inputs differ from the ones this machine computed".into(),
            ));
        }
        runnable_here(&ann).map_err(|why| RegistryError::CannotRun {
            reference: reference.clone(),
            why: why.to_string(),
        })?;
        let config_sha = hex::encode(sha2::Sha256::digest(&config));
        let signed = match &reg.trusted_key {
            Some(k) => Some(verify_pulled(
                client,
                r,
                &manifest_digest,
                k,
                &config_sha,
                &layer.digest,
            )?),
            None => None,
        };
        Ok(Artifact {
            reference,
            manifest_digest,
            layer: layer.clone(),
            config,
            engine,
            signed,
        })
    }

    fn reject(&self, why: String) -> RegistryError {
        RegistryError::Rejected {
            reference: self.reference.clone(),
            why,
        }
    }

    fn cannot_run(&self, why: String) -> RegistryError {
        RegistryError::CannotRun {
            reference: self.reference.clone(),
            why,
        }
    }

    /// The downloaded layer into `staging` through the safe extractor, then
    /// checked as a local build is (its `manifest.json` the config, every
    /// file hashed, nothing extra), and its `llama-server` must start here
    /// (shared libraries, glibc symbols) before anything uses it.
    pub fn unpack(&self, layer: &Path, staging: &Path, fp: &str) -> Result<(), RegistryError> {
        crate::extract::extract_tar_gz(layer, staging, None)
            .map_err(|e| self.reject(format!("its layer does not unpack safely: {e}")))?;
        let extracted = fs_err::read(staging.join("manifest.json"))
            .map_err(|_| self.reject("its layer has no manifest.json".into()))?;
        if extracted != self.config {
            return Err(self.reject("the manifest.json in its layer is not its config".into()));
        }
        if let Err(why) = cache::verify_entry(staging, fp) {
            return Err(self.reject(why.to_string()));
        }
        let (ok, out) = Cmd::new(staging.join(&self.engine.binary))
            .arg("--version")
            .read_any()
            .map_err(|e| self.cannot_run(e.to_string()))?;
        if !ok {
            return Err(self.cannot_run(format!(
                "`llama-server --version` failed: {}",
                excerpt(out.trim(), 400)
            )));
        }
        Ok(())
    }

    /// `origin.json` and, when its signature was verified, the provenance
    /// statement (it travels with the entry: a mirror can sign it again)
    /// into `staging`; returns what was said of its signature.
    pub fn record(&self, staging: &Path) -> Result<String, RegistryError> {
        let origin = Origin {
            registry: self.reference.clone(),
            manifest_digest: self.manifest_digest.clone(),
            pulled_at: llorch_io::now_rfc3339(),
        };
        fsx::write_atomic(
            &staging.join(cache::ORIGIN_FILE),
            serde_json::to_string_pretty(&origin).unwrap().as_bytes(),
        )
        .map_err(io("write origin.json"))?;
        Ok(match &self.signed {
            Some((st, key_id)) => {
                fsx::write_atomic(
                    &staging.join(crate::provenance::FILE),
                    serde_json::to_string_pretty(st).unwrap().as_bytes(),
                )
                .map_err(io("write provenance.json"))?;
                format!("verified: its provenance is signed by the trusted key {key_id}")
            }
            None => {
                "not checked: no trusted key (set LLORCH_TRUSTED_KEY to a builder's public key)"
                    .into()
            }
        })
    }
}
