//! Invariants of the house, checked (ARCHITECTURE.md): the CLI depends on no
//! test crate, processes and HTTP clients are created only in llorch-io, the
//! code map names every public module, public functions fail with typed
//! errors, every normal dependency is used outside tests, every code path
//! ARCHITECTURE names resolves, and its long-files table states each size
//! within 10 %.

use llorch_io::cmd::Cmd;
use std::path::{Path, PathBuf};

use test_support::workspace_root as root;

#[test]
fn the_cli_depends_on_no_test_crate() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let tree = Cmd::new(cargo)
        .args([
            "tree",
            "-p",
            "xtask",
            "--prefix",
            "none",
            "--edges",
            "normal,build",
            "--offline",
        ])
        .dir(root())
        .read()
        .unwrap();
    assert!(tree.contains("llorch-stack"), "{tree}");
    for test_crate in ["test-harness", "test-support"] {
        assert!(
            !tree.contains(test_crate),
            "xtask pulls in the test crate {test_crate}:\n{tree}"
        );
    }
}

/// The Rust files below `dirs` (relative to the root): each as its path
/// relative to the root, and the file.
fn workspace_files(dirs: &[&str]) -> Vec<(String, PathBuf)> {
    let root = root();
    let mut files = Vec::new();
    for d in dirs {
        rust_files(&root.join(d), &mut files);
    }
    files
        .into_iter()
        .map(|f| {
            let rel = f
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (rel, f)
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs_err::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() && name != "target" && !name.starts_with('.') && name != "cache" {
            rust_files(&p, out);
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

#[test]
fn only_llorch_io_may_create_processes_and_http_clients() {
    let clippy = fs_err::read_to_string(root().join("clippy.toml")).unwrap();
    for m in [
        "std::process::Command::new",
        "reqwest::Client::builder",
        "reqwest::blocking::Client::builder",
        "reqwest::Client::new",
    ] {
        assert!(
            clippy.contains(&format!("\"{m}\"")),
            "clippy.toml lacks {m}"
        );
    }
    let files: Vec<PathBuf> = workspace_files(&["crates", "xtask", "tests"])
        .into_iter()
        .map(|(_, f)| f)
        .collect();
    // The lint silenced by name, or by a group that holds it (`style`,
    // `all`), in an attribute anywhere outside llorch-io.
    let silencers = [
        ["clippy::", "disallowed_methods"].concat(),
        ["clippy::", "style"].concat(),
        ["clippy::", "all"].concat(),
    ];
    let escapes: Vec<_> = files
        .iter()
        .filter(|f| !f.starts_with(root().join("crates/llorch-io")))
        .filter(|f| {
            let text = fs_err::read_to_string(f).unwrap();
            silencers.iter().any(|s| {
                text.lines()
                    .any(|l| l.contains(s.as_str()) && l.contains("allow"))
            })
        })
        .collect();
    assert!(escapes.is_empty(), "allowed outside llorch-io: {escapes:?}");
    // …or by a `[lints]` table of a manifest (or the workspace's).
    let mut manifests = vec![root().join("Cargo.toml")];
    for d in ["crates", "tests"] {
        for e in fs_err::read_dir(root().join(d)).unwrap().flatten() {
            manifests.push(e.path().join("Cargo.toml"));
        }
    }
    manifests.push(root().join("xtask/Cargo.toml"));
    for m in manifests.iter().filter(|m| m.is_file()) {
        let text = fs_err::read_to_string(m).unwrap();
        let lints = text
            .split("\n[")
            .filter(|sec| sec.starts_with("lints") || sec.starts_with("workspace.lints"))
            .any(|sec| {
                ["disallowed_methods", "disallowed-methods", "style", "all"]
                    .iter()
                    .any(|k| sec.contains(k) && sec.contains("allow"))
            });
        assert!(
            !lints,
            "{} silences the process/HTTP door lint in a [lints] table",
            m.display()
        );
    }
}

/// Every public module of every crate is named (as `` `module` ``) in its
/// crate's row of ARCHITECTURE.md's code map, so the map cannot fall behind
/// a new module.
#[test]
fn every_public_module_is_in_its_crates_row_of_the_code_map() {
    let root = root();
    let arch = fs_err::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let mut missing = Vec::new();
    let mut crates = 0;
    for entry in fs_err::read_dir(root.join("crates")).unwrap() {
        let dir = entry.unwrap().path();
        let Ok(lib) = fs_err::read_to_string(dir.join("src/lib.rs")) else {
            continue;
        };
        crates += 1;
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let prefix = format!("| `crates/{name}/` |");
        let Some(row) = arch.lines().find(|l| l.starts_with(&prefix)) else {
            missing.push(format!("crates/{name}: no row in the code map"));
            continue;
        };
        for line in lib.lines() {
            let Some(m) = line
                .trim()
                .strip_prefix("pub mod ")
                .and_then(|r| r.strip_suffix(';'))
            else {
                continue;
            };
            if !row.contains(&format!("`{m}`")) {
                missing.push(format!("crates/{name}: `{m}`"));
            }
        }
    }
    assert!(crates >= 7, "found only {crates} crates under crates/");
    assert!(
        missing.is_empty(),
        "public modules missing from ARCHITECTURE.md's code map: {missing:?}"
    );
}

/// No file under `crates/*/src` is over 600 lines unless ARCHITECTURE.md's
/// table of one-idea files names it.
#[test]
fn long_files_are_only_those_architecture_names() {
    let root = root();
    let arch = fs_err::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let mut long = Vec::new();
    for (rel, f) in workspace_files(&["crates"]) {
        if !rel.contains("/src/") {
            continue;
        }
        let lines = fs_err::read_to_string(&f).unwrap().lines().count();
        if lines > 600 && !arch.contains(&format!("| `{rel}` |")) {
            long.push(format!("{rel} ({lines} lines)"));
        }
    }
    assert!(
        long.is_empty(),
        "over 600 lines and not in ARCHITECTURE.md's table of one-idea files: {long:?} (split it, or say there why it is one idea)"
    );
}

/// The `pub` functions whose signature ends in `-> Result<…, String>` in `text`.
fn string_errors(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (i, _) in text.match_indices("fn ") {
        let line_start = text[..i].rfind('\n').map_or(0, |n| n + 1);
        let head = text[line_start..i].trim_start();
        if !head.starts_with("pub") || head.starts_with("pub(") && !head.starts_with("pub(crate)") {
            continue;
        }
        let Some(end) = text[i..].find(['{', ';']) else {
            continue;
        };
        let sig = text[i..i + end]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if sig.contains("-> Result<") && sig.ends_with(", String>") {
            found.push(sig);
        }
    }
    found
}

#[test]
fn library_errors_are_typed() {
    assert_eq!(
        string_errors("pub fn a(x: u8) -> Result<u8, String> {}\npub(crate) fn b(\n  y: u8,\n) -> Result<(), String> {}\nfn c() -> Result<(), String> {}\npub fn d() -> Result<BTreeMap<String, String>, E> {}"),
        vec!["fn a(x: u8) -> Result<u8, String>", "fn b( y: u8, ) -> Result<(), String>"]
    );
    let offenders: Vec<String> = workspace_files(&["crates", "xtask/src"])
        .iter()
        .filter(|(_, f)| f.components().any(|c| c.as_os_str() == "src"))
        .flat_map(|(rel, f)| {
            let text = fs_err::read_to_string(f).unwrap();
            string_errors(&text)
                .into_iter()
                .map(|s| format!("{rel}: {s}"))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "public functions that fail with a String (give them a thiserror type):\n{}",
        offenders.join("\n")
    );
}

/// Whether `rel` (relative to the root) is test code: below a `tests/`
/// directory and not in a crate's `src/` under it (the e2e crate's binary).
fn is_test_code(rel: &str) -> bool {
    // The system tests' harness is their code, though a crate of its own.
    if rel.starts_with("crates/test-harness/") {
        return true;
    }
    let parts: Vec<&str> = rel.split('/').collect();
    match parts.iter().rposition(|p| *p == "tests") {
        Some(i) => !parts[i..].contains(&"src"),
        None => false,
    }
}

/// What test code must not do to find the workspace (`test_support` does it
/// once): read the user's `LLORCH_*` variables, or compute the root again.
fn inherited_layouts(text: &str) -> Vec<&'static str> {
    const NEEDLES: [&str; 3] = [
        concat!("Layout::", "from_root("),
        concat!("Layout::", "discover("),
        concat!("env!(\"CARGO_MANIFEST_DIR\"))", ".join(\".."),
    ];
    NEEDLES.into_iter().filter(|n| text.contains(n)).collect()
}

#[test]
fn tests_never_inherit_the_users_llorch_variables() {
    assert!(is_test_code("crates/a/tests/common/mod.rs"));
    assert!(is_test_code("xtask/tests/tidy.rs"));
    assert!(is_test_code("crates/test-harness/src/lib.rs"));
    assert!(!is_test_code("tests/e2e-haiku/src/bin/llorch-haiku.rs"));
    assert!(!is_test_code("crates/a/src/lib.rs"));
    // The check can fail: a sample that does both.
    let sample = format!(
        "let l = {}root);\nlet r = Path::new({}).join(\"../..\");",
        concat!("Layout::", "from_root("),
        "env!(\"CARGO_MANIFEST_DIR\")"
    );
    assert_eq!(inherited_layouts(&sample).len(), 2, "{sample}");
    let mut found = Vec::new();
    for (rel, f) in workspace_files(&["crates", "xtask", "tests"]) {
        if !is_test_code(&rel) {
            continue;
        }
        let text = fs_err::read_to_string(&f).unwrap();
        for n in inherited_layouts(&text) {
            found.push(format!("{rel}: {n}"));
        }
    }
    assert!(
        found.is_empty(),
        "tests find the workspace through test_support::{{workspace_root, layout, workspace_layout}}, never the user's LLORCH_* variables: {found:?}"
    );
}

/// The names in `manifest`'s `[dependencies]` table that `src` (a crate's
/// non-test source) never names as a path (`name::` or `name` as a word,
/// `-` read as `_`).
fn unused_dependencies(manifest: &str, src: &str) -> Vec<String> {
    let mut in_deps = false;
    let mut unused = Vec::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
            continue;
        }
        if !in_deps || line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(name) = line.split(['=', '.', ' ']).next().filter(|n| !n.is_empty()) else {
            continue;
        };
        let ident = name.replace('-', "_");
        let used = src.match_indices(&ident).any(|(i, _)| {
            let before = src[..i].chars().next_back();
            let after = src[i + ident.len()..].chars().next();
            let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
            !word(before) && !word(after)
        });
        if !used {
            unused.push(name.to_string());
        }
    }
    unused
}

/// A crate's source without its test code: `tests.rs` files and what
/// follows `#[cfg(test)]` in a file (the test module, last by habit).
fn non_test_source(krate: &Path) -> String {
    let mut files = Vec::new();
    rust_files(&krate.join("src"), &mut files);
    if krate.join("build.rs").exists() {
        files.push(krate.join("build.rs"));
    }
    let mut src = String::new();
    for f in files {
        if f.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = fs_err::read_to_string(&f).unwrap();
        src.push_str(text.split("#[cfg(test)]").next().unwrap_or(""));
    }
    src
}

#[test]
fn every_normal_dependency_is_used_outside_tests() {
    // The check can fail: a planted unused and a test-only dependency.
    let manifest = "[package]\nname = \"a\"\n[dependencies]\nserde.workspace = true\nfs-err = \"3\"\nsha2 = { workspace = true }\nlibc.workspace = true\n[dev-dependencies]\nrand = \"1\"\n";
    let src = "use serde::Serialize;\nfn f() { fs_err::read(\"x\"); let serde_json = 1; }\n#[cfg(test)]\nmod tests { fn g() { libc::getpid(); } }";
    assert_eq!(
        unused_dependencies(manifest, src.split("#[cfg(test)]").next().unwrap()),
        vec!["sha2", "libc"]
    );
    let root = root();
    let mut found = Vec::new();
    let mut krates: Vec<PathBuf> = fs_err::read_dir(root.join("crates"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    krates.push(root.join("xtask"));
    for k in krates {
        let Ok(manifest) = fs_err::read_to_string(k.join("Cargo.toml")) else {
            continue;
        };
        for name in unused_dependencies(&manifest, &non_test_source(&k)) {
            found.push(format!(
                "{}: {name}",
                k.strip_prefix(&root).unwrap().display()
            ));
        }
    }
    assert!(
        found.is_empty(),
        "normal dependencies that no non-test code names (remove them, or move them to [dev-dependencies]): {found:?}"
    );
}

/// Where a doc path like `llorch_io::fsx::write_atomic` or
/// `guard::host_allowed` points, if it resolves: the first segment names a
/// crate (its `lib.rs`/`main.rs`) or a module file anywhere in a crate's
/// `src`; each next segment a submodule file, or an item the current file
/// defines (`fn`, `struct`, `enum`, `const`, `static`, `type`, `trait`,
/// `mod`), after which the rest (methods, variants) must occur in that file.
fn resolves(root: &Path, path: &str) -> bool {
    let segs: Vec<&str> = path.split("::").collect();
    let mut crates: Vec<(String, PathBuf)> = fs_err::read_dir(root.join("crates"))
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().replace('-', "_"),
                e.path().join("src"),
            )
        })
        .collect();
    crates.push(("xtask".into(), root.join("xtask/src")));
    let mut starts: Vec<PathBuf> = Vec::new();
    if let Some((_, src)) = crates.iter().find(|(n, _)| n == segs[0]) {
        starts.extend(
            ["lib.rs", "main.rs"]
                .map(|f| src.join(f))
                .into_iter()
                .filter(|f| f.exists()),
        );
    } else {
        for (_, src) in &crates {
            let mut files = Vec::new();
            rust_files(src, &mut files);
            starts.extend(files.into_iter().filter(|f| {
                f.file_stem().is_some_and(|s| s == segs[0])
                    || f.ends_with(format!("{}/mod.rs", segs[0]))
            }));
        }
    }
    let sub = |file: &Path, seg: &str| -> Option<PathBuf> {
        let name = file.file_name()?.to_str()?;
        let dir = if matches!(name, "lib.rs" | "main.rs" | "mod.rs") {
            file.parent()?.to_path_buf()
        } else {
            file.with_extension("")
        };
        [dir.join(format!("{seg}.rs")), dir.join(seg).join("mod.rs")]
            .into_iter()
            .find(|p| p.exists())
    };
    let defines = |text: &str, name: &str| {
        [
            "fn", "struct", "enum", "const", "static", "type", "trait", "mod",
        ]
        .iter()
        .any(|kw| {
            text.match_indices(&format!("{kw} {name}")).any(|(i, m)| {
                let after = text[i + m.len()..].chars().next();
                let before = text[..i].chars().next_back();
                !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
                    && !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            })
        })
    };
    starts.into_iter().any(|start| {
        let mut cur = start;
        for (i, seg) in segs[1..].iter().enumerate() {
            if let Some(next) = sub(&cur, seg) {
                cur = next;
                continue;
            }
            let text = fs_err::read_to_string(&cur).unwrap();
            // Defined here, or a crate root's re-export (`pub use stack::{start_pools, …}`).
            let reexported = text
                .split("pub use ")
                .skip(1)
                .filter_map(|u| u.split(';').next())
                .any(|u| {
                    u.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .any(|w| w == *seg)
                });
            return (defines(&text, seg) || reexported)
                && segs[i + 2..].iter().all(|r| text.contains(r));
        }
        true
    })
}

/// The backticked `a::b…` paths of `text` that name this workspace's code
/// (not std or another crate's).
fn doc_paths(text: &str) -> Vec<String> {
    const FOREIGN: [&str; 8] = [
        "std",
        "fs_err",
        "tokio",
        "serde",
        "reqwest",
        "axum",
        "hyper",
        "oci_client",
    ];
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(|s| s.trim_end_matches("()"))
        .filter(|s| {
            let segs: Vec<&str> = s.split("::").collect();
            segs.len() > 1
                && segs
                    .iter()
                    .all(|g| !g.is_empty() && g.chars().all(|c| c.is_alphanumeric() || c == '_'))
                && segs[0].starts_with(|c: char| c.is_ascii_lowercase())
                && !FOREIGN.contains(&segs[0])
        })
        .map(String::from)
        .collect()
}

#[test]
fn every_code_path_architecture_names_resolves() {
    let root = root();
    // The check can fail: planted paths that do not resolve.
    assert_eq!(
        doc_paths(
            "see `llorch_io::fsx::write_atomic`, `std::fs::read` and `guard::host_allowed()`"
        ),
        ["llorch_io::fsx::write_atomic", "guard::host_allowed"]
    );
    assert!(resolves(&root, "llorch_io::fsx::write_atomic"));
    assert!(resolves(&root, "guard::host_allowed"));
    assert!(resolves(&root, "llorch_stack::start_pools"));
    for planted in [
        "api::guard",
        "llorch_io::fsx::write_atomically",
        "nowhere::thing",
        "source::extract_tar_gz",
    ] {
        assert!(!resolves(&root, planted), "{planted} resolved");
    }
    let arch = fs_err::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let mut paths = doc_paths(&arch);
    paths.sort();
    paths.dedup();
    assert!(paths.len() > 50, "{paths:?}");
    let broken: Vec<&String> = paths.iter().filter(|p| !resolves(&root, p)).collect();
    assert!(
        broken.is_empty(),
        "ARCHITECTURE.md names code that is not there (moved, renamed or gone): {broken:?}"
    );
}

/// The long-files table's rows of `arch`: (file, the lines it states).
fn stated_sizes(arch: &str) -> Vec<(String, usize)> {
    arch.lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let file = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            let lines = cells.get(2)?.strip_prefix('~')?.parse().ok()?;
            Some((file.to_string(), lines))
        })
        .collect()
}

#[test]
fn the_long_files_table_states_each_size_within_ten_per_cent() {
    assert_eq!(
        stated_sizes(
            "| file | lines | idea |\n| `crates/a/src/b.rs` | ~660 | one |\n| `x` | none | y |"
        ),
        [("crates/a/src/b.rs".to_string(), 660)]
    );
    let root = root();
    let arch = fs_err::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let rows = stated_sizes(&arch);
    assert!(!rows.is_empty());
    let off: Vec<String> = rows
        .iter()
        .filter_map(|(f, stated)| {
            let lines = fs_err::read_to_string(root.join(f))
                .map(|t| t.lines().count())
                .unwrap_or(0);
            let ok = lines * 10 >= stated * 9 && lines * 10 <= stated * 11;
            (!ok).then(|| format!("{f}: stated ~{stated}, has {lines}"))
        })
        .collect();
    assert!(
        off.is_empty(),
        "ARCHITECTURE.md's long-files table is out of date: {off:?}"
    );
}

/// The `pub use` lines of `text` that re-export another module of this
/// crate (`crate::…`, `super::…`) or another crate of this workspace: a
/// facade that makes "where is X" two hops.
fn facades(text: &str, workspace_crates: &[String]) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("pub use "))
        .filter(|u| {
            let first = u.split([':', ' ', ';', '{']).next().unwrap_or("");
            first == "crate" || first == "super" || workspace_crates.iter().any(|c| c == first)
        })
        .map(|u| format!("pub use {u}"))
        .collect()
}

#[test]
fn no_module_re_exports_another_of_the_workspace() {
    let crates: Vec<String> = ["llorch_io", "llorch_profile", "engine_runtime"]
        .map(String::from)
        .to_vec();
    assert_eq!(
        facades(
            "pub use crate::flags::*;\npub use llorch_io::download;\npub use reference::OciRef;\n  pub use super::x::Y;\npub use oci_client::A as B;\nuse crate::z;",
            &crates
        ),
        ["pub use crate::flags::*;", "pub use llorch_io::download;", "pub use super::x::Y;"]
    );
    let root = root();
    let mut all: Vec<String> = fs_err::read_dir(root.join("crates"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().replace('-', "_"))
        .collect();
    all.push("xtask".into());
    let found: Vec<String> = workspace_files(&["crates", "xtask/src"])
        .iter()
        .filter(|(rel, _)| rel.contains("/src/") && !is_test_code(rel))
        .flat_map(|(rel, f)| {
            facades(&fs_err::read_to_string(f).unwrap(), &all)
                .into_iter()
                .map(move |u| format!("{rel}: {u}"))
        })
        .collect();
    assert!(
        found.is_empty(),
        "re-exports of what lives elsewhere in the workspace (callers name the module that defines an item): {found:?}"
    );
}

/// The environment variables `text` (non-test source) reads or names:
/// every `"LLORCH_…"` literal, and the names in `var("X")`, `var_os("X")`
/// and clap's `env = "X"` (the platform's own — `PATH`, `HOME`, `CARGO…`,
/// `LD_LIBRARY_PATH` — aside; what a command is given, `.env("X", …)`, is
/// not read).
fn env_vars(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (i, _) in text.match_indices('"') {
        let rest = &text[i + 1..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if name.is_empty() || name.ends_with('_') || !rest[name.len()..].starts_with('"') {
            continue;
        }
        let before = text[..i].trim_end();
        let read =
            before.ends_with("var(") || before.ends_with("var_os(") || before.ends_with("env =");
        let platform = ["PATH", "HOME", "USER", "LD_LIBRARY_PATH"].contains(&name.as_str())
            || name.starts_with("CARGO");
        if (name.starts_with("LLORCH_") || read) && !platform {
            found.push(name);
        }
    }
    found.sort();
    found.dedup();
    found
}

#[test]
fn readme_documents_every_environment_variable_the_code_reads() {
    assert_eq!(
        env_vars("std::env::var(\"HF_TOKEN\"); var_os(\"PATH\"); #[arg(env = \"PORT\")] x(\"LLORCH_X\"); let s = \"NOT_ONE\"; cmd.env(\"SET_ONLY\", 1); p(\"LLORCH_\")"),
        ["HF_TOKEN", "LLORCH_X", "PORT"]
    );
    let root = root();
    let mut read: Vec<String> = workspace_files(&["crates", "xtask/src", "tests"])
        .iter()
        .filter(|(rel, _)| {
            rel.contains("/src/") && !is_test_code(rel) && !rel.starts_with("crates/test-support/")
        })
        .flat_map(|(_, f)| {
            let text = fs_err::read_to_string(f).unwrap();
            env_vars(text.split("#[cfg(test)]").next().unwrap_or(""))
        })
        .collect();
    read.sort();
    read.dedup();
    let readme = fs_err::read_to_string(root.join("README.md")).unwrap();
    let section = readme
        .split("## Environment variables")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has an Environment variables section");
    let mut documented: Vec<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .flat_map(|l| {
            let cell = l.split(" |").next().unwrap_or("");
            cell.split('`')
                .filter(|w| {
                    !w.is_empty()
                        && w.chars()
                            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                })
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    documented.sort();
    documented.dedup();
    let missing: Vec<&String> = read.iter().filter(|v| !documented.contains(v)).collect();
    let stale: Vec<&String> = documented.iter().filter(|v| !read.contains(v)).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "README's Environment variables table: read by the code but not there: {missing:?}; there but read nowhere: {stale:?}"
    );
}

/// Catch-all error variants in `text`: one named `Other`, or one that is a
/// bare `String` shown as itself (`#[error("{0}")] Name(String)`).
fn catch_alls(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut found = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let Some(name) = l.strip_suffix("(String),") else {
            continue;
        };
        let shown_as_itself = i > 0 && lines[i - 1] == "#[error(\"{0}\")]";
        if name == "Other" || shown_as_itself {
            found.push(format!("{name}(String)"));
        }
    }
    found
}

#[test]
fn no_catch_all_error_variants() {
    assert_eq!(
        catch_alls("enum E {\n    #[error(\"{0}\")]\n    Other(String),\n    #[error(\"git: {0}\")]\n    Git(String),\n    #[error(\"{0}\")]\n    Any(String),\n}"),
        ["Other(String)", "Any(String)"]
    );
    // Still to be given their own variants (house issue): each names what
    // failed in its message today.
    const DEBT: [&str; 4] = [
        "crates/engine-provisioner/src/source.rs: Layout(String)",
        "crates/engine-provisioner/src/cache.rs: Stale(String)",
        "crates/engine-provisioner/src/bundle.rs: Refused(String)",
        "crates/engine-runtime/src/supervisor.rs: Failed(String)",
    ];
    let found: Vec<String> = workspace_files(&["crates", "xtask/src"])
        .iter()
        .filter(|(rel, _)| rel.contains("/src/") && !is_test_code(rel))
        .flat_map(|(rel, f)| {
            catch_alls(&fs_err::read_to_string(f).unwrap())
                .into_iter()
                .map(move |v| format!("{rel}: {v}"))
        })
        .collect();
    let new: Vec<&String> = found
        .iter()
        .filter(|f| !DEBT.contains(&f.as_str()))
        .collect();
    assert!(
        new.is_empty(),
        "catch-all error variants (give each failure its own variant with typed fields): {new:?}"
    );
    let paid: Vec<&&str> = DEBT
        .iter()
        .filter(|d| !found.iter().any(|f| f == *d))
        .collect();
    assert!(
        paid.is_empty(),
        "gone: take them off the DEBT list: {paid:?}"
    );
}

/// The name a line declares a function by (`[pub[(…)]] [async] [unsafe] [const] fn NAME`).
fn fn_name(line: &str) -> Option<String> {
    let mut rest = line.trim_start();
    if let Some(r) = rest.strip_prefix("pub") {
        rest = match r.strip_prefix('(') {
            Some(r) => r.split_once(')')?.1,
            None => r,
        };
        if !rest.starts_with(char::is_whitespace) {
            return None;
        }
        rest = rest.trim_start();
    }
    for kw in ["async ", "unsafe ", "const "] {
        rest = rest.strip_prefix(kw).unwrap_or(rest).trim_start();
    }
    let name: String = rest
        .strip_prefix("fn ")?
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

/// Functions of at least `limit` lines in `text` (up to its `#[cfg(test)]`
/// tail): each as its name and length. Braces are counted line by line,
/// strings included, which is exact for this workspace's code.
fn long_functions(text: &str, limit: usize) -> Vec<(String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let end = lines
        .iter()
        .position(|l| l.starts_with("#[cfg(test)]"))
        .unwrap_or(lines.len());
    let mut out = Vec::new();
    for i in 0..end {
        let Some(name) = fn_name(lines[i]) else {
            continue;
        };
        let (mut depth, mut started) = (0i64, false);
        let mut j = i;
        while j < end {
            for c in lines[j].chars() {
                match c {
                    '{' => (depth, started) = (depth + 1, true),
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if (started && depth <= 0) || (!started && lines[j].trim_end().ends_with(';')) {
                break;
            }
            j += 1;
        }
        if started && j < end && j + 1 - i >= limit {
            out.push((name, j + 1 - i));
        }
    }
    out
}

/// No function in `src` is 120 lines or more unless ARCHITECTURE.md's
/// table of long functions names it and says why.
#[test]
fn long_functions_are_only_those_architecture_names() {
    let root = root();
    let arch = fs_err::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let planted = "fn planted() {\n".to_string() + &"    x();\n".repeat(130) + "}\n";
    assert_eq!(
        long_functions(&planted, 120),
        [("planted".to_string(), 132)]
    );
    assert_eq!(
        fn_name("    pub(crate) async fn go_on(x: u8) {"),
        Some("go_on".into())
    );
    assert_eq!(fn_name("    let f = fn_name;"), None);
    let mut long = Vec::new();
    let mut listed = 0;
    for (rel, f) in workspace_files(&["crates", "xtask/src"]) {
        if !rel.contains("/src/") || rel.ends_with("/tests.rs") || rel.contains("/tests/") {
            continue;
        }
        for (name, n) in long_functions(&fs_err::read_to_string(&f).unwrap(), 120) {
            if arch.contains(&format!("| `{rel}` | `{name}` |")) {
                listed += 1;
            } else {
                long.push(format!("{rel}: {name} ({n} lines)"));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions of 120 lines or more that ARCHITECTURE.md's table of long functions does not name: {long:?} (split them into named steps, or say there why not)"
    );
    let rows = arch
        .lines()
        .skip_while(|l| !l.starts_with("Functions of 120 lines or more"))
        .filter(|l| l.starts_with("| `crates/") || l.starts_with("| `xtask/"))
        .count();
    assert_eq!(
        rows, listed,
        "the table of long functions names one that is no longer long (strike it)"
    );
}

/// Libraries print only through `llorch_io::report` (so `--quiet` silences
/// every line of theirs): no `eprintln!`/`eprint!` in `crates/*/src` but in
/// `report.rs` itself, binaries and tests.
#[test]
fn libraries_print_only_through_the_reporter() {
    let stray = |text: &str| {
        let end = text.find("#[cfg(test)]").unwrap_or(text.len());
        text[..end]
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .filter(|l| l.contains("eprintln!(") || l.contains("eprint!("))
            .count()
    };
    assert_eq!(
        stray("fn f() {\n    eprintln!(\"x\");\n}\n"),
        1,
        "a planted line is found"
    );
    let mut found = Vec::new();
    for (rel, f) in workspace_files(&["crates"]) {
        if !rel.contains("/src/")
            || rel.contains("/src/bin/")
            || rel.ends_with("/src/main.rs")
            || rel.ends_with("/tests.rs")
            || rel == "crates/llorch-io/src/report.rs"
            || is_test_code(&rel)
        {
            continue;
        }
        let n = stray(&fs_err::read_to_string(&f).unwrap());
        if n > 0 {
            found.push(format!("{rel} ({n})"));
        }
    }
    assert!(
        found.is_empty(),
        "library code printing past llorch_io::report (use llorch_io::info!/warn!): {found:?}"
    );
}
