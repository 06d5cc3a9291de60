//! Sources: git against a real local repository, archives and sdists with
//! bad digests, archive members that try to escape.

mod support;

use engine_provisioner::source::{self, SourceError};
use llorch_io::paths::Layout;
use llorch_profile::{Pin, SourceSpec};
use support::*;

fn layout(dir: &std::path::Path) -> Layout {
    Layout::at(dir.join("ws"), dir.join("cache"), dir.join("rt"))
}

/// Source trees present under `src-v1/` (staging dirs start with a dot).
fn extracted_trees(l: &Layout) -> Vec<fs_err::DirEntry> {
    fs_err::read_dir(l.bucket(llorch_io::paths::Bucket::Src))
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .collect()
}

fn git_pin(url: &std::path::Path, commit: &str, rev: Option<&str>) -> Pin {
    Pin {
        commit: commit.into(),
        source: SourceSpec::Git {
            url: url.display().to_string(),
            rev: rev.map(String::from),
            submodules: false,
        },
        description: None,
        bundle_trees: Default::default(),
    }
}

#[test]
fn git_clones_fetches_newer_commits_and_verifies_head() {
    let tmp = tempfile::tempdir().unwrap();
    let (up, c1) = git_repo(tmp.path());
    let l = layout(tmp.path());
    let t1 = source::fetch(&git_pin(&up, &c1.to_string(), None), &l, &|_| {}).unwrap();
    let repo = git2::Repository::open(&t1).unwrap();
    assert_eq!(repo.head().unwrap().peel_to_commit().unwrap().id(), c1);
    assert!(repo.head_detached().unwrap());
    assert!(fs_err::read_to_string(t1.join("server.c"))
        .unwrap()
        .contains("git-1"));

    // A newer upstream commit is fetched into the same object store.
    let upr = git2::Repository::open(&up).unwrap();
    fs_err::write(up.join("server.c"), fake_server_c("git-2")).unwrap();
    let c2 = commit_all(&upr, "second");
    let branch = upr.head().unwrap().shorthand().unwrap().to_string();
    let t2 = source::fetch(&git_pin(&up, &c2.to_string(), Some(&branch)), &l, &|_| {}).unwrap();
    assert_ne!(t1, t2);
    assert!(fs_err::read_to_string(t2.join("server.c"))
        .unwrap()
        .contains("git-2"));
    let stores: Vec<_> = fs_err::read_dir(l.cache.join("src-v1/git-db"))
        .unwrap()
        .collect();
    assert_eq!(stores.len(), 1, "one object store per URL");

    // A checkout whose HEAD was moved is detected and recreated.
    let r1 = git2::Repository::open(&t1).unwrap();
    r1.set_head_detached(c2).unwrap();
    let t1b = source::fetch(&git_pin(&up, &c1.to_string(), None), &l, &|_| {}).unwrap();
    assert_eq!(
        git2::Repository::open(&t1b)
            .unwrap()
            .head()
            .unwrap()
            .peel_to_commit()
            .unwrap()
            .id(),
        c1
    );
}

#[test]
fn git_unknown_commit_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (up, _) = git_repo(tmp.path());
    let missing = "0123456789012345678901234567890123456789";
    let err =
        source::fetch(&git_pin(&up, missing, None), &layout(tmp.path()), &|_| {}).unwrap_err();
    assert!(matches!(err, SourceError::UnknownCommit { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(missing) && msg.contains(&up.display().to_string()),
        "{msg}"
    );
}

#[test]
fn git_pin_mismatch_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (up, c1) = git_repo(tmp.path());
    let upr = git2::Repository::open(&up).unwrap();
    fs_err::write(up.join("server.c"), fake_server_c("git-2")).unwrap();
    commit_all(&upr, "second");
    // The branch now points at the second commit, the pin says the first.
    let branch = upr.head().unwrap().shorthand().unwrap().to_string();
    let err = source::fetch(
        &git_pin(&up, &c1.to_string(), Some(&branch)),
        &layout(tmp.path()),
        &|_| {},
    )
    .unwrap_err();
    assert!(matches!(err, SourceError::PinMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&c1.to_string()));
}

#[test]
fn archive_with_wrong_sha256_is_refused_before_extraction() {
    let tmp = tempfile::tempdir().unwrap();
    let (archive, _) = fake_archive(tmp.path(), "x", &fake_server_c("x"));
    let pin = Pin {
        commit: COMMIT.into(),
        source: SourceSpec::Archive {
            location: archive.display().to_string(),
            sha256: "a".repeat(64),
            strip_prefix: Some("fake-llama".into()),
        },
        description: None,
        bundle_trees: Default::default(),
    };
    let l = layout(tmp.path());
    let err = source::fetch(&pin, &l, &|_| {}).unwrap_err();
    assert!(matches!(err, SourceError::ChecksumMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&"a".repeat(64)));
    assert!(extracted_trees(&l).is_empty(), "nothing extracted");
    assert!(archive.is_file(), "the user's own archive is left as it is");
}

/// An archive pin over HTTP goes through the one downloader: a transfer cut
/// halfway resumes from the bytes already in `downloads/` (a `Range`
/// request), the tree is the archive's, and the partial is gone after; a
/// wrong pinned sha256 is refused while nothing is extracted.
#[test]
fn an_archive_over_http_resumes_a_cut_transfer_and_is_checked() {
    use test_support::http::{serve, Faults};
    let tmp = tempfile::tempdir().unwrap();
    let (archive, sha) = fake_archive(tmp.path(), "x", &fake_server_c("x"));
    let bytes = fs_err::read(&archive).unwrap();
    let srv = serve(
        bytes.clone(),
        Faults {
            drop_first_after: Some(bytes.len() / 2),
            ..Default::default()
        },
    );
    let pin = |sha256: &str| Pin {
        commit: COMMIT.into(),
        source: SourceSpec::Archive {
            location: srv.url("/fake-llama.tar.gz"),
            sha256: sha256.into(),
            strip_prefix: Some("fake-llama".into()),
        },
        description: None,
        bundle_trees: Default::default(),
    };
    let l = layout(tmp.path());
    let err = source::fetch(&pin(&"b".repeat(64)), &l, &|_| {}).unwrap_err();
    assert!(matches!(err, SourceError::ChecksumMismatch { .. }), "{err}");
    assert!(extracted_trees(&l).is_empty(), "nothing extracted");

    let srv_gets = srv.counters.lock().unwrap().gets;
    let tree = source::fetch(&pin(&sha), &l, &|_| {}).unwrap();
    assert!(tree.join("CMakeLists.txt").is_file());
    let c = srv.counters.lock().unwrap();
    assert!(c.gets > srv_gets, "downloaded again after the refused one");
    // The first transfer (cut after half) resumed where it broke.
    assert_eq!(c.ranges, [format!("{}-", bytes.len() / 2)]);
    assert!(
        fs_err::read_dir(l.downloads()).map_or(true, |d| d.count() == 0),
        "the partial download is removed once extracted"
    );
}

#[test]
fn sdist_with_wrong_sha256_is_refused_before_extraction() {
    let tmp = tempfile::tempdir().unwrap();
    // The real pinned sdist (pip's cache makes this cheap after the first time), wrong digest.
    let pin = Pin {
        commit: COMMIT.into(),
        source: SourceSpec::PypiSdist {
            package: "llama-cpp-python".into(),
            version: "0.3.35".into(),
            sha256: "b".repeat(64),
            subdir: Some("vendor/llama.cpp".into()),
        },
        description: None,
        bundle_trees: Default::default(),
    };
    let l = layout(tmp.path());
    let err = source::fetch(&pin, &l, &|_| {}).unwrap_err();
    assert!(matches!(err, SourceError::ChecksumMismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("1139dbb54509074b70893fab8554e3b079aa9f4d312058ce4018ef0019e3de12"),
        "the actual digest is shown: {err}"
    );
    assert!(extracted_trees(&l).is_empty(), "nothing extracted");
}

/// `pin bump` hands the sdist it downloaded to learn its digest to the
/// source cache (`fetch_using`): checked against the pin like a download,
/// and never downloaded again. The package is one pip's index does not
/// have, so a download would fail the test.
#[test]
fn an_sdist_already_on_disk_is_checked_and_used_without_a_download() {
    let tmp = tempfile::tempdir().unwrap();
    let (archive, sha) = fake_archive(tmp.path(), "sd", &fake_server_c("sd"));
    let pin = |sha256: String| Pin {
        commit: COMMIT.into(),
        source: SourceSpec::PypiSdist {
            package: "llorch-no-such-package".into(),
            version: "0.0.1".into(),
            sha256,
            subdir: None,
        },
        description: None,
        bundle_trees: Default::default(),
    };
    let l = layout(tmp.path());
    let err = source::fetch_using(&pin("c".repeat(64)), &l, &|_| {}, Some(&archive)).unwrap_err();
    assert!(matches!(err, SourceError::ChecksumMismatch { .. }), "{err}");
    assert!(extracted_trees(&l).is_empty(), "nothing extracted");
    assert!(archive.is_file(), "the caller's file is left as it is");
    let said = std::cell::RefCell::new(Vec::<String>::new());
    let tree = source::fetch_using(
        &pin(sha.clone()),
        &l,
        &|m| said.borrow_mut().push(m.into()),
        Some(&archive),
    )
    .unwrap();
    assert!(tree.join("server.c").is_file());
    assert!(
        !said.borrow().iter().any(|m| m.contains("downloading")),
        "{:?}",
        said.borrow()
    );
    // The same pin, fetched as a build would: the cached tree, no download.
    assert_eq!(source::fetch(&pin(sha), &l, &|_| {}).unwrap(), tree);
}

fn tar_with_raw_name(path: &std::path::Path, name: &[u8], link: Option<&[u8]>) {
    let f = fs_err::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut t = tar::Builder::new(gz);
    let mut ok = tar::Header::new_gnu();
    ok.set_size(3);
    ok.set_mode(0o644);
    ok.set_cksum();
    t.append_data(&mut ok, "fake-llama/ok.txt", &b"ok\n"[..])
        .unwrap();
    let mut h = tar::Header::new_old();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name);
        if let Some(l) = link {
            old.linkname[..l.len()].copy_from_slice(l);
        }
    }
    h.set_entry_type(if link.is_some() {
        tar::EntryType::Symlink
    } else {
        tar::EntryType::Regular
    });
    h.set_size(if link.is_some() { 0 } else { 4 });
    h.set_mode(0o644);
    h.set_cksum();
    t.append(
        &h,
        if link.is_some() {
            &b""[..]
        } else {
            &b"evil"[..]
        },
    )
    .unwrap();
    t.into_inner().unwrap().finish().unwrap();
}

#[test]
fn archive_members_that_escape_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (name, link)) in [
        (&b"fake-llama/../../evil.txt"[..], None),
        (&b"/tmp/llorch-evil-abs.txt"[..], None),
        (&b"fake-llama/link"[..], Some(&b"../../../etc/passwd"[..])),
        (&b"fake-llama/abslink"[..], Some(&b"/etc/passwd"[..])),
    ]
    .into_iter()
    .enumerate()
    {
        let archive = tmp.path().join(format!("evil{i}.tar.gz"));
        tar_with_raw_name(&archive, name, link);
        let dest = tmp.path().join(format!("out{i}"));
        let err = engine_provisioner::extract::extract_tar_gz(&archive, &dest, Some("fake-llama"))
            .unwrap_err();
        assert!(
            matches!(err, SourceError::UnsafeMember { .. }),
            "{i}: {err}"
        );
        assert!(!dest.exists(), "{i}: nothing was written");
    }
    assert!(!tmp.path().join("evil.txt").exists());
    assert!(!std::path::Path::new("/tmp/llorch-evil-abs.txt").exists());
}

/// Serve one file over HTTP on 127.0.0.1 (a few requests), counting them.
fn serve_once(body: Vec<u8>) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h2 = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming().take(4).flatten() {
            let mut s = s;
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            h2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(&body);
        }
    });
    (format!("http://{addr}/fake-llama.tar.gz"), hits)
}

#[test]
fn archive_over_http_is_fetched_verified_and_extracted() {
    let tmp = tempfile::tempdir().unwrap();
    let (archive, sha) = fake_archive(tmp.path(), "web", &fake_server_c("from-http"));
    let (url, hits) = serve_once(fs_err::read(&archive).unwrap());
    let pin = Pin {
        commit: COMMIT.into(),
        source: SourceSpec::Archive {
            location: url.clone(),
            sha256: sha,
            strip_prefix: Some("fake-llama".into()),
        },
        description: None,
        bundle_trees: Default::default(),
    };
    let l = layout(tmp.path());
    let tree = source::fetch(&pin, &l, &|_| {}).unwrap();
    assert!(fs_err::read_to_string(tree.join("server.c"))
        .unwrap()
        .contains("from-http"));
    assert!(tree.join("CMakeLists.txt").is_file());
    // Second fetch: already extracted, no request.
    source::fetch(&pin, &l, &|_| {}).unwrap();
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Same server, wrong digest: refused.
    let (url2, _) = serve_once(fs_err::read(&archive).unwrap());
    let bad = Pin {
        commit: COMMIT.into(),
        source: SourceSpec::Archive {
            location: url2,
            sha256: "c".repeat(64),
            strip_prefix: Some("fake-llama".into()),
        },
        description: None,
        bundle_trees: Default::default(),
    };
    let err = source::fetch(&bad, &layout(&tmp.path().join("other")), &|_| {}).unwrap_err();
    assert!(matches!(err, SourceError::ChecksumMismatch { .. }), "{err}");
}

/// A tar of raw members (names and link targets written byte for byte, so
/// hostile ones can be built): (name, kind, link target, body).
type RawMember<'a> = (&'a str, tar::EntryType, &'a str, &'a [u8]);

fn raw_tar(path: &std::path::Path, members: &[RawMember]) {
    let f = fs_err::File::create(path).unwrap();
    let mut t = tar::Builder::new(f);
    for (name, kind, link, body) in members {
        let mut h = tar::Header::new_old();
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(*kind);
        h.set_size(body.len() as u64);
        h.set_mode(if *kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_cksum();
        t.append(&h, *body).unwrap();
    }
    t.finish().unwrap();
}

/// Each escape shape, including ones that pass a check of member names as
/// text: a symlink chain (`up -> .`, then `t -> up/..`: inside as text,
/// outside on disk), a file written through a symlink, a hard link out, a
/// device file. Each is refused and nothing lands outside the target.
#[test]
fn link_chains_and_writes_through_links_cannot_leave_the_tree() {
    use tar::EntryType as T;
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs_err::create_dir_all(&outside).unwrap();
    let cases: Vec<(&str, Vec<RawMember>)> = vec![
        ("dotdot", vec![("a/../../x", T::Regular, "", b"evil")]),
        (
            "absolute",
            vec![("/tmp/llorch-abs-evil", T::Regular, "", b"evil")],
        ),
        ("symlink out", vec![("l", T::Symlink, "../outside", b"")]),
        ("hard link out", vec![("h", T::Link, "../outside/f", b"")]),
        (
            "hard link absolute",
            vec![("h", T::Link, "/etc/passwd", b"")],
        ),
        (
            "symlink chain",
            vec![
                ("up", T::Symlink, ".", b""),
                ("t", T::Symlink, "up/..", b""),
            ],
        ),
        (
            "chain then a file through it",
            vec![
                ("up", T::Symlink, ".", b""),
                ("t", T::Symlink, "up/../outside", b""),
                ("t/pwned", T::Regular, "", b"evil"),
            ],
        ),
        (
            "a link then a file through it",
            vec![
                ("d", T::Directory, "", b""),
                ("l", T::Symlink, "d", b""),
                ("l/f", T::Regular, "", b"evil"),
            ],
        ),
        (
            "a link over a directory member",
            vec![
                ("d", T::Symlink, ".", b""),
                ("d/x", T::Regular, "", b"evil"),
            ],
        ),
        ("device", vec![("dev", T::Char, "", b"")]),
        ("fifo", vec![("fifo", T::Fifo, "", b"")]),
    ];
    for (i, (what, members)) in cases.iter().enumerate() {
        let archive = tmp.path().join(format!("case{i}.tar"));
        raw_tar(&archive, members);
        let dest = tmp.path().join(format!("tree{i}"));
        let err = engine_provisioner::extract::extract_tar_gz(&archive, &dest, None)
            .expect_err(what)
            .to_string();
        assert!(
            err.contains("case"),
            "{what}: the error names the archive: {err}"
        );
        assert!(
            fs_err::read_dir(&outside).unwrap().next().is_none(),
            "{what}: wrote outside"
        );
    }
    assert!(!std::path::Path::new("/tmp/llorch-abs-evil").exists());
    assert!(!tmp.path().join("x").exists());

    // Links that stay inside are kept, chains included.
    let ok = tmp.path().join("ok.tar");
    raw_tar(
        &ok,
        &[
            ("d/", T::Directory, "", b""),
            ("d/f", T::Regular, "", b"data"),
            ("d/e/", T::Directory, "", b""),
            ("l", T::Symlink, "d", b""),
            ("m", T::Symlink, "l/e/../f", b""),
            ("h", T::Link, "d/f", b""),
        ],
    );
    let dest = tmp.path().join("oktree");
    engine_provisioner::extract::extract_tar_gz(&ok, &dest, None).unwrap();
    assert_eq!(fs_err::read(dest.join("m")).unwrap(), b"data");
    assert_eq!(fs_err::read(dest.join("h")).unwrap(), b"data");
}
