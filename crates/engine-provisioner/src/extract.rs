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
    // Pass 1: validate every member, write nothing.
    validate(archive)?;
    // Pass 2: extract, checking every write against the tree as it is on
    // disk: a path never goes through a symlink, and every link resolves,
    // following the links already extracted (chains), to a place inside.
    fs_err::create_dir_all(dest).map_err(io("create the extraction dir"))?;
    let mut a = open(archive)?;
    // Modes without setuid/setgid/sticky bits.
    a.set_preserve_permissions(false);
    let x = Extraction {
        archive,
        dest,
        strip,
    };
    for e in a.entries().map_err(io("read archive"))? {
        x.entry(&mut e.map_err(io("read archive entry"))?)?;
    }
    Ok(())
}

/// The archive as a tar stream, gunzipped when it starts with gzip's magic.
fn open(archive: &Path) -> Result<tar::Archive<Box<dyn std::io::Read>>, SourceError> {
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
}

/// Every member's path and link target, as the archive states them: no
/// absolute path, no `..`, no link whose target leaves the tree.
fn validate(archive: &Path) -> Result<(), SourceError> {
    let mut a = open(archive)?;
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
    Ok(())
}

/// The second pass: one archive extracted into `dest`.
struct Extraction<'a> {
    archive: &'a Path,
    dest: &'a Path,
    strip: Option<&'a str>,
}

type Entry<'e> = tar::Entry<'e, Box<dyn std::io::Read>>;

impl Extraction<'_> {
    fn unsafe_member(&self, member: &Path, why: String) -> SourceError {
        SourceError::UnsafeMember {
            archive: self.archive.display().to_string(),
            member: member.display().to_string(),
            why,
        }
    }

    /// A member's path below `dest`, `strip` removed (`None`: not extracted).
    fn strip_rel(&self, p: &Path) -> Option<PathBuf> {
        let r = match self.strip {
            Some(s) => p.strip_prefix(s).ok()?.to_path_buf(),
            None => p.to_path_buf(),
        };
        (!r.as_os_str().is_empty()).then_some(r)
    }

    /// One member: its parents real directories, never written through a
    /// symlink, then written by its kind.
    fn entry(&self, e: &mut Entry) -> Result<(), SourceError> {
        let path = e.path().map_err(io("member path"))?.into_owned();
        let Some(rel) = self.strip_rel(&path) else {
            return Ok(());
        };
        let parent = rel.parent().unwrap_or(Path::new(""));
        real_dirs(self.dest, parent).map_err(|why| self.unsafe_member(&path, why))?;
        let target = self.dest.join(&rel);
        let existing = fs_err::symlink_metadata(&target).ok();
        if existing
            .as_ref()
            .is_some_and(|m| m.file_type().is_symlink())
        {
            return Err(self.unsafe_member(&path, "would be written through a symlink".into()));
        }
        use tar::EntryType as T;
        match e.header().entry_type() {
            T::Directory => {
                if existing.is_none() {
                    fs_err::create_dir(&target).map_err(io("extract a directory"))?;
                } else if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                    return Err(self.unsafe_member(&path, "a directory over a file".into()));
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
            T::Symlink => self.symlink(e, &path, &rel, existing.is_some())?,
            T::Link => self.hard_link(e, &path, &rel, existing.is_some())?,
            other => {
                return Err(self.unsafe_member(
                    &path,
                    format!(
                        "is a {other:?} entry (only files, directories and links are extracted)"
                    ),
                ))
            }
        }
        Ok(())
    }

    /// A symlink whose target, followed through the tree as extracted so
    /// far, stays inside it.
    fn symlink(&self, e: &Entry, path: &Path, rel: &Path, exists: bool) -> Result<(), SourceError> {
        let parent = rel.parent().unwrap_or(Path::new(""));
        let link = e
            .link_name()
            .map_err(io("link name"))?
            .ok_or_else(|| self.unsafe_member(path, "a symlink without a target".into()))?
            .into_owned();
        resolve_in_tree(self.dest, &parent.join(&link)).map_err(|why| {
            self.unsafe_member(path, format!("links to `{}`, which {why}", link.display()))
        })?;
        if exists {
            return Err(self.unsafe_member(path, "a symlink over an existing member".into()));
        }
        fs_err::os::unix::fs::symlink(&link, self.dest.join(rel))
            .map_err(io("extract a symlink"))?;
        Ok(())
    }

    /// A hard link to a regular file already extracted inside the tree.
    fn hard_link(
        &self,
        e: &Entry,
        path: &Path,
        rel: &Path,
        replace: bool,
    ) -> Result<(), SourceError> {
        let link = e
            .link_name()
            .map_err(io("link name"))?
            .ok_or_else(|| self.unsafe_member(path, "a hard link without a target".into()))?
            .into_owned();
        let src_rel = self.strip_rel(&link).ok_or_else(|| {
            self.unsafe_member(
                path,
                format!("hard-links to `{}`, outside the tree", link.display()),
            )
        })?;
        let src = resolve_in_tree(self.dest, &src_rel).map_err(|why| {
            self.unsafe_member(
                path,
                format!("hard-links to `{}`, which {why}", link.display()),
            )
        })?;
        let src = self.dest.join(src);
        if !fs_err::symlink_metadata(&src).is_ok_and(|m| m.is_file()) {
            return Err(self.unsafe_member(
                path,
                format!("hard-links to `{}`, not an extracted file", link.display()),
            ));
        }
        let target = self.dest.join(rel);
        if replace {
            fs_err::remove_file(&target).map_err(io(format!("replace {}", rel.display())))?;
        }
        fs_err::hard_link(&src, &target).map_err(io(format!("link {}", rel.display())))?;
        Ok(())
    }
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
