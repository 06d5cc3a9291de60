//! Following upstream: the next llama.cpp resolved as a new pin (the next
//! release of the default pin's sdist package, a named version, or a git
//! revision), with its identity recorded (the archive's sha256, the
//! llama.cpp commit it vendors, each backend's bundle tree digest), the pins
//! file that would hold it, a scratch workspace root to build and prove it
//! in, and the write that records it. `cargo xtask pin bump` composes these
//! with a build and the haiku proof; nothing here writes the real pins file
//! but [`record`].

use crate::source::SourceError;
use llorch_io::cmd::{Cmd, CmdError};
use llorch_io::paths::Layout;
use llorch_io::{io, IoError};
use llorch_profile::{Backend, ConfigError, Pin, PinsFile, SourceSpec};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What resolving or recording a pin can fail with.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("the default pin `{0}` is not a package sdist, so there is no next release to find; use `--git REV`")]
    NotSdist(String),
    #[error("the default pin `{pin}` is already {package} {version}")]
    AlreadyAt {
        pin: String,
        package: String,
        version: String,
    },
    #[error("pin `{0}` is already the default")]
    AlreadyDefault(String),
    #[error("`{0}` is not a package version")]
    BadVersion(String),
    #[error("ask pip's index for the versions of {package}: {source}")]
    PipIndex {
        package: String,
        source: Box<CmdError>,
    },
    #[error("pip listed no versions of {package}:\n{listing}")]
    NoVersions { package: String, listing: String },
    #[error("pip download {package}=={version} (is it a release on pip's index?): {source}")]
    PipDownload {
        package: String,
        version: String,
        source: Box<CmdError>,
    },
    #[error("the {package}=={version} sdist {what}")]
    BadSdist {
        package: String,
        version: String,
        what: &'static str,
    },
    #[error("which llama.cpp commit {package}=={version} vendors at {subdir}: {source}")]
    Vendored {
        package: String,
        version: String,
        subdir: String,
        source: Box<SourceError>,
    },
    #[error("no git pin in the pins file names llama.cpp's URL")]
    NoGitUrl,
    #[error("the pins file has no top-level `pins:` line")]
    NoPinsLine,
    #[error("the new pins file does not load: {0}")]
    CandidateInvalid(Box<ConfigError>),
    #[error("{0} changed while the new pin was built; nothing written (run the bump again)")]
    ChangedMeanwhile(PathBuf),
    #[error(transparent)]
    Config(#[from] Box<ConfigError>),
    #[error(transparent)]
    Source(#[from] Box<SourceError>),
    #[error(transparent)]
    Bundle(#[from] crate::bundle::BundleError),
    #[error("pin `{name}` as YAML: {source}")]
    Yaml {
        name: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Io(#[from] IoError),
}

impl From<SourceError> for PinError {
    fn from(e: SourceError) -> Self {
        Self::Source(Box::new(e))
    }
}

impl From<ConfigError> for PinError {
    fn from(e: ConfigError) -> Self {
        Self::Config(Box::new(e))
    }
}

/// A resolved candidate: the new pin and the pins file that would hold it.
pub struct Candidate {
    pub name: String,
    pub pin: Pin,
    /// The new text of `toolchains/llama.cpp.yaml` (comments kept).
    pub text: String,
}

/// The workspace's pins file.
pub fn pins_path(layout: &Layout) -> PathBuf {
    layout.root.join("toolchains/llama.cpp.yaml")
}

/// Resolve the next pin without writing anything but the source cache: the
/// sdist release `to` (default: the newest on pip's index) of the default
/// pin's package, or the git revision `git` of the git pin's URL.
pub fn resolve(
    layout: &Layout,
    to: Option<&str>,
    git: Option<&str>,
    say: &dyn Fn(&str),
) -> Result<Candidate, PinError> {
    let path = pins_path(layout);
    let text = fs_err::read_to_string(&path).map_err(io("read the pins file"))?;
    let pins = PinsFile::load(&path)?;
    let current = &pins.pins[&pins.default];
    let (name, pin) = match git {
        Some(rev) => resolve_git(&pins, rev, say)?,
        None => {
            let SourceSpec::PypiSdist {
                package,
                version,
                subdir,
                ..
            } = &current.source
            else {
                return Err(PinError::NotSdist(pins.default.clone()));
            };
            let target = match to {
                Some(v) => v.to_string(),
                None => newest_version(package)?,
            };
            if &target == version {
                return Err(PinError::AlreadyAt {
                    pin: pins.default.clone(),
                    package: package.clone(),
                    version: target,
                });
            }
            resolve_sdist(layout, package, &target, subdir.as_deref(), say)?
        }
    };
    if pins.default == name {
        return Err(PinError::AlreadyDefault(name));
    }
    Ok(Candidate {
        text: with_pin(&text, &name, &pin)?,
        name,
        pin,
    })
}

/// A scratch workspace root holding the candidate pins file and the
/// workspace's profiles, checked as the real pins file would be.
pub fn candidate_root(layout: &Layout, text: &str) -> Result<tempfile::TempDir, PinError> {
    let t = tempfile::Builder::new()
        .prefix("llorch-pin-")
        .tempdir()
        .map_err(io("create a scratch workspace root"))?;
    let pins = t.path().join("toolchains/llama.cpp.yaml");
    fs_err::create_dir_all(t.path().join("toolchains")).map_err(io("scratch root"))?;
    fs_err::write(&pins, text).map_err(io("scratch root"))?;
    let req = t.path().join("requirements");
    fs_err::create_dir_all(&req).map_err(io("scratch root"))?;
    for e in fs_err::read_dir(layout.root.join("requirements")).map_err(io("profiles"))? {
        let e = e.map_err(io("profiles"))?;
        if e.file_type().map_err(io("profiles"))?.is_file() {
            fs_err::copy(e.path(), req.join(e.file_name())).map_err(io("copy a profile"))?;
        }
    }
    PinsFile::load(&pins).map_err(|e| PinError::CandidateInvalid(Box::new(e)))?;
    Ok(t)
}

/// Write `text` as the pins file at `path` (atomically), unless the file no
/// longer reads `original`: an edit or another bump meanwhile is refused
/// rather than lost.
pub fn record(path: &Path, original: &str, text: &str) -> Result<(), PinError> {
    let now = fs_err::read_to_string(path).map_err(io("read the pins file"))?;
    if now != original {
        return Err(PinError::ChangedMeanwhile(path.to_path_buf()));
    }
    llorch_io::fsx::write_atomic(path, text.as_bytes()).map_err(io("write the pins file"))?;
    Ok(())
}

/// The newest version of `package` on pip's index (`pip index versions`).
fn newest_version(package: &str) -> Result<String, PinError> {
    let out = Cmd::new("python3")
        .args(["-m", "pip", "index", "versions", package])
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .read()
        .map_err(|e| PinError::PipIndex {
            package: package.into(),
            source: Box::new(e),
        })?;
    parse_newest(&out).ok_or_else(|| PinError::NoVersions {
        package: package.into(),
        listing: out,
    })
}

/// `llama-cpp-python (0.3.36)` → `0.3.36`.
pub fn parse_newest(text: &str) -> Option<String> {
    let line = text
        .lines()
        .find(|l| !l.starts_with("WARNING") && l.contains('('))?;
    let v = line.split('(').nth(1)?.split(')').next()?.trim();
    (!v.is_empty()).then(|| v.to_string())
}

/// Only the characters a package version may hold (PEP 440's, and nothing a
/// shell or pip's requirement syntax reads otherwise).
fn check_version(version: &str) -> Result<(), PinError> {
    let ok = !version.is_empty()
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+' | '!'));
    if ok {
        Ok(())
    } else {
        Err(PinError::BadVersion(version.into()))
    }
}

fn resolve_sdist(
    layout: &Layout,
    package: &str,
    version: &str,
    subdir: Option<&str>,
    say: &dyn Fn(&str),
) -> Result<(String, Pin), PinError> {
    check_version(version)?;
    let bad = |what| PinError::BadSdist {
        package: package.into(),
        version: version.into(),
        what,
    };
    let downloads = layout.downloads();
    fs_err::create_dir_all(&downloads).map_err(io("create the downloads directory"))?;
    let dl = tempfile::Builder::new()
        .prefix("pin-bump-")
        .tempdir_in(&downloads)
        .map_err(io("create a download directory"))?;
    say(&format!("downloading {package}=={version} sdist with pip"));
    Cmd::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "-q", "-d"])
        .arg(dl.path())
        .arg("--no-binary")
        .arg(package)
        .arg(format!("{package}=={version}"))
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .read()
        .map_err(|e| PinError::PipDownload {
            package: package.into(),
            version: version.into(),
            source: Box::new(e),
        })?;
    let archive = first_entry(dl.path(), |p| {
        p.to_string_lossy().ends_with(".tar.gz") && p.is_file()
    })?
    .ok_or_else(|| bad("was not downloaded as a .tar.gz"))?;
    let sha256 = llorch_io::digest::sha256_file(&archive).map_err(io("hash the sdist"))?;
    let tree = dl.path().join("tree");
    crate::extract::extract_tar_gz(&archive, &tree, None)?;
    let top = first_entry(&tree, |p| p.is_dir())?.ok_or_else(|| bad("holds no directory"))?;
    let sub = subdir.unwrap_or("vendor/llama.cpp");
    let commit = crate::source::vendored_commit(&top, sub).map_err(|e| PinError::Vendored {
        package: package.into(),
        version: version.into(),
        subdir: sub.into(),
        source: Box::new(e),
    })?;
    let pin = Pin {
        commit,
        source: SourceSpec::PypiSdist {
            package: package.into(),
            version: version.into(),
            sha256,
            subdir: Some(sub.into()),
        },
        description: Some(format!(
            "llama.cpp as vendored by the {package} {version} sdist (fetched with pip)"
        )),
        bundle_trees: bundle_trees(&top.join(sub))?,
    };
    // The source cache gets this very file (checked against the digest just
    // recorded), so the build that follows does not download it again.
    crate::source::fetch_using(&pin, layout, say, Some(&archive))?;
    Ok((format!("{package}-{version}"), pin))
}

/// The first entry of `dir` (in the order the directory lists them) that
/// `keep` accepts.
fn first_entry(dir: &Path, keep: impl Fn(&Path) -> bool) -> Result<Option<PathBuf>, PinError> {
    let entries = fs_err::read_dir(dir).map_err(io("list a download"))?;
    Ok(entries.flatten().map(|e| e.path()).find(|p| keep(p)))
}

/// Each backend's bundle tree digest of the llama.cpp tree at `llama`.
fn bundle_trees(llama: &Path) -> Result<BTreeMap<String, String>, PinError> {
    let mut trees = BTreeMap::new();
    for (b, name) in [(Backend::Cpu, "cpu"), (Backend::Cuda, "cuda")] {
        let (_, files) = crate::bundle::tree_files(llama, b)?;
        trees.insert(name.to_string(), crate::bundle::tree_digest(&files));
    }
    Ok(trees)
}

fn resolve_git(pins: &PinsFile, rev: &str, say: &dyn Fn(&str)) -> Result<(String, Pin), PinError> {
    let url = pins
        .pins
        .values()
        .find_map(|p| match &p.source {
            SourceSpec::Git { url, .. } => Some(url.clone()),
            _ => None,
        })
        .ok_or(PinError::NoGitUrl)?;
    let is_commit = rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit {
        rev.to_ascii_lowercase()
    } else {
        say(&format!("resolving {rev} at {url}"));
        crate::source::resolve_remote_rev(&url, rev)?
    };
    let pin = Pin {
        commit: commit.clone(),
        source: SourceSpec::Git {
            url: url.clone(),
            rev: (!is_commit).then(|| rev.to_string()),
            submodules: false,
        },
        description: Some(format!("llama.cpp {rev} from {url}, cloned with git")),
        bundle_trees: Default::default(),
    };
    Ok((format!("upstream-{}", &commit[..7]), pin))
}

/// The pins file with `pin` added as `name` (or replacing it) and made the
/// default; comments and the other pins stay as written.
pub fn with_pin(text: &str, name: &str, pin: &Pin) -> Result<String, PinError> {
    let block = llorch_profile::pin_yaml(name, pin).map_err(|e| PinError::Yaml {
        name: name.into(),
        source: Box::new(e),
    })?;
    let indented: String = block.lines().map(|l| format!("  {l}\n")).collect();
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    let mut done = false;
    while let Some(l) = lines.next() {
        if l.starts_with("default:") {
            out.push_str(&format!("default: {name}\n"));
            continue;
        }
        // An existing block of the same name is dropped (replaced below).
        if l == format!("  {name}:") {
            while lines
                .peek()
                .is_some_and(|n| n.starts_with("    ") || n.trim().is_empty())
            {
                lines.next();
            }
            continue;
        }
        out.push_str(l);
        out.push('\n');
        if l == "pins:" && !done {
            out.push_str(&indented);
            done = true;
        }
    }
    if !done {
        return Err(PinError::NoPinsLine);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_version_parses() {
        let t = "WARNING: pip index is currently an experimental command.\nllama-cpp-python (0.3.36)\nAvailable versions: 0.3.36, 0.3.35\n";
        assert_eq!(parse_newest(t).as_deref(), Some("0.3.36"));
        assert_eq!(parse_newest("nothing"), None);
    }

    #[test]
    fn versions_hold_only_version_characters() {
        for ok in ["0.3.36", "1.0rc1", "2!1.0+local_1", "0.3-1"] {
            assert!(check_version(ok).is_ok(), "{ok}");
        }
        for bad in ["", "0.3; rm -rf /", "0.3 --index-url x", "../0.3", "0.3\n"] {
            assert!(
                matches!(check_version(bad), Err(PinError::BadVersion(_))),
                "{bad:?}"
            );
        }
    }

    fn load(text: &str) -> PinsFile {
        let d = tempfile::tempdir().unwrap();
        fs_err::write(d.path().join("p.yaml"), text).unwrap();
        PinsFile::load(&d.path().join("p.yaml")).unwrap()
    }

    #[test]
    fn a_new_pin_becomes_the_default_and_comments_stay() {
        let text = "# comment\nschema: 1\ndefault: a\npins:\n  a:\n    commit: 4df29be4f4c3673f428170fda944a5b19f743bb8\n    source:\n      kind: git\n      url: https://example.invalid/l.git\n";
        let pin = Pin {
            commit: "0c1e57098bba43ac29e6e3b677cdceebdd22334f".into(),
            source: SourceSpec::Git {
                url: "https://example.invalid/l.git".into(),
                rev: Some("b1".into()),
                submodules: false,
            },
            description: Some("next".into()),
            bundle_trees: Default::default(),
        };
        let out = with_pin(text, "b", &pin).unwrap();
        assert!(out.starts_with("# comment\n"), "{out}");
        let parsed = load(&out);
        assert_eq!(parsed.default, "b");
        assert_eq!(parsed.pins["b"], pin);
        assert!(parsed.pins.contains_key("a"));
        // Bumping to the same name again replaces it.
        let again = with_pin(&out, "b", &pin).unwrap();
        let parsed = load(&again);
        assert_eq!(parsed.pins.len(), 2);
        assert!(matches!(
            with_pin("schema: 1\n", "b", &pin),
            Err(PinError::NoPinsLine)
        ));
    }

    #[test]
    fn record_refuses_a_file_changed_meanwhile() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("llama.cpp.yaml");
        fs_err::write(&p, "one\n").unwrap();
        assert!(matches!(
            record(&p, "before\n", "new\n"),
            Err(PinError::ChangedMeanwhile(_))
        ));
        assert_eq!(fs_err::read_to_string(&p).unwrap(), "one\n");
        record(&p, "one\n", "new\n").unwrap();
        assert_eq!(fs_err::read_to_string(&p).unwrap(), "new\n");
    }
}
