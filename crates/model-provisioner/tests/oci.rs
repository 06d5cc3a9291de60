//! Models through a real OCI registry (`docker-registry` on 127.0.0.1):
//! `model push`, then `oci://` refs into an empty store; verified, resumable.

mod support;
use test_support::registry as test_registry;

use llorch_io::paths::Layout;
use model_provisioner::error::ModelError;
use model_provisioner::{FetchOptions, ModelStore};
use std::sync::atomic::Ordering;
use support::tiny_gguf;
use test_registry::{CuttingProxy, TestRegistry};

fn store(d: &std::path::Path) -> ModelStore {
    ModelStore::new(&Layout::at(d.into(), d.join("cache"), d.join("runtime")))
}

fn opts(expected: Option<String>) -> FetchOptions {
    FetchOptions {
        expected_sha256: expected,
        report: llorch_io::report::Reporter::QUIET,
        ..Default::default()
    }
}

/// A store holding one model (imported from a local file); returns its ref and sha256.
fn pushed_model(reg: &TestRegistry, tag: &str) -> (tempfile::TempDir, String, Vec<u8>) {
    let d = tempfile::tempdir().unwrap();
    let body = tiny_gguf(1_500_000, 7);
    let file = d.path().join("tiny.gguf");
    fs_err::write(&file, &body).unwrap();
    let a = store(d.path());
    let r = format!("file:{}", file.display());
    a.fetch(
        &r,
        &FetchOptions {
            import: true,
            ..opts(None)
        },
    )
    .unwrap();
    let to = format!("{}:{tag}", reg.url("llorch/models"));
    let p = model_provisioner::registry::push_model(&a, &r, &to).unwrap();
    assert_eq!(p.sha256, llorch_io::digest::sha256_bytes(&body));
    (d, to, body)
}

#[test]
fn push_then_fetch_by_tag_and_by_digest_into_an_empty_store() {
    let reg = TestRegistry::start(None);
    let (_a, to, body) = pushed_model(&reg, "tiny");
    let sha = llorch_io::digest::sha256_bytes(&body);
    let b = tempfile::tempdir().unwrap();
    let s = store(b.path());
    let out = s.fetch(&to, &opts(Some(sha.clone()))).unwrap();
    assert_eq!(out.metadata.digest, sha);
    assert_eq!(fs_err::read(&out.metadata.path).unwrap(), body);
    assert!(!out.cached);
    // A second fetch is a hit; the manifest digest is recorded as the revision.
    assert!(s.fetch(&to, &opts(Some(sha.clone()))).unwrap().cached);
    let (_, entry, _) = s.stored(&to).unwrap();
    let manifest_digest = entry.revision.unwrap();
    assert!(manifest_digest.starts_with("sha256:"));
    // By manifest digest, without an expected sha256 (the manifest names it).
    let c = tempfile::tempdir().unwrap();
    let by_digest = format!("{}@{manifest_digest}", reg.url("llorch/models"));
    let out = store(c.path())
        .fetch(
            &by_digest,
            &FetchOptions {
                require_digest: true,
                ..opts(None)
            },
        )
        .unwrap();
    assert_eq!(out.metadata.digest, sha);
    // A digest the registry does not have is refused.
    let wrong = format!("{}@sha256:{}", reg.url("llorch/models"), "0".repeat(64));
    assert!(store(c.path()).fetch(&wrong, &opts(None)).is_err());
}

#[test]
fn a_wrong_expected_digest_or_a_tampered_layer_stores_nothing() {
    let reg = TestRegistry::start(None);
    let (_a, to, body) = pushed_model(&reg, "tamper");
    let b = tempfile::tempdir().unwrap();
    let s = store(b.path());
    // The profile expects another file: refused before any download.
    match s.fetch(&to, &opts(Some("1".repeat(64)))) {
        Err(ModelError::Mismatch { .. }) => {}
        other => panic!("{other:?}"),
    }
    let downloads = b.path().join("cache/downloads");
    assert!(fs_err::read_dir(&downloads)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true));
    // Flip a byte of the stored layer in the registry.
    let blob = reg.blob_path(&format!(
        "sha256:{}",
        llorch_io::digest::sha256_bytes(&body)
    ));
    let mut bytes = fs_err::read(&blob).unwrap();
    bytes[1000] ^= 0xff;
    fs_err::write(&blob, &bytes).unwrap();
    let e = s.fetch(&to, &opts(None)).unwrap_err().to_string();
    assert!(e.contains("sha256"), "{e}");
    assert!(s.list().unwrap().is_empty(), "nothing stored");
    let blobs = b.path().join("cache/models-v1/blobs");
    assert!(fs_err::read_dir(&blobs)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true));
}

#[test]
fn a_cut_transfer_resumes_from_its_partial() {
    let reg = TestRegistry::start(None);
    let (_a, _to, body) = pushed_model(&reg, "resume");
    let sha = llorch_io::digest::sha256_bytes(&body);
    let proxy = CuttingProxy::start(&reg.addr);
    proxy.cut_after.store(600_000, Ordering::SeqCst);
    proxy.cutting.store(true, Ordering::SeqCst);
    *proxy.only.lock().unwrap() = Some(format!("sha256:{sha}"));
    let via = format!("{}:resume", proxy.url("llorch/models"));
    let b = tempfile::tempdir().unwrap();
    let out = store(b.path())
        .fetch(&via, &opts(Some(sha.clone())))
        .unwrap();
    assert_eq!(fs_err::read(&out.metadata.path).unwrap(), body);
    let gets = proxy.blob_gets();
    assert!(gets.len() >= 3, "cut twice, resumed twice: {gets:?}");
    assert!(
        gets.iter()
            .skip(1)
            .all(|h| h.to_ascii_lowercase().contains("range: bytes=")),
        "{gets:?}"
    );
}

/// A partial download of the full size whose bytes are wrong (a bad disk, a
/// tampered downloads directory) fails verification once and is removed;
/// the next fetch downloads again and succeeds, instead of failing forever.
#[test]
fn a_partial_with_wrong_bytes_is_removed_and_the_next_fetch_downloads_again() {
    let reg = TestRegistry::start(None);
    let (_a, to, body) = pushed_model(&reg, "badpartial");
    let sha = llorch_io::digest::sha256_bytes(&body);
    let b = tempfile::tempdir().unwrap();
    let s = store(b.path());
    // The store's partial for this ref: downloads/<first 16 hex of sha256(ref)>.partial.
    let key = &llorch_io::digest::sha256_bytes(to.as_bytes())[..16];
    let dl = b.path().join("cache/downloads");
    fs_err::create_dir_all(&dl).unwrap();
    let partial = dl.join(format!("{key}.partial"));
    let mut wrong = body.clone();
    wrong[body.len() / 2] ^= 0xff;
    fs_err::write(&partial, &wrong).unwrap();
    let e = s
        .fetch(&to, &opts(Some(sha.clone())))
        .unwrap_err()
        .to_string();
    assert!(e.contains("sha256"), "{e}");
    assert!(!partial.exists(), "the wrong partial is removed");
    let out = s.fetch(&to, &opts(Some(sha))).unwrap();
    assert_eq!(fs_err::read(&out.metadata.path).unwrap(), body);
}
