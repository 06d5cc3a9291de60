//! OCI referrers: an artifact attached to a manifest by its `subject` (an
//! engine's signed provenance). Registries with the referrers API list them
//! at `/v2/<repo>/referrers/<digest>`; for registries without it, the
//! distribution spec's fallback: the pusher keeps an image index under the
//! tag `sha256-<hex>` of the subject, and readers consult that tag when the
//! API is absent. Both are read bounded and every digest is checked.

use super::{block, registry_err, OciError, Registry, MAX_JSON_BYTES};
use llorch_types::is_sha256_hex;
use llorch_types::OciRef;
use oci_client::manifest::{OciDescriptor, OCI_IMAGE_MEDIA_TYPE};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The empty config of an artifact manifest (`{}`).
pub const EMPTY_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Referrers read for one subject at most.
const MAX_REFERRERS: usize = 256;

/// One artifact attached to a subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Referrer {
    pub digest: String,
    pub size: i64,
    pub artifact_type: String,
}

/// The fallback tag of a subject digest (`sha256:<hex>` → `sha256-<hex>`).
pub fn fallback_tag(subject: &str) -> Result<String, OciError> {
    match subject.strip_prefix("sha256:") {
        Some(hex) if is_sha256_hex(hex) => Ok(format!("sha256-{hex}")),
        _ => Err(OciError::Invalid {
            what: "subject digest".into(),
            reference: subject.into(),
            why: "not a sha256 digest".into(),
        }),
    }
}

impl Registry {
    /// Attach `blob` (its media type is the artifact type) to the manifest
    /// `subject` (`sha256:…`, read back for its size) in `r`'s repository: an artifact
    /// manifest naming the subject, pushed by digest, and listed under the
    /// fallback tag unless the registry lists referrers itself. Returns the
    /// referrer's manifest digest.
    pub fn attach(
        &self,
        r: &OciRef,
        subject: &str,
        artifact_type: &str,
        blob: &[u8],
    ) -> Result<String, OciError> {
        let tag = fallback_tag(subject)?;
        let subject_ref = OciRef {
            tag: None,
            digest: Some(subject.to_string()),
            ..r.clone()
        };
        let subject_size = block(self.read_small(
            &subject_ref,
            "subject manifest",
            "manifests",
            subject,
            Some(OCI_IMAGE_MEDIA_TYPE),
            MAX_JSON_BYTES,
        ))?
        .len();
        let blob_digest = self.push_blob(r, blob)?;
        let config_digest = self.push_blob(r, b"{}")?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_IMAGE_MEDIA_TYPE,
            "artifactType": artifact_type,
            "config": {"mediaType": EMPTY_CONFIG_MEDIA_TYPE, "digest": config_digest, "size": 2},
            "layers": [{"mediaType": artifact_type, "digest": blob_digest, "size": blob.len()}],
            "subject": {"mediaType": OCI_IMAGE_MEDIA_TYPE, "digest": subject, "size": subject_size},
        });
        let bytes = serde_json::to_vec(&manifest).expect("a manifest serializes");
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        let at = OciRef {
            tag: None,
            digest: Some(digest.clone()),
            ..r.clone()
        };
        self.push_manifest_bytes(&at, &bytes, OCI_IMAGE_MEDIA_TYPE)?;
        if self.referrers_api(r, subject)?.is_none() {
            let tagged = r.with_tag(&tag)?;
            let mut index = self.fallback_index(&tagged)?.unwrap_or_else(
                || json!({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": []}),
            );
            let list = index["manifests"]
                .as_array_mut()
                .ok_or_else(|| OciError::Invalid {
                    what: "referrers index".into(),
                    reference: tagged.to_string(),
                    why: "no `manifests` list".into(),
                })?;
            list.retain(|m| m["digest"] != digest.as_str());
            list.push(json!({"mediaType": OCI_IMAGE_MEDIA_TYPE, "digest": digest, "size": bytes.len(), "artifactType": artifact_type}));
            let body = serde_json::to_vec(&index).expect("an index serializes");
            self.push_index(&tagged, &body)?;
        }
        Ok(digest)
    }

    /// The artifacts attached to `subject` in `r`'s repository (the
    /// referrers API, else the fallback tag; none when neither has any).
    pub fn referrers(&self, r: &OciRef, subject: &str) -> Result<Vec<Referrer>, OciError> {
        let tagged = r.with_tag(&fallback_tag(subject)?)?;
        let index = match self.referrers_api(r, subject)? {
            Some(i) => i,
            None => match self.fallback_index(&tagged)? {
                Some(i) => i,
                None => return Ok(Vec::new()),
            },
        };
        let bad = |why: String| OciError::Invalid {
            what: "referrers index".into(),
            reference: tagged.to_string(),
            why,
        };
        let list = index["manifests"]
            .as_array()
            .ok_or_else(|| bad("no `manifests` list".into()))?;
        if list.len() > MAX_REFERRERS {
            return Err(bad(format!(
                "{} referrers (at most {MAX_REFERRERS})",
                list.len()
            )));
        }
        list.iter()
            .map(|m| {
                let digest = m["digest"].as_str().unwrap_or_default();
                let ok = digest.strip_prefix("sha256:").is_some_and(is_sha256_hex);
                let size = m["size"].as_i64().unwrap_or(-1);
                if !ok || !(0..=MAX_JSON_BYTES as i64).contains(&size) {
                    return Err(bad(format!(
                        "entry `{}` (size {size}) is not a sha256 digest with a size",
                        llorch_types::excerpt(digest, 80)
                    )));
                }
                Ok(Referrer {
                    digest: digest.into(),
                    size,
                    artifact_type: m["artifactType"].as_str().unwrap_or_default().into(),
                })
            })
            .collect()
    }

    /// A referrer's one layer (its payload), verified against the referrer
    /// manifest, which is verified against its digest.
    pub fn referrer_payload(&self, r: &OciRef, referrer: &Referrer) -> Result<Vec<u8>, OciError> {
        let at = OciRef {
            tag: None,
            digest: Some(referrer.digest.clone()),
            ..r.clone()
        };
        let (m, _) = self.pull_manifest(&at)?;
        let [layer] = m.layers.as_slice() else {
            return Err(OciError::Invalid {
                what: "referrer".into(),
                reference: at.to_string(),
                why: format!("{} layers, not one", m.layers.len()),
            });
        };
        let d: &OciDescriptor = layer;
        self.pull_small(&at, d)
    }

    /// The referrers API's index for `subject`; `None` when the registry has no such API.
    fn referrers_api(&self, r: &OciRef, subject: &str) -> Result<Option<Value>, OciError> {
        let raw = match block(self.read_small(
            r,
            "referrers",
            "referrers",
            subject,
            Some(INDEX_MEDIA_TYPE),
            MAX_JSON_BYTES,
        )) {
            Ok(raw) => raw,
            Err(OciError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        // A registry without the API may answer something else entirely.
        Ok(serde_json::from_slice::<Value>(&raw)
            .ok()
            .filter(|v| v["manifests"].is_array()))
    }

    fn fallback_index(&self, tagged: &OciRef) -> Result<Option<Value>, OciError> {
        let tag = tagged.tag.clone().unwrap_or_default();
        match block(self.read_small(
            tagged,
            "referrers index",
            "manifests",
            &tag,
            Some(INDEX_MEDIA_TYPE),
            MAX_JSON_BYTES,
        )) {
            Ok(raw) => serde_json::from_slice(&raw)
                .map(Some)
                .map_err(|e| OciError::Invalid {
                    what: "referrers index".into(),
                    reference: tagged.to_string(),
                    why: e.to_string(),
                }),
            Err(OciError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Push an image index under `tagged`'s tag.
    fn push_index(&self, tagged: &OciRef, body: &[u8]) -> Result<(), OciError> {
        let image = super::reference(tagged);
        let content_type = reqwest::header::HeaderValue::from_static(INDEX_MEDIA_TYPE);
        block(async {
            self.client
                .auth(&image, &self.auth, oci_client::RegistryOperation::Push)
                .await
                .map_err(|e| registry_err("authentication for push", tagged, e))?;
            self.client
                .push_manifest_raw(&image, body.to_vec(), content_type)
                .await
                .map_err(|e| registry_err("referrers index upload", tagged, e))
        })?;
        Ok(())
    }
}
