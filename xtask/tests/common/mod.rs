//! Shared by the xtask test files: the xtask binary in a scratch workspace,
//! a stand-in llama.cpp tree that builds in seconds, and snapshots of what
//! users read.
#![allow(dead_code)]

use llorch_io::cmd::{Cmd, Io, KillOnDrop};
use std::io::{BufRead, BufReader};
use std::path::Path;

pub const FAKE_CMAKE: &str = "cmake_minimum_required(VERSION 3.14)\nproject(fake_llama C)\nadd_executable(llama-server server.c)\nset_target_properties(llama-server PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)\n";

pub const FAKE_PROFILE: &str =
    "schema: 1\npool: fake\nallow_package_installs: false\nengine:\n  backend: cpu\n";

pub fn server_c(version: &str) -> String {
    format!(
        "#include <stdio.h>\n#include <string.h>\nint main(int argc, char **argv) {{\n  if (argc > 1 && strcmp(argv[1], \"--version\") == 0) {{ fprintf(stderr, \"version: {version}\\n\"); return 0; }}\n  return 1;\n}}\n"
    )
}

/// The xtask binary with `root` as its workspace and cache and runtime
/// directories inside it, none of the caller's `LLORCH_*`; no compiler cache.
pub fn xtask(root: &Path) -> Cmd {
    // None of the caller's LLORCH_* (a registry, a token, a cache elsewhere).
    std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with("LLORCH_"))
        .fold(Cmd::new(env!("CARGO_BIN_EXE_xtask")), |c, k| {
            c.env_remove(k)
        })
        .env("LLORCH_ROOT", root)
        .env("LLORCH_CACHE_DIR", root.join("cache"))
        .env("LLORCH_RUNTIME_DIR", root.join("rt"))
        .env("LLORCH_COMPILE_CACHE", "off")
        .env_remove("LLORCH_VERBOSE")
        .dir(root)
}

/// Run: (success, stdout, stderr).
pub fn run(cmd: Cmd) -> (bool, String, String) {
    cmd.output().expect("run xtask")
}

/// A workspace at `root` with `pins` and the stand-in `cpu` profile.
pub fn workspace(root: &Path, pins: &str, profile: &str) {
    fs_err::create_dir_all(root.join("toolchains")).unwrap();
    fs_err::create_dir_all(root.join("requirements")).unwrap();
    fs_err::write(root.join("toolchains/llama.cpp.yaml"), pins).unwrap();
    fs_err::write(root.join("requirements/cpu.yaml"), profile).unwrap();
}

/// Compare `text` with `tests/snapshots/<name>.txt`, after `normalize`;
/// `LLORCH_UPDATE_SNAPSHOTS=1` writes it instead (then review the diff).
pub fn snapshot(name: &str, text: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.txt"));
    if std::env::var_os("LLORCH_UPDATE_SNAPSHOTS").is_some_and(|v| v == "1") {
        fs_err::write(&path, text).unwrap();
        return;
    }
    let want = fs_err::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (LLORCH_UPDATE_SNAPSHOTS=1 writes it)",
            path.display()
        )
    });
    assert_eq!(
        text, want,
        "{name}: the output users read changed; if on purpose, LLORCH_UPDATE_SNAPSHOTS=1 rewrites {}",
        path.display()
    );
}

/// Hex digests (12 or more hex digits) as `<hex>`, `root` as `<ws>`.
pub fn normalize(text: &str, root: &Path) -> String {
    let text = text.replace(&root.display().to_string(), "<ws>");
    let mut out = String::new();
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= 12 {
            out.push_str("<hex>");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_hexdigit() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// Start `serve` (`cmd`, stdout piped here, stderr as `stderr` says); once it
/// prints `serving … at URL`: the child and the URL. The rest of its stdout
/// is drained in the background.
pub fn serving(cmd: Cmd, stderr: Io) -> (KillOnDrop, String) {
    let mut child = KillOnDrop(cmd.spawn(Io::Piped, stderr).unwrap());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("serve printed where it serves")
            .unwrap();
        if let Some(rest) = line.strip_prefix("serving ") {
            let at = rest.split(" at ").nth(1).unwrap();
            break at.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    (child, url)
}

/// The binary with this checkout's cache (the engine the tests share) and
/// the private runtime directory `rt`, whatever `LLORCH_*` the user has set.
pub fn xtask_in(rt: &Path) -> Cmd {
    let root = test_support::workspace_root();
    Cmd::new(env!("CARGO_BIN_EXE_xtask"))
        .env("LLORCH_ROOT", &root)
        .env("LLORCH_CACHE_DIR", root.join("cache"))
        .env("LLORCH_RUNTIME_DIR", rt)
        .env_remove("LLORCH_API_TOKEN")
        .dir(root)
}
