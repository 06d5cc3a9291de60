//! The runtime closure of the binaries an image runs: the shared libraries
//! `ldd` names, and the ELF interpreter.
//!
//! Every library goes into the image at the directory of the C library it
//! was resolved with (a directory the copied interpreter searches without a
//! `ld.so.cache`), under the name the binary asks for; the interpreter at
//! the path the binaries name. The GPU driver's own libraries (`libcuda`,
//! `libnvidia-*`) are never copied: a node's NVIDIA container runtime mounts
//! the ones that match its kernel driver, as for every CUDA image. Any other
//! library `ldd` cannot find is an error that names it.

use crate::DeployError;
use llorch_io::cmd::Cmd;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Libraries that come from the node's GPU driver, never from the image.
pub const DRIVER_LIBRARIES: &[&str] = &[
    "libcuda.so",
    "libnvidia-",
    "libnvcuvid.so",
    "libnvoptix.so",
    "libcudadebugger.so",
];

pub fn is_driver_library(name: &str) -> bool {
    DRIVER_LIBRARIES.iter().any(|p| name.starts_with(p))
}

/// One line of `ldd`'s output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LddLine {
    /// `libx.so.1 => /path/libx.so.1 (0x…)`
    Found { name: String, path: PathBuf },
    /// `libx.so.1 => not found`
    Missing { name: String },
    /// `/lib64/ld-linux-x86-64.so.2 (0x…)`: the interpreter.
    Interpreter(PathBuf),
    /// `linux-vdso.so.1 (0x…)`: in the kernel, nothing to copy.
    Virtual,
}

/// A line of `ldd`'s output that is none of the shapes it prints.
#[derive(Debug, thiserror::Error)]
#[error("cannot read ldd line `{0}`")]
pub struct UnreadableLdd(pub String);

/// Read `ldd`'s output; a line it cannot read is an error.
pub fn parse_ldd(text: &str) -> Result<Vec<LddLine>, UnreadableLdd> {
    let mut out = Vec::new();
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line == "statically linked" {
            continue;
        }
        if let Some((name, rest)) = line.split_once(" => ") {
            let name = name.trim().to_string();
            let rest = rest.trim();
            if rest == "not found" {
                out.push(LddLine::Missing { name });
                continue;
            }
            let path = rest.split(" (").next().unwrap_or("").trim();
            if !path.starts_with('/') {
                return Err(UnreadableLdd(llorch_types::excerpt(raw, 120)));
            }
            out.push(LddLine::Found {
                name,
                path: PathBuf::from(path),
            });
        } else {
            let first = line.split(" (").next().unwrap_or("").trim();
            if first.starts_with('/') {
                out.push(LddLine::Interpreter(PathBuf::from(first)));
            } else if first.starts_with("linux-vdso") || first.starts_with("linux-gate") {
                out.push(LddLine::Virtual);
            } else {
                return Err(UnreadableLdd(llorch_types::excerpt(raw, 120)));
            }
        }
    }
    Ok(out)
}

/// What the binaries need at run time.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Closure {
    /// Interpreter path (as the binaries name it) → the file on this machine.
    pub interpreters: BTreeMap<String, PathBuf>,
    /// Library name → the file on this machine it resolved to.
    pub libraries: BTreeMap<String, PathBuf>,
    /// Which binary needs which library (for the explanation).
    pub needed_by: BTreeMap<String, Vec<String>>,
    /// Driver libraries left to the node's container runtime.
    pub from_driver: Vec<String>,
    /// Where the libraries go in the image: the C library's directory.
    pub lib_dir: String,
}

/// The closure of `binaries` (each `(label, path)`), from `ldd`, with
/// `LD_LIBRARY_PATH` extended by `extra_dirs` (a CUDA toolkit's `lib64`).
pub fn of(binaries: &[(&str, &Path)], extra_dirs: &[PathBuf]) -> Result<Closure, DeployError> {
    let mut c = Closure::default();
    let ld_path = std::env::join_paths(
        extra_dirs.iter().cloned().chain(
            std::env::var_os("LD_LIBRARY_PATH")
                .iter()
                .flat_map(std::env::split_paths),
        ),
    )
    .unwrap_or_default();
    for (label, bin) in binaries {
        let text = Cmd::new("ldd")
            .arg(bin)
            .env("LD_LIBRARY_PATH", &ld_path)
            .read()
            .map_err(|e| DeployError::Ldd {
                binary: bin.display().to_string(),
                why: e.to_string(),
            })?;
        let lines = parse_ldd(&text).map_err(|e| DeployError::Ldd {
            binary: bin.display().to_string(),
            why: e.to_string(),
        })?;
        for l in lines {
            match l {
                LddLine::Virtual => {}
                LddLine::Interpreter(p) => {
                    let real = fs_err::canonicalize(&p)
                        .map_err(llorch_io::io("find the ELF interpreter"))?;
                    c.interpreters.insert(p.display().to_string(), real);
                }
                LddLine::Missing { name } if is_driver_library(&name) => {
                    if !c.from_driver.contains(&name) {
                        c.from_driver.push(name);
                    }
                }
                LddLine::Missing { name } => {
                    return Err(DeployError::MissingLibrary {
                        binary: bin.display().to_string(),
                        library: name,
                    })
                }
                LddLine::Found { name, .. } if is_driver_library(&name) => {
                    if !c.from_driver.contains(&name) {
                        c.from_driver.push(name);
                    }
                }
                LddLine::Found { name, path } => {
                    let real = fs_err::canonicalize(&path)
                        .map_err(llorch_io::io("find a shared library"))?;
                    if name.starts_with("libc.so") {
                        if let Some(d) = path.parent() {
                            c.lib_dir = d.display().to_string();
                        }
                    }
                    c.needed_by
                        .entry(name.clone())
                        .or_default()
                        .push(label.to_string());
                    c.libraries.insert(name, real);
                }
            }
        }
    }
    if c.lib_dir.is_empty() && !c.libraries.is_empty() {
        return Err(DeployError::Ldd {
            binary: binaries
                .iter()
                .map(|(_, b)| b.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            why: "no C library among what they load (a static binary needs no closure; this is neither)".into(),
        });
    }
    c.from_driver.sort();
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_read_strictly() {
        let t = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                 \tlibcudart.so.13 => /usr/local/cuda/lib64/libcudart.so.13 (0x00007f00)\n\
                 \tlibcuda.so.1 => not found\n\
                 \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f01)\n\
                 \t/lib64/ld-linux-x86-64.so.2 (0x00007f02)\n";
        let l = parse_ldd(t).unwrap();
        assert_eq!(l[0], LddLine::Virtual);
        assert_eq!(
            l[1],
            LddLine::Found {
                name: "libcudart.so.13".into(),
                path: "/usr/local/cuda/lib64/libcudart.so.13".into()
            }
        );
        assert_eq!(
            l[2],
            LddLine::Missing {
                name: "libcuda.so.1".into()
            }
        );
        assert_eq!(
            l[4],
            LddLine::Interpreter("/lib64/ld-linux-x86-64.so.2".into())
        );
        assert!(parse_ldd("libx.so => relative/path (0x1)").is_err());
        assert!(parse_ldd("garbage line").is_err());
        assert!(is_driver_library("libcuda.so.1") && is_driver_library("libnvidia-ml.so.1"));
        assert!(!is_driver_library("libcudart.so.13") && !is_driver_library("libcublas.so.13"));
    }

    #[test]
    fn the_closure_of_a_real_binary_has_its_c_library_and_interpreter() {
        let c = of(&[("sh", Path::new("/bin/sh"))], &[]).unwrap();
        assert!(
            c.libraries.keys().any(|k| k.starts_with("libc.so")),
            "{c:?}"
        );
        assert_eq!(c.interpreters.len(), 1, "{c:?}");
        assert!(!c.lib_dir.is_empty());
    }
}
