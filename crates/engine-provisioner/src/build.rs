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

use crate::cache::{ArtifactCache, Lookup, Manifest};
use crate::error::BuildError;
use crate::fingerprint::{self, BuildInputs, CudaInputs, InputChange};
use crate::preflight::{self, first_line, Toolbox};
use crate::source;
use llorch_io::cmd::Cmd;
use llorch_io::fsx::FileLock;
use llorch_io::paths::Layout;
use llorch_profile::{Backend, Profile};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

pub(crate) use crate::compile::{compile_and_install, compiler_cache, reuse, WorkDir};

pub const TARGET: &str = "llama-server";

pub(crate) use llorch_io::io;

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
    /// What this call may print: progress, warnings.
    pub report: llorch_io::report::Reporter,
    /// Compile through the compiler cache: `None` lets `LLORCH_COMPILE_CACHE`
    /// decide (on unless `off`); `Some` decides for this build alone (a bench
    /// measuring cold builds, a test that must not depend on the caller's
    /// environment).
    pub compile_cache: Option<bool>,
    /// Never build: take the engine from this directory of prebuilt entries
    /// (`engines-v1/<fingerprint>/`, a container image's), checked as a
    /// cache hit is ([`crate::prebuilt`]).
    pub prebuilt: Option<PathBuf>,
}

impl BuildOptions {
    /// Defaults, without progress output (tests, `--json`, benches).
    pub fn quiet() -> Self {
        BuildOptions {
            report: llorch_io::report::Reporter::QUIET,
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

/// Compute the build inputs from the profile and the tools on this machine.
/// Returns `None` for a tool that is missing (run preflight first).
pub fn plan(profile: &Profile, tb: &Toolbox) -> Result<BuildPlan, BuildError> {
    let missing = |t: &str| BuildError::ToolMissing {
        tool: t.to_string(),
        profile: profile.name.clone(),
    };
    let cmake = tb.find("cmake").ok_or_else(|| missing("cmake"))?;
    let cmake_version = Cmd::new(&cmake)
        .arg("--version")
        .read()
        .map(|s| first_line(&s))
        .map_err(Box::new)?;
    let (c_path, c) = crate::compilers::compiler_identity(tb, "CC", &["cc", "gcc", "clang"])
        .ok_or_else(|| missing("a C compiler"))?;
    let (cxx_path, cxx) =
        crate::compilers::compiler_identity(tb, "CXX", &["c++", "g++", "clang++"])
            .ok_or_else(|| missing("a C++ compiler"))?;
    let compiler_runtime = crate::compilers::compiler_runtime(&c_path, &cxx_path);
    let generator = if tb.find("ninja").is_some() {
        "Ninja"
    } else {
        "Unix Makefiles"
    };
    let mut flags = base_flags(profile);
    flags.extend(profile.file.engine.cmake_flags.iter().cloned());
    let cmake_flags = llorch_profile::normalize_flags(&flags)?;
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
        )?;
        extra_flags.push(format!("-DCMAKE_CUDA_COMPILER={}", nvcc.display()));
        let host = crate::cuda::choose_host_compiler(&nvcc, tb)?;
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
        compiler_runtime,
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
    if let Some(root) = &opts.prebuilt {
        return Ok(crate::prebuilt::find(profile, root)?);
    }
    let started = Instant::now();
    let say = |m: &str| opts.report.info(m);
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
    let reason = match why_build(&cache, &fp, &plan.inputs, &say) {
        Ok(m) => return Ok(hit(m)),
        Err(reason) => reason,
    };
    let registry = crate::registry::EngineRegistry::configured(profile).map_err(|e| {
        BuildError::RegistryConfig {
            profile: profile.name.clone(),
            source: Box::new(e),
        }
    })?;
    if let Some((m, how)) = from_elsewhere(opts, layout, &cache, &plan, registry.as_ref(), &say) {
        return Ok(present(m, Some(how)));
    }
    say(&format!(
        "building llama-server for profile `{}` (fingerprint {}): {reason}",
        profile.name,
        &fp[..12]
    ));
    preflight::ensure(profile, &opts.toolbox, say)?;
    let entry = cache.entry(&fp);
    let Compiled {
        manifest,
        configure_s,
        build_s,
        compile_cache,
    } = compile_fresh(profile, layout, opts, plan, &entry, &say)?;
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
        crate::registry::push_built(layout, &fp, reg, &say);
    }
    Ok(BuildOutcome {
        cache_hit: false,
        cmake_invocations: 2,
        compile_cache,
        ..present(Box::new(manifest), Some(reason))
    })
}

/// Under the entry's exclusive lock: the fresh entry another build just
/// wrote (`Ok`), or why this one must be built (`Err`).
fn why_build(
    cache: &ArtifactCache,
    fp: &str,
    inputs: &BuildInputs,
    say: &dyn Fn(&str),
) -> Result<Box<Manifest>, String> {
    match cache.lookup(fp, Some(inputs)) {
        Lookup::Fresh(m) => Ok(m),
        Lookup::Stale(why) => {
            say(&format!(
                "cached engine {} is corrupt ({why}): rebuilding",
                &fp[..12]
            ));
            Err(format!("cached entry corrupt: {why}"))
        }
        Lookup::Missing => Err(match closest(cache, inputs) {
            Some((cfp, changes)) => format!(
                "no cached build with these inputs; closest is {} ({})",
                &cfp[..12],
                describe_changes(&changes)
            ),
            None => "no cached build yet".to_string(),
        }),
    }
}

/// The entry copied in instead of compiled, and how: from another cache on
/// this machine (the user's, for the test suite) that holds the
/// fingerprint, else from a registry that has it (one that is down or
/// lacks it costs one line).
fn from_elsewhere(
    opts: &BuildOptions,
    layout: &Layout,
    cache: &ArtifactCache,
    plan: &BuildPlan,
    registry: Option<&crate::registry::EngineRegistry>,
    say: &dyn Fn(&str),
) -> Option<(Box<Manifest>, String)> {
    let fp = &plan.fingerprint;
    if let Some(other) = &opts.reuse_from {
        match reuse(other, fp, &plan.inputs, cache) {
            Ok(m) => {
                say(&format!(
                    "reused engine {} from {} (checked against its manifest)",
                    &fp[..12],
                    other.display()
                ));
                return Some((m, format!("reused from {}", other.display())));
            }
            Err(why) => say(&format!(
                "not reusing engine {} from {}: {why}",
                &fp[..12],
                other.display()
            )),
        }
    }
    let reg = registry?;
    let inputs = serde_json::to_value(&plan.inputs).unwrap_or_default();
    match crate::registry::pull(layout, fp, &inputs, reg, &say) {
        Ok(p) => {
            if let Lookup::Fresh(m) = cache.lookup(fp, Some(&plan.inputs)) {
                say(&format!(
                    "pulled engine {} from {} ({:.1} MB in {:.1}s)",
                    &fp[..12],
                    p.reference,
                    p.layer_bytes as f64 / 1e6,
                    p.seconds
                ));
                return Some((
                    m,
                    format!("pulled from {} ({})", p.reference, p.manifest_digest),
                ));
            }
        }
        Err(e) => say(&format!(
            "engine registry {}: {e}; building from source",
            reg.repo
        )),
    }
    None
}

/// What [`compile_fresh`] made: the entry's manifest, the two CMake steps'
/// seconds, what the compiler cache saved.
struct Compiled {
    manifest: Manifest,
    configure_s: f64,
    build_s: f64,
    compile_cache: Option<crate::compile_cache::CompileStats>,
}

/// Fetch the source, compile and install into `entry` (the compiler cache
/// first, where there is one).
fn compile_fresh(
    profile: &Profile,
    layout: &Layout,
    opts: &BuildOptions,
    mut plan: BuildPlan,
    entry: &std::path::Path,
    say: &dyn Fn(&str),
) -> Result<Compiled, BuildError> {
    let src = match &opts.source_bundle {
        Some(b) => crate::bundle::unpack_for_build(b, &profile.pin, layout, &say)?,
        None => source::fetch(&profile.pin, layout, &say)?,
    };
    let work = WorkDir::enter(layout, &plan.fingerprint, &src, &say)?;
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
        entry,
        opts,
        &say,
    )?;
    let compile_cache = cc
        .as_ref()
        .zip(before)
        .and_then(|(c, b)| Some(c.stats()?.since(&b)));
    Ok(Compiled {
        manifest,
        configure_s,
        build_s,
        compile_cache,
    })
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
        .map_err(|e| BuildError::Registry(Box::new(e)))
}
