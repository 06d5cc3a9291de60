//! The CUDA toolchain: nvcc, CUDA root, host-compiler compatibility, local
//! GPUs, and the SASS architectures present in a built binary.
//!
//! nvcc refuses host compilers newer than it supports ("unsupported GNU
//! version"). Rather than keep a version table, we ask nvcc: compile a tiny
//! kernel with the default host compiler, and if that fails try older
//! gcc/clang versions found on PATH, using the first one nvcc accepts as
//! `CMAKE_CUDA_HOST_COMPILER`.

use crate::preflight::{CudaReport, Toolbox};
use llorch_io::cmd::Cmd;
use std::path::{Path, PathBuf};

/// CUDA roots in the order they are tried.
pub fn cuda_root_candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for var in ["CUDA_PATH", "CUDA_HOME", "CUDA_ROOT"] {
        if let Some(p) = std::env::var_os(var) {
            v.push(PathBuf::from(p));
        }
    }
    v.push(PathBuf::from("/opt/cuda"));
    v.push(PathBuf::from("/usr/local/cuda"));
    v
}

/// nvcc on PATH, else in a CUDA root.
pub fn find_nvcc(tb: &Toolbox) -> Option<(PathBuf, Option<PathBuf>)> {
    if let Some(p) = tb.find("nvcc") {
        let root = p.parent().and_then(Path::parent).map(Path::to_path_buf);
        return Some((p, root));
    }
    if tb.path.is_some() {
        return None;
    }
    cuda_root_candidates()
        .into_iter()
        .map(|r| (r.join("bin/nvcc"), Some(r)))
        .find(|(n, _)| n.is_file())
}

/// `release 12.4, V12.4.131` → `12.4.131`.
pub fn parse_nvcc_version(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.split_once(", V").map(|(_, v)| v.trim().to_string()))
        .or_else(|| {
            text.lines().find_map(|l| {
                l.split_once("release ")
                    .map(|(_, v)| v.split(',').next().unwrap_or("").trim().to_string())
            })
        })
}

/// What stops a CUDA build before CMake runs; each names the arch or the
/// compiler, the toolkit, and what to change.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("engine.cuda_archs has `native` but no GPU is visible here, so there is nothing to build for; name the archs explicitly (e.g. [\"86-real\"] for an RTX 3090, [\"90-real\"] for an H100)")]
    NativeWithoutGpu,
    #[error("engine.cuda_archs: `{arch}` ({features} features) needs CUDA {need} or later; this toolkit is CUDA {have}. Install a newer toolkit or use `{plain}`")]
    FeaturesNeedNewer {
        arch: String,
        features: &'static str,
        need: &'static str,
        have: String,
        plain: u32,
    },
    #[error("engine.cuda_archs: sm_{sm} is not an architecture any CUDA toolkit this project knows builds (known: {known})")]
    UnknownArch { sm: u32, known: String },
    #[error("engine.cuda_archs: sm_{sm} ({gpus}) needs CUDA {need} or later; this toolkit is CUDA {have}. Install CUDA {need} or newer, or build for an older architecture")]
    ArchNeedsNewer {
        sm: u32,
        gpus: &'static str,
        need: String,
        have: String,
    },
    #[error("engine.cuda_archs: CUDA {since} and later no longer build for sm_{sm} ({gpus}); this toolkit is CUDA {have}. Build with a CUDA {last_major}.x toolkit (point PATH or CUDA_HOME at it), or drop sm_{sm} from the profile")]
    ArchDropped {
        sm: u32,
        gpus: &'static str,
        since: String,
        have: String,
        last_major: u32,
    },
    #[error("nvcc rejects the default host compiler ({0}) and no older g++/clang++ on PATH works either\n  hint: install a gcc that your CUDA supports (Arch/CachyOS: pacman -S gcc14; Debian/Ubuntu: apt-get install g++-12) or set CUDAHOSTCXX")]
    NoHostCompiler(String),
    #[error("cuobjdump not found (it ships with the CUDA toolkit next to nvcc)")]
    NoCuobjdump,
    #[error("cuobjdump: {0}")]
    Cuobjdump(llorch_io::cmd::CmdError),
    #[error(transparent)]
    Io(#[from] llorch_io::IoError),
}

/// Ask nvcc whether it accepts `host` (None = its default) as host
/// compiler: `Ok(Err(first lines of what nvcc said))` when it does not.
pub fn nvcc_accepts(nvcc: &Path, host: Option<&Path>) -> Result<Result<(), String>, CudaError> {
    use llorch_io::io;
    let dir = tempfile::tempdir().map_err(io("create a temp dir for nvcc's probe"))?;
    let src = dir.path().join("probe.cu");
    fs_err::write(&src, "__global__ void k(float *x) { x[0] = 1.0f; }\n")
        .map_err(io("write nvcc's probe"))?;
    let mut c = Cmd::new(nvcc)
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(dir.path().join("probe.o"));
    if let Some(h) = host {
        c = c.arg("-ccbin").arg(h);
    }
    Ok(match c.read_any() {
        Ok((true, _)) => Ok(()),
        Ok((false, out)) => Err(out.lines().take(3).collect::<Vec<_>>().join(" ")),
        Err(e) => Err(e.to_string()),
    })
}

/// Older host compilers to try when nvcc refuses the default one.
pub fn host_compiler_candidates(tb: &Toolbox) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for ver in (9..=15).rev() {
        for name in [format!("g++-{ver}"), format!("clang++-{ver}")] {
            if let Some(p) = tb.find(&name) {
                v.push(p);
            }
        }
    }
    // Arch/CachyOS ship the CUDA-compatible gcc as /opt/cuda/bin/g++ or gcc13/gcc14 packages.
    for name in ["g++-14", "g++-13", "g++-12"] {
        let p = PathBuf::from("/usr/bin").join(name);
        if p.is_file() && !v.contains(&p) {
            v.push(p);
        }
    }
    v
}

/// Pick the host compiler: `None` when nvcc accepts the default.
pub fn choose_host_compiler(nvcc: &Path, tb: &Toolbox) -> Result<Option<PathBuf>, CudaError> {
    if let Some(explicit) = std::env::var_os("CUDAHOSTCXX") {
        return Ok(Some(PathBuf::from(explicit)));
    }
    let default_err = match nvcc_accepts(nvcc, None)? {
        Ok(()) => return Ok(None),
        Err(e) => e,
    };
    for cand in host_compiler_candidates(tb) {
        if nvcc_accepts(nvcc, Some(&cand))?.is_ok() {
            return Ok(Some(cand));
        }
    }
    Err(CudaError::NoHostCompiler(default_err))
}

/// Compute capabilities of the local GPUs (`8.6` → `86`), empty without nvidia-smi.
pub fn local_gpu_archs(tb: &Toolbox) -> Vec<String> {
    let Some(smi) = tb.find("nvidia-smi") else {
        return Vec::new();
    };
    llorch_io::gpu::compute_caps(smi).unwrap_or_default()
}

/// Archs (as written in a profile) → the numeric SASS archs they produce.
pub fn sass_targets(archs: &[String]) -> Vec<String> {
    archs
        .iter()
        .filter(|a| a.as_str() != "native" && !a.ends_with("-virtual"))
        .map(|a| {
            a.trim_end_matches("-real")
                .trim_end_matches(['a', 'f'])
                .to_string()
        })
        .collect()
}

/// Archs (as written in a profile) that embed PTX in the engine: a plain
/// number (`90`: CMake builds the cubin and embeds the PTX) and `-virtual`.
/// That PTX is what keeps a CUDA engine from reproducing: cicc (NVVM) numbers
/// its virtual registers differently from run to run for the largest kernels
/// (measured on the fattn-tile instances, CUDA 13.0.88, docs/gpu.md), while
/// ptxas turns either text into the same cubin. `-real` archs reproduce.
pub fn ptx_archs(archs: &[String]) -> Vec<String> {
    archs
        .iter()
        .filter(|a| a.as_str() != "native" && !a.ends_with("-real"))
        .cloned()
        .collect()
}

/// Why a CUDA engine that embeds PTX may not reproduce, and what to change;
/// `None` when every arch is `-real` (or `native`).
pub fn ptx_note(archs: &[String]) -> Option<String> {
    let ptx = ptx_archs(archs);
    if ptx.is_empty() {
        return None;
    }
    let real: Vec<String> = ptx
        .iter()
        .map(|a| format!("{}-real", a.trim_end_matches("-virtual")))
        .collect();
    Some(format!(
        "engine.cuda_archs {ptx:?} embed PTX: cicc gives different PTX from run to run for the largest kernels (the cubins are the same), so such an engine cannot reproduce byte for byte; name {real:?} to build cubins only, which reproduce (the engine then runs only on those GPUs, with no PTX to JIT for others)"
    ))
}

/// Archs the profile does not cover for the local GPUs.
pub fn uncovered_gpus(profile_archs: &[String], local: &[String]) -> Vec<String> {
    if profile_archs.iter().any(|a| a == "native") {
        return Vec::new();
    }
    let covered = sass_targets(profile_archs);
    local
        .iter()
        .filter(|g| !covered.contains(g))
        .cloned()
        .collect()
}

pub fn probe(tb: &Toolbox, archs: &[String], warnings: &mut Vec<String>) -> CudaReport {
    let found = find_nvcc(tb);
    let nvcc_version = found
        .as_ref()
        .and_then(|(n, _)| Cmd::new(n).arg("--version").read().ok())
        .and_then(|t| parse_nvcc_version(&t));
    let (host_compiler, host_compiler_ok) = match &found {
        Some((n, _)) => match choose_host_compiler(n, tb) {
            Ok(h) => (
                Some(
                    h.map(|p| p.display().to_string())
                        .unwrap_or_else(|| "default (accepted by nvcc)".into()),
                ),
                Some(true),
            ),
            Err(e) => {
                warnings.push(e.to_string());
                (None, Some(false))
            }
        },
        None => (None, None),
    };
    let gpus = local_gpu_archs(tb);
    let uncovered = uncovered_gpus(archs, &gpus);
    if !uncovered.is_empty() {
        warnings.push(format!(
            "the profile builds for sm_{} but this machine has GPU(s) of compute capability {}: the engine will fail with \"no kernel image is available\" here; add {} to engine.cuda_archs",
            sass_targets(archs).join(", sm_"),
            uncovered.join(", "),
            uncovered.join(", ")
        ));
    }
    // The same check a build makes before configuring (native without a GPU, archs vs toolkit).
    if let Some(v) = &nvcc_version {
        if let Err(e) = check_archs(archs, v, &gpus) {
            warnings.push(e.to_string());
        }
    } else if archs.iter().any(|a| a == "native") && gpus.is_empty() {
        warnings.push("engine.cuda_archs has `native` but no GPU is visible: CMake's detection will fail; name the archs explicitly".into());
    }
    CudaReport {
        nvcc: found.as_ref().map(|(n, _)| n.display().to_string()),
        nvcc_version,
        cuda_root: found.and_then(|(_, r)| r).map(|r| r.display().to_string()),
        host_compiler,
        host_compiler_ok,
        gpus_compute_cap: gpus,
        mps: llorch_io::gpu::mps_control_daemon(),
    }
}

/// SASS archs (`sm_90` → `90`) embedded in a binary, via `cuobjdump --list-elf`.
pub fn sass_archs_in(binary: &Path, tb: &Toolbox) -> Result<Vec<String>, CudaError> {
    let cuobjdump = tb
        .find("cuobjdump")
        .or_else(|| {
            find_nvcc(tb)
                .and_then(|(n, _)| Some(n.parent()?.join("cuobjdump")))
                .filter(|p| p.is_file())
        })
        .ok_or(CudaError::NoCuobjdump)?;
    let out = Cmd::new(cuobjdump)
        .arg("--list-elf")
        .arg(binary)
        .read()
        .map_err(CudaError::Cuobjdump)?;
    Ok(parse_list_elf(&out))
}

pub fn parse_list_elf(text: &str) -> Vec<String> {
    let mut archs: Vec<String> = text
        .split(|c: char| c.is_whitespace() || c == '.')
        .filter_map(|w| w.strip_prefix("sm_"))
        .map(|a| {
            a.trim_end_matches(|c: char| !c.is_ascii_digit())
                .to_string()
        })
        .filter(|a| !a.is_empty())
        .collect();
    archs.sort();
    archs.dedup();
    archs
}

/// A row of [`ARCH_TOOLKITS`]: archs, first toolkit (major, minor), first toolkit without them, family.
pub type ArchToolkits = (&'static [u32], (u32, u32), Option<(u32, u32)>, &'static str);

/// Which CUDA toolkits build which GPU architectures: `(archs, first toolkit
/// that builds them, first toolkit that no longer does, who they are)`.
/// From NVIDIA's release notes, as CMake's own list of "all" architectures
/// per toolkit records them (`Modules/Internal/CMakeCUDAArchitecturesAll.cmake`).
pub const ARCH_TOOLKITS: &[ArchToolkits] = &[
    (&[35, 37], (7, 0), Some((12, 0)), "Kepler"),
    (&[50, 52, 53], (7, 0), Some((13, 0)), "Maxwell"),
    (&[60, 61, 62], (8, 0), Some((13, 0)), "Pascal"),
    (&[70, 72], (9, 0), Some((13, 0)), "Volta"),
    (&[75], (10, 0), None, "Turing"),
    (&[80], (11, 0), None, "Ampere (A100)"),
    (&[86], (11, 1), None, "Ampere (RTX 30, A40)"),
    (&[87], (11, 4), None, "Ampere (Jetson Orin)"),
    (&[88], (13, 0), None, "Ampere (Jetson)"),
    (&[89], (11, 8), None, "Ada (RTX 40, L4, L40)"),
    (&[90], (11, 8), None, "Hopper (H100, H200)"),
    (&[100, 120], (12, 8), None, "Blackwell"),
    (
        &[101],
        (12, 8),
        Some((13, 0)),
        "Blackwell (Thor; sm_110 from CUDA 13)",
    ),
    (&[103, 121], (12, 9), None, "Blackwell"),
    (&[110], (13, 0), None, "Blackwell (Thor)"),
];

/// The toolkit version `nvcc --version` reports (`13.0.88`) as (major, minor).
pub fn toolkit_version(v: &str) -> Option<(u32, u32)> {
    let mut it = v.split('.');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Check a profile's archs against the toolkit found, before anything is
/// configured: an error names the arch, the toolkit and what to change.
/// `gpus`: compute capabilities visible here (for `native`).
pub fn check_archs(archs: &[String], nvcc_version: &str, gpus: &[String]) -> Result<(), CudaError> {
    let Some((maj, min)) = toolkit_version(nvcc_version) else {
        return Ok(());
    };
    let have = (maj, min);
    let shown = |t: (u32, u32)| format!("{}.{}", t.0, t.1);
    for a in archs {
        if a == "native" {
            if gpus.is_empty() {
                return Err(CudaError::NativeWithoutGpu);
            }
            continue;
        }
        let base = a.trim_end_matches("-real").trim_end_matches("-virtual");
        let (num, suffix) = match base.strip_suffix(['a', 'f']) {
            Some(n) => (n, base.chars().last()),
            None => (base, None),
        };
        let Ok(n) = num.parse::<u32>() else {
            continue;
        };
        let features = match suffix {
            Some('a') if have < (12, 0) => Some(("architecture-specific", "12.0")),
            Some('f') if have < (12, 9) => Some(("family-specific", "12.9")),
            _ => None,
        };
        if let Some((features, need)) = features {
            return Err(CudaError::FeaturesNeedNewer {
                arch: a.clone(),
                features,
                need,
                have: nvcc_version.into(),
                plain: n,
            });
        }
        let Some((_, first, gone, who)) = ARCH_TOOLKITS.iter().find(|(l, ..)| l.contains(&n))
        else {
            return Err(CudaError::UnknownArch {
                sm: n,
                known: ARCH_TOOLKITS
                    .iter()
                    .flat_map(|(l, ..)| l.iter())
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        if have < *first {
            return Err(CudaError::ArchNeedsNewer {
                sm: n,
                gpus: who,
                need: shown(*first),
                have: nvcc_version.into(),
            });
        }
        if let Some(g) = gone {
            if have >= *g {
                return Err(CudaError::ArchDropped {
                    sm: n,
                    gpus: who,
                    since: shown(*g),
                    have: nvcc_version.into(),
                    last_major: g.0 - 1,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_real_archs_leave_ptx_out() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            ptx_archs(&v(&["90-real", "86-real", "native"])),
            Vec::<String>::new()
        );
        assert_eq!(
            ptx_archs(&v(&["90", "86-real", "120a-virtual"])),
            v(&["90", "120a-virtual"])
        );
        assert!(ptx_note(&v(&["90-real"])).is_none());
        let note = ptx_note(&v(&["90", "86-real"])).unwrap();
        assert!(
            note.contains("[\"90\"]") && note.contains("[\"90-real\"]"),
            "{note}"
        );
    }

    #[test]
    fn archs_are_checked_against_the_toolkit_by_one_table() {
        let ok = |a: &[&str], v: &str| {
            check_archs(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>(), v, &[])
        };
        ok(&["86"], "12.4.131").unwrap();
        ok(&["90", "86-real"], "13.0.88").unwrap();
        ok(&["120"], "12.8.61").unwrap();
        ok(&["90a"], "12.2.140").unwrap();
        ok(&["61"], "12.6.20").unwrap();
        for (archs, v, says) in [
            (&["61"][..], "13.0.88", "no longer build for sm_61"),
            (&["70"], "13.0.88", "CUDA 12.x toolkit"),
            (&["120"], "12.6.20", "needs CUDA 12.8"),
            (&["100"], "12.4.131", "needs CUDA 12.8"),
            (&["121"], "12.8.61", "needs CUDA 12.9"),
            (&["101"], "13.0.88", "no longer build for sm_101"),
            (&["90a"], "11.8.89", "needs CUDA 12.0"),
            (&["120f"], "12.8.61", "needs CUDA 12.9"),
            (&["86", "99"], "12.4.131", "sm_99"),
            (&["native"], "12.4.131", "no GPU is visible"),
        ] {
            let e = ok(archs, v).unwrap_err().to_string();
            assert!(e.contains(says), "{archs:?} on {v}: {e}");
        }
        // `native` with a GPU visible is left to CMake.
        check_archs(&["native".into()], "12.4.131", &["90".into()]).unwrap();
    }

    #[test]
    fn nvcc_version_parses() {
        let t = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 12.4, V12.4.131\nBuild cuda_12.4";
        assert_eq!(parse_nvcc_version(t).as_deref(), Some("12.4.131"));
    }

    #[test]
    fn list_elf_parses() {
        let t = "ELF file    1: ggml-cuda.1.sm_86.cubin\nELF file    2: ggml-cuda.2.sm_90.cubin\nELF file 3: x.3.sm_90a.cubin";
        assert_eq!(parse_list_elf(t), vec!["86", "90"]);
    }

    #[test]
    fn uncovered_gpu_is_reported() {
        assert_eq!(
            uncovered_gpus(&["86".into()], &["86".into(), "90".into()]),
            vec!["90"]
        );
        assert!(uncovered_gpus(&["90a".into()], &["90".into()]).is_empty());
        assert!(uncovered_gpus(&["native".into()], &["75".into()]).is_empty());
    }
}
