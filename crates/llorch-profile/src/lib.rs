//! Profiles (`requirements/<name>.yaml`) and pins (`toolchains/llama.cpp.yaml`).
//!
//! Both are typed, versioned (`schema: 1`) and strict: unknown keys are
//! errors, and every error names the file, line and column.

pub mod concurrency;
pub mod pins;
pub mod spec;
pub mod stack;

pub use pins::*;
pub use spec::*;

pub use concurrency::{Affinity, Auto, Concurrency, ConcurrencyKeys, Count, Mode};

use std::collections::BTreeMap;

use llorch_types::PoolId;
use std::path::{Path, PathBuf};

pub const PROFILE_SCHEMA: u32 = 1;
pub const PINS_SCHEMA: u32 = 1;
pub const DEFAULT_PROFILE: &str = "cpu";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("no profile named `{name}` (looked for {looked})\n  available profiles: {available}\n  hint: pass --profile NAME or --profile path/to/profile.yaml")]
    NoSuchProfile {
        name: String,
        looked: String,
        available: String,
    },
    #[error("{path}: pin `{pin}` is not defined in {pins}\n  defined pins: {available}")]
    NoSuchPin {
        path: String,
        pin: String,
        pins: String,
        available: String,
    },
}

/// Line and column (1-based) of the key at `key_path` (`engine.cuda_archs`)
/// in YAML `text`: each segment is looked for as `segment:` at the start of a
/// line (after indentation), below the previous segment's line.
pub fn locate(text: &str, key_path: &str) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut from = 0;
    let mut found = None;
    for seg in key_path.split('.') {
        let (i, col) = lines.iter().enumerate().skip(from).find_map(|(i, l)| {
            let t = l.trim_start();
            let key = t.trim_start_matches("- ");
            (key.starts_with(&format!("{seg}:")) || key.starts_with(&format!("\"{seg}\":")))
                .then(|| (i, l.len() - key.len() + 1))
        })?;
        found = Some((i + 1, col));
        from = i + 1;
    }
    found
}

/// A validation error at `key_path`, with its line and column when found.
fn invalid_at(path: &Path, text: &str, key_path: &str, message: String) -> ConfigError {
    let message = match locate(text, key_path) {
        Some((l, c)) => format!("line {l} column {c}: {message}"),
        None => message,
    };
    ConfigError::Invalid {
        path: path.display().to_string(),
        message,
    }
}

/// The largest configuration file read (profiles, pins, stack files).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Read a configuration file: a regular file (a FIFO, a device or a
/// directory is refused before it is opened) of at most [`MAX_CONFIG_BYTES`],
/// read with that bound whatever its size claims.
pub fn read_config(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    let shown = path.display().to_string();
    let bad = |why: String| ConfigError::Invalid {
        path: shown.clone(),
        message: why,
    };
    let m = fs_err::metadata(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    if !m.is_file() {
        return Err(bad(
            "not a regular file (configuration is read only from regular files)".into(),
        ));
    }
    if m.len() > MAX_CONFIG_BYTES {
        return Err(bad(format!(
            "{} bytes; a configuration file is at most {MAX_CONFIG_BYTES}",
            m.len()
        )));
    }
    let f = fs_err::File::open(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    let mut buf = Vec::new();
    f.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
    if buf.len() as u64 > MAX_CONFIG_BYTES {
        return Err(bad(format!(
            "more than {MAX_CONFIG_BYTES} bytes; a configuration file is at most that"
        )));
    }
    String::from_utf8(buf).map_err(|_| bad("not UTF-8 text".into()))
}

/// A parse error without the file's content: a file that is not a profile
/// (a credentials file named by mistake) must not be echoed to the
/// terminal. Quoted values in the parser's message are replaced by `…`;
/// short key names in backticks stay (they say which key is unknown).
fn redact(message: &str) -> String {
    let mut out = String::new();
    let mut chars = message.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                for n in chars.by_ref() {
                    if n == '"' {
                        break;
                    }
                }
                out.push_str("\"…\"");
            }
            '`' => {
                let mut inner = String::new();
                for n in chars.by_ref() {
                    if n == '`' {
                        break;
                    }
                    inner.push(n);
                }
                let key_like = inner.len() <= 40
                    && inner
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
                out.push('`');
                out.push_str(if key_like { &inner } else { "…" });
                out.push('`');
            }
            _ => out.push(c),
        }
    }
    out.chars().take(400).collect()
}

fn parse_yaml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let opts = serde_saphyr::options! { with_snippet: false };
    serde_saphyr::from_str_with_options(text, opts).map_err(|e| {
        let mut message = redact(&e.to_string());
        // Name the key at fault (never its value): the last `key:` before
        // the error's column on its line.
        if let Some(loc) = e.location() {
            let line = text.lines().nth((loc.line() as usize).saturating_sub(1));
            if let Some(key) = line.and_then(|l| key_before(l, loc.column() as usize)) {
                message = format!("{message} (key `{key}`)");
            }
        }
        ConfigError::Parse {
            path: path.display().to_string(),
            message,
        }
    })
}

/// The last `key:` on `line` before 1-based `column`, if it looks like a key name.
fn key_before(line: &str, column: usize) -> Option<String> {
    let head: String = line.chars().take(column.saturating_sub(1)).collect();
    let colon = head.rfind(':')?;
    let key: String = head[..colon]
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    (!key.is_empty() && key.len() <= 40).then_some(key)
}

/// A loaded profile with its resolved pin.
#[derive(Clone, Debug)]
pub struct Profile {
    pub name: String,
    pub path: PathBuf,
    pub file: ProfileFile,
    pub pin_name: String,
    pub pin: Pin,
}

impl Profile {
    /// Resolve `NAME` (→ `requirements/NAME.yaml`) or a path, then load it and its pin.
    pub fn resolve(root: &Path, name_or_path: Option<&str>) -> Result<Profile, ConfigError> {
        let arg = name_or_path.unwrap_or(DEFAULT_PROFILE);
        let path = if arg.ends_with(".yaml") || arg.ends_with(".yml") || arg.contains('/') {
            PathBuf::from(arg)
        } else {
            root.join("requirements").join(format!("{arg}.yaml"))
        };
        if !path.is_file() {
            return Err(ConfigError::NoSuchProfile {
                name: arg.to_string(),
                looked: path.display().to_string(),
                available: list_profiles(root).join(", "),
            });
        }
        let pins_path = root.join("toolchains/llama.cpp.yaml");
        Profile::load(&path, &pins_path)
    }

    pub fn load(path: &Path, pins_path: &Path) -> Result<Profile, ConfigError> {
        let text = read_config(path)?;
        let file: ProfileFile = parse_yaml(path, &text)?;
        let invalid = |key: &str, message: String| invalid_at(path, &text, key, message);
        if file.schema != PROFILE_SCHEMA {
            return Err(invalid(
                "schema",
                format!(
                    "schema {} is not supported (this llama-orch reads schema {PROFILE_SCHEMA})",
                    file.schema
                ),
            ));
        }
        check_server(&file)
            .and_then(|()| check_engine(&file))
            .and_then(|()| check_model(&file))
            .map_err(|(key, message)| invalid(&key, message))?;
        let pins = PinsFile::load(pins_path)?;
        let pin_name = file
            .engine
            .pin
            .clone()
            .unwrap_or_else(|| pins.default.clone());
        let pin = pins
            .pins
            .get(&pin_name)
            .cloned()
            .ok_or_else(|| ConfigError::NoSuchPin {
                path: path.display().to_string(),
                pin: pin_name.clone(),
                pins: pins_path.display().to_string(),
                available: pins.pins.keys().cloned().collect::<Vec<_>>().join(", "),
            })?;
        let name = match path.file_stem().map(|s| s.to_str()) {
            Some(Some(n)) => n.to_string(),
            _ => {
                return Err(ConfigError::Invalid {
                    path: path.display().to_string(),
                    message: "the profile's file name is not UTF-8 (it names the profile in JSON output); rename the file".into(),
                })
            }
        };
        Ok(Profile {
            name,
            path: path.to_path_buf(),
            file,
            pin_name,
            pin,
        })
    }

    pub fn pool(&self) -> &PoolId {
        &self.file.pool
    }

    /// How the pool serves many clients (checked when the profile was loaded).
    pub fn concurrency(&self) -> Concurrency {
        self.file
            .server
            .concurrency_keys()
            .resolve()
            .unwrap_or_default()
    }
}

type Refusal = (String, String);

/// A refusal of `key`, with the sentence the user sees.
fn bad(key: &str, message: String) -> Refusal {
    (key.to_string(), message)
}

/// The `server` section: pool id, pooling, MPS, concurrency, sizes, port.
fn check_server(file: &ProfileFile) -> Result<(), Refusal> {
    let sv = &file.server;
    if file.pool.is_replica() {
        return Err(bad(
            "pool",
            format!(
                "pool `{}`: ids ending in `.r<N>` name replicas; choose another pool id",
                file.pool
            ),
        ));
    }
    if sv.pooling.is_some() && !sv.embeddings {
        return Err(bad(
            "server.pooling",
            "server.pooling applies to an embedding pool; add `embeddings: true` (or remove pooling)".into(),
        ));
    }
    if sv.mps == spec::MpsMode::Own && file.engine.backend != spec::Backend::Cuda {
        return Err(bad(
            "server.mps",
            format!(
                "server.mps: own starts an NVIDIA MPS daemon, which only CUDA engines use; this profile's backend is {} (remove `mps: own`)",
                file.engine.backend.as_str()
            ),
        ));
    }
    if let Err((key, message)) = sv.concurrency_keys().resolve() {
        return Err(bad(&format!("server.{key}"), format!("server.{message}")));
    }
    for (key, value, max) in [
        ("server.ready_timeout_s", sv.ready_timeout_s, 86_400u64),
        ("server.ctx_size", sv.ctx_size as u64, 1 << 22),
        ("server.threads", sv.threads as u64, 4096),
    ] {
        if value > max {
            return Err(bad(
                key,
                format!("{key} is {value}; the largest accepted value is {max}"),
            ));
        }
    }
    file.server
        .port
        .candidates()
        .map(|_| ())
        .map_err(|m| bad("server.port", format!("server.{m}")))?;
    Ok(())
}

/// The `engine` section: list sizes, build type, backend and CUDA archs, CMake flags, registry.
fn check_engine(file: &ProfileFile) -> Result<(), Refusal> {
    let sv = &file.server;
    for (key, list) in [
        ("server.extra_args", &sv.extra_args),
        ("engine.cmake_flags", &file.engine.cmake_flags),
    ] {
        if list.len() > 64 || list.iter().any(|a| a.len() > 512) {
            return Err(bad(
                key,
                format!("{key}: at most 64 entries of at most 512 characters each"),
            ));
        }
    }
    if file.engine.build_type.len() > 32 || sv.host.len() > 253 {
        return Err(bad(
            "engine.build_type",
            "engine.build_type or server.host is too long".into(),
        ));
    }
    match file.engine.backend {
        Backend::Cuda if file.engine.cuda_archs.is_empty() => {
            return Err(bad("engine.backend",
                "engine.cuda_archs is empty: name the GPU architectures to build for, e.g. [86] for an RTX 3090 or [90] for an H100 (`native` only works where a GPU is visible)".into(),
            ))
        }
        Backend::Cpu if !file.engine.cuda_archs.is_empty() => {
            return Err(bad("engine.cuda_archs", "engine.cuda_archs is set but engine.backend is cpu".into()))
        }
        _ => {}
    }
    for a in &file.engine.cuda_archs {
        let ok = a == "native"
            || a.trim_end_matches(['a', 'f'])
                .trim_end_matches("-real")
                .trim_end_matches("-virtual")
                .parse::<u32>()
                .is_ok();
        if !ok {
            return Err(bad("engine.cuda_archs", format!(
                "engine.cuda_archs: `{}` is not a CUDA architecture (expected e.g. 86, 90, 90a or native)",
                llorch_types::excerpt(a, 20)
            )));
        }
    }
    for f in &file.engine.cmake_flags {
        normalize_flag(f).map_err(|m| bad("engine.cmake_flags", m.to_string()))?;
    }
    if let Some(r) = &file.engine.registry {
        let parsed = llorch_types::OciRef::parse(&r.url)
            .map_err(|e| bad("engine.registry", format!("engine.registry.url: {e}")))?;
        if parsed.tag.is_some() || parsed.digest.is_some() {
            return Err(bad("engine.registry", "engine.registry.url names a repository without a tag or digest (engines are tagged with their fingerprint)".into()));
        }
    }
    Ok(())
}

/// The `model` section: the ref's length, the digest's form.
fn check_model(file: &ProfileFile) -> Result<(), Refusal> {
    if let Some(m) = &file.model {
        if m.reference.len() > 4096 {
            return Err(bad(
                "model.ref",
                format!(
                    "model.ref is {} bytes long; a model ref is at most 4096",
                    m.reference.len()
                ),
            ));
        }
        if let Some(d) = &m.sha256 {
            if !llorch_types::is_sha256_hex(d) {
                return Err(bad(
                    "model.sha256",
                    format!(
                        "model.sha256 `{}` must be 64 lowercase hex digits",
                        llorch_types::excerpt(d, 80)
                    ),
                ));
            }
        }
    }
    Ok(())
}

pub fn list_profiles(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs_err::read_dir(root.join("requirements"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            // A file whose name is not UTF-8 is not a profile anyone can name.
            (p.extension().is_some_and(|x| x == "yaml"))
                .then(|| p.file_stem()?.to_str().map(str::to_string))
                .flatten()
        })
        .collect();
    v.sort();
    v
}

/// A CMake flag a profile may not pass.
#[derive(Debug, thiserror::Error)]
pub enum FlagError {
    #[error("cmake flag `{0}` must have the form -DKEY=VALUE")]
    Form(String),
    #[error("cmake flag `{flag}`: bad variable name `{key}`")]
    Name { flag: String, key: String },
}

/// `-D KEY=VALUE`, `-DKEY:TYPE=VALUE` → `-DKEY=VALUE`; anything else is refused.
pub fn normalize_flag(flag: &str) -> Result<String, FlagError> {
    let form = || FlagError::Form(flag.into());
    let body = flag
        .trim()
        .strip_prefix("-D")
        .map(str::trim_start)
        .ok_or_else(form)?;
    let (key, value) = body.split_once('=').ok_or_else(form)?;
    let key = key.split_once(':').map(|(k, _)| k).unwrap_or(key).trim();
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(FlagError::Name {
            flag: flag.into(),
            key: key.into(),
        });
    }
    Ok(format!("-D{key}={value}"))
}

/// Normalize, de-duplicate by key (the last one wins, as in CMake), sort.
pub fn normalize_flags(flags: &[String]) -> Result<Vec<String>, FlagError> {
    let mut by_key: BTreeMap<String, String> = BTreeMap::new();
    for f in flags {
        let n = normalize_flag(f)?;
        let key = n[2..]
            .split_once('=')
            .map(|(k, _)| k.to_string())
            .unwrap_or_default();
        by_key.insert(key, n);
    }
    Ok(by_key.into_values().collect())
}
