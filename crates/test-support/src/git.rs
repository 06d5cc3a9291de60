//! Git repositories for tests: every file of the work tree committed on top
//! of HEAD (or as the first commit).

use std::path::Path;

/// When a commit says it was made.
pub enum When {
    Now,
    /// Seconds since the epoch: the same tree then gives the same commit id
    /// on every run (for output compared with a snapshot).
    At(i64),
}

/// Commit every file of `repo`'s work tree on top of HEAD (no parent on an
/// empty repository), moving HEAD; returns the commit id.
pub fn commit_all(repo: &git2::Repository, msg: &str, when: When) -> git2::Oid {
    let mut idx = repo.index().unwrap();
    idx.add_all(["*"], git2::IndexAddOption::DEFAULT, None)
        .unwrap();
    idx.write().unwrap();
    let tree = repo.find_tree(idx.write_tree().unwrap()).unwrap();
    let sig = match when {
        When::Now => git2::Signature::now("test", "test@example.invalid"),
        When::At(t) => git2::Signature::new("test", "test@example.invalid", &git2::Time::new(t, 0)),
    }
    .unwrap();
    let parents: Vec<git2::Commit> = repo
        .head()
        .ok()
        .and_then(|h| h.peel_to_commit().ok())
        .into_iter()
        .collect();
    let refs: Vec<&git2::Commit> = parents.iter().collect();
    repo.commit(Some("HEAD"), &sig, &sig, msg, &tree, &refs)
        .unwrap()
}

/// A new repository at `dir` (created) whose first commit holds `files`
/// (name, contents); returns it and the commit id.
pub fn repo_with(
    dir: &Path,
    files: &[(&str, &str)],
    msg: &str,
    when: When,
) -> (git2::Repository, git2::Oid) {
    fs_err::create_dir_all(dir).unwrap();
    for (name, text) in files {
        fs_err::write(dir.join(name), text).unwrap();
    }
    let repo = git2::Repository::init(dir).unwrap();
    let oid = commit_all(&repo, msg, when);
    (repo, oid)
}
