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
        !engine_provisioner::build::work_dir(&ws2.layout).exists(),
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
