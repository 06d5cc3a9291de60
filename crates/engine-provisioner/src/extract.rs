//! The safe extractor: a `.tar.gz` (or plain `.tar`) unpacked into a
//! directory, refusing, before anything is written, absolute member paths,
//! `..` components, and links (symbolic or hard) whose target, followed
//! through the links already extracted, would leave the target directory.
//! Used for source archives, sdists, offline bundles and pulled engines.

use crate::source::{io, SourceError};
use std::path::{Component, Path, PathBuf};

fn check_member(archive: &Path, member: &Path) -> Result<(), SourceError> {
    let bad = |why: &str| SourceError::UnsafeMember {
        archive: archive.display().to_string(),
        member: member.display().to_string(),
        why: why.to_string(),
    };
    if member.is_absolute() {
        return Err(bad("is an absolute path"));
    }
    if member.components().any(|c| {
        matches!(
            c,
            Component::ParentDir | Component::Prefix(_) | Component::RootDir
        )
    }) {
        return Err(bad("escapes the target directory (`..`)"));
    }
    Ok(())
}

/// Extract a `.tar.gz` (or plain `.tar`) into `dest`, stripping `strip` from
/// member paths; refuses unsafe members before writing anything.
pub fn extract_tar_gz(archive: &Path, dest: &Path, strip: Option<&str>) -> Result<(), SourceError> {
    let open = || -> Result<tar::Archive<Box<dyn std::io::Read>>, SourceError> {
        let f = fs_err::File::open(archive).map_err(io("read the archive"))?;
        let mut magic = [0u8; 2];
        let gz = {
            use std::io::Read;
            let mut g = fs_err::File::open(archive).map_err(io("open"))?;
            g.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b]
        };
        let r: Box<dyn std::io::Read> = if gz {
            Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)))
        } else {
            Box::new(std::io::BufReader::new(f))
        };
        Ok(tar::Archive::new(r))
    };
    // Pass 1: validate every member, write nothing.
    let mut a = open()?;
    for e in a.entries().map_err(io("read archive"))? {
        let e = e.map_err(io("read archive entry"))?;
        let path = e.path().map_err(io("member path"))?.into_owned();
        check_member(archive, &path)?;
        if let Some(link) = e.link_name().map_err(io("link name"))? {
            let resolved = if e.header().entry_type().is_hard_link() {
                link.to_path_buf()
            } else {
                path.parent().unwrap_or(Path::new("")).join(&link)
            };
            if link.is_absolute() || escapes(&resolved) {
                return Err(SourceError::UnsafeMember {
                    archive: archive.display().to_string(),
                    member: path.display().to_string(),
                    why: format!("links to `{}` outside the target directory", link.display()),
                });
            }
        }
    }
    // Pass 2: extract, checking every write against the tree as it is on
    // disk: a path never goes through a symlink, and every link resolves,
    // following the links already extracted (chains), to a place inside.
    fs_err::create_dir_all(dest).map_err(io("create the extraction dir"))?;
    let mut a = open()?;
    // Modes without setuid/setgid/sticky bits.
    a.set_preserve_permissions(false);
    let unsafe_member = |member: &Path, why: String| SourceError::UnsafeMember {
        archive: archive.display().to_string(),
        member: member.display().to_string(),
        why,
    };
    let strip_rel = |p: &Path| -> Option<PathBuf> {
        let r = match strip {
            Some(s) => p.strip_prefix(s).ok()?.to_path_buf(),
            None => p.to_path_buf(),
        };
        (!r.as_os_str().is_empty()).then_some(r)
    };
    for e in a.entries().map_err(io("read archive"))? {
        let mut e = e.map_err(io("read archive entry"))?;
        let path = e.path().map_err(io("member path"))?.into_owned();
        let Some(rel) = strip_rel(&path) else {
            continue;
        };
        let kind = e.header().entry_type();
        let parent = rel.parent().unwrap_or(Path::new(""));
        real_dirs(dest, parent).map_err(|why| unsafe_member(&path, why))?;
        let target = dest.join(&rel);
        let existing = fs_err::symlink_metadata(&target).ok();
        if existing
            .as_ref()
            .is_some_and(|m| m.file_type().is_symlink())
        {
            return Err(unsafe_member(
                &path,
                "would be written through a symlink".into(),
            ));
        }
        use tar::EntryType as T;
        match kind {
            T::Directory => {
                if existing.is_none() {
                    fs_err::create_dir(&target).map_err(io("extract a directory"))?;
                } else if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                    return Err(unsafe_member(&path, "a directory over a file".into()));
                }
            }
            T::Regular | T::Continuous => {
                if existing.is_some_and(|m| m.is_file()) {
                    fs_err::remove_file(&target)
                        .map_err(io(format!("replace {}", rel.display())))?;
                }
                e.unpack(&target)
                    .map_err(io(format!("extract {}", rel.display())))?;
            }
            T::Symlink => {
                let link = e
                    .link_name()
                    .map_err(io("link name"))?
                    .ok_or_else(|| unsafe_member(&path, "a symlink without a target".into()))?
                    .into_owned();
                resolve_in_tree(dest, &parent.join(&link)).map_err(|why| {
                    unsafe_member(&path, format!("links to `{}`, which {why}", link.display()))
                })?;
                if existing.is_some() {
                    return Err(unsafe_member(
                        &path,
                        "a symlink over an existing member".into(),
                    ));
                }
                fs_err::os::unix::fs::symlink(&link, &target).map_err(io("extract a symlink"))?;
            }
            T::Link => {
                let link = e
                    .link_name()
                    .map_err(io("link name"))?
                    .ok_or_else(|| unsafe_member(&path, "a hard link without a target".into()))?
                    .into_owned();
                let src_rel = strip_rel(&link).ok_or_else(|| {
                    unsafe_member(
                        &path,
                        format!("hard-links to `{}`, outside the tree", link.display()),
                    )
                })?;
                let src = resolve_in_tree(dest, &src_rel).map_err(|why| {
                    unsafe_member(
                        &path,
                        format!("hard-links to `{}`, which {why}", link.display()),
                    )
                })?;
                let src = dest.join(src);
                if !fs_err::symlink_metadata(&src).is_ok_and(|m| m.is_file()) {
                    return Err(unsafe_member(
                        &path,
                        format!("hard-links to `{}`, not an extracted file", link.display()),
                    ));
                }
                if existing.is_some() {
                    fs_err::remove_file(&target)
                        .map_err(io(format!("replace {}", rel.display())))?;
                }
                fs_err::hard_link(&src, &target).map_err(io(format!("link {}", rel.display())))?;
            }
            other => {
                return Err(unsafe_member(
                    &path,
                    format!(
                        "is a {other:?} entry (only files, directories and links are extracted)"
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// Make every component of `rel` (below `root`) a real directory: existing
/// ones must not be symlinks, missing ones are created one by one.
fn real_dirs(root: &Path, rel: &Path) -> Result<(), String> {
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        let Component::Normal(n) = c else {
            return Err("is not a plain relative path".into());
        };
        cur.push(n);
        match fs_err::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "goes through the symlink `{}`",
                    cur.strip_prefix(root).unwrap_or(&cur).display()
                ))
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "goes through the file `{}`",
                    cur.strip_prefix(root).unwrap_or(&cur).display()
                ))
            }
            Err(_) => fs_err::create_dir(&cur)
                .map_err(|e| format!("cannot create {}: {e}", cur.display()))?,
        }
    }
    Ok(())
}

/// Where `rel` (relative to `root`) physically leads, following the symlinks
/// already in the tree (at most 40), as a path relative to `root`; an error
/// if it leaves the tree at any step or names an absolute path.
fn resolve_in_tree(root: &Path, rel: &Path) -> Result<PathBuf, String> {
    use std::collections::VecDeque;
    use std::ffi::OsString;
    enum Seg {
        Up,
        Name(OsString),
    }
    fn segs(p: &Path) -> Result<Vec<Seg>, String> {
        p.components()
            .filter_map(|c| match c {
                Component::CurDir => None,
                Component::ParentDir => Some(Ok(Seg::Up)),
                Component::Normal(n) => Some(Ok(Seg::Name(n.to_os_string()))),
                _ => Some(Err("is an absolute path".to_string())),
            })
            .collect()
    }
    let mut todo: VecDeque<Seg> = segs(rel)?.into();
    let mut at: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(s) = todo.pop_front() {
        match s {
            Seg::Up => {
                if at.pop().is_none() {
                    return Err("leaves the tree".into());
                }
            }
            Seg::Name(n) => {
                let mut p = root.to_path_buf();
                p.extend(&at);
                p.push(&n);
                match fs_err::symlink_metadata(&p) {
                    Ok(m) if m.file_type().is_symlink() => {
                        hops += 1;
                        if hops > 40 {
                            return Err("goes through more than 40 links".into());
                        }
                        let t = fs_err::read_link(&p).map_err(|e| e.to_string())?;
                        for s in segs(&t)?.into_iter().rev() {
                            todo.push_front(s);
                        }
                    }
                    _ => at.push(n),
                }
            }
        }
    }
    Ok(at.iter().collect())
}

fn escapes(p: &Path) -> bool {
    let mut depth: i64 = 0;
    for c in p.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            _ => return true,
        }
        if depth < 0 {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_detection() {
        assert!(escapes(Path::new("a/../../b")));
        assert!(!escapes(Path::new("a/../b")));
        assert!(escapes(Path::new("/etc/passwd")));
    }
}
