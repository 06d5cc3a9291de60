//! Where things live. The workspace root is found from `LLORCH_ROOT`, else by
//! walking up from the current directory to the folder holding
//! `toolchains/llama.cpp.yaml`; the cache root is `LLORCH_CACHE_DIR`, else
//! `<root>/cache`; run state is `LLORCH_RUNTIME_DIR`, else `<root>/.runtime`.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("cannot find the llama-orch workspace from {start}: no toolchains/llama.cpp.yaml in it or any parent\n  hint: run from inside the llama-orch checkout, or set LLORCH_ROOT")]
pub struct NoWorkspace {
    pub start: String,
}

pub fn workspace_root() -> Result<PathBuf, NoWorkspace> {
    if let Some(r) = std::env::var_os("LLORCH_ROOT") {
        return Ok(PathBuf::from(r));
    }
    let start = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    find_root_from(&start).ok_or_else(|| NoWorkspace {
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

    pub fn discover() -> Result<Layout, NoWorkspace> {
        Ok(Layout::from_root(workspace_root()?))
    }

    /// A layout with explicit directories (tests).
    pub fn at(root: PathBuf, cache: PathBuf, runtime: PathBuf) -> Layout {
        Layout {
            root,
            cache,
            runtime,
        }
    }

    pub fn locks(&self) -> PathBuf {
        self.cache.join("locks")
    }
    pub fn downloads(&self) -> PathBuf {
        self.cache.join("downloads")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.cache.join("run")
    }
    pub fn engines_dir(&self) -> PathBuf {
        self.runtime.join("engines")
    }
}
