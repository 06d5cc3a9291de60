//! `k8s render` against the real schemas, offline: every rendered object of
//! the default profile and of a two-pool stack passes `kubernetes-validate
//! --strict` for Kubernetes 1.33 to 1.37, and the `InferencePool` passes the
//! openAPIV3Schema of the CRD vendored in `crates/llorch-deploy/schemas`
//! (Gateway API Inference Extension v1.5.0); a planted typo fails; a pool id
//! that cannot be a Kubernetes name is refused by key before anything is
//! written.

use llorch_io::cmd::Cmd;
use std::path::Path;
use test_support::workspace_root as root;

const VALIDATORS: &[&str] = &["kubernetes-validate==1.37.0", "jsonschema==4.26.0"];

fn xtask(rt: &Path) -> Cmd {
    // None of the caller's LLORCH_* (a model, a pool, a token, a registry).
    std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with("LLORCH_"))
        .fold(Cmd::new(env!("CARGO_BIN_EXE_xtask")), |c, k| {
            c.env_remove(k)
        })
        .env("LLORCH_ROOT", root())
        .env("LLORCH_CACHE_DIR", root().join("cache"))
        .env("LLORCH_RUNTIME_DIR", rt)
        .dir(root())
}

/// (valid, what the validator said) for every YAML file in `dir`.
fn validate(dir: &Path) -> (bool, String) {
    let py = test_support::python_packages("k8s-validate", VALIDATORS);
    let mut files: Vec<_> = fs_err::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let (ok, out, err) =
        Cmd::new("python3")
            .arg(root().join("xtask/tests/python/validate_k8s.py"))
            .arg(root().join(
                "crates/llorch-deploy/schemas/inference.networking.k8s.io_inferencepools.yaml",
            ))
            .args(files)
            .env("PYTHONPATH", py)
            .output()
            .unwrap();
    (ok, format!("{out}{err}"))
}

fn render(rt: &Path, out: &Path, pools: &[&str], extra: &[&str]) -> (bool, String, String) {
    xtask(rt)
        .args(["k8s", "render", "--image", "registry.example:5000/llorch/image@sha256:0000000000000000000000000000000000000000000000000000000000000000", "--out"])
        .arg(out)
        .args(pools)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn rendered_manifests_pass_strict_validation_and_a_planted_typo_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = tmp.path().join("rt");
    // The default profile.
    let one = tmp.path().join("one");
    let (ok, _, err) = render(&rt, &one, &[], &[]);
    assert!(ok, "{err}");
    let (valid, said) = validate(&one);
    assert!(valid, "{said}");
    assert!(said.contains("5 object(s) valid"), "{said}");
    // A two-pool stack, the models as image volumes, three hosts each.
    let stack = tmp.path().join("stack.yaml");
    fs_err::write(
        &stack,
        "schema: 1\npools:\n  - id: chat\n    profile: cpu\n    mode: batched\n    slots: 4\n  - id: embed\n    profile: cpu-embed\n",
    )
    .unwrap();
    let two = tmp.path().join("two");
    let (ok, out, err) = render(
        &rt,
        &two,
        &["--stack", stack.to_str().unwrap()],
        &[
            "--hosts",
            "3",
            "--namespace",
            "llm",
            "--model-image",
            "registry.example:5000/llorch/models:smollm2",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("InferencePool/llorch-chat") && out.contains("InferencePool/llorch-embed"),
        "{out}"
    );
    let (valid, said) = validate(&two);
    assert!(valid, "{said}");
    assert!(said.contains("10 object(s) valid"), "{said}");
    let chat = fs_err::read_to_string(two.join("chat.yaml")).unwrap();
    assert!(
        chat.contains("replicas: 3") && chat.contains("namespace: llm"),
        "{chat}"
    );
    assert!(
        chat.contains("reference: registry.example:5000/llorch/models:smollm2"),
        "{chat}"
    );
    // The endpoint picker reads this pool's gauges by name.
    assert!(
        chat.contains(r#"llorch_pool_kv_cache_utilization{pool=\"chat\"}"#)
            || chat.contains(r#"llorch_pool_kv_cache_utilization{pool="chat"}"#),
        "{chat}"
    );

    // A misspelled probe key, and a misspelled InferencePool field: both fail.
    for (from, to) in [
        ("readinessProbe:", "readinesProbe:"),
        ("targetPorts:", "targetPort:"),
    ] {
        let bad = tmp.path().join(format!("bad-{}", to.trim_end_matches(':')));
        fs_err::create_dir_all(&bad).unwrap();
        let text = fs_err::read_to_string(one.join("default.yaml")).unwrap();
        assert!(text.contains(from), "{from}");
        fs_err::write(bad.join("default.yaml"), text.replacen(from, to, 1)).unwrap();
        let (valid, said) = validate(&bad);
        assert!(!valid, "{to} passed validation:\n{said}");
        assert!(said.contains(to.trim_end_matches(':')), "{said}");
    }
}

#[test]
fn a_pool_id_that_cannot_be_a_kubernetes_name_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = tmp.path().join("rt");
    let stack = tmp.path().join("stack.yaml");
    fs_err::write(
        &stack,
        "schema: 1\npools:\n  - id: chat\n    profile: cpu\n  - id: big_model\n    profile: cpu-embed\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let (ok, _, err) = render(&rt, &out, &["--stack", stack.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(
        err.contains("pools[].id") && err.contains("big_model"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written");
}
