//! `cargo xtask pin bump` against a real git repository (a stand-in tree
//! that builds in seconds) and pip's real index: the new pin is written only
//! after its build passed; a failed step leaves the pins file as it was.

mod common;

use common::*;
use std::path::Path;

fn commit(repo: &git2::Repository, dir: &Path, server: &str, msg: &str) -> git2::Oid {
    fs_err::write(dir.join("CMakeLists.txt"), FAKE_CMAKE).unwrap();
    fs_err::write(dir.join("server.c"), server).unwrap();
    test_support::git::commit_all(repo, msg, test_support::git::When::Now)
}

#[test]
fn a_git_bump_records_the_new_pin_only_after_it_built() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ws");
    let up = tmp.path().join("upstream");
    fs_err::create_dir_all(&up).unwrap();
    let repo = git2::Repository::init(&up).unwrap();
    let c1 = commit(&repo, &up, &server_c("1"), "one");
    let c2 = commit(&repo, &up, &server_c("2"), "two");
    repo.tag_lightweight("v2", &repo.find_object(c2, None).unwrap(), false)
        .unwrap();
    let c3 = commit(&repo, &up, "this is not C\n", "broken");
    repo.tag(
        "broken",
        &repo.find_object(c3, None).unwrap(),
        &git2::Signature::now("t", "t@example.invalid").unwrap(),
        "annotated",
        false,
    )
    .unwrap();
    fs_err::create_dir_all(root.join("toolchains")).unwrap();
    fs_err::create_dir_all(root.join("requirements")).unwrap();
    let pins = format!(
        "# the pins of this test\nschema: 1\ndefault: base\npins:\n  base:\n    commit: {c1}\n    source:\n      kind: git\n      url: {}\n",
        up.display()
    );
    let pins_path = root.join("toolchains/llama.cpp.yaml");
    fs_err::write(&pins_path, &pins).unwrap();
    fs_err::write(
        root.join("requirements/cpu.yaml"),
        "schema: 1\npool: fake\nallow_package_installs: false\nengine:\n  backend: cpu\n",
    )
    .unwrap();

    // A tag whose tree does not build: the error says so, nothing is written.
    let (ok, _, err) = run(xtask(&root).args(["pin", "bump", "--git", "broken", "--skip-haiku"]));
    assert!(!ok);
    assert!(err.contains("nothing written"), "{err}");
    assert_eq!(fs_err::read_to_string(&pins_path).unwrap(), pins);
    // A tag that does not exist.
    let (ok, _, err) = run(xtask(&root).args(["pin", "bump", "--git", "v9", "--skip-haiku"]));
    assert!(!ok);
    assert!(err.contains("no tag or branch `v9`"), "{err}");
    assert_eq!(fs_err::read_to_string(&pins_path).unwrap(), pins);
    // A package release on a git default pin.
    let (ok, _, err) = run(xtask(&root).args(["pin", "bump", "--to", "1.0"]));
    assert!(!ok);
    assert!(err.contains("not a package sdist"), "{err}");

    // The good tag: built, then written, the old pin and the comment kept.
    let (ok, out, err) =
        run(xtask(&root).args(["pin", "bump", "--git", "v2", "--skip-haiku", "--json"]));
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["to_commit"], c2.to_string());
    assert_eq!(r["from_commit"], c1.to_string());
    assert_eq!(r["haiku"], "skipped");
    let text = fs_err::read_to_string(&pins_path).unwrap();
    assert!(text.starts_with("# the pins of this test\n"), "{text}");
    let new_name = format!("upstream-{}", &c2.to_string()[..7]);
    assert!(text.contains(&format!("default: {new_name}\n")), "{text}");
    assert!(text.contains("  base:\n"), "{text}");
    assert!(text.contains("rev: v2"), "{text}");
    // The engine the bump built is the one the new default pin gives.
    let (ok, out, err) = run(xtask(&root).args(["engine", "build", "--json"]));
    assert!(ok, "{err}");
    let b: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(b["cache_hit"], true);
    assert_eq!(b["fingerprint"], r["to_fingerprint"]);
    assert!(b["version"].as_str().unwrap().contains("version: 2"), "{b}");
}

/// A release that pip's index does not have: pip's error, nothing written.
#[test]
fn a_release_pip_cannot_find_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ws");
    let real = test_support::workspace_root();
    fs_err::create_dir_all(root.join("toolchains")).unwrap();
    fs_err::create_dir_all(root.join("requirements")).unwrap();
    let pins = fs_err::read_to_string(real.join("toolchains/llama.cpp.yaml")).unwrap();
    fs_err::write(root.join("toolchains/llama.cpp.yaml"), &pins).unwrap();
    fs_err::copy(
        real.join("requirements/cpu.yaml"),
        root.join("requirements/cpu.yaml"),
    )
    .unwrap();
    let (ok, _, err) = run(xtask(&root).args(["pin", "bump", "--to", "0.0.0.dev0"]));
    assert!(!ok);
    assert!(
        err.contains("pip download llama-cpp-python==0.0.0.dev0"),
        "{err}"
    );
    assert_eq!(
        fs_err::read_to_string(root.join("toolchains/llama.cpp.yaml")).unwrap(),
        pins
    );
    let (ok, _, err) = run(xtask(&root).args(["pin", "bump", "--to", "0.3.35"]));
    assert!(!ok);
    assert!(err.contains("already llama-cpp-python 0.3.35"), "{err}");
}
