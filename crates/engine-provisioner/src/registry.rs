//! Engines shared through an OCI registry: a build happens once per
//! fingerprint per fleet.
//!
//! An engine is pushed as one OCI artifact tagged with its fingerprint:
//! the config blob is the entry's `manifest.json` (every build input, every
//! file's sha256), one layer is a deterministic `tar.gz` of the entry, and the
//! manifest's annotations say what the engine needs to run (glibc, CPU
//! features, the CUDA toolkit it was built with).
//!
//! A pull trusts nothing it has not checked: the manifest's fingerprint
//! annotation and the config's fingerprint and inputs must be the ones this
//! machine computed; the layer is fetched resumably and must match its
//! digest; the engine must be able to run here (glibc, CPU features, CUDA
//! driver) and `llama-server --version` must run; the extracted entry must
//! pass the same check as a local build (every file hashed against the
//! manifest, nothing extra, no links). Only then is it renamed into
//! `engines-v1/<fingerprint>/`, with `origin.json` saying where it came from.

use crate::cache::{self, ArtifactCache, Lookup, Manifest};
use llorch_io::fsx;
use llorch_io::oci::{self, OciError, Registry};
use llorch_io::paths::Layout;
use llorch_types::OciRef;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

mod pulled;
mod signing;
use signing::sign_pushed;

pub const ARTIFACT_TYPE: &str = "application/vnd.llama-orch.engine.v1";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.llama-orch.engine.manifest.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.llama-orch.engine.files.v1.tar+gzip";
pub const ANN_FINGERPRINT: &str = "org.llama-orch.fingerprint";
pub const ANN_GLIBC: &str = "org.llama-orch.glibc";
pub const ANN_CPU: &str = "org.llama-orch.cpu-features";
pub const ANN_CUDA: &str = "org.llama-orch.cuda-toolkit";
/// An engine layer larger than this is refused (a CUDA build is a few hundred MB).
pub const MAX_LAYER_BYTES: i64 = 16 << 30;

/// Where engines are shared, from `LLORCH_ENGINE_REGISTRY` or the profile's
/// `engine.registry`.
#[derive(Clone, Debug)]
pub struct EngineRegistry {
    /// The repository (no tag): engines are tagged with their fingerprint.
    pub repo: OciRef,
    pub push: bool,
    pub insecure: bool,
    /// Sign what is pushed with this private key (`LLORCH_SIGNING_KEY`, `--sign-key`).
    pub signing_key: Option<PathBuf>,
    /// Pull only engines signed by this public key (`LLORCH_TRUSTED_KEY`, `--trusted-key`).
    pub trusted_key: Option<PathBuf>,
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

impl EngineRegistry {
    pub fn new(url: &str, push: bool, insecure: bool) -> Result<EngineRegistry, OciError> {
        let repo = OciRef::parse(url)?;
        if repo.tag.is_some() || repo.digest.is_some() {
            return Err(OciError::BadRef(llorch_types::BadOciRef {
                reference: url.into(),
                why: "an engine registry is a repository: engines are tagged with their fingerprint, so give no tag or digest".into(),
            }));
        }
        Ok(EngineRegistry {
            repo,
            push,
            insecure,
            signing_key: env_path("LLORCH_SIGNING_KEY"),
            trusted_key: env_path("LLORCH_TRUSTED_KEY"),
        })
    }

    /// The registry for a profile: `LLORCH_ENGINE_REGISTRY` (push when
    /// `LLORCH_ENGINE_REGISTRY_PUSH=1`) wins over `engine.registry`.
    pub fn configured(
        profile: &llorch_profile::Profile,
    ) -> Result<Option<EngineRegistry>, OciError> {
        if let Ok(url) = std::env::var("LLORCH_ENGINE_REGISTRY") {
            if !url.is_empty() {
                let push = std::env::var("LLORCH_ENGINE_REGISTRY_PUSH").is_ok_and(|v| v == "1");
                let insecure =
                    std::env::var("LLORCH_ENGINE_REGISTRY_INSECURE").is_ok_and(|v| v == "1");
                return EngineRegistry::new(&url, push, insecure).map(Some);
            }
        }
        match &profile.file.engine.registry {
            Some(r) => EngineRegistry::new(&r.url, r.push, r.insecure).map(Some),
            None => Ok(None),
        }
    }

    fn tagged(&self, fp: &str) -> Result<OciRef, OciError> {
        Ok(self.repo.with_tag(fp)?)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error("no cached engine with fingerprint {0} to push: run `cargo xtask engine build` first")]
    NotCached(String),
    #[error("the cached engine {fp} is corrupt ({why}); rebuild it before pushing")]
    Corrupt { fp: String, why: String },
    #[error("the engine at {reference} is not usable: {why}")]
    Rejected { reference: String, why: String },
    #[error("the engine at {reference} cannot run on this machine: {why}")]
    CannotRun { reference: String, why: String },
    #[error("the engine at {reference} {why}\n  hint: {hint}")]
    Signature {
        reference: String,
        why: String,
        hint: String,
    },
    #[error(transparent)]
    Provenance(#[from] crate::provenance::ProvenanceError),
    #[error(transparent)]
    Io(#[from] llorch_io::IoError),
}

use llorch_io::io;

/// What a push did.
#[derive(Debug, serde::Serialize)]
pub struct Pushed {
    pub reference: String,
    pub manifest_digest: String,
    pub layer_bytes: u64,
    pub seconds: f64,
    /// The key id that signed its provenance (attached as a referrer), if signed.
    pub signed_by: Option<String>,
}

/// What a pull did.
#[derive(Debug, serde::Serialize)]
pub struct Pulled {
    pub reference: String,
    pub manifest_digest: String,
    pub layer_bytes: u64,
    pub seconds: f64,
    pub dir: PathBuf,
    /// `verified: signed by key …`, or why signatures were not checked.
    pub signature: String,
}

/// `origin.json` beside a pulled entry's manifest.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    pub registry: String,
    pub manifest_digest: String,
    pub pulled_at: String,
}

/// Where a cached entry came from (`None`: built here).
pub fn origin(dir: &Path) -> Option<Origin> {
    let text = fs_err::read_to_string(dir.join(cache::ORIGIN_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// glibc of this process (`gnu_get_libc_version`), e.g. `2.36`.
pub fn glibc_version() -> Option<String> {
    #[cfg(target_env = "gnu")]
    {
        extern "C" {
            fn gnu_get_libc_version() -> *const std::os::raw::c_char;
        }
        // SAFETY: returns a pointer to a static NUL-terminated string.
        let s = unsafe { std::ffi::CStr::from_ptr(gnu_get_libc_version()) };
        return s.to_str().ok().map(str::to_string);
    }
    #[allow(unreachable_code)]
    None
}

fn version_tuple(v: &str) -> Vec<u32> {
    v.split(['.', '-'])
        .map_while(|p| p.parse::<u32>().ok())
        .collect()
}

/// The x86 features the build's code may use (ggml's instruction options).
pub const CPU_FEATURES: &[&str] = &[
    "sse4_2",
    "avx",
    "avx2",
    "bmi2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
];

/// This CPU's flags from `/proc/cpuinfo` (those in [`CPU_FEATURES`]).
pub fn cpu_features() -> Vec<String> {
    let info = fs_err::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: std::collections::BTreeSet<&str> = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    CPU_FEATURES
        .iter()
        .filter(|f| flags.contains(**f))
        .map(|f| f.to_string())
        .collect()
}

/// What an engine built with `inputs` needs from the CPU: with
/// `GGML_NATIVE=OFF`, ggml's portable baseline (AVX, AVX2, BMI2, FMA, F16C,
/// minus what the flags turn off, plus AVX-512 when turned on); a native
/// build needs everything the build host had.
pub fn required_cpu_features(inputs: &serde_json::Value) -> Vec<String> {
    if !inputs["host_triple"]
        .as_str()
        .is_some_and(|t| t.starts_with("x86_64"))
    {
        return Vec::new();
    }
    let flags: Vec<&str> = inputs["cmake_flags"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let on = |k: &str| flags.contains(&format!("-D{k}=ON").as_str());
    let off = |k: &str| flags.contains(&format!("-D{k}=OFF").as_str());
    if !off("GGML_NATIVE") {
        return cpu_features();
    }
    let mut need = Vec::new();
    for (opt, feats) in [
        ("GGML_AVX", &["avx"][..]),
        ("GGML_AVX2", &["avx2"][..]),
        ("GGML_BMI2", &["bmi2"][..]),
        ("GGML_FMA", &["fma"][..]),
        ("GGML_F16C", &["f16c"][..]),
    ] {
        if !off(opt) {
            need.extend(feats.iter().map(|f| f.to_string()));
        }
    }
    if on("GGML_AVX512") {
        need.extend(["avx512f", "avx512bw", "avx512vl"].map(String::from));
    }
    need
}

/// The CUDA toolkit release (`13.0`) an engine was built with.
fn cuda_toolkit(inputs: &serde_json::Value) -> Option<String> {
    let v = inputs["cuda"]["nvcc_version"].as_str()?;
    // "Cuda compilation tools, release 13.0, V13.0.88" or "13.0.88"
    let rel = v
        .split("release ")
        .nth(1)
        .map(|r| r.split(',').next().unwrap_or(r).trim().to_string())
        .unwrap_or_else(|| {
            version_tuple(v)
                .iter()
                .take(2)
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(".")
        });
    (!rel.is_empty()).then_some(rel)
}

/// Why a pulled engine cannot run on this machine.
#[derive(Debug, thiserror::Error)]
pub enum NotRunnable {
    #[error("it needs glibc {need} or newer; this machine has {have}")]
    Glibc { need: String, have: String },
    #[error("it uses CPU instructions this machine lacks: {}", .0.join(", "))]
    CpuFeatures(Vec<String>),
    #[error("it was built with CUDA {toolkit}; this machine's driver supports CUDA {driver} at most (update the driver)")]
    CudaDriver { toolkit: String, driver: String },
    #[error(transparent)]
    Gpu(#[from] llorch_io::gpu::GpuError),
}

/// Can an engine with these annotations run here? The reason when not.
pub fn runnable_here(ann: &BTreeMap<String, String>) -> Result<(), NotRunnable> {
    if let (Some(need), Some(have)) = (ann.get(ANN_GLIBC), glibc_version()) {
        if version_tuple(&have) < version_tuple(need) {
            return Err(NotRunnable::Glibc {
                need: need.clone(),
                have,
            });
        }
    }
    if let Some(need) = ann.get(ANN_CPU) {
        let have = cpu_features();
        let missing: Vec<String> = need
            .split(',')
            .filter(|f| !f.is_empty() && !have.iter().any(|h| h == f))
            .map(String::from)
            .collect();
        if !missing.is_empty() {
            return Err(NotRunnable::CpuFeatures(missing));
        }
    }
    if let Some(toolkit) = ann.get(ANN_CUDA) {
        let driver = llorch_io::gpu::driver_cuda(llorch_io::gpu::NVIDIA_SMI)?;
        if version_tuple(&driver) < version_tuple(toolkit) {
            return Err(NotRunnable::CudaDriver {
                toolkit: toolkit.clone(),
                driver,
            });
        }
    }
    Ok(())
}

/// A deterministic `tar.gz` of an entry: its manifest and listed files,
/// sorted, with mode bits kept and times, owners and names of users zeroed.
fn pack_entry(dir: &Path, m: &Manifest, out: &Path) -> Result<(), RegistryError> {
    let f = fs_err::File::create(out).map_err(io("pack the engine"))?;
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut t = tar::Builder::new(gz);
    let mut names: Vec<&str> = m.files.keys().map(String::as_str).collect();
    names.push("manifest.json");
    names.sort();
    for rel in names {
        let p = dir.join(rel);
        let meta = fs_err::metadata(&p).map_err(io("pack the engine"))?;
        let mut h = tar::Header::new_gnu();
        h.set_size(meta.len());
        h.set_mode(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o755);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Regular);
        let file = fs_err::File::open(&p).map_err(io("pack the engine"))?;
        t.append_data(&mut h, rel, file)
            .map_err(io(format!("pack {rel}")))?;
    }
    t.into_inner()
        .and_then(|gz| gz.finish())
        .and_then(|f| f.sync_all())
        .map_err(io("finish the engine archive"))?;
    Ok(())
}

/// Publish the cached engine `fp` to `reg`, tagged with the fingerprint.
pub fn push(layout: &Layout, fp: &str, reg: &EngineRegistry) -> Result<Pushed, RegistryError> {
    // Held shared for the whole push: gc cannot remove the entry meanwhile.
    let _lease =
        fsx::FileLock::shared(&layout.engine_lock(fp)).map_err(io("lock the engine entry"))?;
    push_locked(layout, fp, reg)
}

/// [`push`] for a caller that holds the entry's lock already.
pub fn push_locked(
    layout: &Layout,
    fp: &str,
    reg: &EngineRegistry,
) -> Result<Pushed, RegistryError> {
    let t0 = Instant::now();
    let cache = ArtifactCache::new(&layout.cache);
    let m = match cache.lookup(fp, None) {
        Lookup::Fresh(m) => m,
        Lookup::Missing => return Err(RegistryError::NotCached(fp.into())),
        Lookup::Stale(why) => return Err(RegistryError::Corrupt { fp: fp.into(), why }),
    };
    let dir = cache.entry(fp);
    let config = fs_err::read(dir.join("manifest.json")).map_err(io("read manifest.json"))?;
    let tmp = tempfile::Builder::new()
        .prefix(".push-")
        .tempdir_in(layout.bucket(llorch_io::paths::Bucket::Downloads))
        .or_else(|_| {
            fs_err::create_dir_all(layout.bucket(llorch_io::paths::Bucket::Downloads))?;
            tempfile::Builder::new()
                .prefix(".push-")
                .tempdir_in(layout.bucket(llorch_io::paths::Bucket::Downloads))
        })
        .map_err(io("create a staging directory for the push"))?;
    let archive = tmp.path().join("engine.tar.gz");
    pack_entry(&dir, &m, &archive)?;
    let r = reg.tagged(fp)?;
    let client = Registry::connect(&r, reg.insecure)?;
    let mut ann = BTreeMap::new();
    ann.insert(ANN_FINGERPRINT.to_string(), fp.to_string());
    if let Some(g) = glibc_version() {
        ann.insert(ANN_GLIBC.into(), g);
    }
    ann.insert(ANN_CPU.into(), required_cpu_features(&m.inputs).join(","));
    if let Some(c) = cuda_toolkit(&m.inputs) {
        ann.insert(ANN_CUDA.into(), c);
    }
    ann.insert(
        "org.opencontainers.image.created".into(),
        m.built_at.clone(),
    );
    ann.insert(
        "org.opencontainers.image.version".into(),
        m.version_output.lines().next().unwrap_or("").to_string(),
    );
    ann.insert("org.llama-orch.pin".into(), m.pin.clone());
    let pushed = client.push_artifact(
        &r,
        &oci::Artifact {
            artifact_type: ARTIFACT_TYPE,
            config_media_type: CONFIG_MEDIA_TYPE,
            config: &config,
            layer_media_type: LAYER_MEDIA_TYPE,
            layer: &archive,
            layer_annotations: BTreeMap::new(),
            annotations: ann,
            expect_layer_digest: None,
        },
    )?;
    let signed_by = match &reg.signing_key {
        Some(k) => Some(sign_pushed(&client, &r, &dir, k, &pushed)?),
        None => None,
    };
    Ok(Pushed {
        reference: r.to_string(),
        manifest_digest: pushed.manifest_digest,
        layer_bytes: pushed.layer_bytes,
        seconds: t0.elapsed().as_secs_f64(),
        signed_by,
    })
}

/// Fetch engine `fp` from `reg` and install it, verified, as a local build
/// would. `inputs` are the build inputs this machine computed for `fp`. The
/// caller holds the entry's exclusive lock.
pub fn pull(
    layout: &Layout,
    fp: &str,
    inputs: &serde_json::Value,
    reg: &EngineRegistry,
    say: &dyn Fn(&str),
) -> Result<Pulled, RegistryError> {
    let t0 = Instant::now();
    let r = reg.tagged(fp)?;
    let client = Registry::connect(&r, reg.insecure)?;
    // Everything but the archive checked, its signature included, before a
    // byte of the archive is fetched.
    let art = pulled::Artifact::check(&client, &r, fp, inputs, reg)?;
    let downloads = layout.bucket(llorch_io::paths::Bucket::Downloads);
    fs_err::create_dir_all(&downloads).map_err(io("create downloads dir"))?;
    let partial = downloads.join(format!("engine-{fp}.tar.gz.partial"));
    say(&format!(
        "pulling engine {} from {} ({:.1} MB)",
        &fp[..12],
        reg.repo,
        art.layer.size as f64 / 1e6
    ));
    client.pull_to_file(&r, &art.layer, &partial, 6, &|_, _| {})?;
    let cache = ArtifactCache::new(&layout.cache);
    let entry = cache.entry(fp);
    fs_err::create_dir_all(&cache.dir).map_err(io("create engines dir"))?;
    let staging = fsx::staging_dir_for(&entry).map_err(io("create staging dir"))?;
    art.unpack(&partial, staging.path(), fp)?;
    let signature = art.record(staging.path())?;
    fsx::commit_dir(staging, &entry).map_err(io("install the pulled engine"))?;
    let _ = fs_err::remove_file(&partial);
    Ok(Pulled {
        reference: art.reference,
        manifest_digest: art.manifest_digest,
        layer_bytes: art.layer.size as u64,
        seconds: t0.elapsed().as_secs_f64(),
        dir: entry,
        signature,
    })
}

/// Push the entry just built (the caller holds its exclusive lock); a failed push costs one line.
pub(crate) fn push_built(layout: &Layout, fp: &str, reg: &EngineRegistry, say: &dyn Fn(&str)) {
    let short = &fp[..12];
    say(&match push_locked(layout, fp, reg) {
        Ok(p) => format!(
            "pushed engine {short} to {} ({})",
            p.reference, p.manifest_digest
        ),
        Err(e) => format!("could not push engine {short} to {}: {e}", reg.repo),
    });
}
