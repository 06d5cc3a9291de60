//! Builds that reproduce bit for bit, and the check that they do.
//!
//! Every build maps its source and build directories away
//! (`-ffile-prefix-map`, which also covers `__FILE__` and debug info; for
//! CUDA through `-Xcompiler` to nvcc's host compiler) and fixes the clock
//! (`SOURCE_DATE_EPOCH`), so where the cache lives changes no byte of the
//! engine ([`env()`]). [`rebuild`] proves it for one engine: it builds the
//! profile again from its pinned source, in a scratch copy of the tree and a
//! scratch build directory, with no compiler cache (a cache hit returns the
//! bytes it stored and would prove nothing about the compiler), and
//! compares every file with the cached (or pulled) entry: the way a fleet
//! checks a registry without trusting the machine that pushed.

use crate::build::{self, BuildOptions};
use crate::cache::{ArtifactCache, Lookup};
use crate::error::BuildError;
use llorch_io::fsx::FileLock;
use llorch_io::paths::{Bucket, Layout};
use llorch_profile::{Backend, Profile};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What source and build directories become inside the binary.
pub const SRC_MAP: &str = "/llorch/src";
pub const BUILD_MAP: &str = "/llorch/build";
/// The clock every build sees (`__DATE__`, `__TIME__`).
pub const SOURCE_DATE_EPOCH: &str = "0";

/// The environment of configure and compile: the user's `CFLAGS`,
/// `CXXFLAGS` and `CUDAFLAGS` (already in the fingerprint) plus the prefix
/// maps of these two directories, and `SOURCE_DATE_EPOCH`. A directory
/// whose path holds whitespace cannot be written into a flags variable; its
/// map is left out (that build then names its directory).
pub fn env(src: &Path, build_dir: &Path) -> Vec<(String, String)> {
    let mut maps = Vec::new();
    for (dir, to) in [(src, SRC_MAP), (build_dir, BUILD_MAP)] {
        let mut seen = Vec::new();
        for d in [Some(dir.to_path_buf()), dir.canonicalize().ok()]
            .into_iter()
            .flatten()
        {
            let s = d.display().to_string();
            if s.chars().any(char::is_whitespace) || seen.contains(&s) {
                continue;
            }
            maps.push(format!("-ffile-prefix-map={s}={to}"));
            seen.push(s);
        }
    }
    let with = |var: &str, extra: &[String]| {
        let mut v: Vec<String> = std::env::var(var)
            .ok()
            .filter(|s| !s.is_empty())
            .into_iter()
            .collect();
        v.extend(extra.iter().cloned());
        (var.to_string(), v.join(" "))
    };
    let cuda: Vec<String> = maps.iter().map(|m| format!("-Xcompiler={m}")).collect();
    vec![
        with("CFLAGS", &maps),
        with("CXXFLAGS", &maps),
        with("CUDAFLAGS", &cuda),
        ("SOURCE_DATE_EPOCH".into(), SOURCE_DATE_EPOCH.into()),
    ]
}

/// The nvcc launcher's version, recorded in the CUDA inputs.
pub const NVCC_LAUNCHER: &str = "llorch-nvcc-v1";

/// nvcc's own objects vary with where the build runs, beyond what the host
/// compiler's prefix maps cover. Measured on CUDA 13.0 (one kernel compiled
/// in two directories, `docs/gpu/nvcc_determinism.sh`): its temporary files
/// are named after its pid (`tmpxft_<pid>_…`), and the hash in every
/// anonymous namespace's mangled name follows the absolute source path it
/// hands cudafe++ (`--orig_src_path_name`). This launcher adds, per object,
/// `--frandom-seed=<object>` (CUDA 12.9+) and that source path mapped as the
/// prefix maps map it, and runs nvcc under sccache, whose own steps name
/// the temporaries the same in any directory: objects identical. (nvcc's
/// `-objtemp` does that alone, but sccache cannot run nvcc with it: it reads
/// `-objtemp` as `-o bjtemp`, and the long form fails in its steps.) Written
/// into the build directory; CMake runs `launcher sccache nvcc …`.
const NVCC_LAUNCHER_SH: &str = r#"#!/bin/sh
# llama-orch: nvcc launcher for reproducible CUDA objects (engine-provisioner/src/reproduce.rs)
src= obj= prev=
for a in "$@"; do
  [ "$prev" = "-o" ] && obj=$a
  case "$a" in *.cu) src=$a ;; esac
  prev=$a
done
[ -n "$src" ] && [ -n "$obj" ] || exec "$@"
case "$src" in
  "$LLORCH_NVCC_SRC"/*) mapped="/llorch/src${src#"$LLORCH_NVCC_SRC"}" ;;
  "$LLORCH_NVCC_BUILD"/*) mapped="/llorch/build${src#"$LLORCH_NVCC_BUILD"}" ;;
  *) mapped=$src ;;
esac
# Right after nvcc itself.
n=$#
for a in "$@"; do
  set -- "$@" "$a"
  case "$a" in
    nvcc|*/nvcc) set -- "$@" "--frandom-seed=$obj" -Xcudafe "--orig_src_path_name=$mapped" -Xcicc "--orig_src_path_name=$mapped" ;;
  esac
done
shift "$n"
exec "$@"
"#;

/// Whether this nvcc gets the launcher: `--frandom-seed` is CUDA 12.9+.
pub fn nvcc_launcher_for(nvcc_version: &str) -> Option<String> {
    let v = crate::cuda::toolkit_version(nvcc_version)?;
    (v >= (12, 9)).then(|| NVCC_LAUNCHER.to_string())
}

/// The CUDA compiler launcher a plan already has (the compiler cache's sccache).
pub fn cuda_launcher_of(plan: &crate::build::BuildPlan) -> Option<String> {
    plan.extra_flags
        .iter()
        .rev()
        .find_map(|f| f.strip_prefix(CUDA_LAUNCHER))
        .filter(|r| !r.is_empty())
        .map(str::to_string)
}

const CUDA_LAUNCHER: &str = "-DCMAKE_CUDA_COMPILER_LAUNCHER=";

/// Write the launcher into `build_dir` and make `launcher;sccache` the CUDA
/// compiler launcher.
pub fn use_nvcc_launcher(
    plan: &mut crate::build::BuildPlan,
    src: &Path,
    build_dir: &Path,
    sccache: &Path,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs_err::create_dir_all(build_dir)?;
    let script = build_dir.join("llorch-nvcc-launcher.sh");
    fs_err::write(&script, NVCC_LAUNCHER_SH)?;
    fs_err::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    plan.extra_flags.retain(|f| !f.starts_with(CUDA_LAUNCHER));
    plan.extra_flags.push(format!(
        "{CUDA_LAUNCHER}{};{}",
        script.display(),
        sccache.display()
    ));
    plan.extra_env
        .push(("LLORCH_NVCC_SRC".into(), src.display().to_string()));
    plan.extra_env
        .push(("LLORCH_NVCC_BUILD".into(), build_dir.display().to_string()));
    Ok(())
}

/// One file of the engine, cached against rebuilt.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FileCompare {
    pub file: String,
    pub same: bool,
    pub cached_sha256: Option<String>,
    pub rebuilt_sha256: Option<String>,
    pub cached_bytes: Option<u64>,
    pub rebuilt_bytes: Option<u64>,
    /// Byte ranges `[start, end)` that differ (the first 16).
    pub ranges: Vec<(u64, u64)>,
    pub differing_bytes: u64,
}

/// The outcome of [`rebuild`].
#[derive(Clone, Debug, Serialize)]
pub struct Reproduction {
    pub profile: String,
    pub fingerprint: String,
    pub cached: PathBuf,
    pub reproduced: bool,
    pub files: Vec<FileCompare>,
    pub rebuild_s: f64,
    /// Why it may differ, when the profile asks for something known not to
    /// reproduce (PTX embedded by a CUDA engine).
    pub notes: Vec<String>,
}

/// Compare two files byte by byte: the differing ranges (the first 16) and
/// how many bytes differ (a length difference counts as differing bytes).
pub fn diff_files(a: &Path, b: &Path) -> std::io::Result<(Vec<(u64, u64)>, u64)> {
    use std::io::Read;
    let mut fa = std::io::BufReader::new(fs_err::File::open(a)?);
    let mut fb = std::io::BufReader::new(fs_err::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    let (mut ranges, mut differing, mut pos) = (Vec::new(), 0u64, 0u64);
    let mut open: Option<u64> = None;
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        let n = na.max(nb);
        if n == 0 {
            break;
        }
        for i in 0..n {
            let differs = i >= na || i >= nb || ba[i] != bb[i];
            let at = pos + i as u64;
            match (differs, open) {
                (true, None) => open = Some(at),
                (false, Some(s)) => {
                    if ranges.len() < 16 {
                        ranges.push((s, at));
                    }
                    open = None;
                }
                _ => {}
            }
            differing += differs as u64;
        }
        pos += n as u64;
        fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
            let mut got = 0;
            while got < buf.len() {
                match r.read(&mut buf[got..])? {
                    0 => break,
                    k => got += k,
                }
            }
            Ok(got)
        }
    }
    if let Some(s) = open {
        if ranges.len() < 16 {
            ranges.push((s, pos));
        }
    }
    Ok((ranges, differing))
}

/// Compare two engine directories over the union of their manifests' files.
pub fn compare(
    cached_dir: &Path,
    cached: &std::collections::BTreeMap<String, String>,
    rebuilt_dir: &Path,
    rebuilt: &std::collections::BTreeMap<String, String>,
) -> std::io::Result<Vec<FileCompare>> {
    let mut names: Vec<&String> = cached.keys().chain(rebuilt.keys()).collect();
    names.sort();
    names.dedup();
    let size = |d: &Path, f: &str| fs_err::metadata(d.join(f)).ok().map(|m| m.len());
    let mut out = Vec::new();
    for f in names {
        let (a, b) = (cached.get(f), rebuilt.get(f));
        let same = a.is_some() && a == b;
        let (ranges, differing) = if !same && a.is_some() && b.is_some() {
            diff_files(&cached_dir.join(f), &rebuilt_dir.join(f))?
        } else {
            (Vec::new(), 0)
        };
        out.push(FileCompare {
            file: f.clone(),
            same,
            cached_sha256: a.cloned(),
            rebuilt_sha256: b.cloned(),
            cached_bytes: size(cached_dir, f),
            rebuilt_bytes: size(rebuilt_dir, f),
            ranges,
            differing_bytes: differing,
        });
    }
    Ok(out)
}

/// Copy a directory tree (symlinks as symlinks; nothing else but files and dirs).
pub(crate) fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    fs_err::create_dir_all(to)?;
    for e in fs_err::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let t = e.file_type()?;
        if t.is_symlink() {
            fs_err::os::unix::fs::symlink(fs_err::read_link(&src)?, &dst)?;
        } else if t.is_dir() {
            copy_tree(&src, &dst)?;
        } else if t.is_file() {
            fs_err::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// Scratch directories of rebuilds whose process is gone (Ctrl-C, a crash).
fn sweep_scratch(build_bucket: &Path) {
    for e in fs_err::read_dir(build_bucket)
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("verify-")
            .and_then(|r| r.rsplit('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs_err::remove_dir_all(e.path());
        }
    }
}

/// Removes the scratch directory however the rebuild ends (kept, for
/// comparing objects by hand, when `LLORCH_VERIFY_KEEP=1`).
struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("LLORCH_VERIFY_KEEP").is_some_and(|v| v == "1") {
            llorch_io::info!("kept the scratch rebuild at {}", self.0.display());
            return;
        }
        let _ = fs_err::remove_dir_all(&self.0);
    }
}

/// Rebuild the profile's engine from its pinned source in scratch
/// directories, without a compiler cache, and compare every file with the
/// cached entry of the same fingerprint (built here or pulled).
pub fn rebuild(
    profile: &Profile,
    layout: &Layout,
    opts: &BuildOptions,
) -> Result<Reproduction, BuildError> {
    let started = Instant::now();
    let started_at = llorch_io::now_rfc3339();
    let say = |m: &str| opts.report.info(m);
    let mut plan = match build::plan(profile, &opts.toolbox) {
        Ok(p) => p,
        Err(_) => {
            crate::preflight::ensure(profile, &opts.toolbox, say)?;
            build::plan(profile, &opts.toolbox)?
        }
    };
    // No compiler cache: the compiler itself must give these bytes.
    plan.extra_flags
        .retain(|f| !f.contains("_COMPILER_LAUNCHER="));
    let fp = plan.fingerprint.clone();
    let cache = ArtifactCache::new(&layout.cache);
    use llorch_io::io;
    // Held shared for the whole check: `engine gc` cannot remove the entry meanwhile.
    let _lock =
        FileLock::shared(&layout.engine_lock(&fp)).map_err(io("lock engine cache entry"))?;
    let cached = match cache.lookup(&fp, Some(&plan.inputs)) {
        Lookup::Fresh(m) => m,
        Lookup::Stale(why) => {
            return Err(BuildError::CachedCorrupt {
                fingerprint: fp[..12].to_string(),
                profile: profile.name.clone(),
                why,
            })
        }
        Lookup::Missing => {
            return Err(BuildError::NotCached {
                fingerprint: fp[..12].to_string(),
                profile: profile.name.clone(),
            })
        }
    };
    crate::preflight::ensure(profile, &opts.toolbox, say)?;
    let src = match &opts.source_bundle {
        Some(b) => crate::bundle::unpack_for_build(b, &profile.pin, layout, &say)?,
        None => crate::source::fetch(&profile.pin, layout, &say)?,
    };
    let bucket = layout.bucket(Bucket::Build);
    fs_err::create_dir_all(&bucket).map_err(io("create build bucket"))?;
    sweep_scratch(&bucket);
    let scratch = Scratch(bucket.join(format!("verify-{}-{}", &fp[..12], std::process::id())));
    let _ = fs_err::remove_dir_all(&scratch.0);
    let tree = scratch.0.join("src");
    say(&format!(
        "rebuilding {} (fingerprint {}) in {} from a copy of {}, no compiler cache",
        profile.name,
        &fp[..12],
        scratch.0.display(),
        src.display()
    ));
    copy_tree(&src, &tree).map_err(io("copy the source tree"))?;
    let entry = scratch.0.join("engine");
    let (rebuilt, _, _) = build::compile_and_install(
        profile,
        layout,
        &plan,
        &tree,
        &scratch.0.join("build"),
        &entry,
        opts,
        &say,
    )?;
    let dir = cache.entry(&fp);
    let files = compare(&dir, &cached.files, &entry, &rebuilt.files)
        .map_err(io("compare the rebuilt engine"))?;
    let reproduced = files.iter().all(|f| f.same);
    if reproduced {
        // A second statement: this builder reproduced the entry.
        use crate::provenance as p;
        let manifest = fs_err::read(dir.join("manifest.json")).map_err(io("read manifest.json"))?;
        let build: Option<serde_json::Value> = fs_err::read(dir.join(p::FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let statement =
            p::reproduced_statement(build.as_ref(), &manifest, &fp, &started_at, files.len());
        llorch_io::fsx::write_atomic(
            &dir.join(p::REPRODUCED_FILE),
            serde_json::to_string_pretty(&statement)
                .expect("a statement serializes")
                .as_bytes(),
        )
        .map_err(io("write reproduced.json"))?;
    } else {
        // What no longer holds is not claimed.
        let _ = fs_err::remove_file(dir.join(crate::provenance::REPRODUCED_FILE));
    }
    let engine = &profile.file.engine;
    let notes = match engine.backend {
        Backend::Cuda if !reproduced => crate::cuda::ptx_note(&engine.cuda_archs)
            .into_iter()
            .collect(),
        _ => Vec::new(),
    };
    Ok(Reproduction {
        profile: profile.name.clone(),
        fingerprint: fp,
        cached: dir,
        reproduced,
        files,
        rebuild_s: started.elapsed().as_secs_f64(),
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The launcher hands nvcc the object-named temporaries, the seed and
    /// the mapped source path, and leaves other commands alone (a stand-in
    /// nvcc prints what it got).
    #[test]
    fn the_nvcc_launcher_adds_what_makes_objects_reproducible() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let nvcc = d.path().join("nvcc");
        fs_err::write(&nvcc, "#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done\n").unwrap();
        fs_err::set_permissions(&nvcc, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut plan = crate::build::BuildPlan {
            inputs: serde_json::from_value(serde_json::json!({
                "schema": 3, "source": {"kind": "archive", "id": "x", "commit": "c", "subdir": null},
                "cmake_flags": [], "build_type": "Release", "targets": [], "c_compiler": "",
                "cxx_compiler": "", "compiler_runtime": "", "cmake_version": "", "cuda": null, "host_triple": "", "env": {}
            }))
            .unwrap(),
            fingerprint: String::new(),
            generator: "Ninja".into(),
            extra_flags: vec!["-DCMAKE_CUDA_COMPILER_LAUNCHER=/x/sccache".into()],
            extra_env: vec![],
        };
        let (src, build) = (Path::new("/w/src"), d.path().join("build"));
        assert_eq!(cuda_launcher_of(&plan).as_deref(), Some("/x/sccache"));
        use_nvcc_launcher(&mut plan, src, &build, Path::new("/x/sccache")).unwrap();
        let script = build.join("llorch-nvcc-launcher.sh");
        assert_eq!(
            plan.extra_flags,
            vec![format!(
                "-DCMAKE_CUDA_COMPILER_LAUNCHER={};/x/sccache",
                script.display()
            )]
        );
        let run = |args: &[&str]| {
            let mut c = llorch_io::cmd::Cmd::new(&script)
                .arg("sh")
                .arg("-c")
                .arg("for a in \"$@\"; do echo \"$a\"; done")
                .arg("x")
                .args(args);
            for (k, v) in &plan.extra_env {
                c = c.env(k, v);
            }
            c.read().unwrap()
        };
        // As CMake runs it: the launcher, then nvcc (a path ending in /nvcc), then its arguments.
        let nv = nvcc.display().to_string();
        let got = run(&[
            &nv,
            "-x",
            "cu",
            "-c",
            "/w/src/ggml/src/ggml-cuda/acc.cu",
            "-o",
            "ggml/CMakeFiles/acc.cu.o",
        ]);
        assert_eq!(
            got,
            format!("{nv}\n--frandom-seed=ggml/CMakeFiles/acc.cu.o\n-Xcudafe\n--orig_src_path_name=/llorch/src/ggml/src/ggml-cuda/acc.cu\n-Xcicc\n--orig_src_path_name=/llorch/src/ggml/src/ggml-cuda/acc.cu\n-x\ncu\n-c\n/w/src/ggml/src/ggml-cuda/acc.cu\n-o\nggml/CMakeFiles/acc.cu.o")
        );
        // Not a compile of a .cu file: passed through untouched.
        assert_eq!(run(&[&nv, "--version"]), format!("{nv}\n--version"));
        assert_eq!(nvcc_launcher_for("12.8.93"), None);
        assert_eq!(nvcc_launcher_for("13.0.88").as_deref(), Some(NVCC_LAUNCHER));
    }

    #[test]
    fn differing_ranges_are_found_and_counted() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let mut x = vec![7u8; 200_000];
        fs_err::write(&a, &x).unwrap();
        fs_err::write(&b, &x).unwrap();
        assert_eq!(diff_files(&a, &b).unwrap(), (vec![], 0));
        x[10] = 0;
        x[11] = 0;
        x[150_000] = 1;
        fs_err::write(&b, &x).unwrap();
        assert_eq!(
            diff_files(&a, &b).unwrap(),
            (vec![(10, 12), (150_000, 150_001)], 3)
        );
        x.truncate(199_990);
        fs_err::write(&b, &x).unwrap();
        let (r, n) = diff_files(&a, &b).unwrap();
        assert_eq!(r.last(), Some(&(199_990, 200_000)));
        assert_eq!(n, 3 + 10);
    }

    #[test]
    fn the_environment_maps_both_directories_and_fixes_the_clock() {
        let e = env(Path::new("/c/src-v1/x"), Path::new("/c/build-v1/fp"));
        let get = |k: &str| e.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert!(get("CFLAGS").contains("-ffile-prefix-map=/c/src-v1/x=/llorch/src"));
        assert!(get("CXXFLAGS").contains("-ffile-prefix-map=/c/build-v1/fp=/llorch/build"));
        assert!(get("CUDAFLAGS").contains("-Xcompiler=-ffile-prefix-map=/c/src-v1/x=/llorch/src"));
        assert_eq!(get("SOURCE_DATE_EPOCH"), "0");
        let e = env(Path::new("/c/my src"), Path::new("/c/b"));
        assert!(!e[0].1.contains("my src"), "{:?}", e[0]);
    }
}
