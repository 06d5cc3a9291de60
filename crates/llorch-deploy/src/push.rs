//! Pushing an image layout to a registry, through the OCI door
//! (`llorch_io::oci`): layers, config, then the manifest as its exact bytes,
//! so the registry serves the layout's own digest.

use crate::image::MANIFEST_MEDIA_TYPE;
use crate::DeployError;
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// What a pushed image is.
#[derive(Clone, Debug, Serialize)]
pub struct PushedImage {
    pub reference: String,
    pub digest: String,
}

/// Push an image layout (its one manifest, config and layers) to `to`
/// (`oci://HOST[:PORT]/REPO[:TAG]`; the layout's tag when none is given).
/// The digest the registry serves is the layout's, byte for byte.
pub fn push(dir: &Path, to: &str, insecure: bool) -> Result<PushedImage, DeployError> {
    use llorch_io::oci::{OciError, Registry};
    use llorch_types::OciRef;
    let index: Value = serde_json::from_slice(
        &fs_err::read(dir.join("index.json")).map_err(llorch_io::io("read the image index"))?,
    )
    .map_err(|e| DeployError::Spec {
        path: dir.join("index.json").display().to_string(),
        why: e.to_string(),
    })?;
    let m = &index["manifests"][0];
    let digest = m["digest"].as_str().unwrap_or("").to_string();
    let tag = m["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .unwrap_or("latest");
    let mut r = OciRef::parse(to).map_err(OciError::from)?;
    if r.tag.is_none() && r.digest.is_none() {
        r = r.with_tag(tag).map_err(OciError::from)?;
    }
    let blob = |d: &str| -> Result<PathBuf, DeployError> {
        let hex = d
            .strip_prefix("sha256:")
            .filter(|h| llorch_types::is_sha256_hex(h))
            .ok_or_else(|| DeployError::Spec {
                path: dir.display().to_string(),
                why: format!("`{}` is not a sha256 digest", llorch_types::excerpt(d, 80)),
            })?;
        Ok(dir.join("blobs/sha256").join(hex))
    };
    let manifest_bytes =
        fs_err::read(blob(&digest)?).map_err(llorch_io::io("read the image manifest"))?;
    let manifest: Value =
        serde_json::from_slice(&manifest_bytes).map_err(|e| DeployError::Spec {
            path: dir.display().to_string(),
            why: e.to_string(),
        })?;
    let reg = Registry::connect(&r, insecure)?;
    for l in manifest["layers"].as_array().into_iter().flatten() {
        let d = l["digest"].as_str().unwrap_or("");
        let (got, _) = reg.push_file(&r, &blob(d)?)?;
        if got != d {
            return Err(DeployError::Spec {
                path: dir.display().to_string(),
                why: format!("layer {d} hashes to {got}"),
            });
        }
    }
    let cd = manifest["config"]["digest"].as_str().unwrap_or("");
    let cfg = fs_err::read(blob(cd)?).map_err(llorch_io::io("read the image config"))?;
    reg.push_blob(&r, &cfg)?;
    let pushed = reg.push_manifest_bytes(&r, &manifest_bytes, MANIFEST_MEDIA_TYPE)?;
    Ok(PushedImage {
        reference: r.to_string(),
        digest: pushed,
    })
}
