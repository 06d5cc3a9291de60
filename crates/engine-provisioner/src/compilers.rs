//! What the compilers are, for the fingerprint: each one's `--version`
//! line, and what they compile against beyond it (the driver's own bytes,
//! a wrapper script's included, and the C++ and C library headers'
//! versions), which a distribution updates apart from the compiler.

use crate::preflight::{first_line, Toolbox};
use llorch_io::cmd::Cmd;
use std::path::PathBuf;

/// The compiler `env` names (or the first of `candidates` found): its path
/// and its `--version` line.
pub fn compiler_identity(
    tb: &Toolbox,
    env: &str,
    candidates: &[&str],
) -> Option<(PathBuf, String)> {
    let from_env = std::env::var(env).ok().filter(|s| !s.is_empty());
    let path = match &from_env {
        Some(c) => tb.find(c),
        None => candidates.iter().find_map(|c| tb.find(c)),
    }?;
    let line = Cmd::new(&path)
        .arg("--version")
        .read()
        .ok()
        .map(|s| first_line(&s))?;
    Some((path, line))
}

/// What the compilers compile against ([`BuildInputs::compiler_runtime`](crate::fingerprint::BuildInputs::compiler_runtime)):
/// each driver's sha256 as resolved, and the C++ and C library headers'
/// versions as the C++ compiler sees them. A part that cannot be read says
/// so (the same machine state gives the same text).
pub fn compiler_runtime(c: &std::path::Path, cxx: &std::path::Path) -> String {
    let sha = |p: &std::path::Path| {
        fs_err::canonicalize(p)
            .ok()
            .and_then(|r| llorch_io::digest::sha256_file(&r).ok())
            .unwrap_or_else(|| "unreadable".into())
    };
    let headers = (|| {
        let dir = tempfile::tempdir().ok()?;
        let probe = dir.path().join("probe.cpp");
        fs_err::write(&probe, "#include <cstddef>\n#include <cstdio>\n").ok()?;
        let out = Cmd::new(cxx)
            .args(["-x", "c++", "-E", "-dM"])
            .arg(&probe)
            .read()
            .ok()?;
        Some(header_versions(&out))
    })()
    .unwrap_or_else(|| "headers unreadable".into());
    format!("cc {} c++ {} {headers}", sha(c), sha(cxx))
}

/// The library versions in a `-E -dM` dump: libstdc++'s `__GLIBCXX__` (its
/// release date) or libc++'s `_LIBCPP_VERSION`, and glibc's
/// `__GLIBC__.__GLIBC_MINOR__`.
pub fn header_versions(dump: &str) -> String {
    let def = |name: &str| {
        dump.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("#define") && w.next() == Some(name))
                .then(|| w.next().unwrap_or("").to_string())
        })
    };
    let cxx = match (def("__GLIBCXX__"), def("_LIBCPP_VERSION")) {
        (Some(v), _) => format!("libstdc++ {v}"),
        (None, Some(v)) => format!("libc++ {v}"),
        _ => "c++ library unknown".into(),
    };
    let libc = match (def("__GLIBC__"), def("__GLIBC_MINOR__")) {
        (Some(a), Some(b)) => format!("glibc {a}.{b}"),
        _ => "c library unknown".into(),
    };
    format!("{cxx} {libc}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_versions_are_read_from_a_macro_dump() {
        let gnu = "#define __GLIBCXX__ 20240904\n#define __GLIBC__ 2\n#define __GLIBC_MINOR__ 39\n#define X 1\n";
        assert_eq!(header_versions(gnu), "libstdc++ 20240904 glibc 2.39");
        assert_eq!(
            header_versions("#define _LIBCPP_VERSION 190100\n"),
            "libc++ 190100 c library unknown"
        );
        assert_eq!(header_versions(""), "c++ library unknown c library unknown");
        // This machine's compilers: a digest for each driver and real versions.
        let tb = Toolbox::default();
        let (c, _) = compiler_identity(&tb, "CC", &["cc", "gcc", "clang"]).unwrap();
        let (cxx, _) = compiler_identity(&tb, "CXX", &["c++", "g++", "clang++"]).unwrap();
        let r = compiler_runtime(&c, &cxx);
        assert!(!r.contains("unreadable") && !r.contains("unknown"), "{r}");
        assert_eq!(
            r,
            compiler_runtime(&c, &cxx),
            "the same machine gives the same text"
        );
    }
}
