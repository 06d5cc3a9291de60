//! Models in an OCI registry: `oci://HOST[:PORT]/REPO:TAG` (or `@sha256:…`)
//! refs and `model push`.
//!
//! A model artifact has one layer, the GGUF file itself, so the layer's
//! digest is the model's sha256: the store's name for it. A pull checks the
//! manifest (digest when the ref names one), the layer against the profile's
//! expected sha256 before downloading, then the bytes against the digest;
//! an interrupted transfer resumes from its `.partial`.

use crate::error::ModelError;
use crate::store::{FetchOptions, ModelStore};
use llorch_io::oci::{self, Registry};
use llorch_types::OciRef;
use std::collections::BTreeMap;
use std::path::Path;

pub const ARTIFACT_TYPE: &str = "application/vnd.llama-orch.model.v1";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.llama-orch.model.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.llama-orch.model.gguf";
/// A model layer larger than this is refused.
pub const MAX_MODEL_BYTES: i64 = 1 << 40;

fn oci_err(reference: &str) -> impl Fn(oci::OciError) -> ModelError + '_ {
    move |source| ModelError::Registry {
        reference: reference.to_string(),
        source: Box::new(source),
    }
}

/// Plain HTTP off loopback only with `LLORCH_REGISTRY_INSECURE=1`.
fn insecure() -> bool {
    std::env::var("LLORCH_REGISTRY_INSECURE").is_ok_and(|v| v == "1")
}

/// Fetch the model at `reference` into `partial`, verified; returns (sha256 hex, size, manifest digest).
pub fn pull_model(
    reference: &str,
    partial: &Path,
    opts: &FetchOptions,
) -> Result<(String, u64, String), ModelError> {
    let e = oci_err(reference);
    let r = OciRef::parse(reference).map_err(|b| e(b.into()))?;
    let client = Registry::connect(&r, insecure()).map_err(&e)?;
    let (m, manifest_digest) = client.pull_manifest(&r).map_err(&e)?;
    let layers: Vec<_> = m
        .layers
        .iter()
        .filter(|l| l.media_type == LAYER_MEDIA_TYPE)
        .collect();
    let [layer] = layers.as_slice() else {
        return Err(ModelError::Artifact {
            reference: reference.to_string(),
            why: format!(
                "the artifact has {} layers of type {LAYER_MEDIA_TYPE}, not one (was it pushed with `model push`?)",
                layers.len()
            ),
        });
    };
    if layer.size <= 0 || layer.size > MAX_MODEL_BYTES {
        return Err(ModelError::Artifact {
            reference: reference.to_string(),
            why: format!("the model layer claims {} bytes", layer.size),
        });
    }
    let hex = layer
        .digest
        .strip_prefix("sha256:")
        .unwrap_or_default()
        .to_string();
    if let Some(exp) = &opts.expected_sha256 {
        if exp != &hex {
            return Err(ModelError::Mismatch {
                reference: reference.into(),
                source_desc: format!("the registry's manifest {manifest_digest}"),
                expected: exp.clone(),
                actual: hex,
            });
        }
    }
    opts.report.info(format_args!(
        "pulling {reference} ({:.1} MB)",
        layer.size as f64 / 1e6
    ));
    client
        .pull_to_file(&r, layer, partial, 6, &|_, _| {})
        .map_err(&e)?;
    Ok((hex, layer.size as u64, manifest_digest))
}

/// What `model push` did.
#[derive(Debug, serde::Serialize)]
pub struct ModelPushed {
    pub reference: String,
    pub manifest_digest: String,
    pub sha256: String,
    pub size_bytes: u64,
}

/// Publish the stored model of `model_ref` to `to` (which names a tag).
pub fn push_model(
    store: &ModelStore,
    model_ref: &str,
    to: &str,
) -> Result<ModelPushed, ModelError> {
    let e = oci_err(to);
    let r = OciRef::parse(to).map_err(|b| e(b.into()))?;
    if r.tag.is_none() || r.digest.is_some() {
        return Err(ModelError::Artifact {
            reference: to.to_string(),
            why: "push to a tag (oci://HOST/REPO:TAG)".into(),
        });
    }
    let (canonical, entry, path) = store.stored(model_ref)?;
    // The blob's lease: gc cannot remove it while it is mapped and uploaded.
    let _lease = llorch_io::fsx::FileLock::shared(&store.layout.blob_lock(&entry.digest))
        .map_err(ModelError::BlobLock)?;
    let client = Registry::connect(&r, insecure()).map_err(&e)?;
    let config = serde_json::to_vec(&serde_json::json!({
        "reference": canonical,
        "sha256": entry.digest,
        "size_bytes": entry.size_bytes,
    }))
    .expect("json");
    let title = path
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| n.ends_with(".gguf"))
        .map(str::to_string)
        .unwrap_or_else(|| format!("{}.gguf", &entry.digest[..16]));
    let want = format!("sha256:{}", entry.digest);
    let pushed = client
        .push_artifact(
            &r,
            &oci::Artifact {
                artifact_type: ARTIFACT_TYPE,
                config_media_type: CONFIG_MEDIA_TYPE,
                config: &config,
                layer_media_type: LAYER_MEDIA_TYPE,
                layer: &path,
                layer_annotations: BTreeMap::from([(
                    "org.opencontainers.image.title".to_string(),
                    title,
                )]),
                annotations: BTreeMap::from([(
                    "org.llama-orch.model.ref".to_string(),
                    canonical.clone(),
                )]),
                expect_layer_digest: Some(&want),
            },
        )
        .map_err(|err| match err {
            oci::OciError::Digest { actual, .. } => ModelError::StoredChanged {
                path: path.display().to_string(),
                actual,
                want: want.to_string(),
            },
            other => e(other),
        })?;
    let (manifest_digest, size) = (pushed.manifest_digest, pushed.layer_bytes);
    Ok(ModelPushed {
        reference: r.to_string(),
        manifest_digest,
        sha256: entry.digest,
        size_bytes: size,
    })
}
