//! `cargo xtask image build`: an OCI image built from the fingerprinted
//! engine as cached, the llama-orch binary that serves it, and their
//! runtime closure; no base image, no daemon.
//!
//! Layers, in order:
//! 1. `closure`: the shared libraries `ldd` names for the engines and the
//!    llama-orch binary, the ELF interpreter, CA certificates;
//! 2. `engines`: each pool's engine entry, byte for byte as cached, at
//!    `/opt/llorch/prebuilt/engines-v1/<fingerprint>/` (its manifest and
//!    every file's sha256 come along and are checked at start);
//! 3. `llorch`: `/usr/local/bin/llorch`, the pins file, each pool's profile
//!    and `/opt/llorch/image.json` ([`ImageSpec`]: the pools, what each
//!    expects of its model, and where every other file came from).
//!
//! The entrypoint is `llorch serve --in-image`: the same `serve` users run,
//! with the engine taken from the prebuilt directory (never built) and the
//! model from `$LLORCH_MODEL`, verified against the digest baked in before
//! anything starts. Models are never in the image.
//!
//! Reproducible: every layer is a deterministic tar ([`crate::layer`]), and
//! the config, manifest and index are canonical JSON without timestamps, so
//! the same engine, binary, closure and profiles give the same digest in any
//! cache directory and on any machine with the same files.

use crate::closure;
use crate::layer::{Layer, LayerBlob, Source, COMPRESSOR};
use crate::spec::{Explained, ImagePool, ImageSpec, SPEC_SCHEMA};
use crate::DeployError;
use engine_provisioner::{BuildOptions, BuildOutcome};
use llorch_io::paths::Layout;
use llorch_profile::stack::Stack;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const IMAGE_ROOT: &str = "/opt/llorch";
/// Below [`IMAGE_ROOT`]: the prebuilt engines (`engines-v1/<fp>/`).
pub const PREBUILT: &str = "prebuilt";
/// Below [`IMAGE_ROOT`]: the image's description.
pub const SPEC_FILE: &str = "image.json";
pub const BINARY: &str = "/usr/local/bin/llorch";
/// The writable state (cache, run files): a volume (`emptyDir`).
pub const STATE_DIR: &str = "/var/lib/llorch";
pub const MODELS_DIR: &str = "/models";
pub const DEFAULT_MODEL: &str = "/models/model.gguf";
pub const USER: &str = "65532:65532";
pub const DEFAULT_PORT: u16 = 8080;
pub const CA_CERTS: &str = "/etc/ssl/certs/ca-certificates.crt";

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// How to build the image.
#[derive(Clone, Debug)]
pub struct ImageOptions {
    /// The OCI image layout directory to write (replaced whole, atomically).
    pub out: PathBuf,
    /// The tag recorded in `index.json` (`org.opencontainers.image.ref.name`).
    pub tag: String,
    /// The llama-orch binary the image runs (the running `cargo xtask`).
    pub binary: PathBuf,
    /// What this call may print: progress, warnings.
    pub report: llorch_io::report::Reporter,
}

/// A built image.
#[derive(Clone, Debug, Serialize)]
pub struct BuiltImage {
    pub dir: PathBuf,
    pub tag: String,
    /// `sha256:…` of the manifest: the image's digest.
    pub digest: String,
    pub config_digest: String,
    pub layers: Vec<LayerBlob>,
    /// Compressed bytes of all layers.
    pub size: u64,
    pub labels: BTreeMap<String, String>,
    pub pools: Vec<ImagePool>,
}

/// The OCI architecture name of this machine.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Build (or reuse) each pool's engine, learn each model's digest, and write
/// the image layout to `opts.out`.
pub fn build(
    layout: &Layout,
    stack: &Stack,
    opts: &ImageOptions,
) -> Result<BuiltImage, DeployError> {
    let say = |m: &str| opts.report.info(m);
    let mut pools = Vec::new();
    let mut engines: Vec<(BuildOutcome, String)> = Vec::new();
    for p in &stack.pools {
        crate::names::check_pool_id(p.id.as_str())?;
        let prof = &p.profile;
        say(&format!(
            "image: pool {}: engine for profile {}",
            p.id, prof.name
        ));
        let engine = engine_provisioner::build(
            prof,
            layout,
            &BuildOptions {
                report: opts.report,
                ..Default::default()
            },
        )?;
        let model = prof
            .file
            .model
            .as_ref()
            .ok_or_else(|| DeployError::NoModel(prof.name.clone()))?;
        let model_sha256 = match &model.sha256 {
            Some(d) => d.clone(),
            None => {
                say(&format!(
                    "image: pool {}: learning the digest of {}",
                    p.id, model.reference
                ));
                model_provisioner::ModelStore::new(layout)
                    .fetch(
                        &model.reference,
                        &model_provisioner::FetchOptions {
                            report: opts.report,
                            ..Default::default()
                        },
                    )?
                    .metadata
                    .digest
            }
        };
        let profile_bytes =
            fs_err::read(&prof.path).map_err(llorch_io::io("read a profile for the image"))?;
        let profile_rel = format!("requirements/{}.yaml", p.id);
        let c = p.concurrency;
        if c.auto.any() {
            // Chosen on the machine that serves, from its memory: an image
            // records the counts it serves with.
            return Err(DeployError::BadName {
                key: "slots".into(),
                value: "auto".into(),
                why: format!("pool `{}` leaves slots or replicas to auto; an image needs them named (bench tune on the target says which)", p.id),
            });
        }
        pools.push(ImagePool {
            id: p.id.to_string(),
            profile: profile_rel.clone(),
            profile_sha256: llorch_io::digest::sha256_bytes(&profile_bytes),
            fingerprint: engine.fingerprint.clone(),
            pin: prof.pin_name.clone(),
            backend: prof.file.engine.backend.as_str().to_string(),
            model_sha256,
            model_ref: model.reference.clone(),
            mode: c.mode.as_str().to_string(),
            slots: c.slots,
            replicas: c.replicas,
            affinity: c.affinity.as_str().to_string(),
            ctx_size: prof.file.server.ctx_size,
            threads: prof.file.server.threads,
        });
        engines.push((engine, profile_rel));
    }
    let cuda = stack
        .pools
        .iter()
        .any(|p| p.profile.file.engine.backend == llorch_profile::Backend::Cuda);
    write_image(layout, stack, opts, pools, &engines, cuda)
}

fn write_image(
    layout: &Layout,
    stack: &Stack,
    opts: &ImageOptions,
    pools: Vec<ImagePool>,
    engines: &[(BuildOutcome, String)],
    cuda: bool,
) -> Result<BuiltImage, DeployError> {
    let mut explained: Vec<Explained> = Vec::new();
    let base = closure_layer(opts, engines, cuda, &mut explained)?;
    let eng = engines_layer(engines, &mut explained)?;
    let top = llorch_layer(layout, stack, opts, engines, &pools, explained)?;
    write_layout(opts, pools, [&base, &eng, &top], cuda)
}

/// Record where an image file comes from, with its sha256.
fn explain(
    to: &mut Vec<Explained>,
    path: &str,
    origin: String,
    src: &Path,
) -> Result<(), DeployError> {
    to.push(Explained {
        path: path.to_string(),
        origin,
        sha256: llorch_io::digest::sha256_file(src)
            .map_err(llorch_io::io("hash a file for the image"))?,
    });
    Ok(())
}

/// The runtime closure of every engine and of llama-orch: the ELF
/// interpreter, the shared libraries `ldd` names, CA certificates.
fn closure_layer(
    opts: &ImageOptions,
    engines: &[(BuildOutcome, String)],
    cuda: bool,
    explained: &mut Vec<Explained>,
) -> Result<Layer, DeployError> {
    let mut bins: Vec<(String, PathBuf)> = Vec::new();
    for (e, _) in engines {
        let label = format!("llama-server {}", &e.fingerprint[..12]);
        if !bins.iter().any(|(l, _)| *l == label) {
            bins.push((label, e.binary.clone()));
        }
    }
    bins.push(("llorch".into(), opts.binary.clone()));
    let bin_refs: Vec<(&str, &Path)> = bins
        .iter()
        .map(|(l, p)| (l.as_str(), p.as_path()))
        .collect();
    let extra = if cuda { cuda_lib_dirs() } else { Vec::new() };
    let cl = closure::of(&bin_refs, &extra)?;
    let mut base = Layer::new("closure");
    for (path, real) in &cl.interpreters {
        base.file(path, Source::File(real.clone()), true)?;
        explain(
            explained,
            path,
            format!("ELF interpreter, from {}", real.display()),
            real,
        )?;
    }
    for (name, real) in &cl.libraries {
        let at = format!("{}/{name}", cl.lib_dir);
        base.file(&at, Source::File(real.clone()), false)?;
        let by = cl
            .needed_by
            .get(name)
            .map(|v| v.join(", "))
            .unwrap_or_default();
        explain(
            explained,
            &at,
            format!("shared library needed by {by}, from {}", real.display()),
            real,
        )?;
    }
    let ca = Path::new(CA_CERTS);
    if ca.is_file() {
        base.file(CA_CERTS, Source::File(ca.to_path_buf()), false)?;
        explain(
            explained,
            CA_CERTS,
            format!("CA certificates, from {CA_CERTS}"),
            ca,
        )?;
    }
    Ok(base)
}

/// Each engine's cache entry, byte for byte, under the prebuilt directory
/// (pools of one build share one entry).
fn engines_layer(
    engines: &[(BuildOutcome, String)],
    explained: &mut Vec<Explained>,
) -> Result<Layer, DeployError> {
    let mut eng = Layer::new("engines");
    let mut added = std::collections::BTreeSet::new();
    for (e, _) in engines
        .iter()
        .filter(|(e, _)| added.insert(e.fingerprint.clone()))
    {
        let dest = format!("{IMAGE_ROOT}/{PREBUILT}/engines-v1/{}", e.fingerprint);
        eng.tree(&dest, &e.dir)?;
        for (path, node) in eng.nodes() {
            if let (
                true,
                crate::layer::Node::File {
                    source: Source::File(src),
                    ..
                },
            ) = (path.starts_with(&dest), node)
            {
                explain(
                    explained,
                    path,
                    format!(
                        "engine {} as cached (its manifest lists this file)",
                        e.fingerprint
                    ),
                    src,
                )?;
            }
        }
    }
    Ok(eng)
}

/// The llama-orch binary, the pins file, the pools' profiles, the state
/// directories, and `image.json` naming every file of the image.
fn llorch_layer(
    layout: &Layout,
    stack: &Stack,
    opts: &ImageOptions,
    engines: &[(BuildOutcome, String)],
    pools: &[ImagePool],
    mut explained: Vec<Explained>,
) -> Result<Layer, DeployError> {
    let mut top = Layer::new("llorch");
    top.file(BINARY, Source::File(opts.binary.clone()), true)?;
    explain(
        &mut explained,
        BINARY,
        "the llama-orch binary that built this image (`cargo xtask`)".into(),
        &opts.binary,
    )?;
    let pins = layout.root.join("toolchains/llama.cpp.yaml");
    let pins_at = format!("{IMAGE_ROOT}/toolchains/llama.cpp.yaml");
    top.file(&pins_at, Source::File(pins.clone()), false)?;
    explain(&mut explained, &pins_at, "the pins file".into(), &pins)?;
    for (p, (_, rel)) in stack.pools.iter().zip(engines) {
        let at = format!("{IMAGE_ROOT}/{rel}");
        top.file(&at, Source::File(p.profile.path.clone()), false)?;
        explain(
            &mut explained,
            &at,
            format!("profile {} of pool {}", p.profile.name, p.id),
            &p.profile.path,
        )?;
    }
    for d in [MODELS_DIR, STATE_DIR] {
        top.dir(d, 0o755)?;
    }
    top.dir("/tmp", 0o1777)?;
    explained.sort_by(|a, b| a.path.cmp(&b.path));
    let spec = ImageSpec {
        schema: SPEC_SCHEMA,
        pools: pools.to_vec(),
        files: explained,
        compressor: COMPRESSOR.into(),
    };
    let spec_bytes = canonical(&serde_json::to_value(&spec).expect("the spec serializes"));
    top.file(
        &format!("{IMAGE_ROOT}/{SPEC_FILE}"),
        Source::Bytes(spec_bytes),
        false,
    )?;
    Ok(top)
}

/// Write the layers, config, manifest and index as an OCI image layout in
/// a staging directory beside `opts.out`; one rename publishes it.
fn write_layout(
    opts: &ImageOptions,
    pools: Vec<ImagePool>,
    layers_in: [&Layer; 3],
    cuda: bool,
) -> Result<BuiltImage, DeployError> {
    if let Some(parent) = opts.out.parent() {
        fs_err::create_dir_all(parent).map_err(llorch_io::io("create the image's directory"))?;
    }
    let staging = llorch_io::fsx::staging_dir_for(&opts.out)
        .map_err(llorch_io::io("create a staging directory for the image"))?;
    let blobs = staging.path().join("blobs/sha256");
    fs_err::create_dir_all(&blobs).map_err(llorch_io::io("create the image's blobs"))?;
    let mut layers = Vec::new();
    for l in layers_in {
        layers.push(l.write(&blobs)?);
    }
    let labels = labels(&pools);
    let config = config_json(&pools, &layers, &labels, cuda);
    let config_bytes = canonical(&config);
    let config_digest = put_blob(&blobs, &config_bytes)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config_bytes.len()},
        "layers": layers.iter().map(|l| json!({"mediaType": LAYER_MEDIA_TYPE, "digest": l.digest, "size": l.size})).collect::<Vec<_>>(),
        "annotations": labels,
    });
    let manifest_bytes = canonical(&manifest);
    let digest = put_blob(&blobs, &manifest_bytes)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [{
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": digest,
            "size": manifest_bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": opts.tag},
        }],
    });
    write(staging.path(), "index.json", &canonical(&index))?;
    write(
        staging.path(),
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    llorch_io::fsx::commit_dir(staging, &opts.out)
        .map_err(llorch_io::io("publish the image layout"))?;
    Ok(BuiltImage {
        dir: opts.out.clone(),
        tag: opts.tag.clone(),
        digest,
        config_digest,
        size: layers.iter().map(|l| l.size).sum(),
        layers,
        labels,
        pools,
    })
}

/// A CUDA toolkit's library directories (where `libcudart` and `libcublas` live).
fn cuda_lib_dirs() -> Vec<PathBuf> {
    let tb = engine_provisioner::preflight::Toolbox::default();
    let mut roots: Vec<PathBuf> = engine_provisioner::cuda::find_nvcc(&tb)
        .and_then(|(_, r)| r)
        .into_iter()
        .collect();
    roots.extend(engine_provisioner::cuda::cuda_root_candidates());
    roots
        .into_iter()
        .flat_map(|r| {
            [
                r.join("lib64"),
                r.join("lib"),
                r.join("targets/x86_64-linux/lib"),
            ]
        })
        .filter(|d| d.is_dir())
        .collect()
}

/// The labels a registry and a cluster read: what engine, pin, profile and
/// model each pool of the image is.
fn labels(pools: &[ImagePool]) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (
            "org.opencontainers.image.title".to_string(),
            "llama-orch".to_string(),
        ),
        (
            "org.opencontainers.image.description".to_string(),
            "llama-orch serving a fingerprinted llama.cpp engine (models mount at /models)"
                .to_string(),
        ),
    ]);
    if let Some(p) = pools.first() {
        for (k, v) in [
            ("engine.fingerprint", &p.fingerprint),
            ("pin", &p.pin),
            ("profile", &p.profile),
            ("model.sha256", &p.model_sha256),
            ("pool", &p.id),
        ] {
            l.insert(format!("dev.llorch.{k}"), v.clone());
        }
    }
    l.insert(
        "dev.llorch.pools".to_string(),
        pools
            .iter()
            .map(|p| p.id.as_str())
            .collect::<Vec<_>>()
            .join(","),
    );
    l
}

fn config_json(
    pools: &[ImagePool],
    layers: &[LayerBlob],
    labels: &BTreeMap<String, String>,
    cuda: bool,
) -> Value {
    let first = pools.first().map(|p| p.id.clone()).unwrap_or_default();
    let mut env = vec![
        format!("PATH=/usr/local/bin"),
        format!("LLORCH_ROOT={IMAGE_ROOT}"),
        format!("LLORCH_CACHE_DIR={STATE_DIR}/cache"),
        format!("LLORCH_RUNTIME_DIR={STATE_DIR}/run"),
        format!("HOME={STATE_DIR}"),
        format!("LLORCH_MODEL={DEFAULT_MODEL}"),
        format!("LLORCH_POOL={first}"),
        format!("PORT={DEFAULT_PORT}"),
        format!("SSL_CERT_FILE={CA_CERTS}"),
    ];
    if cuda {
        env.push("NVIDIA_VISIBLE_DEVICES=all".into());
        env.push("NVIDIA_DRIVER_CAPABILITIES=compute,utility".into());
    }
    env.sort();
    json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": {
            "User": USER,
            "Env": env,
            "Entrypoint": [BINARY, "serve", "--in-image"],
            "ExposedPorts": {format!("{DEFAULT_PORT}/tcp"): {}},
            "WorkingDir": IMAGE_ROOT,
            "Labels": labels,
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
    })
}

/// Compact JSON with sorted keys (serde_json's maps are sorted here).
pub fn canonical(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("a JSON value serializes")
}

fn put_blob(blobs: &Path, bytes: &[u8]) -> Result<String, DeployError> {
    let hex = llorch_io::digest::sha256_bytes(bytes);
    write(blobs, &hex, bytes)?;
    Ok(format!("sha256:{hex}"))
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), DeployError> {
    fs_err::write(dir.join(name), bytes).map_err(llorch_io::io("write the image layout"))?;
    Ok(())
}
