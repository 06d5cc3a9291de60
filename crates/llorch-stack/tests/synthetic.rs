//! Synthetic models: deterministic bytes, and loadable by the real CPU engine.

use engine_provisioner::build::BuildOptions;
use engine_runtime::lifecycle;
use llorch_io::handoff::{EngineModel, Owner, ProcessIdentity};
use llorch_io::paths::Layout;
use llorch_profile::Profile;
use llorch_types::PoolId;
use model_provisioner::{FetchOptions, ModelStore};

use test_support::workspace_root as repo_root;

const TINY: &str = "synthetic:llama?embd=64&layers=2&ff=128&heads=4&kv_heads=2&seed=1";

fn store_in(dir: &std::path::Path) -> ModelStore {
    // Shares the workspace source trees (for the tokenizer), not its model store.
    let root = repo_root();
    std::env::set_var("LLORCH_SYNTHETIC_VOCAB", vocab());
    ModelStore::new(&Layout::at(root, dir.join("cache"), dir.join("rt")))
}

fn vocab() -> std::path::PathBuf {
    let root = repo_root();
    let layout = test_support::workspace_layout();
    let p = Profile::resolve(&root, None).unwrap();
    let tree = engine_provisioner::source::fetch(&p.pin, &layout, &|_| {}).unwrap();
    tree.join("models/ggml-vocab-llama-spm.gguf")
}

#[test]
fn same_parameters_same_digest_and_the_cpu_engine_loads_it() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let q = FetchOptions {
        report: llorch_io::report::Reporter::QUIET,
        ..Default::default()
    };
    let ma = store_in(a.path()).fetch(TINY, &q).unwrap().metadata;
    let mb = store_in(b.path()).fetch(TINY, &q).unwrap().metadata;
    assert_eq!(ma.digest, mb.digest, "deterministic");
    assert_eq!(ma.arch.as_deref(), Some("llama"));
    assert_eq!(ma.quant.as_deref(), Some("F16"));
    assert_eq!(ma.ctx_max, Some(2048));
    let other = store_in(a.path())
        .fetch(&TINY.replace("seed=1", "seed=2"), &q)
        .unwrap()
        .metadata;
    assert_ne!(other.digest, ma.digest);
    // An expected digest pins it like any other model.
    assert!(store_in(b.path())
        .fetch(
            TINY,
            &FetchOptions {
                expected_sha256: Some(ma.digest.clone()),
                report: llorch_io::report::Reporter::QUIET,
                ..Default::default()
            }
        )
        .is_ok());

    // The real CPU engine loads it and generates.
    let root = repo_root();
    let rt = tempfile::tempdir().unwrap();
    let layout = test_support::layout(rt.path());
    let p = Profile::resolve(&root, None).unwrap();
    let pool = PoolId::parse("synthetic-test").unwrap();
    let built = engine_provisioner::build(&p, &layout, &BuildOptions::quiet()).unwrap();
    let model = EngineModel {
        reference: TINY.into(),
        path: ma.path.clone(),
        digest: ma.digest.clone(),
        metadata: serde_json::json!({}),
    };
    let prep = engine_runtime::flags::prepare(
        &p,
        &pool,
        &built.binary,
        &built.fingerprint,
        &built.version,
        model,
    )
    .unwrap();
    let owner = Owner::Supervised {
        supervisor: ProcessIdentity::current(),
        command: "test".into(),
    };
    let eng = lifecycle::spawn(&prep, &layout, &owner).unwrap();
    let r: serde_json::Value = llorch_io::llama_server::blocking_client_for(
        &eng.url,
        &llorch_io::http::probe_client(),
    )
    .post(llorch_io::llama_server::http_url(&eng.url, "/completion"))
        .json(&serde_json::json!({"prompt": "Hello", "n_predict": 8, "temperature": 0.0, "ignore_eos": true}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    eng.stop();
    assert_eq!(r["timings"]["predicted_n"], 8, "{r}");
}
