//! No code from a registry artifact runs before its digest matches the pin.
//! `pip download` of an sdist prepares its metadata by running the sdist's
//! build backend; a local index (pip's own `--find-links`, set through pip's
//! environment configuration, as a user's pip.conf would) serves an sdist
//! whose backend writes a marker file when imported. With a pin whose sha256
//! does not match, the fetch is refused and the marker never appears; with
//! the right sha256 the same backend does run (so the check can fail).
//!
//! One test in this file: it sets pip's environment for the whole process.

use engine_provisioner::source::{self, SourceError};
use llorch_io::paths::Layout;
use llorch_profile::{Pin, SourceSpec};

const BACKEND: &str = r#"import os
open(os.environ['LLORCH_TEST_MARKER'], 'w').write('the build backend ran')

def get_requires_for_build_wheel(config_settings=None):
    return []

def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    d = os.path.join(metadata_directory, 'evilpkg-1.0.dist-info')
    os.makedirs(d)
    open(os.path.join(d, 'METADATA'), 'w').write('Metadata-Version: 2.1\nName: evilpkg\nVersion: 1.0\n')
    return 'evilpkg-1.0.dist-info'
"#;

fn sdist(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("evilpkg-1.0.tar.gz");
    let f = fs_err::File::create(&path).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    let mut t = tar::Builder::new(gz);
    let files: [(&str, &str); 3] = [
        (
            "pyproject.toml",
            "[build-system]\nrequires = []\nbuild-backend = \"evil_backend\"\nbackend-path = [\".\"]\n",
        ),
        ("evil_backend.py", BACKEND),
        ("CMakeLists.txt", "cmake_minimum_required(VERSION 3.14)\nproject(evil C)\n"),
    ];
    for (name, body) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        t.append_data(&mut h, format!("evilpkg-1.0/{name}"), body.as_bytes())
            .unwrap();
    }
    t.into_inner().unwrap().finish().unwrap();
    path
}

#[test]
fn an_sdist_whose_hash_does_not_match_never_runs_its_build_backend() {
    let tmp = tempfile::tempdir().unwrap();
    let links = tmp.path().join("links");
    fs_err::create_dir_all(&links).unwrap();
    let archive = sdist(&links);
    let good = llorch_io::digest::sha256_file(&archive).unwrap();
    let marker = tmp.path().join("marker");
    // SAFETY: the only test in this binary; set before any thread is spawned.
    unsafe {
        std::env::set_var("PIP_NO_INDEX", "1");
        std::env::set_var("PIP_FIND_LINKS", &links);
        std::env::set_var("LLORCH_TEST_MARKER", &marker);
    }
    let pin = |sha256: String| Pin {
        commit: "0".repeat(40),
        source: SourceSpec::PypiSdist {
            package: "evilpkg".into(),
            version: "1.0".into(),
            sha256,
            subdir: None,
        },
        description: None,
        bundle_trees: Default::default(),
    };
    let layout = |d: &str| {
        let root = tmp.path().join(d);
        Layout::at(root.clone(), root.join("cache"), root.join("rt"))
    };
    let err = source::fetch(&pin("a".repeat(64)), &layout("bad"), &|_| {}).unwrap_err();
    assert!(matches!(err, SourceError::ChecksumMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&good), "names what pip got: {err}");
    assert!(
        !marker.exists(),
        "the sdist's build backend ran before its hash was checked"
    );
    let tree = source::fetch(&pin(good), &layout("good"), &|_| {}).unwrap();
    assert!(tree.join("CMakeLists.txt").is_file());
    assert!(
        marker.exists(),
        "with the pinned hash the backend runs (the check above can fail)"
    );
}
