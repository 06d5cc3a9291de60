//! Files that never appear half-written, and locks that serialize work on
//! one cache entry.
//!
//! Architecture Invariant: a final cache path is only ever created by
//! `rename` from a sibling temporary path; temporaries clean up on `Drop`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Write `bytes` to `path` atomically (temp file in the same dir, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs_err::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// A staging directory beside `final_path` (same filesystem, so the final
/// rename is atomic); removed on drop unless committed.
pub fn staging_dir_for(final_path: &Path) -> std::io::Result<tempfile::TempDir> {
    let parent = final_path.parent().unwrap_or(Path::new("."));
    fs_err::create_dir_all(parent)?;
    let name = final_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    tempfile::Builder::new()
        .prefix(&format!(".staging-{name}-"))
        .tempdir_in(parent)
}

/// Move a finished staging dir into place. An existing final dir is moved
/// aside first and deleted after the rename (a corrupted entry being replaced).
pub fn commit_dir(staging: tempfile::TempDir, final_path: &Path) -> std::io::Result<()> {
    let staged = staging.keep();
    replace_dir(&staged, final_path)
}

/// Move one subdirectory of a finished staging dir into place (an extracted
/// archive whose wanted tree sits below its top); the rest of the staging dir
/// is removed on drop.
pub fn commit_subdir(
    staging: tempfile::TempDir,
    sub: &Path,
    final_path: &Path,
) -> std::io::Result<()> {
    replace_dir(&staging.path().join(sub), final_path)
}

fn replace_dir(staged: &Path, final_path: &Path) -> std::io::Result<()> {
    if final_path.exists() {
        let aside = final_path.with_extension(format!("old-{}", std::process::id()));
        fs_err::rename(final_path, &aside)?;
        fs_err::rename(staged, final_path)?;
        let _ = fs_err::remove_dir_all(aside);
    } else {
        fs_err::rename(staged, final_path)?;
    }
    Ok(())
}

/// An exclusive advisory lock on a file under `cache/locks/`, held until drop.
/// Locks taken by a process die with it, so a crash never leaves a stale lock.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
    pub path: PathBuf,
}

/// An I/O error that names the path it happened on (and keeps its kind).
fn at(path: &Path) -> impl Fn(std::io::Error) -> std::io::Error + '_ {
    move |e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Create the lock's directory and open (or create) the lock file; errors name the path.
fn open_lock(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(p) = path.parent() {
        fs_err::create_dir_all(p)?;
    }
    fs_err::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map(std::fs::File::from)
}

impl FileLock {
    /// Block until the lock is ours. `on_wait` is called once if someone else
    /// holds it (to tell the user why nothing happens). Errors name the lock file.
    pub fn exclusive(path: &Path, on_wait: impl FnOnce()) -> std::io::Result<FileLock> {
        let file = open_lock(path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                on_wait();
                file.lock().map_err(at(path))?;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(at(path)(e)),
        }
        Ok(FileLock {
            _file: file,
            path: path.to_path_buf(),
        })
    }

    /// Shared lock (readers of a cache entry, e.g. a running engine's model).
    pub fn shared(path: &Path) -> std::io::Result<FileLock> {
        let file = open_lock(path)?;
        file.lock_shared().map_err(at(path))?;
        Ok(FileLock {
            _file: file,
            path: path.to_path_buf(),
        })
    }

    /// The lock's file descriptor (a child that inherits it holds the lock too).
    pub fn raw_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self._file.as_raw_fd()
    }

    /// Try an exclusive lock without waiting; `None` when someone holds it.
    pub fn try_exclusive(path: &Path) -> std::io::Result<Option<FileLock>> {
        let file = open_lock(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(FileLock {
                _file: file,
                path: path.to_path_buf(),
            })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(at(path)(e)),
        }
    }
}

/// Total size in bytes of the regular files below `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(rd) = fs_err::read_dir(dir) else {
        return 0;
    };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            total += dir_size(&e.path());
        } else if ft.is_file() {
            total += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    total
}

/// Bytes an unprivileged writer may still use on the filesystem that holds
/// `path` (the nearest existing ancestor when `path` does not exist yet).
pub fn free_space(path: &Path) -> std::io::Result<u64> {
    let mut p = path;
    while !p.exists() {
        p = p.parent().unwrap_or(Path::new("/"));
    }
    let st = rustix::fs::statvfs(p).map_err(std::io::Error::from)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Open (or create) a download's `.partial` file for reading and writing,
/// never through a symlink (`O_NOFOLLOW`): a link planted there is refused,
/// its target untouched.
pub fn open_partial(path: &Path) -> std::io::Result<fs_err::File> {
    use fs_err::os::unix::fs::OpenOptionsExt;
    fs_err::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o644)
        .open(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn free_space_reads_the_nearest_existing_ancestor() {
        let d = tempfile::tempdir().unwrap();
        let here = super::free_space(d.path()).unwrap();
        let below = super::free_space(&d.path().join("not/yet/made")).unwrap();
        assert!(here > 0);
        // Same filesystem: within what other writers changed meanwhile.
        assert!(here.abs_diff(below) < 1 << 30, "{here} vs {below}");
    }

    #[test]
    fn a_lock_that_cannot_be_taken_names_its_path() {
        let d = tempfile::tempdir().unwrap();
        // The cache "directory" is a file: nothing below it can exist.
        let not_dir = d.path().join("cache");
        fs_err::write(&not_dir, b"x").unwrap();
        let lock = not_dir.join("locks/engine-x.lock");
        for e in [
            FileLock::exclusive(&lock, || {}).err().unwrap(),
            FileLock::shared(&lock).err().unwrap(),
            FileLock::try_exclusive(&lock).err().unwrap(),
        ] {
            assert!(e.to_string().contains(&*not_dir.to_string_lossy()), "{e}");
        }
    }

    use super::*;

    #[test]
    fn atomic_write_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        write_atomic(&p, b"1").unwrap();
        write_atomic(&p, b"2").unwrap();
        assert_eq!(fs_err::read(&p).unwrap(), b"2");
        assert_eq!(fs_err::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn second_exclusive_lock_waits() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l.lock");
        let a = FileLock::exclusive(&p, || {}).unwrap();
        assert!(FileLock::try_exclusive(&p).unwrap().is_none());
        drop(a);
        // Another test of this binary may fork between our open and its exec:
        // its child holds the same open file (and so the lock) until it execs.
        // The lock comes free then; only a lock that never does is a failure.
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while FileLock::try_exclusive(&p).unwrap().is_none() {
            assert!(
                std::time::Instant::now() < give_up,
                "the lock never came free"
            );
            std::thread::yield_now();
        }
    }

    #[test]
    fn staging_commit_is_atomic_and_replaces() {
        let d = tempfile::tempdir().unwrap();
        let fin = d.path().join("entry");
        for v in ["one", "two"] {
            let s = staging_dir_for(&fin).unwrap();
            fs_err::write(s.path().join("f"), v).unwrap();
            commit_dir(s, &fin).unwrap();
        }
        assert_eq!(fs_err::read_to_string(fin.join("f")).unwrap(), "two");
        assert_eq!(fs_err::read_dir(d.path()).unwrap().count(), 1);
    }
}
