//! Signing at push and the trusted-key check at pull (the formats are
//! [`crate::provenance`]'s).

use super::RegistryError;
use llorch_io::io;
use llorch_io::oci::{self, Registry};
use llorch_types::OciRef;
use sha2::Digest;
use std::path::Path;

/// Sign the entry's statement, with the pushed archive added to its subject,
/// and attach it to the pushed engine; the key id.
pub(super) fn sign_pushed(
    client: &Registry,
    r: &OciRef,
    dir: &Path,
    key_path: &Path,
    pushed: &oci::PushedArtifact,
) -> Result<String, RegistryError> {
    use crate::provenance as p;
    let key = p::SigningKey::load(key_path)?;
    let text = fs_err::read_to_string(dir.join(p::FILE)).map_err(|_| RegistryError::Corrupt {
        fp: dir.display().to_string(),
        why: format!(
            "it has no {} (built by an older llama-orch); rebuild it to sign it",
            p::FILE
        ),
    })?;
    let statement: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| RegistryError::Corrupt {
            fp: dir.display().to_string(),
            why: format!("{}: {e}", p::FILE),
        })?;
    let manifest = fs_err::read(dir.join("manifest.json")).map_err(io("read manifest.json"))?;
    let manifest_sha = hex::encode(sha2::Sha256::digest(&manifest));
    if p::subject_digest(&statement, "manifest.json") != Some(manifest_sha.as_str()) {
        return Err(RegistryError::Corrupt {
            fp: dir.display().to_string(),
            why: format!("its {} does not name its manifest.json", p::FILE),
        });
    }
    let bundle = p::sign(&p::with_archive(&statement, &pushed.layer_digest), &key);
    client.attach(r, &pushed.manifest_digest, p::BUNDLE_MEDIA_TYPE, &bundle)?;
    // "Reproduced by" (`engine verify --rebuild`), when it names the same manifest.
    let reproduced = fs_err::read(dir.join(p::REPRODUCED_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter(|s| p::subject_digest(s, "manifest.json") == Some(manifest_sha.as_str()));
    if let Some(s) = reproduced {
        let bundle = p::sign(&p::with_archive(&s, &pushed.layer_digest), &key);
        client.attach(r, &pushed.manifest_digest, p::BUNDLE_MEDIA_TYPE, &bundle)?;
    }
    Ok(key.key_id)
}

/// The pulled engine's signed statement, checked with the trusted key
/// against what is being pulled: the manifest.json (`config_sha`) and the
/// archive (`layer_digest`) must be its subject.
pub(super) fn verify_pulled(
    client: &Registry,
    r: &OciRef,
    manifest_digest: &str,
    key_path: &Path,
    config_sha: &str,
    layer_digest: &str,
) -> Result<(serde_json::Value, String), RegistryError> {
    use crate::provenance as p;
    let key = p::TrustedKey::load(key_path)?;
    let refuse = |why: String, hint: &str| RegistryError::Signature {
        reference: r.to_string(),
        why,
        hint: hint.into(),
    };
    let bundles: Vec<_> = client
        .referrers(r, manifest_digest)?
        .into_iter()
        .filter(|x| x.artifact_type == p::BUNDLE_MEDIA_TYPE)
        .collect();
    if bundles.is_empty() {
        return Err(refuse(
            "has no signature: no signed provenance is attached to it".into(),
            "push it with `cargo xtask engine push --sign-key KEY`, or pull without a trusted key (LLORCH_TRUSTED_KEY)",
        ));
    }
    let mut last = None;
    for b in bundles.iter().take(16) {
        let bytes = client.referrer_payload(r, b)?;
        match p::verify(&bytes, &key) {
            Ok(st) => {
                let layer_hex = layer_digest.strip_prefix("sha256:").unwrap_or(layer_digest);
                let named = (
                    p::subject_digest(&st, "manifest.json"),
                    p::subject_digest(&st, p::ARCHIVE_SUBJECT),
                );
                if named != (Some(config_sha), Some(layer_hex)) {
                    return Err(refuse(
                        format!(
                            "is signed by the trusted key, but its statement does not name the pulled bytes: manifest.json sha256 {config_sha} and archive {layer_digest}, it names {} and {}",
                            named.0.unwrap_or("nothing"),
                            named.1.unwrap_or("nothing")
                        ),
                        "the signature belongs to another build: do not use this engine; push it again from a trusted builder",
                    ));
                }
                return Ok((st, key.key_id));
            }
            Err(e) => last = Some(e),
        }
    }
    let why = match last {
        Some(p::BundleRefused::OtherKey { found, trusted }) => {
            format!("is signed by key {found}, not by the trusted key {trusted}")
        }
        Some(e) => format!("has a signature that does not hold: {e}"),
        None => "has no signature".into(),
    };
    Err(refuse(
        why,
        &format!(
            "trust the builder's public key (LLORCH_TRUSTED_KEY={}) only if it is the right one",
            key_path.display()
        ),
    ))
}
