//! Where an engine came from, as a signed, offline-verifiable statement.
//!
//! Every build writes an in-toto Statement (v1) with a SLSA provenance (v1)
//! predicate into its entry (`provenance.json`): the subject is the entry's
//! `manifest.json` (which lists every file's sha256), the build definition
//! names the profile (and its content digest), the pin, the backend, CUDA
//! archs and CMake flags, the resolved dependencies are the source identity
//! and the compilers and tools the fingerprint recorded, and the run details
//! name the builder (`LLORCH_BUILDER_ID`, else `llama-orch/ci` under CI,
//! else `llama-orch/local`) with start and finish times.
//!
//! `engine push --sign-key K` adds the pushed archive's digest to the subject,
//! signs the statement with an Ed25519 key as a DSSE envelope inside a
//! Sigstore bundle (v0.3, key-based: no certificate, no transparency log,
//! because GPU hosts are often air-gapped) and attaches it to the engine in
//! the registry as an OCI referrer. `engine pull` with a trusted public key
//! refuses an engine without a signature, one signed by another key, and one
//! whose statement does not name the pulled bytes.
//!
//! Keys: `cargo xtask engine keygen` writes a PKCS#8 private key (mode 0600,
//! never printed) and its SubjectPublicKeyInfo public key, both PEM; a key's
//! id is the sha256 of its public key's DER.

use crate::cache::Manifest;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The statement beside `manifest.json` in an engine entry.
pub const FILE: &str = "provenance.json";
/// The second statement `engine verify --rebuild` writes when the rebuild
/// reproduced the entry byte for byte: the same subject, by the verifier.
pub const REPRODUCED_FILE: &str = "reproduced.json";
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
pub const BUILD_TYPE: &str = "https://llama-orch.dev/engine-build/v1";
/// DSSE payload type of an in-toto statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// A Sigstore bundle (also the referrer's artifact type).
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// The subject name of the pushed archive (the registry layer).
pub const ARCHIVE_SUBJECT: &str = "engine.tar.gz";
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410) before the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// Largest key file or bundle read (both are a few hundred bytes).
const MAX_KEY_BYTES: u64 = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    #[error("{path}: {why}")]
    Key { path: String, why: String },
    #[error("{0}")]
    Io(#[from] llorch_io::IoError),
}

/// Who built: `LLORCH_BUILDER_ID`, else CI or local.
pub fn builder_id() -> String {
    match std::env::var("LLORCH_BUILDER_ID") {
        Ok(id) if !id.is_empty() && id.len() <= 256 => id,
        _ if std::env::var_os("CI").is_some() => "llama-orch/ci".into(),
        _ => "llama-orch/local".into(),
    }
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// The build statement of an entry: `manifest_json` is `manifest.json`'s
/// exact bytes, `profile_path` the profile file it was built from.
pub fn statement(m: &Manifest, manifest_json: &[u8], profile: &llorch_profile::Profile) -> Value {
    let profile_digest = fs_err::read(&profile.path)
        .map(|b| sha256_hex(&b))
        .unwrap_or_default();
    let engine = &profile.file.engine;
    let inputs = &m.inputs;
    let mut deps = Vec::new();
    if let Some(src) = inputs.get("source") {
        let mut digest = serde_json::Map::new();
        if let Some(c) = src.get("commit").and_then(Value::as_str) {
            digest.insert("gitCommit".into(), json!(c));
        }
        if let Some(s) = src.get("sha256").and_then(Value::as_str) {
            digest.insert("sha256".into(), json!(s));
        }
        deps.push(json!({"name": "llama.cpp source", "digest": digest, "annotations": src}));
    }
    for key in ["compilers", "cmake", "generator", "nvcc", "host"] {
        if let Some(v) = inputs.get(key) {
            deps.push(json!({"name": key, "annotations": {"identity": v}}));
        }
    }
    let finished = &m.built_at;
    let started =
        time::OffsetDateTime::parse(finished, &time::format_description::well_known::Rfc3339)
            .ok()
            .map(|t| t - time::Duration::seconds_f64(m.configure_s + m.build_s))
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| finished.clone());
    json!({
        "_type": STATEMENT_TYPE,
        "subject": [{"name": "manifest.json", "digest": {"sha256": sha256_hex(manifest_json)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "profile": m.profile,
                    "profile_sha256": profile_digest,
                    "pin": m.pin,
                    "backend": inputs.get("backend").cloned().unwrap_or(Value::Null),
                    "cuda_archs": engine.cuda_archs,
                    "cmake_flags": inputs.get("cmake_flags").cloned().unwrap_or(json!(engine.cmake_flags)),
                },
                "internalParameters": {"fingerprint": m.fingerprint},
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": builder_id()},
                "metadata": {"invocationId": m.fingerprint, "startedOn": started, "finishedOn": finished},
            },
        },
    })
}

/// The "reproduced by" statement: the entry's `manifest.json` (its exact
/// bytes) rebuilt from source by this builder, `identical` of `files` files
/// the same byte for byte. The build definition is the build statement's.
pub fn reproduced_statement(
    build: Option<&Value>,
    manifest_json: &[u8],
    fingerprint: &str,
    started: &str,
    identical: usize,
) -> Value {
    let definition = build
        .map(|b| b["predicate"]["buildDefinition"].clone())
        .filter(|d| d.is_object())
        .unwrap_or_else(
            || json!({"buildType": BUILD_TYPE, "internalParameters": {"fingerprint": fingerprint}}),
        );
    json!({
        "_type": STATEMENT_TYPE,
        "subject": [{"name": "manifest.json", "digest": {"sha256": sha256_hex(manifest_json)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": definition,
            "runDetails": {
                "builder": {"id": builder_id()},
                "metadata": {
                    "invocationId": format!("reproduce:{fingerprint}"),
                    "startedOn": started,
                    "finishedOn": llorch_io::now_rfc3339(),
                },
                "byproducts": [{
                    "name": "reproduced",
                    "annotations": {
                        "files_identical": identical,
                        "method": "cargo xtask engine verify --rebuild: the pinned source copied to a scratch tree, built with no compiler cache, every file compared byte for byte",
                    },
                }],
            },
        },
    })
}

/// The statement with the pushed archive added to its subject.
pub fn with_archive(statement: &Value, layer_digest: &str) -> Value {
    let mut s = statement.clone();
    let hex = layer_digest.strip_prefix("sha256:").unwrap_or(layer_digest);
    if let Some(subject) = s["subject"].as_array_mut() {
        subject.retain(|e| e["name"] != ARCHIVE_SUBJECT);
        subject.push(json!({"name": ARCHIVE_SUBJECT, "digest": {"sha256": hex}}));
    }
    s
}

/// The sha256 the statement's subject gives `name`.
pub fn subject_digest<'a>(statement: &'a Value, name: &str) -> Option<&'a str> {
    statement["subject"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["digest"]["sha256"]
        .as_str()
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn unpem(text: &str, label: &str) -> Result<Vec<u8>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let body = text
        .split_once(&begin)
        .and_then(|(_, rest)| rest.split_once(&end))
        .map(|(b, _)| b)
        .ok_or_else(|| format!("not a PEM `{label}`"))?;
    let b64: String = body.split_whitespace().collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("its base64 does not decode: {e}"))
}

fn read_small(path: &Path) -> Result<String, ProvenanceError> {
    let key_err = |why: String| ProvenanceError::Key {
        path: path.display().to_string(),
        why,
    };
    let meta = fs_err::metadata(path).map_err(|e| key_err(e.to_string()))?;
    if !meta.is_file() || meta.len() > MAX_KEY_BYTES {
        return Err(key_err(
            "not a key file (a regular file of at most 16 KiB)".into(),
        ));
    }
    fs_err::read_to_string(path).map_err(|e| key_err(e.to_string()))
}

/// A public key's id: the sha256 of its SubjectPublicKeyInfo DER.
fn key_id(public: &[u8]) -> String {
    let mut der = ED25519_SPKI_PREFIX.to_vec();
    der.extend_from_slice(public);
    sha256_hex(&der)
}

/// A key to verify with (a public key file).
#[derive(Clone, Debug)]
pub struct TrustedKey {
    pub path: PathBuf,
    pub key_id: String,
    public: Vec<u8>,
}

impl TrustedKey {
    pub fn load(path: &Path) -> Result<TrustedKey, ProvenanceError> {
        let text = read_small(path)?;
        let der = unpem(&text, "PUBLIC KEY").map_err(|why| ProvenanceError::Key {
            path: path.display().to_string(),
            why: format!("{why} (expected an Ed25519 public key from `cargo xtask engine keygen`)"),
        })?;
        let public = der
            .strip_prefix(&ED25519_SPKI_PREFIX[..])
            .filter(|k| k.len() == 32)
            .ok_or_else(|| ProvenanceError::Key {
                path: path.display().to_string(),
                why: "not an Ed25519 public key".into(),
            })?
            .to_vec();
        Ok(TrustedKey {
            path: path.to_path_buf(),
            key_id: key_id(&public),
            public,
        })
    }
}

/// A key to sign with (a private key file, never printed).
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pub key_id: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.key_id)
    }
}

impl SigningKey {
    /// Load a private key; refused when others may read it.
    pub fn load(path: &Path) -> Result<SigningKey, ProvenanceError> {
        use std::os::unix::fs::PermissionsExt;
        let key_err = |why: String| ProvenanceError::Key {
            path: path.display().to_string(),
            why,
        };
        let mode = fs_err::metadata(path)
            .map_err(|e| key_err(e.to_string()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(key_err(format!(
                "mode {:o}: a private key must not be readable by others (chmod 600 it)",
                mode & 0o777
            )));
        }
        let der = unpem(&read_small(path)?, "PRIVATE KEY").map_err(key_err)?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|_| key_err("not an Ed25519 PKCS#8 private key".into()))?;
        let key_id = key_id(pair.public_key().as_ref());
        Ok(SigningKey { pair, key_id })
    }

    /// The public key, PEM.
    pub fn public_pem(&self) -> String {
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend_from_slice(self.pair.public_key().as_ref());
        pem("PUBLIC KEY", &der)
    }
}

/// What `keygen` wrote.
#[derive(Debug, serde::Serialize)]
pub struct KeyFiles {
    pub private_key: PathBuf,
    pub public_key: PathBuf,
    pub key_id: String,
}

/// A new Ed25519 key pair as `<stem>.key` (0600, created, never replaced)
/// and `<stem>.pub`.
pub fn keygen(stem: &Path) -> Result<KeyFiles, ProvenanceError> {
    use fs_err::os::unix::fs::OpenOptionsExt;
    use std::io::Write;
    let private_key = stem.with_extension("key");
    let public_key = stem.with_extension("pub");
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| ProvenanceError::Key {
        path: private_key.display().to_string(),
        why: "the system's random source failed".into(),
    })?;
    let mut f = fs_err::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&private_key)
        .map_err(|e| ProvenanceError::Key {
            path: private_key.display().to_string(),
            why: format!("{e} (an existing key is never replaced)"),
        })?;
    f.write_all(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes())
        .map_err(llorch_io::io("write the private key"))?;
    let key = SigningKey::load(&private_key)?;
    llorch_io::fsx::write_atomic(&public_key, key.public_pem().as_bytes())
        .map_err(llorch_io::io("write the public key"))?;
    Ok(KeyFiles {
        private_key,
        public_key,
        key_id: key.key_id,
    })
}

/// DSSE's pre-authentication encoding of a payload.
fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    v.extend_from_slice(payload);
    v
}

/// The statement signed as a Sigstore bundle (JSON bytes).
pub fn sign(statement: &Value, key: &SigningKey) -> Vec<u8> {
    let payload = serde_json::to_vec(statement).expect("a statement serializes");
    let sig = key.pair.sign(&pae(PAYLOAD_TYPE, &payload));
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    serde_json::to_vec_pretty(&json!({
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": key.key_id}},
        "dsseEnvelope": {
            "payload": b64(&payload),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": b64(sig.as_ref()), "keyid": key.key_id}],
        },
    }))
    .expect("a bundle serializes")
}

/// Why a bundle is not accepted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BundleRefused {
    #[error("not a Sigstore bundle with a DSSE envelope: {0}")]
    Malformed(String),
    #[error("signed by key {found}, not the trusted key {trusted}")]
    OtherKey { found: String, trusted: String },
    #[error("its signature does not verify with the trusted key {0}")]
    BadSignature(String),
}

/// Verify a bundle with `key`; the signed statement when it holds.
pub fn verify(bundle: &[u8], key: &TrustedKey) -> Result<Value, BundleRefused> {
    let bad = |w: &str| BundleRefused::Malformed(w.into());
    let b: Value = serde_json::from_slice(bundle).map_err(|e| bad(&e.to_string()))?;
    if b["mediaType"] != BUNDLE_MEDIA_TYPE {
        return Err(bad("mediaType"));
    }
    let env = &b["dsseEnvelope"];
    if env["payloadType"] != PAYLOAD_TYPE {
        return Err(bad("payloadType is not an in-toto statement"));
    }
    let d = |v: &Value| {
        v.as_str()
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
    };
    let payload = d(&env["payload"]).ok_or_else(|| bad("payload"))?;
    let sigs = env["signatures"]
        .as_array()
        .ok_or_else(|| bad("signatures"))?;
    let hint = b["verificationMaterial"]["publicKey"]["hint"].as_str();
    let mut found = None;
    for s in sigs.iter().take(16) {
        let keyid = s["keyid"].as_str().or(hint).unwrap_or("(none)");
        if keyid != key.key_id {
            found.get_or_insert_with(|| keyid.to_string());
            continue;
        }
        let sig = d(&s["sig"]).ok_or_else(|| bad("sig"))?;
        UnparsedPublicKey::new(&ED25519, &key.public)
            .verify(&pae(PAYLOAD_TYPE, &payload), &sig)
            .map_err(|_| BundleRefused::BadSignature(key.key_id.clone()))?;
        let statement: Value =
            serde_json::from_slice(&payload).map_err(|e| bad(&format!("payload: {e}")))?;
        if statement["_type"] != STATEMENT_TYPE {
            return Err(bad("payload is not an in-toto v1 statement"));
        }
        return Ok(statement);
    }
    Err(BundleRefused::OtherKey {
        found: found.unwrap_or_else(|| "(no signature)".into()),
        trusted: key.key_id.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_every_refusal_names_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let a = keygen(&dir.path().join("a")).unwrap();
        let b = keygen(&dir.path().join("b")).unwrap();
        assert_ne!(a.key_id, b.key_id);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs_err::metadata(&a.private_key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(keygen(&dir.path().join("a")).is_err(), "never replaced");
        let ka = SigningKey::load(&a.private_key).unwrap();
        assert!(!format!("{ka:?}").contains("PRIVATE"));
        let ta = TrustedKey::load(&a.public_key).unwrap();
        let tb = TrustedKey::load(&b.public_key).unwrap();
        let st = json!({"_type": STATEMENT_TYPE, "subject": [{"name": "manifest.json", "digest": {"sha256": "00"}}]});
        let st = with_archive(&st, "sha256:ab");
        assert_eq!(subject_digest(&st, ARCHIVE_SUBJECT), Some("ab"));
        let bundle = sign(&st, &ka);
        assert_eq!(verify(&bundle, &ta).unwrap(), st);
        assert!(matches!(
            verify(&bundle, &tb),
            Err(BundleRefused::OtherKey { .. })
        ));
        // A payload changed after signing.
        let mut v: Value = serde_json::from_slice(&bundle).unwrap();
        let other = serde_json::to_vec(&with_archive(&st, "sha256:cd")).unwrap();
        v["dsseEnvelope"]["payload"] =
            json!(base64::engine::general_purpose::STANDARD.encode(other));
        assert_eq!(
            verify(&serde_json::to_vec(&v).unwrap(), &ta),
            Err(BundleRefused::BadSignature(ta.key_id.clone()))
        );
        assert!(matches!(
            verify(b"{}", &ta),
            Err(BundleRefused::Malformed(_))
        ));
        // A private key others can read is refused.
        fs_err::set_permissions(&a.private_key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = SigningKey::load(&a.private_key).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }
}
