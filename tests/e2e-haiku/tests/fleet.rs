//! A second machine never compiles: the default profile's engine and model,
//! pushed to a real OCI registry (`docker-registry` on 127.0.0.1), pulled into
//! an empty cache by a profile that names the registry, serve the haiku proof.

use test_support::registry as test_registry;

use engine_provisioner::registry::{self, EngineRegistry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_cache_serves_the_haiku_from_a_registry_without_compiling() {
    let reg = test_registry::TestRegistry::start(None);
    let root = test_support::workspace_root();
    let here = tempfile::tempdir().unwrap();
    let layout = test_support::layout(&here.path().join("rt"));
    let profile = llorch_profile::Profile::resolve(&root, None).unwrap();
    // This machine: the engine and model (built and fetched once per machine, shared).
    let prep = tokio::task::block_in_place(|| {
        llorch_stack::prepare(
            &profile,
            profile.pool(),
            &layout,
            &engine_provisioner::BuildOptions::quiet(),
        )
    })
    .unwrap();
    let fp = prep.engine.fingerprint.clone();
    let engines = EngineRegistry::new(&reg.url("llorch/engines"), false, false).unwrap();
    tokio::task::block_in_place(|| registry::push(&layout, &fp, &engines)).unwrap();
    let model_ref = profile.file.model.as_ref().unwrap().reference.clone();
    let model_to = format!("{}:smollm2", reg.url("llorch/models"));
    let pushed = tokio::task::block_in_place(|| {
        model_provisioner::registry::push_model(
            &model_provisioner::ModelStore::new(&layout),
            &model_ref,
            &model_to,
        )
    })
    .unwrap();
    // Another machine: the same profile, but its model comes from the registry
    // and its engine registry is set; an empty cache.
    let text = fs_err::read_to_string(root.join("requirements/cpu.yaml"))
        .unwrap()
        .replace(&format!("ref: {model_ref}"), &format!("ref: {model_to}"))
        .replace(
            "engine:\n",
            &format!(
                "engine:\n  registry:\n    url: {}\n",
                reg.url("llorch/engines")
            ),
        );
    let pfile = here.path().join("fleet.yaml");
    fs_err::write(&pfile, text).unwrap();
    let fleet =
        llorch_profile::Profile::load(&pfile, &root.join("toolchains/llama.cpp.yaml")).unwrap();
    let cache2 = here.path().join("cache");
    let layout2 =
        llorch_io::paths::Layout::at(root.clone(), cache2.clone(), here.path().join("rt2"));
    let pool = llorch_types::PoolId::parse(&format!("fleet-{}", std::process::id())).unwrap();
    let report = llorch_proof::run(
        &fleet,
        &pool,
        &layout2,
        llorch_io::report::Reporter::QUIET,
        &|_| {},
    )
    .await
    .unwrap();
    assert!(report.passed, "haiku proof failed: {:#?}", report.checks);
    // The engine was pulled, not built: byte-identical, with its origin, no build dir.
    let e1 = root.join("cache/engines-v1").join(&fp);
    let e2 = cache2.join("engines-v1").join(&fp);
    let m: serde_json::Value =
        serde_json::from_slice(&fs_err::read(e1.join("manifest.json")).unwrap()).unwrap();
    for f in m["files"]
        .as_object()
        .unwrap()
        .keys()
        .chain(["manifest.json".to_string()].iter())
    {
        assert_eq!(
            fs_err::read(e1.join(f)).unwrap(),
            fs_err::read(e2.join(f)).unwrap(),
            "{f}"
        );
    }
    assert!(registry::origin(&e2).is_some());
    assert!(
        !cache2.join("build-v1").join(&fp).exists(),
        "nothing was compiled"
    );
    assert!(!cache2.join("src-v1").exists(), "no source was fetched");
    assert!(cache2
        .join("models-v1/blobs")
        .join(format!("sha256-{}", pushed.sha256))
        .is_file());
}
