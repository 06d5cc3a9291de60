//! The CUDA path on a machine without a GPU (profile parsing, flags, host
//! compiler fallback, doctor without nvcc), offline source bundles, and
//! synthetic models loaded by the real CPU engine.

mod support;

use engine_provisioner::build::{self, BuildOptions};
use engine_provisioner::preflight::{self, Toolbox};
use engine_provisioner::{bundle, source};
use llorch_profile::Profile;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use support::*;
use test_support::workspace_root as repo_root;

fn script(dir: &Path, name: &str, body: &str) {
    let p = dir.join(name);
    fs_err::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs_err::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn link_real(dir: &Path, tool: &str) {
    if let Ok(p) = which::which(tool) {
        fs_err::os::unix::fs::symlink(p, dir.join(tool)).unwrap();
    }
}

#[test]
fn cuda_profiles_generate_explicit_arch_flags() {
    let root = repo_root();
    let rtx = Profile::resolve(&root, Some("llamacpp-3090-source")).unwrap();
    let f = build::base_flags(&rtx).join(" ") + " ";
    assert!(
        f.contains("-DGGML_CUDA=ON") && f.contains("-DCMAKE_CUDA_ARCHITECTURES=86-real "),
        "{f}"
    );
    let h100 = Profile::resolve(&root, Some("h100")).unwrap();
    assert!(build::base_flags(&h100)
        .join(" ")
        .contains("-DCMAKE_CUDA_ARCHITECTURES=90-real"));
    let mut multi = h100.clone();
    multi.file.engine.cuda_archs = vec!["86".into(), "90".into()];
    assert!(build::base_flags(&multi)
        .join(" ")
        .contains("-DCMAKE_CUDA_ARCHITECTURES=86;90"));
    let cpu = Profile::resolve(&root, None).unwrap();
    assert!(!build::base_flags(&cpu).join(" ").contains("CUDA"));
}

/// A profile's archs are checked against the toolkit found before anything
/// is configured: a stand-in CUDA 13 nvcc refuses a Pascal (sm_61) profile
/// and names the arch, the toolkit and what to change; doctor says the same.
#[test]
fn an_arch_the_toolkit_cannot_build_is_refused_before_configuring() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    fs_err::create_dir_all(&bin).unwrap();
    script(
        &bin,
        "nvcc",
        r#"case "$*" in
  *--version*) echo "Cuda compilation tools, release 13.0, V13.0.88"; exit 0;;
  *) exit 0;;
esac"#,
    );
    for t in ["cmake", "cc", "c++", "g++", "ninja"] {
        link_real(&bin, t);
    }
    let tb = Toolbox {
        path: Some(bin.clone().into_os_string()),
    };
    let mut p = Profile::resolve(&repo_root(), Some("h100")).unwrap();
    let plan = build::plan(&p, &tb).expect("sm_90 builds with CUDA 13");
    // CUDA 12.9+: nvcc runs through the reproducibility launcher, and that is an input.
    assert_eq!(
        plan.inputs.cuda.as_ref().unwrap().nvcc_launcher.as_deref(),
        Some(engine_provisioner::reproduce::NVCC_LAUNCHER)
    );
    p.file.engine.cuda_archs = vec!["61".into()];
    let e = match build::plan(&p, &tb) {
        Ok(_) => panic!("an sm_61 profile was planned with CUDA 13"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("sm_61") && e.contains("13.0.88") && e.contains("CUDA 12.x toolkit"),
        "{e}"
    );
    let report = preflight::check(&p, &tb);
    assert!(
        report.warnings.iter().any(|w| w.contains("sm_61")),
        "{:?}",
        report.warnings
    );
}

#[test]
fn nvcc_rejecting_the_default_host_compiler_falls_back_to_an_older_one() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    fs_err::create_dir_all(&bin).unwrap();
    // A stand-in nvcc that accepts only `-ccbin .../g++-12`, like CUDA 12.x with a too-new default gcc.
    script(
        &bin,
        "nvcc",
        r#"case "$*" in
  *--version*) echo "Cuda compilation tools, release 12.4, V12.4.131"; exit 0;;
  *"-ccbin "*g++-12*) exit 0;;
  *) echo "error -- unsupported GNU version! gcc versions later than 13 are not supported!" >&2; exit 1;;
esac"#,
    );
    script(&bin, "g++-12", r#"echo "g++-12 (Debian 12.2.0) 12.2.0""#);
    for t in ["cmake", "cc", "c++", "ninja"] {
        link_real(&bin, t);
    }
    let tb = Toolbox {
        path: Some(bin.clone().into_os_string()),
    };
    let chosen = engine_provisioner::cuda::choose_host_compiler(&bin.join("nvcc"), &tb).unwrap();
    assert_eq!(chosen, Some(bin.join("g++-12")));

    let root = repo_root();
    let p = Profile::resolve(&root, Some("h100")).unwrap();
    let plan = build::plan(&p, &tb).unwrap();
    let cuda = plan.inputs.cuda.as_ref().unwrap();
    assert_eq!(cuda.nvcc_version, "12.4.131");
    assert_eq!(cuda.archs, vec!["90-real"]);
    // Before CUDA 12.9 (no --frandom-seed) nvcc runs without the reproducibility launcher.
    assert_eq!(cuda.nvcc_launcher, None);
    assert_eq!(
        cuda.host_compiler.as_deref(),
        Some("g++-12 (Debian 12.2.0) 12.2.0")
    );
    assert!(plan.extra_flags.iter().any(|f| f
        == &format!(
            "-DCMAKE_CUDA_HOST_COMPILER={}",
            bin.join("g++-12").display()
        )));
    assert!(plan
        .inputs
        .cmake_flags
        .contains(&"-DGGML_CUDA=ON".to_string()));
    // The nvcc version and the archs are build inputs.
    let mut p86 = p.clone();
    p86.file.engine.cuda_archs = vec!["86".into()];
    assert_ne!(
        build::plan(&p86, &tb).unwrap().fingerprint,
        plan.fingerprint
    );

    let report = preflight::check(&p, &tb);
    let cuda = report.cuda.unwrap();
    assert_eq!(cuda.nvcc_version.as_deref(), Some("12.4.131"));
    assert_eq!(cuda.host_compiler_ok, Some(true));
}

#[test]
fn doctor_without_nvcc_names_it_and_how_to_install_it_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    fs_err::create_dir_all(&bin).unwrap();
    for t in ["cmake", "cc", "c++", "ninja", "python3"] {
        link_real(&bin, t);
    }
    let tb = Toolbox {
        path: Some(bin.into_os_string()),
    };
    let p = Profile::resolve(&repo_root(), Some("h100")).unwrap();
    let report = preflight::check(&p, &tb);
    let nvcc = report.checks.iter().find(|c| c.tool == "nvcc").unwrap();
    assert!(nvcc.required && !nvcc.ok);
    let err = preflight::ensure(&p, &tb, |_| {}).unwrap_err().to_string();
    assert!(err.contains("nvcc"), "{err}");
    assert!(
        err.contains("pacman -S --needed --noconfirm cuda"),
        "Arch/CachyOS: {err}"
    );
    assert!(
        err.contains("apt-get install -y --no-install-recommends nvidia-cuda-toolkit"),
        "Debian/Ubuntu: {err}"
    );
    assert!(err.contains("dnf install -y cuda-toolkit"), "Fedora: {err}");
    let err = build::plan(&p, &tb).unwrap_err().to_string();
    assert!(err.contains("nvcc not found"), "{err}");
}

#[test]
fn source_bundles_round_trip_build_identically_and_refuse_tampering() {
    let tmp = tempfile::tempdir().unwrap();
    let (archive, sha) = fake_archive(tmp.path(), "b", &fake_server_c("bundled"));
    let ws = Workspace::new(&archive_pin_yaml(&archive, &sha), &[("fake", CPU_PROFILE)]);
    let p = ws.profile("fake");
    let tree = source::fetch(&p.pin, &ws.layout, &|_| {}).unwrap();
    let out = tmp.path().join("bundle.tar.gz");
    let m = bundle::create(&p, &tree, &out).unwrap();
    assert_eq!(m.files.len(), 2, "{:?}", m.files.keys());
    let digest = bundle::tree_digest(&m.files);
    let mut p = p;
    p.pin.bundle_trees.insert("cpu".into(), digest.clone());

    // An offline host: no archive reachable, a fresh cache, the bundle, and
    // a pin that names the bundle's tree.
    let offline_pin = format!(
        "{}    bundle_trees:\n      cpu: {digest}\n",
        archive_pin_yaml(Path::new("/nonexistent/archive.tar.gz"), &sha)
    );
    let offline = Workspace::new(&offline_pin, &[("fake", CPU_PROFILE)]);
    let opts = BuildOptions {
        source_bundle: Some(out.clone()),
        report: llorch_io::report::Reporter::QUIET,
        ..Default::default()
    };
    let built = build::build(&offline.profile("fake"), &offline.layout, &opts).unwrap();
    assert!(built.version.contains("bundled"));
    let normal = build::plan(&p, &Toolbox::default()).unwrap();
    assert_eq!(
        built.fingerprint, normal.fingerprint,
        "the bundle keeps the pin's source identity"
    );

    // Tampering: change a file, keep the manifest.
    let unpacked = tmp.path().join("unpacked");
    engine_provisioner::extract::extract_tar_gz(&out, &unpacked, None).unwrap();
    fs_err::write(unpacked.join("tree/server.c"), fake_server_c("evil")).unwrap();
    let tampered = tmp.path().join("tampered.tar.gz");
    repack(&unpacked, &tampered);
    let err = bundle::verify_into(&tampered, &p.pin, &tmp.path().join("v1"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tampered") && err.contains("server.c"),
        "{err}"
    );
    assert!(!tmp.path().join("v1").exists(), "nothing was extracted");
    // An extra file is refused too.
    fs_err::write(unpacked.join("tree/server.c"), fake_server_c("bundled")).unwrap();
    fs_err::write(unpacked.join("tree/extra.c"), "int x;").unwrap();
    repack(&unpacked, &tampered);
    let err = bundle::verify_into(&tampered, &p.pin, &tmp.path().join("v2"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("extra.c"), "{err}");
    // A bundle of another pin is refused.
    let mut other = p.pin.clone();
    other.commit = "0".repeat(40);
    let err = bundle::verify_into(&out, &other, &tmp.path().join("v3"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("but the pin is"), "{err}");

    // Tampering with a recomputed manifest: the file and its manifest line
    // both changed. The pin's tree digest refuses it, and nothing is written.
    fs_err::remove_file(unpacked.join("tree/extra.c")).unwrap();
    let evil = fake_server_c("evil");
    fs_err::write(unpacked.join("tree/server.c"), &evil).unwrap();
    let mut forged = m.clone();
    forged.files.insert(
        "server.c".into(),
        llorch_io::digest::sha256_bytes(evil.as_bytes()),
    );
    fs_err::write(
        unpacked.join("llorch-bundle.json"),
        serde_json::to_vec_pretty(&forged).unwrap(),
    )
    .unwrap();
    repack(&unpacked, &tampered);
    let dest = tmp.path().join("v4");
    let err = bundle::verify_into(&tampered, &p.pin, &dest)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bundle_trees.cpu"), "{err}");
    assert!(!dest.exists(), "nothing was extracted");
    // A pin that names no tree for the bundle's backend refuses it, with the fix.
    let mut unnamed = p.pin.clone();
    unnamed.bundle_trees.clear();
    let err = bundle::verify_into(&out, &unnamed, &tmp.path().join("v5"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bundle_trees: {cpu: "), "{err}");
}

fn repack(dir: &Path, out: &Path) {
    let f = fs_err::File::create(out).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut t = tar::Builder::new(gz);
    t.append_path_with_name(dir.join("llorch-bundle.json"), "llorch-bundle.json")
        .unwrap();
    t.append_dir_all("tree", dir.join("tree")).unwrap();
    t.into_inner().unwrap().finish().unwrap();
}

#[test]
fn the_real_pin_bundles_what_the_cpu_build_needs() {
    // The default pin's tree (fetched by the default build) trimmed for a CPU build.
    let root = repo_root();
    let layout = test_support::workspace_layout();
    let p = Profile::resolve(&root, None).unwrap();
    let tree = source::fetch(&p.pin, &layout, &|_| {}).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cpu.tar.gz");
    let m = bundle::create(&p, &tree, &out).unwrap();
    assert!(m.files.contains_key("tools/server/server.cpp"));
    assert!(m.files.contains_key("ggml/src/ggml-cpu/ggml-cpu.c"));
    assert!(m.files.contains_key(bundle::VOCAB_FOR_SYNTHETIC));
    assert!(!m.files.keys().any(|k| k.starts_with("ggml/src/ggml-cuda/")));
    assert!(!m.files.keys().any(|k| k.starts_with("docs/")));
    let size = fs_err::metadata(&out).unwrap().len();
    assert!(size < 30_000_000, "compact: {size} bytes");
    let check = tmp.path().join("check");
    bundle::verify_into(&out, &p.pin, &check).unwrap();
}
