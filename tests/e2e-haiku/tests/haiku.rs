//! `cargo test -p test-harness-e2e-haiku`: the haiku proof on the default
//! profile, with automated provisioning (the engine build and the model are
//! shared through the workspace cache, built once per machine).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haiku_streams_real_tokens_from_the_engine() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap();
    let rt = tempfile_dir();
    let layout = llorch_io::paths::Layout::at(root.clone(), root.join("cache"), rt.clone());
    let profile = llorch_profile::Profile::resolve(&root, None).unwrap();
    let report = test_harness_e2e_haiku::run(&profile, &layout, true, &|_| {})
        .await
        .unwrap();
    for c in &report.checks {
        eprintln!(
            "{} {}: {}",
            if c.ok { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    eprintln!("haiku:\n{}", report.text);
    assert!(report.passed, "haiku proof failed: {:#?}", report.checks);
    assert_eq!(test_harness_e2e_haiku::haiku_lines(&report.text).len(), 3);
    assert!(rt.join("haiku/last.json").is_file());
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("llorch-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
