//! Engines through a real OCI registry (`docker-registry` on 127.0.0.1), with
//! the stand-in llama.cpp tree so each build takes seconds.

mod support;
use test_support::registry as test_registry;

use engine_provisioner::build::{self, BuildOptions};
use engine_provisioner::registry::{self, EngineRegistry, RegistryError};
use llorch_io::oci::OciError;
use std::path::Path;
use support::*;
use test_registry::{CuttingProxy, TestRegistry};

fn profile_with_registry(url: &str, push: bool) -> String {
    format!("{CPU_PROFILE}  registry:\n    url: {url}\n    push: {push}\n")
}

fn entries(ws: &Workspace) -> Vec<String> {
    fs_err::read_dir(ws.layout.bucket(llorch_io::paths::Bucket::Engines))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The build inputs recorded in a cached entry's manifest.
fn inputs_of(ws: &Workspace, fp: &str) -> serde_json::Value {
    let m = ws
        .layout
        .bucket(llorch_io::paths::Bucket::Engines)
        .join(fp)
        .join("manifest.json");
    serde_json::from_slice::<serde_json::Value>(&fs_err::read(m).unwrap()).unwrap()["inputs"]
        .clone()
}

/// A workspace whose fake engine is built (and its fingerprint).
fn built(tmp: &Path, name: &str) -> (Workspace, String, std::path::PathBuf, String) {
    let (archive, sha) = fake_archive(tmp, name, &fake_server_c(&format!("{name}-fake")));
    let pins = archive_pin_yaml(&archive, &sha);
    let ws = Workspace::new(&pins, &[("fake", CPU_PROFILE)]);
    let b = build::build(&ws.profile("fake"), &ws.layout, &BuildOptions::quiet()).unwrap();
    (ws, b.fingerprint, archive, sha)
}

#[test]
fn push_then_pull_into_an_empty_cache_gives_the_same_engine_and_no_build() {
    let reg = TestRegistry::start(None);
    let tmp = tempfile::tempdir().unwrap();
    let (ws1, fp, archive, sha) = built(tmp.path(), "rt");
    let r = EngineRegistry::new(&reg.url("llorch/engines"), false, false).unwrap();
    let pushed = registry::push(&ws1.layout, &fp, &r).unwrap();
    assert!(pushed.reference.ends_with(&format!(":{fp}")));
    // Another machine: same pins and profile (plus the registry), empty cache.
    let ws2 = Workspace::new(
        &archive_pin_yaml(&archive, &sha),
        &[(
            "fake",
            &profile_with_registry(&reg.url("llorch/engines"), false),
        )],
    );
    let out = build::build(&ws2.profile("fake"), &ws2.layout, &BuildOptions::quiet()).unwrap();
    assert_eq!(out.fingerprint, fp);
    assert_eq!(out.cmake_invocations, 0, "pulled, not built");
    assert!(
        out.reason
            .as_deref()
            .unwrap()
            .starts_with("pulled from oci://"),
        "{:?}",
        out.reason
    );
    let e1 = ws1
        .layout
        .bucket(llorch_io::paths::Bucket::Engines)
        .join(&fp);
    let e2 = ws2
        .layout
        .bucket(llorch_io::paths::Bucket::Engines)
        .join(&fp);
    for f in ["bin/llama-server", "manifest.json"] {
        assert_eq!(
            fs_err::read(e1.join(f)).unwrap(),
            fs_err::read(e2.join(f)).unwrap(),
            "{f}"
        );
    }
    assert!(
        !engine_provisioner::compile::work_dir(&ws2.layout).exists(),
        "no CMake build directory: nothing was compiled"
    );
    let origin = registry::origin(&e2).expect("origin.json");
    assert_eq!(origin.manifest_digest, pushed.manifest_digest);
    let ex = build::explain(&ws2.profile("fake"), &ws2.layout, &Default::default()).unwrap();
    assert!(ex.cached);
    assert_eq!(ex.origin.unwrap().registry, pushed.reference);
    // The next build is a plain hit; nothing but the entry is left.
    let again = build::build(&ws2.profile("fake"), &ws2.layout, &BuildOptions::quiet()).unwrap();
    assert!(again.cache_hit);
    assert_eq!(entries(&ws2), vec![fp.clone()]);
    let downloads = ws2.layout.bucket(llorch_io::paths::Bucket::Downloads);
    assert!(
        fs_err::read_dir(&downloads).unwrap().next().is_none(),
        "no partial left"
    );
}

#[test]
fn a_tampered_layer_is_refused_and_the_build_falls_back_to_source() {
    let reg = TestRegistry::start(None);
    let tmp = tempfile::tempdir().unwrap();
    let (ws1, fp, archive, sha) = built(tmp.path(), "tamper");
    let r = EngineRegistry::new(&reg.url("llorch/engines"), false, false).unwrap();
    registry::push(&ws1.layout, &fp, &r).unwrap();
    // Flip bytes of the layer in the registry's storage (same length).
    let client = llorch_io::oci::Registry::connect(&r.repo.with_tag(&fp).unwrap(), false).unwrap();
    let (m, _) = client
        .pull_manifest(&r.repo.with_tag(&fp).unwrap())
        .unwrap();
    let blob = reg.blob_path(&m.layers[0].digest);
    let mut bytes = fs_err::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs_err::write(&blob, &bytes).unwrap();

    let ws2 = Workspace::new(
        &archive_pin_yaml(&archive, &sha),
        &[(
            "fake",
            &profile_with_registry(&reg.url("llorch/engines"), false),
        )],
    );
    let inputs = inputs_of(&ws1, &fp);
    match registry::pull(&ws2.layout, &fp, &inputs, &r, &|_| {}) {
        Err(RegistryError::Oci(OciError::Digest { .. })) => {}
        other => panic!("{other:?}"),
    }
    assert!(
        entries(&ws2).is_empty(),
        "nothing installed: {:?}",
        entries(&ws2)
    );
    // The build says why in one line and compiles.
    let out = build::build(&ws2.profile("fake"), &ws2.layout, &BuildOptions::quiet()).unwrap();
    assert_eq!(out.cmake_invocations, 2);
    assert_eq!(entries(&ws2), vec![fp]);
}

#[test]
fn a_registry_that_dies_mid_pull_leaves_nothing_installed_and_the_next_pull_resumes() {
    let reg = TestRegistry::start(None);
    let tmp = tempfile::tempdir().unwrap();
    let (ws1, fp, archive, sha) = built(tmp.path(), "dies");
    let direct = EngineRegistry::new(&reg.url("llorch/engines"), false, false).unwrap();
    registry::push(&ws1.layout, &fp, &direct).unwrap();
    let inputs = inputs_of(&ws1, &fp);
    let ws2 = Workspace::new(&archive_pin_yaml(&archive, &sha), &[("fake", CPU_PROFILE)]);

    // 1. Cut every blob response after 1500 bytes (head included): each
    //    attempt gets further through a range request, and the pull completes.
    let proxy = CuttingProxy::start(&reg.addr);
    proxy
        .cut_after
        .store(1500, std::sync::atomic::Ordering::SeqCst);
    proxy
        .cutting
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let via = EngineRegistry::new(&proxy.url("llorch/engines"), false, false).unwrap();
    let layer = {
        let c =
            llorch_io::oci::Registry::connect(&direct.repo.with_tag(&fp).unwrap(), false).unwrap();
        c.pull_manifest(&direct.repo.with_tag(&fp).unwrap())
            .unwrap()
            .0
            .layers[0]
            .clone()
    };
    let layer_size = layer.size;
    // Only the layer's responses are cut (the config is small).
    *proxy.only.lock().unwrap() = Some(layer.digest.clone());
    assert!(
        layer_size > 1500,
        "the layer ({layer_size} bytes) spans several cut responses"
    );
    // 2. First the registry dies for good after the first cut of the layer.
    proxy
        .die_after_blob_gets
        .store(2, std::sync::atomic::Ordering::SeqCst); // the config, then the layer
    let err = registry::pull(&ws2.layout, &fp, &inputs, &via, &|_| {}).unwrap_err();
    assert!(
        matches!(err, RegistryError::Oci(OciError::Registry { .. })),
        "{err}"
    );
    assert!(
        entries(&ws2).is_empty(),
        "nothing half-installed: {:?}",
        entries(&ws2)
    );
    let partial = ws2
        .layout
        .bucket(llorch_io::paths::Bucket::Downloads)
        .join(format!("engine-{fp}.tar.gz.partial"));
    let kept = fs_err::metadata(&partial)
        .expect("the partial is kept")
        .len();
    assert!(
        kept > 0 && (kept as i64) < layer_size,
        "{kept} of {layer_size}"
    );
    // 3. The registry is back (a fresh proxy, still cutting): the pull resumes
    //    from the partial and completes.
    let proxy2 = CuttingProxy::start(&reg.addr);
    proxy2
        .cut_after
        .store(1500, std::sync::atomic::Ordering::SeqCst);
    proxy2
        .cutting
        .store(true, std::sync::atomic::Ordering::SeqCst);
    *proxy2.only.lock().unwrap() = Some(layer.digest.clone());
    let via2 = EngineRegistry::new(&proxy2.url("llorch/engines"), false, false).unwrap();
    registry::pull(&ws2.layout, &fp, &inputs, &via2, &|_| {}).unwrap();
    let gets = proxy2.blob_gets();
    let layer_gets: Vec<&String> = gets
        .iter()
        .filter(|h| h.to_ascii_lowercase().contains("range:"))
        .collect();
    assert!(
        layer_gets
            .iter()
            .any(|h| h.contains(&format!("bytes={kept}-"))),
        "the first layer request resumes at {kept}: {gets:?}"
    );
    assert!(
        layer_gets.len() >= 2,
        "several cut responses, each resumed: {gets:?}"
    );
    assert_eq!(entries(&ws2), vec![fp.clone()]);
    assert!(!partial.exists());
    engine_provisioner::cache::verify_entry(
        &ws2.layout
            .bucket(llorch_io::paths::Bucket::Engines)
            .join(&fp),
        &fp,
    )
    .unwrap();
}

#[test]
fn a_missing_fingerprint_or_a_dead_registry_falls_back_to_building_and_push_publishes() {
    let reg = TestRegistry::start(None);
    let tmp = tempfile::tempdir().unwrap();
    let (archive, sha) = fake_archive(tmp.path(), "miss", &fake_server_c("miss-fake"));
    let pins = archive_pin_yaml(&archive, &sha);
    // A registry port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("oci://{}/llorch/engines", l.local_addr().unwrap())
    };
    let ws0 = Workspace::new(&pins, &[("fake", &profile_with_registry(&dead, false))]);
    let out = build::build(&ws0.profile("fake"), &ws0.layout, &BuildOptions::quiet()).unwrap();
    assert_eq!(
        out.cmake_invocations, 2,
        "built after the registry did not answer"
    );
    // A live registry without the fingerprint: build, then push (push: true).
    let ws1 = Workspace::new(
        &pins,
        &[(
            "fake",
            &profile_with_registry(&reg.url("llorch/engines"), true),
        )],
    );
    let out = build::build(&ws1.profile("fake"), &ws1.layout, &BuildOptions::quiet()).unwrap();
    assert_eq!(out.cmake_invocations, 2);
    let r = EngineRegistry::new(&reg.url("llorch/engines"), false, false).unwrap();
    let tagged = r.repo.with_tag(&out.fingerprint).unwrap();
    let (m, _) = llorch_io::oci::Registry::connect(&tagged, false)
        .unwrap()
        .pull_manifest(&tagged)
        .expect("the build pushed its engine");
    assert_eq!(
        m.annotations.unwrap()[registry::ANN_FINGERPRINT],
        out.fingerprint
    );
    // A third machine pulls it.
    let ws2 = Workspace::new(
        &pins,
        &[(
            "fake",
            &profile_with_registry(&reg.url("llorch/engines"), false),
        )],
    );
    let out2 = build::build(&ws2.profile("fake"), &ws2.layout, &BuildOptions::quiet()).unwrap();
    assert_eq!(out2.cmake_invocations, 0);
}

#[test]
fn an_engine_that_cannot_run_here_is_refused_with_the_reason() {
    use std::collections::BTreeMap;
    let mut ann = BTreeMap::new();
    ann.insert(registry::ANN_GLIBC.to_string(), "99.0".to_string());
    let e = registry::runnable_here(&ann).unwrap_err().to_string();
    assert!(e.contains("glibc 99.0"), "{e}");
    let mut ann = BTreeMap::new();
    ann.insert(
        registry::ANN_CPU.to_string(),
        "avx2,no_such_feature".to_string(),
    );
    // `no_such_feature` is never in /proc/cpuinfo's known set.
    let e = registry::runnable_here(&ann).unwrap_err().to_string();
    assert!(e.contains("no_such_feature"), "{e}");
    let mut ann = BTreeMap::new();
    ann.insert(registry::ANN_CUDA.to_string(), "13.0".to_string());
    if test_registry::which("nvidia-smi").is_none() {
        let e = registry::runnable_here(&ann).unwrap_err().to_string();
        assert!(e.contains("no NVIDIA driver"), "{e}");
    }
    // What this machine built, it can run.
    let mut ann = BTreeMap::new();
    if let Some(g) = registry::glibc_version() {
        ann.insert(registry::ANN_GLIBC.to_string(), g);
    }
    ann.insert(
        registry::ANN_CPU.to_string(),
        registry::cpu_features().join(","),
    );
    registry::runnable_here(&ann).unwrap();
}

/// A registry client and the pushed engine's reference, layer digest and manifest digest.
fn pushed_engine(
    r: &EngineRegistry,
    fp: &str,
) -> (
    llorch_io::oci::Registry,
    llorch_types::OciRef,
    String,
    String,
) {
    let tagged = r.repo.with_tag(fp).unwrap();
    let client = llorch_io::oci::Registry::connect(&tagged, false).unwrap();
    let (m, digest) = client.pull_manifest(&tagged).unwrap();
    let layer = m.layers[0].digest.clone();
    (client, tagged, layer, digest)
}

/// Signed provenance end to end: the build's statement names its
/// manifest.json; a host that trusts a key refuses an unsigned engine and one
/// signed by another key (naming both keys), and takes one signed by the
/// trusted key, keeping the statement that names the pulled bytes; a
/// statement signed by the trusted key for other bytes is refused; an
/// independent verifier (Python's `cryptography`, written from the bundle,
/// DSSE and in-toto formats) accepts the bundle the registry holds.
#[test]
fn signed_engines_are_pulled_only_with_the_trusted_key_and_each_refusal_says_why() {
    use engine_provisioner::provenance as p;
    use sha2::Digest;
    let reg = TestRegistry::start(None);
    let tmp = tempfile::tempdir().unwrap();
    let (ws1, fp, archive, sha) = built(tmp.path(), "sig");
    let keys = tmp.path().join("keys");
    fs_err::create_dir_all(&keys).unwrap();
    let a = p::keygen(&keys.join("builder")).unwrap();
    let b = p::keygen(&keys.join("other")).unwrap();
    // The build wrote its statement beside the manifest.
    let entry = ws1
        .layout
        .bucket(llorch_io::paths::Bucket::Engines)
        .join(&fp);
    let manifest_sha = hex::encode(sha2::Sha256::digest(
        fs_err::read(entry.join("manifest.json")).unwrap(),
    ));
    let st: serde_json::Value =
        serde_json::from_slice(&fs_err::read(entry.join(p::FILE)).unwrap()).unwrap();
    assert_eq!(
        p::subject_digest(&st, "manifest.json"),
        Some(manifest_sha.as_str())
    );
    assert_eq!(st["predicateType"], p::PREDICATE_TYPE);
    assert_eq!(
        st["predicate"]["buildDefinition"]["internalParameters"]["fingerprint"],
        fp.as_str()
    );
    assert_eq!(
        st["predicate"]["buildDefinition"]["externalParameters"]["profile"],
        "fake"
    );
    // Keys come from the test, never from the environment.
    let mut plain = EngineRegistry::new(&reg.url("llorch/signed"), false, false).unwrap();
    plain.signing_key = None;
    plain.trusted_key = None;
    let with = |sign: Option<&Path>, trust: Option<&Path>| EngineRegistry {
        signing_key: sign.map(Path::to_path_buf),
        trusted_key: trust.map(Path::to_path_buf),
        ..plain.clone()
    };
    let trusting = with(None, Some(&a.public_key));
    let ws2 = Workspace::new(&archive_pin_yaml(&archive, &sha), &[("fake", CPU_PROFILE)]);
    let inputs = inputs_of(&ws1, &fp);
    let pull = |r: &EngineRegistry| registry::pull(&ws2.layout, &fp, &inputs, r, &|_| {});
    // Unsigned.
    assert_eq!(
        registry::push(&ws1.layout, &fp, &plain).unwrap().signed_by,
        None
    );
    let e = pull(&trusting).unwrap_err().to_string();
    assert!(e.contains("has no signature"), "{e}");
    assert!(entries(&ws2).is_empty(), "nothing installed");
    // Signed by another key.
    let pushed = registry::push(&ws1.layout, &fp, &with(Some(&b.private_key), None)).unwrap();
    assert_eq!(pushed.signed_by.as_deref(), Some(b.key_id.as_str()));
    let e = pull(&trusting).unwrap_err().to_string();
    assert!(e.contains(&b.key_id) && e.contains(&a.key_id), "{e}");
    assert!(entries(&ws2).is_empty(), "nothing installed");
    // Signed by the trusted key: pulled, and the statement names what was pulled.
    registry::push(&ws1.layout, &fp, &with(Some(&a.private_key), None)).unwrap();
    let pulled = pull(&trusting).unwrap();
    assert!(pulled.signature.contains(&a.key_id), "{}", pulled.signature);
    let (client, tagged, layer, manifest_digest) = pushed_engine(&plain, &fp);
    let kept: serde_json::Value =
        serde_json::from_slice(&fs_err::read(pulled.dir.join(p::FILE)).unwrap()).unwrap();
    assert_eq!(
        p::subject_digest(&kept, p::ARCHIVE_SUBJECT),
        layer.strip_prefix("sha256:")
    );
    assert_eq!(
        p::subject_digest(&kept, "manifest.json"),
        Some(manifest_sha.as_str())
    );
    // The independent verifier, on each bundle the registry holds for it:
    // the trusted key's holds, the other key's does not.
    let py = test_support::python_packages("cryptography", &["cryptography==48.0.0"]);
    let verifier = test_support::workspace_root()
        .join("crates/engine-provisioner/tests/python/verify_bundle.py");
    let mut verdicts = Vec::new();
    for x in client.referrers(&tagged, &manifest_digest).unwrap() {
        assert_eq!(x.artifact_type, p::BUNDLE_MEDIA_TYPE);
        let file = tmp.path().join("bundle.json");
        fs_err::write(&file, client.referrer_payload(&tagged, &x).unwrap()).unwrap();
        let (ok, out, err) = llorch_io::cmd::Cmd::new("python3")
            .arg(&verifier)
            .arg(&file)
            .arg(&a.public_key)
            .arg(layer.strip_prefix("sha256:").unwrap())
            .env("PYTHONPATH", &py)
            .output()
            .unwrap();
        verdicts.push((ok, format!("{out}{err}")));
    }
    assert_eq!(verdicts.len(), 2, "{verdicts:?}");
    assert!(
        !verdicts[0].0 && verdicts[0].1.contains("no signature by key"),
        "{verdicts:?}"
    );
    assert!(
        verdicts[1].0 && verdicts[1].1.contains(&a.key_id),
        "{verdicts:?}"
    );
    // A statement for other bytes, signed by the trusted key, on another engine: refused.
    let forged = with(None, Some(&a.public_key));
    let forged = EngineRegistry {
        repo: llorch_types::OciRef::parse(&reg.url("llorch/forged")).unwrap(),
        ..forged
    };
    registry::push(
        &ws1.layout,
        &fp,
        &EngineRegistry {
            trusted_key: None,
            ..forged.clone()
        },
    )
    .unwrap();
    let (client, tagged, _, manifest_digest) = pushed_engine(&forged, &fp);
    let other = p::with_archive(&st, &format!("sha256:{}", "0".repeat(64)));
    let bundle = p::sign(&other, &p::SigningKey::load(&a.private_key).unwrap());
    client
        .attach(&tagged, &manifest_digest, p::BUNDLE_MEDIA_TYPE, &bundle)
        .unwrap();
    let ws3 = Workspace::new(&archive_pin_yaml(&archive, &sha), &[("fake", CPU_PROFILE)]);
    let e = registry::pull(&ws3.layout, &fp, &inputs, &forged, &|_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not name the pulled bytes"), "{e}");
    assert!(entries(&ws3).is_empty());
    // Without a trusted key a pull says it checked no signature.
    let ws4 = Workspace::new(&archive_pin_yaml(&archive, &sha), &[("fake", CPU_PROFILE)]);
    let pulled = registry::pull(&ws4.layout, &fp, &inputs, &plain, &|_| {}).unwrap();
    assert!(
        pulled.signature.starts_with("not checked"),
        "{}",
        pulled.signature
    );
}
