//! Build fingerprints.
//!
//! A fingerprint is the sha256 of the canonical JSON (sorted keys, no
//! whitespace) of [`BuildInputs`]: everything that changes the binary, and
//! nothing that does not (never mtimes, never absolute paths). The same JSON
//! is stored in the artifact's `manifest.json`, so [`explain`](crate::build::explain) can say which
//! input differs from the closest cached build.
//!
//! Architecture Invariant: runtime flags (port, threads, context size) are
//! not build inputs; build flags always are.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Bumped when the meaning of the inputs or the artifact layout changes.
/// 2: builds map their directories away and fix the clock
/// ([`crate::reproduce`]): the same fingerprint gives the same bytes; the
/// CMake generator is no longer an input (both give the same bytes).
/// 3: what the compilers compile against ([`BuildInputs::compiler_runtime`]):
/// the same `--version` line gave three different CUDA engines on lent GPU
/// hosts whose `gcc` is a wrapper adding the system's libstdc++ headers.
pub const FINGERPRINT_SCHEMA: u32 = 3;

/// Environment variables that change what CMake and the compilers produce.
pub const BUILD_ENV_VARS: &[&str] = &[
    "CC",
    "CXX",
    "CFLAGS",
    "CXXFLAGS",
    "CPPFLAGS",
    "LDFLAGS",
    "CUDAHOSTCXX",
    "CUDAFLAGS",
    "CUDACXX",
    "NVCC_PREPEND_FLAGS",
    "NVCC_APPEND_FLAGS",
];

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SourceIdentity {
    pub kind: String,
    /// Full commit for git, sha256 of the archive for sdists and archives.
    pub id: String,
    /// The llama.cpp commit the tree is.
    pub commit: String,
    #[serde(default)]
    pub subdir: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CudaInputs {
    pub nvcc_version: String,
    pub archs: Vec<String>,
    pub host_compiler: Option<String>,
    /// The launcher that makes nvcc's objects reproducible
    /// ([`crate::reproduce::NVCC_LAUNCHER`]; CUDA 12.9 and later), which
    /// changes the bytes, so it is an input. Absent: not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvcc_launcher: Option<String>,
}

/// Every input that changes the built `llama-server`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BuildInputs {
    pub schema: u32,
    pub source: SourceIdentity,
    /// Normalized (`-DKEY=VALUE`), sorted, de-duplicated (last wins).
    pub cmake_flags: Vec<String>,
    pub build_type: String,
    pub targets: Vec<String>,
    pub c_compiler: String,
    pub cxx_compiler: String,
    /// What the compilers compile against, beyond their `--version` line:
    /// the sha256 of each driver executable as resolved (a wrapper script
    /// that adds include paths or flags is part of it), and the C++ and C
    /// library headers' versions (`__GLIBCXX__` or `_LIBCPP_VERSION`,
    /// `__GLIBC__.__GLIBC_MINOR__`), which a distribution updates apart
    /// from the compiler.
    pub compiler_runtime: String,
    pub cmake_version: String,
    // Not the CMake generator: Ninja and Unix Makefiles give the same bytes
    // (measured: docs/gpu.md), so installing ninja later rebuilds nothing.
    pub cuda: Option<CudaInputs>,
    pub host_triple: String,
    pub env: BTreeMap<String, String>,
}

impl BuildInputs {
    pub fn canonical_json(&self) -> String {
        // serde_json's Map is a BTreeMap here (no preserve_order), so object
        // keys come out sorted: the text is canonical.
        let v = serde_json::to_value(self).expect("inputs serialize");
        serde_json::to_string(&v).expect("value serializes")
    }

    pub fn fingerprint(&self) -> String {
        llorch_io::digest::sha256_bytes(self.canonical_json().as_bytes())
    }
}

/// `x86_64-linux-gnu` style triple of this host.
pub fn host_triple() -> String {
    let env = if cfg!(target_env = "gnu") {
        "gnu"
    } else if cfg!(target_env = "musl") {
        "musl"
    } else {
        "unknown"
    };
    format!(
        "{}-{}-{}",
        std::env::consts::ARCH,
        std::env::consts::OS,
        env
    )
}

/// Build-relevant environment variables that are set (and non-empty).
pub fn build_env() -> BTreeMap<String, String> {
    BUILD_ENV_VARS
        .iter()
        .filter_map(|k| {
            std::env::var(k)
                .ok()
                .filter(|v| !v.is_empty())
                .map(|v| (k.to_string(), v))
        })
        .collect()
}

/// One input that differs between two fingerprints.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct InputChange {
    pub input: String,
    pub cached: serde_json::Value,
    pub wanted: serde_json::Value,
}

/// Which top-level inputs differ (flag lists are compared flag by flag).
pub fn diff(cached: &serde_json::Value, wanted: &BuildInputs) -> Vec<InputChange> {
    let wanted = serde_json::to_value(wanted).expect("inputs serialize");
    let empty = serde_json::Map::new();
    let a = cached.as_object().unwrap_or(&empty);
    let b = wanted.as_object().unwrap_or(&empty);
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let null = serde_json::Value::Null;
    let mut out = Vec::new();
    for k in keys {
        let (x, y) = (a.get(k).unwrap_or(&null), b.get(k).unwrap_or(&null));
        if x == y {
            continue;
        }
        if let (Some(xs), Some(ys)) = (x.as_array(), y.as_array()) {
            if k == "cmake_flags" {
                let removed: Vec<_> = xs.iter().filter(|f| !ys.contains(f)).cloned().collect();
                let added: Vec<_> = ys.iter().filter(|f| !xs.contains(f)).cloned().collect();
                out.push(InputChange {
                    input: k.clone(),
                    cached: serde_json::Value::Array(removed),
                    wanted: serde_json::Value::Array(added),
                });
                continue;
            }
        }
        out.push(InputChange {
            input: k.clone(),
            cached: x.clone(),
            wanted: y.clone(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use llorch_profile::{normalize_flag, normalize_flags};

    pub(crate) fn sample() -> BuildInputs {
        BuildInputs {
            schema: FINGERPRINT_SCHEMA,
            source: SourceIdentity {
                kind: "git".into(),
                id: "4df29be4f4c3673f428170fda944a5b19f743bb8".into(),
                commit: "4df29be4f4c3673f428170fda944a5b19f743bb8".into(),
                subdir: None,
            },
            cmake_flags: normalize_flags(&["-DB=1".into(), "-DA=2".into()]).unwrap(),
            build_type: "Release".into(),
            targets: vec!["llama-server".into()],
            c_compiler: "gcc 12".into(),
            cxx_compiler: "g++ 12".into(),
            compiler_runtime: "cc 00 c++ 00 libstdc++ 20230528 glibc 2.36".into(),
            cmake_version: "3.25.1".into(),
            cuda: None,
            host_triple: "x86_64-linux-gnu".into(),
            env: BTreeMap::new(),
        }
    }

    #[test]
    fn every_input_changes_the_fingerprint() {
        let base = sample();
        let fp = base.fingerprint();
        let mut variants: Vec<(&str, BuildInputs)> = Vec::new();
        let mut v = base.clone();
        v.source.id = "0".repeat(40);
        variants.push(("source", v));
        let mut v = base.clone();
        v.source.kind = "pypi_sdist".into();
        variants.push(("source kind", v));
        let mut v = base.clone();
        v.cmake_flags.push("-DC=3".into());
        variants.push(("flags", v));
        let mut v = base.clone();
        v.build_type = "Debug".into();
        variants.push(("build type", v));
        let mut v = base.clone();
        v.targets.push("llama-cli".into());
        variants.push(("targets", v));
        let mut v = base.clone();
        v.c_compiler = "clang 17".into();
        variants.push(("c compiler", v));
        let mut v = base.clone();
        v.cxx_compiler = "clang++ 17".into();
        variants.push(("cxx compiler", v));
        let mut v = base.clone();
        v.compiler_runtime = "cc 00 c++ 00 libstdc++ 20240904 glibc 2.36".into();
        variants.push(("compiler runtime", v));
        let mut v = base.clone();
        v.cmake_version = "3.31.0".into();
        variants.push(("cmake", v));
        let mut v = base.clone();
        v.cuda = Some(CudaInputs {
            nvcc_version: "12.4".into(),
            archs: vec!["86".into()],
            host_compiler: None,
            nvcc_launcher: None,
        });
        variants.push(("cuda", v.clone()));
        let mut w = v.clone();
        w.cuda.as_mut().unwrap().archs = vec!["90".into()];
        variants.push(("cuda archs", w));
        let mut w = v.clone();
        w.cuda.as_mut().unwrap().nvcc_launcher = Some("llorch-nvcc-v1".into());
        variants.push(("nvcc launcher", w));
        let mut w = v;
        w.cuda.as_mut().unwrap().nvcc_version = "13.0".into();
        variants.push(("nvcc", w));
        let mut v = base.clone();
        v.host_triple = "aarch64-linux-gnu".into();
        variants.push(("triple", v));
        let mut v = base.clone();
        v.env.insert("CFLAGS".into(), "-O1".into());
        variants.push(("env", v));
        let mut v = base.clone();
        v.schema += 1;
        variants.push(("schema", v));
        let mut seen = std::collections::HashSet::new();
        seen.insert(fp.clone());
        for (what, v) in variants {
            assert!(
                seen.insert(v.fingerprint()),
                "{what} did not change the fingerprint"
            );
        }
    }

    /// Every field of the inputs is named here: a new input must be added
    /// to the variants above (it fails to compile otherwise), and the
    /// fingerprint of the sample is pinned, so a change of its encoding is
    /// a decision (bump [`FINGERPRINT_SCHEMA`]), not an accident.
    #[test]
    fn the_inputs_are_all_covered_and_the_encoding_is_pinned() {
        let BuildInputs {
            schema: _,
            source: _,
            cmake_flags: _,
            build_type: _,
            targets: _,
            c_compiler: _,
            cxx_compiler: _,
            compiler_runtime: _,
            cmake_version: _,
            cuda: _,
            host_triple: _,
            env: _,
        } = sample();
        assert_eq!(
            sample().fingerprint(),
            GOLDEN,
            "the fingerprint encoding changed"
        );
    }

    const GOLDEN: &str = "ec94ce3a551299d39d26c0c72fc2b9c5e8df91c4a4e779ef41147eb77deb116c";

    #[test]
    fn flag_order_and_spelling_do_not_matter() {
        let a = normalize_flags(&["-DA=1".into(), "-D B:BOOL=ON".into()]).unwrap();
        let b = normalize_flags(&["-DB=ON".into(), "-DA=1".into()]).unwrap();
        assert_eq!(a, b);
        let last_wins = normalize_flags(&["-DA=1".into(), "-DA=2".into()]).unwrap();
        assert_eq!(last_wins, vec!["-DA=2".to_string()]);
    }

    #[test]
    fn bad_flags_are_refused() {
        assert!(normalize_flag("GGML_CUDA=ON").is_err());
        assert!(normalize_flag("-DGGML_CUDA").is_err());
        assert!(normalize_flag("-D=1").is_err());
    }

    #[test]
    fn diff_names_the_changed_input() {
        let a = sample();
        let mut b = a.clone();
        b.cmake_flags.push("-DGGML_CUDA=ON".into());
        b.cmake_version = "3.31".into();
        let d = diff(&serde_json::to_value(&a).unwrap(), &b);
        let names: Vec<_> = d.iter().map(|c| c.input.as_str()).collect();
        assert_eq!(names, vec!["cmake_flags", "cmake_version"]);
        assert_eq!(d[0].wanted, serde_json::json!(["-DGGML_CUDA=ON"]));
    }
}
