//! What users read, pinned: `engine explain` (why a build would run),
//! `doctor` (what is found, what is missing and how to get it, and that a
//! missing required tool fails it) and `model ls` (what is stored, last use
//! as an age), from the
//! real binary in a scratch workspace, compared with `tests/snapshots/`
//! after digests and the workspace path are normalized.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A git repository of the stand-in tree with one commit at a fixed time
/// (so its id, and the build flags naming it, are the same every run).
fn fixed_repo(dir: &Path) -> String {
    let server = server_c("1.0-fake");
    let files = [
        ("CMakeLists.txt", FAKE_CMAKE),
        ("server.c", server.as_str()),
    ];
    let (_, oid) = test_support::git::repo_with(dir, &files, "one", test_support::git::When::At(0));
    oid.to_string()
}

/// A scratch workspace `<dir>/ws` whose one pin is [`fixed_repo`] at
/// `<dir>/upstream`, with the stand-in `cpu` profile.
fn fixed_workspace(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("ws");
    let commit = fixed_repo(&dir.join("upstream"));
    let pins = format!(
        "schema: 1\ndefault: fake\npins:\n  fake:\n    commit: {commit}\n    source:\n      kind: git\n      url: {}\n",
        dir.join("upstream").display()
    );
    workspace(&root, &pins, FAKE_PROFILE);
    root
}

#[test]
fn engine_explain_says_why_a_build_would_run() {
    let tmp = tempfile::tempdir().unwrap();
    let root = fixed_workspace(tmp.path());
    let step = |title: &str, args: &[&str]| -> String {
        let (ok, out, err) = run(xtask(&root).args(args));
        assert!(ok, "{title}: {err}");
        format!("$ xtask {}\n{out}\n", args.join(" "))
    };
    let mut shown = step("nothing built", &["engine", "explain"]);
    step("build", &["engine", "build", "--json"]);
    shown += &step("built", &["engine", "explain"]);
    fs_err::write(
        root.join("requirements/cpu.yaml"),
        format!("{FAKE_PROFILE}  cmake_flags:\n    - -DFAKE_OPTION=ON\n"),
    )
    .unwrap();
    shown += &step("a flag added", &["engine", "explain"]);
    snapshot("engine_explain", &normalize(&shown, tmp.path()));
}

fn stand_in(bin: &Path, name: &str, body: &str) {
    let p = bin.join(name);
    fs_err::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs_err::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn doctor_names_what_is_found_what_is_missing_and_how_to_get_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ws");
    let real = test_support::workspace_root();
    let pins = fs_err::read_to_string(real.join("toolchains/llama.cpp.yaml")).unwrap();
    workspace(&root, &pins, FAKE_PROFILE);
    // Stand-ins with fixed versions; no ninja, no sccache.
    let bin = tmp.path().join("bin");
    fs_err::create_dir_all(&bin).unwrap();
    stand_in(&bin, "cmake", "echo 'cmake version 3.28.3'");
    stand_in(&bin, "cc", "echo 'cc (stand-in) 13.2.0'");
    stand_in(&bin, "c++", "echo 'c++ (stand-in) 13.2.0'");
    stand_in(
        &bin,
        "python3",
        "if [ \"$1\" = -m ]; then echo 'pip 24.0 from /stand-in (python 3.12)'; else echo 'Python 3.12.1'; fi",
    );
    let (ok, out, err) = run(xtask(&root)
        .env("PATH", &bin)
        .env_remove("CC")
        .env_remove("LLORCH_COMPILE_CACHE")
        .env_remove("CXX")
        .arg("doctor"));
    // A required tool is missing (ninja): doctor says so and fails.
    assert!(!ok, "{out}");
    let out = format!("{out}(exit 1) {err}");
    // The package manager (and so every install command) is this machine's,
    // and what the engine sandbox has is this kernel's (its wording is
    // engine-runtime's unit tests').
    let text: String = normalize(&out, tmp.path())
        .lines()
        .map(|l| {
            if l.starts_with("package manager:") {
                "package manager: <this machine's>".to_string()
            } else if l.starts_with("engine sandbox auto: ") {
                "engine sandbox auto: <this kernel's protections>".to_string()
            } else if let Some(i) = l.find("install: ").filter(|_| !l.contains("cargo xtask")) {
                format!("{}install: <this machine's command>", &l[..i])
            } else {
                l.to_string()
            }
        })
        .map(|l| l + "\n")
        .collect();
    snapshot("doctor", &text);
}

#[test]
fn model_ls_lists_what_is_stored_with_its_last_use_as_an_age() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ws");
    let real = test_support::workspace_root();
    let pins = fs_err::read_to_string(real.join("toolchains/llama.cpp.yaml")).unwrap();
    workspace(&root, &pins, FAKE_PROFILE);
    let step = |title: &str, args: &[&str]| -> String {
        let (ok, out, err) = run(xtask(&root).args(args));
        assert!(ok, "{title}: {err}");
        format!("$ xtask {}\n{out}\n", args.join(" "))
    };
    let mut shown = step("empty", &["model", "ls"]);
    let mut refs = Vec::new();
    for (name, size, salt) in [("small.gguf", 3_000_000, 1), ("large.gguf", 12_500_000, 2)] {
        let path = root.join(name);
        fs_err::write(&path, test_support::gguf::tiny_gguf(size, salt)).unwrap();
        let r = format!("file:{}", path.display());
        step("fetch", &["model", "fetch", &r, "--import"]);
        refs.push(r);
    }
    // Last uses at fixed distances from now, so the ages read the same on every run.
    let file = root.join("cache/models-v1/refs.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(&file).unwrap()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for (r, ago) in refs.iter().zip([3 * 86_400 + 100, 2 * 3600 + 10]) {
        v["refs"][r]["last_use"] = serde_json::json!(now - ago);
    }
    fs_err::write(&file, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    shown += &step("two models", &["model", "ls"]);
    snapshot("model_ls", &normalize(&shown, tmp.path()));
}

/// A JSON document's shape: every value replaced by its type, arrays by
/// their first element's shape (what a script reading it depends on).
fn shape(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Null => "<null>".into(),
        Value::Bool(_) => "<bool>".into(),
        Value::Number(_) => "<number>".into(),
        Value::String(_) => "<string>".into(),
        Value::Array(a) => Value::Array(a.iter().take(1).map(shape).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
    }
}

/// The `--json` documents scripts read keep their keys and types: `engine
/// build`, `engine explain`, `model fetch`, `model ls`, `engine status`
/// (snapshots in `tests/snapshots/`, reviewed with `cargo insta review`).
#[test]
fn json_documents_keep_their_keys_and_types() {
    let tmp = tempfile::tempdir().unwrap();
    let root = fixed_workspace(tmp.path());
    let model = root.join("m.gguf");
    fs_err::write(&model, test_support::gguf::tiny_gguf(100_000, 3)).unwrap();
    let model_ref = format!("file:{}", model.display());
    let json = |args: &[&str]| -> serde_json::Value {
        let (ok, out, err) = run(xtask(&root).args(args).env("LLORCH_COMPILE_CACHE", "off"));
        assert!(ok, "{args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    };
    let docs = serde_json::json!({
        "engine build --json": shape(&json(&["engine", "build", "--json"])),
        "engine explain --json": shape(&json(&["engine", "explain", "--json"])),
        "model fetch REF --import --json": shape(&json(&["model", "fetch", &model_ref, "--import", "--json"])),
        "model ls --json": shape(&json(&["model", "ls", "--json"])),
        "engine status --json": shape(&json(&["engine", "status", "--json"])),
    });
    insta::assert_json_snapshot!("json_documents", docs);
}

/// `--quiet` silences every library line (a build says what it builds, and
/// why, without it); `--verbose` adds every external command line.
#[test]
fn quiet_silences_every_library_line_and_verbose_shows_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let root = fixed_workspace(tmp.path());
    let (ok, out, err) = run(xtask(&root)
        .args(["--quiet", "engine", "build"])
        .env("LLORCH_COMPILE_CACHE", "off"));
    assert!(ok, "{err}");
    assert_eq!(err, "", "--quiet: nothing on stderr");
    assert!(!out.is_empty(), "the result is still printed: {out}");
    // Built now: explain is quiet by nature; a rebuild after a flag change talks.
    fs_err::write(
        root.join("requirements/cpu.yaml"),
        format!("{FAKE_PROFILE}  cmake_flags:\n    - -DFAKE_OPTION=ON\n"),
    )
    .unwrap();
    let (ok, _, err) = run(xtask(&root)
        .args(["engine", "build", "--verbose"])
        .env("LLORCH_COMPILE_CACHE", "off"));
    assert!(ok, "{err}");
    assert!(err.contains("building llama-server"), "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("$ ") && l.contains("cmake")),
        "--verbose shows the command lines: {err}"
    );
}
