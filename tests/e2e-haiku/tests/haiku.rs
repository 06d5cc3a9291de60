//! `cargo test -p test-harness-e2e-haiku`: the haiku proof on the default
//! profile, with automated provisioning (the engine build and the model are
//! shared through the workspace cache, built once per machine).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haiku_streams_real_tokens_from_the_engine() {
    let root = test_support::workspace_root();
    let rt = tempfile_dir();
    let layout = test_support::layout(&rt);
    let profile = llorch_profile::Profile::resolve(&root, None).unwrap();
    let report = llorch_proof::run(
        &profile,
        profile.pool(),
        &layout,
        llorch_io::report::Reporter::QUIET,
        &|_| {},
    )
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
    assert_eq!(llorch_proof::haiku_lines(&report.text).len(), 3);
    assert!(
        llorch_proof::is_three_lines(&report.text),
        "{:?}",
        report.text
    );
    assert!(rt.join("haiku/last.json").is_file());
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("llorch-e2e-{}", std::process::id()));
    fs_err::create_dir_all(&d).unwrap();
    d
}

/// `haiku` never stops or replaces an engine the user started with
/// `provision`: a detached engine for the pool keeps running, untouched,
/// through a whole `llorch-haiku` run (the binary `cargo xtask haiku` runs).
#[test]
fn a_provisioned_engine_survives_a_haiku_run() {
    use engine_runtime::lifecycle;
    use llorch_io::handoff::Handoff;
    use llorch_types::PoolId;
    let root = test_support::workspace_root();
    let rt = tempfile::tempdir().unwrap();
    let layout = test_support::layout(rt.path());
    let profile = llorch_profile::Profile::resolve(&root, None).unwrap();
    let pool = PoolId::parse(&format!("survive-{}", std::process::id())).unwrap();
    let out = llorch_stack::provision(
        &profile,
        &pool,
        &layout,
        &engine_provisioner::BuildOptions::quiet(),
    )
    .unwrap();
    let handoff_path = layout.handoff(&pool);
    let before = Handoff::read(&handoff_path).unwrap().expect("a handoff");
    let (ok, stdout, stderr) = llorch_io::cmd::Cmd::new(env!("CARGO_BIN_EXE_llorch-haiku"))
        .args(["--pool", pool.as_str(), "--json"])
        .env("LLORCH_ROOT", &root)
        .env("LLORCH_RUNTIME_DIR", rt.path())
        .dir(&root)
        .output()
        .unwrap();
    let run = engine_runtime::run_state::read_pool(&layout, &pool);
    let after = Handoff::read(&handoff_path).unwrap();
    let stopped = lifecycle::stop_pool(&layout, &pool);
    assert!(ok, "haiku failed: {stdout}\n{stderr}");
    let run = run.expect("the provisioned pool still has its run record");
    assert!(run.engine_alive, "the provisioned engine died during haiku");
    assert_eq!(run.record.process, before.process, "same process");
    assert_eq!(run.record.process.pid, out.pid);
    assert_eq!(after.as_ref(), Some(&before), "handoff untouched");
    assert!(matches!(stopped, Ok(lifecycle::Stopped::Engine(p)) if p == out.pid));
}
