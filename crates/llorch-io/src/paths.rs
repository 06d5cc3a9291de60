//! Where things live. The workspace root is found from `LLORCH_ROOT`, else by
//! walking up from the current directory to the folder holding
//! `toolchains/llama.cpp.yaml`; the cache root is `LLORCH_CACHE_DIR`, else
//! `<root>/cache`; run state is `LLORCH_RUNTIME_DIR`, else `<root>/.runtime`.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NoWorkspace {
    #[error("cannot find the llama-orch workspace from {start}: no toolchains/llama.cpp.yaml in it or any parent\n  hint: run from inside the llama-orch checkout, or set LLORCH_ROOT")]
    NotFound { start: String },
    #[error("{what} {} is not valid UTF-8: its paths are written into JSON run files and handoffs, and are never converted lossily\n  hint: move it to a UTF-8 path or set {var}", .path.display())]
    NotUtf8 {
        what: &'static str,
        var: &'static str,
        path: PathBuf,
    },
}

/// A path as UTF-8 text (camino), or an error naming it. Every path that is
/// written into JSON or shown as a value goes through this (or is below a
/// [`Layout`] root, which `discover` has checked).
pub fn utf8(path: &Path) -> Result<&camino::Utf8Path, NotUtf8> {
    camino::Utf8Path::from_path(path).ok_or_else(|| NotUtf8(path.to_path_buf()))
}

#[derive(Debug, thiserror::Error)]
#[error("{} is not valid UTF-8 (paths written into JSON are never converted lossily); rename it", .0.display())]
pub struct NotUtf8(pub PathBuf);

pub fn workspace_root() -> Result<PathBuf, NoWorkspace> {
    if let Some(r) = std::env::var_os("LLORCH_ROOT") {
        return Ok(PathBuf::from(r));
    }
    let start = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    find_root_from(&start).ok_or_else(|| NoWorkspace::NotFound {
        start: start.display().to_string(),
    })
}

pub fn find_root_from(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|d| d.join("toolchains/llama.cpp.yaml").is_file())
        .map(Path::to_path_buf)
}

/// The directories a run of llama-orch uses.
#[derive(Clone, Debug)]
pub struct Layout {
    pub root: PathBuf,
    pub cache: PathBuf,
    pub runtime: PathBuf,
}

impl Layout {
    pub fn from_root(root: PathBuf) -> Layout {
        let cache = std::env::var_os("LLORCH_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("cache"));
        let runtime = std::env::var_os("LLORCH_RUNTIME_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(".runtime"));
        Layout {
            root,
            cache,
            runtime,
        }
    }

    /// The layout of this workspace; its three roots must be UTF-8, so that
    /// every path below them can be written into JSON as it is.
    pub fn discover() -> Result<Layout, NoWorkspace> {
        let l = Layout::from_root(workspace_root()?);
        for (what, var, path) in [
            ("workspace root", "LLORCH_ROOT", &l.root),
            ("cache directory", "LLORCH_CACHE_DIR", &l.cache),
            ("runtime directory", "LLORCH_RUNTIME_DIR", &l.runtime),
        ] {
            if path.to_str().is_none() {
                return Err(NoWorkspace::NotUtf8 {
                    what,
                    var,
                    path: path.clone(),
                });
            }
        }
        Ok(l)
    }

    /// A layout with explicit directories (tests).
    pub fn at(root: PathBuf, cache: PathBuf, runtime: PathBuf) -> Layout {
        Layout {
            root,
            cache,
            runtime,
        }
    }

    /// A versioned cache bucket (`cache/engines-v1`, …): the one place bucket names are spelled.
    pub fn bucket(&self, b: Bucket) -> PathBuf {
        self.cache.join(b.dir_name())
    }
    pub fn locks(&self) -> PathBuf {
        self.bucket(Bucket::Locks)
    }
    pub fn downloads(&self) -> PathBuf {
        self.bucket(Bucket::Downloads)
    }
    pub fn run_dir(&self) -> PathBuf {
        self.bucket(Bucket::Run)
    }
    pub fn engines_dir(&self) -> PathBuf {
        self.runtime.join("engines")
    }

    /// `locks/engine-<fp>.lock`: exclusive while a build writes the entry or gc removes it,
    /// shared by every engine process running that build.
    pub fn engine_lock(&self, fingerprint: &str) -> PathBuf {
        self.locks().join(format!("engine-{fingerprint}.lock"))
    }
    /// `locks/build-work.lock`: exclusive while a build compiles in `build-v1/work`.
    pub fn build_work_lock(&self) -> PathBuf {
        self.locks().join("build-work.lock")
    }
    /// `locks/compile-cache.lock`: held while the compiler cache's server is started.
    pub fn compile_cache_lock(&self) -> PathBuf {
        self.locks().join("compile-cache.lock")
    }
    /// `locks/blob-<digest>.lock`: shared by every engine process using the model blob,
    /// exclusive while gc removes it.
    pub fn blob_lock(&self, digest: &str) -> PathBuf {
        self.locks().join(format!("blob-{digest}.lock"))
    }
    /// `locks/pool-<id>.lock`: orders provision, up, down and supervisor (re)starts of one pool.
    pub fn pool_lock(&self, pool: &llorch_types::PoolId) -> PathBuf {
        self.locks().join(format!("pool-{pool}.lock"))
    }
    /// `locks/src-<source-id>.lock`: exclusive while one pinned source tree is
    /// fetched or unpacked from a bundle.
    pub fn source_lock(&self, source_id: &str) -> PathBuf {
        self.locks().join(format!("src-{source_id}.lock"))
    }
    /// `locks/models-refs.lock`: held while `models-v1/refs.json` is read, changed and rewritten.
    pub fn model_refs_lock(&self) -> PathBuf {
        self.locks().join("models-refs.lock")
    }

    /// A pool's run files: `run/<id>.pid`, `run/llamacpp-<id>.log`, and in the
    /// runtime directory its handoff `engines/<id>.json` and API key `engines/<id>.key`.
    pub fn pid_file(&self, pool: &llorch_types::PoolId) -> PathBuf {
        self.run_dir().join(format!("{pool}.pid"))
    }
    pub fn engine_log(&self, pool: &llorch_types::PoolId) -> PathBuf {
        self.run_dir().join(format!("llamacpp-{pool}.log"))
    }
    pub fn handoff(&self, pool: &llorch_types::PoolId) -> PathBuf {
        self.engines_dir().join(format!("{pool}.json"))
    }
    /// The directory of a pool's engine socket (`run/<pool>.d/`): the one
    /// place the engine may create a file (its socket), owned by the user
    /// it runs as, private to it.
    pub fn engine_socket_dir(&self, pool: &llorch_types::PoolId) -> PathBuf {
        self.run_dir().join(format!("{pool}.d"))
    }
    pub fn api_key(&self, pool: &llorch_types::PoolId) -> PathBuf {
        self.engines_dir().join(format!("{pool}.key"))
    }

    /// Create `dir` (below the cache or runtime root) and make sure no component
    /// below that root is a symlink: run files are never written through a link
    /// that leads out of the cache or runtime directory.
    pub fn ensure_private_dir(&self, dir: &Path) -> Result<(), DirError> {
        let base = [&self.cache, &self.runtime]
            .into_iter()
            .find(|b| dir.starts_with(b))
            .ok_or_else(|| DirError {
                path: dir.display().to_string(),
                why: "is outside the cache and runtime directories".into(),
            })?;
        fs_err::create_dir_all(dir).map_err(|e| DirError {
            path: dir.display().to_string(),
            why: format!("cannot create it: {e}"),
        })?;
        let mut cur = base.clone();
        for c in dir.strip_prefix(base).unwrap_or(Path::new("")).components() {
            cur.push(c);
            let md = fs_err::symlink_metadata(&cur).map_err(|e| DirError {
                path: cur.display().to_string(),
                why: e.to_string(),
            })?;
            if md.file_type().is_symlink() || !md.is_dir() {
                return Err(DirError {
                    path: cur.display().to_string(),
                    why: "is a symlink or not a directory; refusing to write run state through it (remove it)".into(),
                });
            }
        }
        Ok(())
    }
}

/// A cache or runtime directory that cannot be used, with its path.
#[derive(Debug, thiserror::Error)]
#[error("{path} {why}")]
pub struct DirError {
    pub path: String,
    pub why: String,
}

/// The versioned buckets of the cache. Bump a version instead of migrating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bucket {
    /// `src-v1/<source-id>/`: checked-out or extracted llama.cpp trees (owner: engine-provisioner::source)
    Src,
    /// `build-v1/work/`: the one work dir engines compile in; `verify-*` scratch rebuilds (owner: engine-provisioner::build)
    Build,
    /// `compile-v1/`: the compiler cache's objects (owner: engine-provisioner::compile_cache)
    Compile,
    /// `tools-v1/`: tools installed into the cache (sccache) (owner: engine-provisioner::compile_cache)
    Tools,
    /// `engines-v1/<fingerprint>/`: installed engines + manifest.json (owner: engine-provisioner::cache)
    Engines,
    /// `models-v1/`: blobs and refs.json (owner: model-provisioner::store)
    Models,
    /// `downloads/`: partial downloads (owner: llorch_io::download, for the model store and archive pins)
    Downloads,
    /// `locks/`: flock files (names: `Layout::*_lock`)
    Locks,
    /// `run/`: `<pool>.pid` run records and engine logs (owner: engine-runtime)
    Run,
    /// `tune-v1/`: what `bench tune --write` measured, read by `slots: auto` (owner: llorch-stack::auto)
    Tune,
}

impl Bucket {
    pub fn dir_name(self) -> &'static str {
        match self {
            Bucket::Src => "src-v1",
            Bucket::Build => "build-v1",
            Bucket::Compile => "compile-v1",
            Bucket::Tools => "tools-v1",
            Bucket::Engines => "engines-v1",
            Bucket::Models => "models-v1",
            Bucket::Downloads => "downloads",
            Bucket::Locks => "locks",
            Bucket::Run => "run",
            Bucket::Tune => "tune-v1",
        }
    }
}
