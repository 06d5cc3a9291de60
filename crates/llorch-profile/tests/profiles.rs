//! Profiles and pins: the shipped ones load; bad ones fail with file, line and column.

use llorch_profile::{Backend, Profile};
use std::path::{Path, PathBuf};

use test_support::workspace_root as root;

#[test]
fn shipped_profiles_load() {
    let r = root();
    let cpu = Profile::resolve(&r, None).unwrap();
    assert_eq!(cpu.name, "cpu");
    assert_eq!(cpu.file.engine.backend, Backend::Cpu);
    assert_eq!(cpu.pin.commit, "4df29be4f4c3673f428170fda944a5b19f743bb8");
    let rtx = Profile::resolve(&r, Some("llamacpp-3090-source")).unwrap();
    assert_eq!(rtx.file.engine.cuda_archs, vec!["86-real"]);
    assert!(matches!(
        rtx.pin.source,
        llorch_profile::SourceSpec::Git { .. }
    ));
    assert_eq!(
        rtx.pin.commit, cpu.pin.commit,
        "both pins are the same llama.cpp commit"
    );
    let h100 = Profile::resolve(&r, Some("h100")).unwrap();
    assert_eq!(h100.file.engine.cuda_archs, vec!["90-real"]);
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs_err::write(&p, text).unwrap();
    p
}

#[test]
fn unknown_key_names_file_line_and_column() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "bad.yaml",
        "schema: 1\npool: default\nengine:\n  backend: cpu\n  cmake_flagz: []\n",
    );
    let err = Profile::load(&p, &root().join("toolchains/llama.cpp.yaml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad.yaml"), "{err}");
    assert!(err.contains("cmake_flagz"), "{err}");
    assert!(err.contains("line 5"), "{err}");
    assert!(err.contains("column 3"), "{err}");
}

#[test]
fn malformed_yaml_names_line_and_column() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "broken.yaml",
        "schema: 1\npool: [default\nengine:\n",
    );
    let err = Profile::load(&p, &root().join("toolchains/llama.cpp.yaml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("broken.yaml"), "{err}");
    assert!(err.contains("line"), "{err}");
    assert!(err.contains("column"), "{err}");
}

#[test]
fn cuda_without_archs_is_refused_with_advice() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "c.yaml",
        "schema: 1\npool: g\nengine:\n  backend: cuda\n",
    );
    let err = Profile::load(&p, &root().join("toolchains/llama.cpp.yaml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cuda_archs"), "{err}");
    assert!(err.contains("[86]"), "{err}");
}

#[test]
fn own_mps_is_for_cuda_engines_only() {
    let d = tempfile::tempdir().unwrap();
    let pins = root().join("toolchains/llama.cpp.yaml");
    let cpu = write(
        d.path(),
        "m.yaml",
        "schema: 1\npool: m\nengine:\n  backend: cpu\nserver:\n  mps: own\n",
    );
    let err = Profile::load(&cpu, &pins).unwrap_err().to_string();
    assert!(err.contains("server.mps") && err.contains("cpu"), "{err}");
    let cuda = write(
        d.path(),
        "g.yaml",
        "schema: 1\npool: g\nengine:\n  backend: cuda\n  cuda_archs: [\"90-real\"]\nserver:\n  mps: own\n",
    );
    let p = Profile::load(&cuda, &pins).unwrap();
    assert_eq!(p.file.server.mps, llorch_profile::MpsMode::Own);
    let bad = write(
        d.path(),
        "b.yaml",
        "schema: 1\npool: g\nengine:\n  backend: cuda\n  cuda_archs: [\"90-real\"]\nserver:\n  mps: mine\n",
    );
    let err = Profile::load(&bad, &pins).unwrap_err().to_string();
    assert!(err.contains("mps") && err.contains("own"), "{err}");
}

#[test]
fn unknown_pin_and_profile_are_named() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "p.yaml",
        "schema: 1\npool: g\nengine:\n  backend: cpu\n  pin: nope\n",
    );
    let err = Profile::load(&p, &root().join("toolchains/llama.cpp.yaml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`nope`") && err.contains("llama-cpp-python-0.3.35"),
        "{err}"
    );
    let err = Profile::resolve(&root(), Some("no-such-profile"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no-such-profile") && err.contains("cpu"),
        "{err}"
    );
}

#[test]
fn bad_cmake_flag_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "f.yaml",
        "schema: 1\npool: g\nengine:\n  backend: cpu\n  cmake_flags: [GGML_NATIVE=OFF]\n",
    );
    let err = Profile::load(&p, &root().join("toolchains/llama.cpp.yaml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("-DKEY=VALUE"), "{err}");
}

#[test]
fn locate_finds_nested_keys() {
    let text = "schema: 1\nengine:\n  backend: cuda\n  cuda_archs: []\nserver:\n  port: x\n";
    assert_eq!(
        llorch_profile::locate(text, "engine.cuda_archs"),
        Some((4, 3))
    );
    assert_eq!(llorch_profile::locate(text, "server.port"), Some((6, 3)));
    assert_eq!(llorch_profile::locate(text, "model.sha256"), None);
}
