//! Image layers written the same way every time: the same files give the
//! same bytes, whatever the machine, the cache directory or the clock.
//!
//! * entries sorted by path, every parent directory listed before its
//!   children;
//! * numeric owner 0:0, no user or group names, mtime 0;
//! * modes fixed: 0755 for directories and executables, 0644 for other
//!   files (a file's own mode bits, umask, setuid are never copied);
//! * gzip from `flate2` (its Rust backend, `miniz_oxide`, at the version
//!   `Cargo.lock` pins) at level 6, with no name and mtime 0 in its header.
//!
//! A layer's `diff_id` is the sha256 of the tar, its digest the sha256 of
//! the gzip stream; both are computed while writing, in one pass.

use crate::DeployError;
use llorch_io::digest::HashingWriter;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What the compressor is, recorded in the image's explanation.
pub const COMPRESSOR: &str = "gzip level 6, flate2 with miniz_oxide (versions pinned by Cargo.lock), header mtime 0, no name";

/// Where a file's bytes come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// A file on this machine (read, never linked: its bytes go in the layer).
    File(PathBuf),
    /// Bytes made for the image (its configuration).
    Bytes(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    Dir { mode: u32 },
    File { source: Source, executable: bool },
}

/// One layer's tree: image path (absolute, `/`-separated) → node.
#[derive(Clone, Debug, Default)]
pub struct Layer {
    pub name: String,
    nodes: BTreeMap<String, Node>,
}

/// A layer written as a blob.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerBlob {
    pub name: String,
    /// `sha256:…` of the gzip stream (the blob's name).
    pub digest: String,
    /// `sha256:…` of the uncompressed tar (the image config's `diff_ids`).
    pub diff_id: String,
    pub size: u64,
    pub files: usize,
}

impl Layer {
    pub fn new(name: &str) -> Layer {
        Layer {
            name: name.into(),
            nodes: BTreeMap::new(),
        }
    }

    /// Check an image path: absolute, plain components only.
    fn key(path: &str) -> Result<String, DeployError> {
        let ok = path.starts_with('/')
            && path.len() > 1
            && path[1..]
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'));
        if !ok {
            return Err(DeployError::BadPath(path.to_string()));
        }
        Ok(path.to_string())
    }

    fn add_parents(&mut self, path: &str) {
        let mut cur = String::new();
        let parts: Vec<&str> = path[1..].split('/').collect();
        for c in &parts[..parts.len() - 1] {
            cur.push('/');
            cur.push_str(c);
            self.nodes
                .entry(cur.clone())
                .or_insert(Node::Dir { mode: 0o755 });
        }
    }

    /// A directory (and its parents); `mode` 0755, or 01777 for `/tmp`.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), DeployError> {
        let k = Self::key(path)?;
        self.add_parents(&k);
        self.nodes.insert(k, Node::Dir { mode });
        Ok(())
    }

    /// A file from `source`; a path added twice must have the same source.
    pub fn file(
        &mut self,
        path: &str,
        source: Source,
        executable: bool,
    ) -> Result<(), DeployError> {
        let k = Self::key(path)?;
        self.add_parents(&k);
        let node = Node::File { source, executable };
        match self.nodes.get(&k) {
            Some(existing) if existing != &node => Err(DeployError::Conflict(k)),
            _ => {
                self.nodes.insert(k, node);
                Ok(())
            }
        }
    }

    /// Every file below `src` (regular files and directories only; a link
    /// or anything else is refused), at `dest` in the image.
    pub fn tree(&mut self, dest: &str, src: &Path) -> Result<(), DeployError> {
        self.dir(dest, 0o755)?;
        let mut entries: Vec<_> = fs_err::read_dir(src)
            .map_err(llorch_io::io("list a directory for an image layer"))?
            .collect::<Result<_, _>>()
            .map_err(llorch_io::io("list a directory for an image layer"))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let name = name.to_str().ok_or_else(|| {
                DeployError::BadPath(format!("{} (not UTF-8)", e.path().display()))
            })?;
            let t = e
                .file_type()
                .map_err(llorch_io::io("stat a file for an image layer"))?;
            let at = format!("{dest}/{name}");
            if t.is_dir() {
                self.tree(&at, &e.path())?;
            } else if t.is_file() {
                let exec = is_executable(&e.path())?;
                self.file(&at, Source::File(e.path()), exec)?;
            } else {
                return Err(DeployError::NotRegular(e.path()));
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Paths and nodes, sorted.
    pub fn nodes(&self) -> impl Iterator<Item = (&String, &Node)> {
        self.nodes.iter()
    }

    /// Write the layer as `blobs/sha256/<hex>` below `out` (a staging
    /// directory), hashing the tar and the gzip stream as they are written.
    pub fn write(&self, blobs: &Path) -> Result<LayerBlob, DeployError> {
        use flate2::{Compression, GzBuilder};
        let tmp = tempfile::NamedTempFile::new_in(blobs).map_err(llorch_io::io(format!(
            "create a layer in {}",
            blobs.display()
        )))?;
        let file = tmp
            .reopen()
            .map_err(llorch_io::io("open the layer being written"))?;
        let outer = HashingWriter::new(std::io::BufWriter::new(file));
        let gz = GzBuilder::new()
            .mtime(0)
            .operating_system(255)
            .write(outer, Compression::new(6));
        let inner = HashingWriter::new(gz);
        let mut tar = tar::Builder::new(inner);
        tar.mode(tar::HeaderMode::Deterministic);
        let mut files = 0;
        for (path, node) in &self.nodes {
            let rel = &path[1..];
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match node {
                Node::Dir { mode } => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    tar.append_data(&mut h, format!("{rel}/"), std::io::empty())
                        .map_err(llorch_io::io("write an image layer"))?;
                }
                Node::File { source, executable } => {
                    files += 1;
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(if *executable { 0o755 } else { 0o644 });
                    match source {
                        Source::Bytes(b) => {
                            h.set_size(b.len() as u64);
                            tar.append_data(&mut h, rel, &b[..])
                                .map_err(llorch_io::io("write an image layer"))?;
                        }
                        Source::File(p) => {
                            let f = fs_err::File::open(p)
                                .map_err(llorch_io::io("read a file for an image layer"))?;
                            let len = f
                                .metadata()
                                .map_err(llorch_io::io("stat a file for an image layer"))?
                                .len();
                            h.set_size(len);
                            // Exactly `len` bytes: a file that grows while read is cut, one that shrinks fails.
                            tar.append_data(&mut h, rel, std::io::Read::take(f, len))
                                .map_err(llorch_io::io(format!(
                                    "write {} into an image layer",
                                    p.display()
                                )))?;
                        }
                    }
                }
            }
        }
        let inner = tar
            .into_inner()
            .map_err(llorch_io::io("finish an image layer"))?;
        let (gz, diff) = inner.finish();
        let outer = gz
            .finish()
            .map_err(llorch_io::io("finish an image layer"))?;
        let (mut buf, digest) = outer.finish();
        buf.flush()
            .map_err(llorch_io::io("finish an image layer"))?;
        drop(buf);
        let dest = blobs.join(&digest);
        let size = fs_err::metadata(tmp.path())
            .map_err(llorch_io::io("stat the layer written"))?
            .len();
        // Blobs are content, readable by all (a temporary file is 0600).
        {
            use std::os::unix::fs::PermissionsExt;
            fs_err::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
                .map_err(llorch_io::io("make the layer readable"))?;
        }
        tmp.persist(&dest)
            .map_err(|e| llorch_io::io("keep the layer written")(e.error))?;
        Ok(LayerBlob {
            name: self.name.clone(),
            digest: format!("sha256:{digest}"),
            diff_id: format!("sha256:{diff}"),
            size,
            files,
        })
    }
}

/// Whether anyone may execute the file.
pub fn is_executable(p: &Path) -> Result<bool, DeployError> {
    use std::os::unix::fs::PermissionsExt;
    let m = fs_err::metadata(p).map_err(llorch_io::io("stat a file for an image layer"))?;
    Ok(m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer_of(dir: &Path) -> Layer {
        let mut l = Layer::new("t");
        l.tree("/opt/x", dir).unwrap();
        l.file("/etc/a.json", Source::Bytes(b"{}".to_vec()), false)
            .unwrap();
        l
    }

    #[test]
    fn the_same_files_give_the_same_bytes_whatever_their_times_modes_and_place() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for (d, mode) in [(a.path(), 0o700), (b.path(), 0o755)] {
            fs_err::create_dir_all(d.join("bin")).unwrap();
            fs_err::write(d.join("bin/tool"), b"#!/bin/sh\n").unwrap();
            fs_err::write(d.join("z.txt"), b"z").unwrap();
            use std::os::unix::fs::PermissionsExt;
            fs_err::set_permissions(d.join("bin/tool"), std::fs::Permissions::from_mode(mode))
                .unwrap();
        }
        // Another mtime for one of them.
        fs_err::File::options()
            .write(true)
            .open(b.path().join("z.txt"))
            .unwrap()
            .file()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
            .unwrap();
        let (oa, ob) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let la = layer_of(a.path()).write(oa.path()).unwrap();
        let lb = layer_of(b.path()).write(ob.path()).unwrap();
        assert_eq!(la.digest, lb.digest);
        assert_eq!(la.diff_id, lb.diff_id);
        assert_eq!(la.files, 3);
        // A changed byte changes both digests.
        fs_err::write(b.path().join("z.txt"), b"y").unwrap();
        let lc = layer_of(b.path()).write(ob.path()).unwrap();
        assert_ne!(la.digest, lc.digest);
        assert_ne!(la.diff_id, lc.diff_id);
        // The tar lists parents first, numeric owners, mtime 0, fixed modes.
        let blob = oa.path().join(la.digest.trim_start_matches("sha256:"));
        let gz = flate2::read::GzDecoder::new(fs_err::File::open(blob).unwrap());
        let mut t = tar::Archive::new(gz);
        let mut seen = Vec::new();
        for e in t.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            assert_eq!(
                (h.uid().unwrap(), h.gid().unwrap(), h.mtime().unwrap()),
                (0, 0, 0)
            );
            seen.push((e.path().unwrap().display().to_string(), h.mode().unwrap()));
        }
        assert_eq!(
            seen,
            vec![
                ("etc/".into(), 0o755),
                ("etc/a.json".into(), 0o644),
                ("opt/".into(), 0o755),
                ("opt/x/".into(), 0o755),
                ("opt/x/bin/".into(), 0o755),
                ("opt/x/bin/tool".into(), 0o755),
                ("opt/x/z.txt".into(), 0o644),
            ]
        );
    }

    #[test]
    fn hostile_paths_and_links_are_refused() {
        let mut l = Layer::new("t");
        for bad in ["relative", "/", "/a/../b", "/a//b", "/a/./b"] {
            assert!(
                matches!(
                    l.file(bad, Source::Bytes(vec![]), false),
                    Err(DeployError::BadPath(_))
                ),
                "{bad}"
            );
        }
        l.file("/a", Source::Bytes(b"1".to_vec()), false).unwrap();
        assert!(matches!(
            l.file("/a", Source::Bytes(b"2".to_vec()), false),
            Err(DeployError::Conflict(_))
        ));
        let d = tempfile::tempdir().unwrap();
        fs_err::os::unix::fs::symlink("/etc/passwd", d.path().join("link")).unwrap();
        assert!(matches!(
            Layer::new("t").tree("/opt/x", d.path()),
            Err(DeployError::NotRegular(_))
        ));
    }
}
