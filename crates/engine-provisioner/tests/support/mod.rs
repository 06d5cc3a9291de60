//! Fixtures: a tiny CMake project that stands in for llama.cpp (so the whole
//! build pipeline runs for real in seconds), workspaces with their own pins
//! and profiles, and local git repositories.
#![allow(dead_code)]

use llorch_io::paths::Layout;
use std::path::{Path, PathBuf};

pub const FAKE_CMAKE: &str = r#"cmake_minimum_required(VERSION 3.14)
project(fake_llama C)
add_executable(llama-server server.c)
set_target_properties(llama-server PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
"#;

pub fn fake_server_c(version: &str) -> String {
    format!(
        r#"#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {{
    if (argc > 1 && strcmp(argv[1], "--version") == 0) {{
        fprintf(stderr, "version: {version}\nbuilt with a test compiler\n");
        return 0;
    }}
    return 1;
}}
"#
    )
}

/// Write the fake llama.cpp tree into `dir`.
pub fn write_fake_tree(dir: &Path, server_c: &str) {
    fs_err::create_dir_all(dir).unwrap();
    fs_err::write(dir.join("CMakeLists.txt"), FAKE_CMAKE).unwrap();
    fs_err::write(dir.join("server.c"), server_c).unwrap();
}

/// A `.tar.gz` of the fake tree under `prefix/`; returns (path, sha256).
pub fn fake_archive(dir: &Path, name: &str, server_c: &str) -> (PathBuf, String) {
    let tree = dir.join(format!("{name}-tree"));
    write_fake_tree(&tree, server_c);
    let out = dir.join(format!("{name}.tar.gz"));
    let f = fs_err::File::create(&out).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut t = tar::Builder::new(gz);
    t.append_dir_all("fake-llama", &tree).unwrap();
    t.into_inner().unwrap().finish().unwrap();
    let sha = llorch_io::digest::sha256_file(&out).unwrap();
    (out, sha)
}

pub const COMMIT: &str = "4df29be4f4c3673f428170fda944a5b19f743bb8";

/// A workspace (root with toolchains/ and requirements/) plus its own cache and runtime.
pub struct Workspace {
    pub dir: tempfile::TempDir,
    pub layout: Layout,
}

impl Workspace {
    pub fn new(pins_yaml: &str, profiles: &[(&str, &str)]) -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ws");
        fs_err::create_dir_all(root.join("toolchains")).unwrap();
        fs_err::create_dir_all(root.join("requirements")).unwrap();
        fs_err::write(root.join("toolchains/llama.cpp.yaml"), pins_yaml).unwrap();
        for (name, text) in profiles {
            fs_err::write(root.join("requirements").join(format!("{name}.yaml")), text).unwrap();
        }
        let layout = Layout::at(root, dir.path().join("cache"), dir.path().join("runtime"));
        Workspace { dir, layout }
    }

    pub fn profile(&self, name: &str) -> llorch_profile::Profile {
        llorch_profile::Profile::resolve(&self.layout.root, Some(name)).unwrap()
    }
}

pub fn archive_pin_yaml(location: &Path, sha: &str) -> String {
    format!(
        "schema: 1\ndefault: fake\npins:\n  fake:\n    commit: {COMMIT}\n    source:\n      kind: archive\n      location: {}\n      sha256: {sha}\n      strip_prefix: fake-llama\n",
        location.display()
    )
}

pub const CPU_PROFILE: &str =
    "schema: 1\npool: fake\nallow_package_installs: false\nengine:\n  backend: cpu\n";

/// A git repository with one commit of the fake tree; returns the repo path and commit id.
pub fn git_repo(dir: &Path) -> (PathBuf, git2::Oid) {
    let path = dir.join("upstream");
    write_fake_tree(&path, &fake_server_c("git-1"));
    let repo = git2::Repository::init(&path).unwrap();
    let oid = commit_all(&repo, "first");
    (path, oid)
}

/// Commit every file of the work tree on top of HEAD.
pub fn commit_all(repo: &git2::Repository, msg: &str) -> git2::Oid {
    test_support::git::commit_all(repo, msg, test_support::git::When::Now)
}
