//! Fetching a pinned llama.cpp tree into `cache/src-v1/<source-id>/`.
//!
//! * `git`: one bare object store per URL (`src-v1/git-db/<url-hash>.git`),
//!   fetched into as new commits are pinned; each commit gets its own
//!   detached checkout (`src-v1/git-<commit>`) that borrows the store's
//!   objects through `objects/info/alternates`. HEAD is verified against the pin.
//! * `pypi_sdist`: `python3 -m pip download --no-deps --no-binary PKG PKG==VER`
//!   (pip's own index configuration applies), sha256 checked before
//!   extraction, then the pinned subdirectory is kept.
//! * `archive`: a local path or an http(s) URL, sha256 checked, extracted
//!   with a strip prefix.
//!
//! Archives are extracted by [`crate::extract`] (members that would land
//! outside the target are refused). Every tree is staged beside its final
//! path and renamed into place only when complete, under a per-source lock.

use crate::extract::extract_tar_gz;
use crate::fingerprint::SourceIdentity;
use llorch_io::cmd::Cmd;
use llorch_io::fsx::{self, FileLock};
use llorch_io::paths::Layout;
use llorch_profile::{Pin, SourceSpec};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("sha256 mismatch for {what}\n  expected: {expected}\n  actual:   {actual}\n  nothing was extracted (a download of ours is deleted; a file of yours is left as it is). If the pin is right, the file is corrupt or was tampered with: try again, or check your package index / mirror.")]
    ChecksumMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("refusing to extract {archive}: member `{member}` {why}")]
    UnsafeMember {
        archive: String,
        member: String,
        why: String,
    },
    #[error("git: {0}")]
    Git(String),
    #[error("commit {commit} is not in {url} (fetched all branches and tags)\n  hint: check the pin in toolchains/llama.cpp.yaml; a shallow or private mirror may lack it")]
    UnknownCommit { url: String, commit: String },
    #[error("pin mismatch for {url}: {detail}")]
    PinMismatch { url: String, detail: String },
    #[error("pip download of {package}=={version} failed: {source}\n  hint: pip uses its own index configuration (pip config list); check network access to your package index")]
    Pip {
        package: String,
        version: String,
        source: Box<llorch_io::cmd::CmdError>,
    },
    #[error(transparent)]
    Download(Box<llorch_io::download::DownloadError>),
    #[error(transparent)]
    Io(#[from] llorch_io::IoError),
    #[error("{0}")]
    Layout(String),
    #[error(transparent)]
    Transport(#[from] crate::git_https::TransportError),
}

pub(crate) use llorch_io::io;

/// The identity of a pin's source (what the fingerprint records).
pub fn identity(pin: &Pin) -> SourceIdentity {
    match &pin.source {
        SourceSpec::Git { .. } => SourceIdentity {
            kind: "git".into(),
            id: pin.commit.to_lowercase(),
            commit: pin.commit.to_lowercase(),
            subdir: None,
        },
        SourceSpec::PypiSdist { sha256, subdir, .. } => SourceIdentity {
            kind: "pypi_sdist".into(),
            id: sha256.clone(),
            commit: pin.commit.to_lowercase(),
            subdir: subdir.clone(),
        },
        SourceSpec::Archive {
            sha256,
            strip_prefix,
            ..
        } => SourceIdentity {
            kind: "archive".into(),
            id: sha256.clone(),
            commit: pin.commit.to_lowercase(),
            subdir: strip_prefix.clone(),
        },
    }
}

/// Directory name under `src-v1/` for a pin.
pub fn source_id(pin: &Pin) -> String {
    match &pin.source {
        SourceSpec::Git { .. } => format!("git-{}", pin.commit.to_lowercase()),
        SourceSpec::PypiSdist {
            package,
            version,
            sha256,
            ..
        } => format!("pypi-{package}-{version}-{}", &sha256[..12]),
        SourceSpec::Archive { sha256, .. } => format!("archive-{}", &sha256[..12]),
    }
}

/// Make the pin's tree present; returns its path. `progress` gets short status lines.
pub fn fetch(pin: &Pin, layout: &Layout, progress: &dyn Fn(&str)) -> Result<PathBuf, SourceError> {
    fetch_using(pin, layout, progress, None)
}

/// [`fetch`], with the sdist of a package pin already on disk (`pin bump`
/// downloaded it to learn its digest): checked against the pin's sha256
/// like a download, so the source is not downloaded a second time.
pub fn fetch_using(
    pin: &Pin,
    layout: &Layout,
    progress: &dyn Fn(&str),
    sdist: Option<&Path>,
) -> Result<PathBuf, SourceError> {
    let src_root = layout.bucket(llorch_io::paths::Bucket::Src);
    let id = source_id(pin);
    let final_dir = src_root.join(&id);
    let _lock = FileLock::exclusive(&layout.source_lock(&id), || {
        progress(&format!(
            "waiting for another process preparing source {id}"
        ))
    })
    .map_err(io("lock source"))?;
    if let SourceSpec::Git {
        url,
        rev,
        submodules,
    } = &pin.source
    {
        return git_checkout(
            url,
            rev.as_deref(),
            &pin.commit,
            *submodules,
            &src_root,
            progress,
        );
    }
    if final_dir.join(".llorch-complete").is_file() {
        return Ok(final_dir);
    }
    let staging = fsx::staging_dir_for(&final_dir).map_err(io("create staging dir"))?;
    let tree = staging.path().join("tree");
    match &pin.source {
        SourceSpec::PypiSdist {
            package,
            version,
            sha256,
            subdir,
        } => {
            let dl = tempfile::tempdir_in(&src_root).map_err(io("temp dir"))?;
            let file = match sdist {
                Some(f) => f.to_path_buf(),
                None => {
                    progress(&format!("downloading {package}=={version} sdist with pip"));
                    pip_download_sdist(package, version, sha256, dl.path())?
                }
            };
            let spec = format!("{package}=={version}");
            verify_sha256(&file, sha256, &format!("{spec} sdist ({})", file.display()))?;
            progress("extracting sdist");
            stage_sdist(&file, &spec, subdir.as_deref(), staging.path())?;
        }
        SourceSpec::Archive {
            location,
            sha256,
            strip_prefix,
        } => {
            let file = if location.starts_with("http://") || location.starts_with("https://") {
                progress(&format!("downloading {location}"));
                download_archive(location, sha256, layout)?
            } else {
                let p = PathBuf::from(location);
                if p.is_absolute() {
                    p
                } else {
                    layout.root.join(p)
                }
            };
            verify_sha256(&file, sha256, &format!("archive {location}"))?;
            progress("extracting archive");
            extract_tar_gz(&file, &tree, strip_prefix.as_deref())?;
            if file.starts_with(layout.downloads()) {
                let _ = fs_err::remove_file(&file);
            }
        }
        SourceSpec::Git { .. } => unreachable!(),
    }
    fs_err::write(tree.join(".llorch-complete"), identity(pin).id).map_err(io("mark complete"))?;
    fsx::commit_subdir(staging, Path::new("tree"), &final_dir)
        .map_err(io("install source tree"))?;
    Ok(final_dir)
}

/// A verified sdist unpacked under `staging`, its llama.cpp tree (`subdir`
/// of its one top directory) moved to `staging/tree`.
fn stage_sdist(
    file: &Path,
    spec: &str,
    subdir: Option<&str>,
    staging: &Path,
) -> Result<(), SourceError> {
    let unpack = staging.join("unpack");
    extract_tar_gz(file, &unpack, None)?;
    let top = single_top_dir(&unpack)?;
    let tree = match subdir {
        Some(s) => top.join(s),
        None => top,
    };
    if !tree.join("CMakeLists.txt").is_file() {
        return Err(SourceError::Layout(format!(
            "{spec}: no CMakeLists.txt at `{}` inside the sdist (check `subdir` in the pin)",
            subdir.unwrap_or(".")
        )));
    }
    fs_err::rename(&tree, staging.join("tree")).map_err(io("move tree"))?;
    fs_err::remove_dir_all(&unpack).map_err(io("clean unpack dir"))?;
    Ok(())
}

/// An archive pin's URL through the one downloader: resumable (a cut
/// transfer continues from the bytes already in `downloads/`), hashed while
/// it streams, refused (and deleted) unless it is the pinned sha256.
fn download_archive(location: &str, sha256: &str, layout: &Layout) -> Result<PathBuf, SourceError> {
    // The digest names the partial file: only a digest, never a path.
    if !llorch_types::is_sha256_hex(sha256) {
        return Err(SourceError::Layout(format!(
            "archive {location}: sha256 `{sha256}` is not 64 lowercase hex digits"
        )));
    }
    let partial = layout.downloads().join(format!("archive-{sha256}.partial"));
    let opts = llorch_io::download::DownloadOptions {
        expected_sha256: Some(sha256.to_string()),
        ..Default::default()
    };
    llorch_io::download::download(location, location, &partial, &opts).map_err(|e| match e {
        llorch_io::download::DownloadError::DigestMismatch {
            expected, actual, ..
        } => SourceError::ChecksumMismatch {
            what: format!("archive {location}"),
            expected,
            actual,
        },
        e => SourceError::Download(Box::new(e)),
    })?;
    Ok(partial)
}

pub fn verify_sha256(file: &Path, expected: &str, what: &str) -> Result<(), SourceError> {
    let actual =
        llorch_io::digest::sha256_file(file).map_err(io(format!("hash {}", file.display())))?;
    if actual != expected {
        // Never deleted here: it may be the user's own file (a local archive
        // pin, the sdist `pin bump` hands over); downloads live in temporary
        // directories, and the downloader deletes a partial that mismatches.
        return Err(SourceError::ChecksumMismatch {
            what: what.to_string(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

/// `pip download` of a pinned sdist in pip's hash-checking mode: pip checks
/// the archive against the pin's sha256 before it prepares metadata, so the
/// sdist's build backend (code from the registry) never runs unless the
/// archive is the pinned one. The user's pip configuration (index, proxy,
/// certificates) is honoured; we only add the hash.
fn pip_download_sdist(
    package: &str,
    version: &str,
    sha256: &str,
    dir: &Path,
) -> Result<PathBuf, SourceError> {
    let spec = format!("{package}=={version}");
    if !llorch_types::is_sha256_hex(sha256) {
        return Err(SourceError::Layout(format!(
            "{spec}: the pin's sha256 is not 64 hex digits"
        )));
    }
    let req = dir.join("llorch-requirements.txt");
    fs_err::write(&req, format!("{spec} --hash=sha256:{sha256}\n"))
        .map_err(io("write pip requirements"))?;
    let out_dir = dir.join("out");
    let r = Cmd::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--require-hashes",
            "-q",
            "-d",
        ])
        .arg(&out_dir)
        .arg("--no-binary")
        .arg(package)
        .arg("-r")
        .arg(&req)
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .read();
    if let Err(source) = r {
        let text = source.to_string();
        if text.contains("DO NOT MATCH THE HASHES") {
            let actual = text
                .split("Got")
                .nth(1)
                .and_then(|t| t.split_whitespace().next())
                .unwrap_or("(see pip's message)")
                .to_string();
            return Err(SourceError::ChecksumMismatch {
                what: format!(
                    "{spec} sdist from pip's index (checked by pip before anything in it ran)"
                ),
                expected: sha256.to_string(),
                actual,
            });
        }
        return Err(SourceError::Pip {
            package: package.into(),
            version: version.into(),
            source: Box::new(source),
        });
    }
    fs_err::read_dir(&out_dir)
        .map_err(io("list pip download dir"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".tar.gz"))
        .ok_or_else(|| SourceError::Layout(format!("pip downloaded no .tar.gz sdist for {spec}")))
}

/// The commit a package's own git metadata (shipped in its sdist, as
/// llama-cpp-python's is) records for the submodule at `sub`.
pub fn vendored_commit(top: &Path, sub: &str) -> Result<String, SourceError> {
    let repo = git2::Repository::open(top).map_err(|e| {
        SourceError::Layout(format!(
            "{} carries no readable git metadata ({e})",
            top.display()
        ))
    })?;
    let tree = repo
        .head()
        .and_then(|h| h.peel_to_tree())
        .map_err(git_err)?;
    let entry = tree.get_path(Path::new(sub)).map_err(git_err)?;
    if entry.kind() != Some(git2::ObjectType::Commit) {
        return Err(SourceError::Layout(format!(
            "{sub} is not a submodule in the package's git tree"
        )));
    }
    Ok(entry.id().to_string())
}

/// The commit a tag or branch names at `url` (annotated tags peeled).
pub fn resolve_remote_rev(url: &str, rev: &str) -> Result<String, SourceError> {
    if url.starts_with("https://") {
        crate::git_https::install()?;
    }
    let mut remote = git2::Remote::create_detached(url).map_err(git_err)?;
    remote.connect(git2::Direction::Fetch).map_err(git_err)?;
    let heads = remote.list().map_err(git_err)?;
    [
        format!("refs/tags/{rev}^{{}}"),
        format!("refs/tags/{rev}"),
        format!("refs/heads/{rev}"),
    ]
    .iter()
    .find_map(|w| {
        heads
            .iter()
            .find(|h| h.name() == w)
            .map(|h| h.oid().to_string())
    })
    .ok_or_else(|| SourceError::Layout(format!("{url} has no tag or branch `{rev}`")))
}

fn single_top_dir(dir: &Path) -> Result<PathBuf, SourceError> {
    let entries: Vec<PathBuf> = fs_err::read_dir(dir)
        .map_err(io("list extracted sdist"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    match entries.as_slice() {
        [one] if one.is_dir() => Ok(one.clone()),
        _ => Err(SourceError::Layout(format!(
            "expected one top-level directory in the sdist, found {}",
            entries.len()
        ))),
    }
}

// ---------------------------------------------------------------- git

fn git_err(e: git2::Error) -> SourceError {
    SourceError::Git(e.message().to_string())
}

fn head_commit(repo: &git2::Repository) -> Result<git2::Oid, SourceError> {
    Ok(repo
        .head()
        .map_err(git_err)?
        .peel_to_commit()
        .map_err(git_err)?
        .id())
}

fn url_key(url: &str) -> String {
    llorch_io::digest::sha256_bytes(url.as_bytes())[..16].to_string()
}

/// Fetch `commit` from `url` into the shared object store and check it out
/// detached at `src_root/git-<commit>`.
pub fn git_checkout(
    url: &str,
    rev: Option<&str>,
    commit: &str,
    submodules: bool,
    src_root: &Path,
    progress: &dyn Fn(&str),
) -> Result<PathBuf, SourceError> {
    let commit = commit.to_lowercase();
    let final_dir = src_root.join(format!("git-{commit}"));
    let oid = git2::Oid::from_str(&commit).map_err(git_err)?;
    if final_dir.join(".git").exists() {
        let repo = git2::Repository::open(&final_dir).map_err(git_err)?;
        let head = head_commit(&repo)?;
        if head == oid {
            return Ok(final_dir);
        }
        progress(&format!(
            "checkout {} has HEAD {head}, not {commit}: recreating it",
            final_dir.display()
        ));
        fs_err::remove_dir_all(&final_dir).map_err(io("remove stale checkout"))?;
    }
    let db_path = src_root
        .join("git-db")
        .join(format!("{}.git", url_key(url)));
    let db = object_store(&db_path, url)?;
    if db.find_commit(oid).is_err() {
        fetch_commit(&db, url, oid, progress)?;
    }
    if let Some(rev) = rev {
        check_rev(&db, url, rev, oid)?;
    }
    progress(&format!("checking out {commit}"));
    let staging = fsx::staging_dir_for(&final_dir).map_err(io("create staging dir"))?;
    check_out(staging.path(), &db_path, url, oid, submodules, progress)?;
    fsx::commit_dir(staging, &final_dir).map_err(io("install checkout"))?;
    Ok(final_dir)
}

/// The bare object store shared by every checkout of `url`.
fn object_store(db_path: &Path, url: &str) -> Result<git2::Repository, SourceError> {
    if db_path.exists() {
        return git2::Repository::open_bare(db_path).map_err(git_err);
    }
    fs_err::create_dir_all(db_path).map_err(io("create git store"))?;
    let r = git2::Repository::init_bare(db_path).map_err(git_err)?;
    r.remote("origin", url).map_err(git_err)?;
    Ok(r)
}

/// Every branch and tag of `url` into the store, then the commit by id
/// where the server serves unadvertised commits; the commit must be there.
fn fetch_commit(
    db: &git2::Repository,
    url: &str,
    oid: git2::Oid,
    progress: &dyn Fn(&str),
) -> Result<(), SourceError> {
    if url.starts_with("https://") {
        crate::git_https::install()?;
    }
    progress(&format!("fetching {url}"));
    let mut remote = db.find_remote("origin").map_err(git_err)?;
    let mut opts = git2::FetchOptions::new();
    opts.download_tags(git2::AutotagOption::All);
    remote
        .fetch(
            &[
                "+refs/heads/*:refs/remotes/origin/*",
                "+refs/tags/*:refs/tags/*",
            ],
            Some(&mut opts),
            None,
        )
        .map_err(git_err)?;
    let commit = oid.to_string();
    if db.find_commit(oid).is_err() {
        // Servers that allow it can serve an unadvertised commit by id.
        let _ = remote.fetch(
            &[commit.as_str()],
            Some(&mut git2::FetchOptions::new()),
            None,
        );
    }
    if db.find_commit(oid).is_err() {
        return Err(SourceError::UnknownCommit {
            url: url.into(),
            commit,
        });
    }
    Ok(())
}

/// The pin's `rev` (a branch, tag or any revision) must name its commit.
fn check_rev(
    db: &git2::Repository,
    url: &str,
    rev: &str,
    oid: git2::Oid,
) -> Result<(), SourceError> {
    let resolved = db
        .revparse_single(&format!("refs/remotes/origin/{rev}"))
        .or_else(|_| db.revparse_single(&format!("refs/tags/{rev}")))
        .or_else(|_| db.revparse_single(rev))
        .and_then(|o| o.peel_to_commit())
        .map_err(|e| SourceError::PinMismatch {
            url: url.into(),
            detail: format!("rev `{rev}` does not resolve: {}", e.message()),
        })?;
    if resolved.id() != oid {
        return Err(SourceError::PinMismatch {
            url: url.into(),
            detail: format!(
                "rev `{rev}` is {}, but the pin says commit {oid}",
                resolved.id()
            ),
        });
    }
    Ok(())
}

/// A work tree at `dir` borrowing the store's objects (alternates), checked
/// out detached at `oid` and verified, with its submodules if asked.
fn check_out(
    dir: &Path,
    db_path: &Path,
    url: &str,
    oid: git2::Oid,
    submodules: bool,
    progress: &dyn Fn(&str),
) -> Result<(), SourceError> {
    let repo = git2::Repository::init(dir).map_err(git_err)?;
    let alternates = repo.path().join("objects/info/alternates");
    fs_err::create_dir_all(alternates.parent().unwrap()).map_err(io("alternates dir"))?;
    fs_err::write(
        &alternates,
        format!("{}\n", db_path.join("objects").display()),
    )
    .map_err(io("write alternates"))?;
    let repo = git2::Repository::open(dir).map_err(git_err)?;
    repo.remote("origin", url).map_err(git_err)?;
    {
        let c = repo.find_commit(oid).map_err(git_err)?;
        let mut co = git2::build::CheckoutBuilder::new();
        co.force();
        repo.checkout_tree(c.as_object(), Some(&mut co))
            .map_err(git_err)?;
        repo.set_head_detached(oid).map_err(git_err)?;
    }
    let head = head_commit(&repo)?;
    if head != oid {
        return Err(SourceError::PinMismatch {
            url: url.into(),
            detail: format!("HEAD is {head} after checkout, expected {oid}"),
        });
    }
    if submodules {
        for mut sm in repo.submodules().map_err(git_err)? {
            progress(&format!("updating submodule {}", sm.path().display()));
            sm.update(true, None).map_err(git_err)?;
        }
    }
    Ok(())
}
