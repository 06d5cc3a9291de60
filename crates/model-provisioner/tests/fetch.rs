//! The model store against a real HTTP server on 127.0.0.1 with fault injection.

mod support;

use llorch_io::paths::Layout;
use model_provisioner::error::ModelError;
use model_provisioner::{FetchOptions, ModelStore};
use support::{serve, tiny_gguf, Faults};

fn temp_layout() -> (tempfile::TempDir, Layout) {
    let d = tempfile::tempdir().unwrap();
    let l = Layout::at(
        d.path().into(),
        d.path().join("cache"),
        d.path().join("runtime"),
    );
    (d, l)
}

fn sha(b: &[u8]) -> String {
    llorch_io::digest::sha256_bytes(b)
}

fn opts(expected: Option<String>) -> FetchOptions {
    FetchOptions {
        expected_sha256: expected,
        report: llorch_io::report::Reporter::QUIET,
        ..Default::default()
    }
}

const SIZE: usize = 1_500_000;

#[test]
fn resume_after_a_dropped_connection_transfers_only_the_missing_bytes() {
    let body = tiny_gguf(SIZE, 1);
    let srv = serve(
        body.clone(),
        Faults {
            drop_first_after: Some(600_000),
            ..Default::default()
        },
    );
    let (_d, l) = temp_layout();
    let out = ModelStore::new(&l)
        .fetch(&srv.url("/m/model.gguf"), &opts(Some(sha(&body))))
        .unwrap();
    let c = srv.counters.lock().unwrap();
    assert_eq!(c.gets, 2, "one drop, one resume");
    assert_eq!(c.ranges, vec!["600000-".to_string()]);
    assert_eq!(
        c.body_bytes, SIZE as u64,
        "the resume sent only the missing bytes"
    );
    assert_eq!(out.resumed_from, 600_000);
    assert_eq!(fs_err::read(&out.metadata.path).unwrap(), body);
    assert_eq!(out.metadata.arch.as_deref(), Some("llama"));
    assert_eq!(out.metadata.ctx_max, Some(4096));
}

#[test]
fn a_server_that_ignores_range_still_yields_a_correct_file() {
    let body = tiny_gguf(SIZE, 2);
    let srv = serve(
        body.clone(),
        Faults {
            drop_first_after: Some(500_000),
            ignore_range: true,
            ..Default::default()
        },
    );
    let (_d, l) = temp_layout();
    let out = ModelStore::new(&l)
        .fetch(&srv.url("/m/model.gguf"), &opts(Some(sha(&body))))
        .unwrap();
    assert_eq!(out.resumed_from, 0, "a 200 is never taken as a resume");
    assert_eq!(fs_err::read(&out.metadata.path).unwrap(), body);
}

#[test]
fn wrong_content_is_refused_and_nothing_reaches_the_store() {
    let body = tiny_gguf(SIZE, 3);
    let srv = serve(body, Faults::default());
    let (_d, l) = temp_layout();
    let store = ModelStore::new(&l);
    let want = "0".repeat(64);
    let err = store
        .fetch(&srv.url("/m/model.gguf"), &opts(Some(want.clone())))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Download(_)), "{msg}");
    assert!(
        msg.contains(&want) && msg.contains("/m/model.gguf") && msg.contains("expected"),
        "{msg}"
    );
    assert!(!store.blob(&want).exists());
    let blobs = fs_err::read_dir(store.dir.join("blobs"))
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(blobs, 0);
    let partials = fs_err::read_dir(l.downloads())
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(partials, 0, "a corrupt partial is deleted");
}

#[test]
fn not_found_names_the_ref() {
    let srv = serve(tiny_gguf(1000, 4), Faults::default());
    let (_d, l) = temp_layout();
    let url = srv.url("/m/missing.gguf");
    let err = ModelStore::new(&l)
        .fetch(&url, &opts(None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("404") && err.contains(&url), "{err}");
}

#[test]
fn server_errors_are_retried() {
    let body = tiny_gguf(SIZE, 5);
    let srv = serve(
        body.clone(),
        Faults {
            fail_first: 2,
            ..Default::default()
        },
    );
    let (_d, l) = temp_layout();
    let out = ModelStore::new(&l)
        .fetch(&srv.url("/m/model.gguf"), &opts(Some(sha(&body))))
        .unwrap();
    assert_eq!(srv.counters.lock().unwrap().gets, 3);
    assert_eq!(out.metadata.digest, sha(&body));
}

#[test]
fn concurrent_fetches_of_one_ref_download_once() {
    let body = tiny_gguf(SIZE, 6);
    let srv = serve(
        body.clone(),
        Faults {
            delay_ms: 300,
            ..Default::default()
        },
    );
    let (_d, l) = temp_layout();
    let url = srv.url("/m/model.gguf");
    let hs: Vec<_> = (0..3)
        .map(|_| {
            let (l, url, want) = (l.clone(), url.clone(), sha(&body));
            std::thread::spawn(move || ModelStore::new(&l).fetch(&url, &opts(Some(want))).unwrap())
        })
        .collect();
    let outs: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        srv.counters.lock().unwrap().gets,
        1,
        "one download for three fetches"
    );
    assert_eq!(outs.iter().filter(|o| !o.cached).count(), 1);
}

#[test]
fn hub_refs_use_the_linked_etag_and_record_the_commit() {
    let body = tiny_gguf(SIZE, 7);
    let srv = serve(body.clone(), Faults::default());
    let (_d, l) = temp_layout();
    let mut store = ModelStore::new(&l);
    store.hf_endpoint = format!("http://{}", srv.addr);
    let out = store
        .fetch(
            "hf:org/repo/sub/model.gguf",
            &FetchOptions {
                require_digest: true,
                report: llorch_io::report::Reporter::QUIET,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(out.metadata.digest, sha(&body));
    assert_eq!(
        out.metadata.revision.as_deref(),
        Some("0123456789abcdef0123456789abcdef01234567")
    );
    assert!(out
        .metadata
        .source_url
        .as_deref()
        .unwrap()
        .ends_with("/org/repo/resolve/main/sub/model.gguf"));
    let refs = store.read_refs().unwrap();
    assert!(refs.refs.contains_key("hf:org/repo@main/sub/model.gguf"));
    let prov = fs_err::read_to_string(l.runtime.join("provenance/models.jsonl")).unwrap();
    assert!(
        prov.contains("\"event\":\"fetch\"") && prov.contains(&sha(&body)),
        "{prov}"
    );
}

#[test]
fn hub_etag_mismatch_is_refused() {
    let body = tiny_gguf(SIZE, 8);
    let srv = serve(
        body,
        Faults {
            linked_etag: Some("1".repeat(64)),
            ..Default::default()
        },
    );
    let (_d, l) = temp_layout();
    let mut store = ModelStore::new(&l);
    store.hf_endpoint = format!("http://{}", srv.addr);
    let err = store
        .fetch("hf:other/repo/model.gguf", &opts(None))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&"1".repeat(64)) && err.contains("mismatch"),
        "{err}"
    );
}

#[test]
fn strict_mode_refuses_a_ref_without_digest() {
    let (_d, l) = temp_layout();
    let err = ModelStore::new(&l)
        .fetch(
            "http://127.0.0.1:9/m.gguf",
            &FetchOptions {
                require_digest: true,
                report: llorch_io::report::Reporter::QUIET,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("require_digest") && err.contains("sha256"),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_gguf_is_refused() {
    let (d, l) = temp_layout();
    let p = d.path().join("weights.bin");
    fs_err::write(&p, b"PK\x03\x04 not a model").unwrap();
    let err = ModelStore::new(&l)
        .fetch(p.to_str().unwrap(), &opts(None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a GGUF"), "{err}");
}

#[test]
fn eviction_never_removes_a_model_in_use() {
    let (d, l) = temp_layout();
    let store = ModelStore::new(&l);
    let mut digests = Vec::new();
    for i in 0..3u8 {
        let p = d.path().join(format!("m{i}.gguf"));
        fs_err::write(&p, tiny_gguf(100_000, i)).unwrap();
        let o = store
            .fetch(
                p.to_str().unwrap(),
                &FetchOptions {
                    import: true,
                    report: llorch_io::report::Reporter::QUIET,
                    ..Default::default()
                },
            )
            .unwrap();
        digests.push(o.metadata.digest);
        std::thread::sleep(std::time::Duration::from_millis(1100)); // distinct last-use seconds
    }
    // A running engine uses the oldest model: it holds the blob's lease
    // (a shared flock; flock conflicts per open file, so holding it here is
    // what an engine process does).
    let lease = llorch_io::fsx::FileLock::shared(&l.blob_lock(&digests[0])).unwrap();
    let rep = store.gc(0).unwrap();
    assert_eq!(rep.kept_in_use, vec![digests[0].clone()]);
    assert_eq!(
        rep.evicted,
        vec![digests[1].clone(), digests[2].clone()],
        "least recently used first"
    );
    assert!(store.blob(&digests[0]).is_file());
    assert!(!store.blob(&digests[1]).exists());
    // Once the engine is gone, the blob can go too.
    drop(lease);
    let rep = store.gc(0).unwrap();
    assert_eq!(rep.evicted, vec![digests[0].clone()]);
    assert!(!store.blob(&digests[0]).exists());
}

#[test]
fn local_files_are_used_in_place_and_verified() {
    let (d, l) = temp_layout();
    let p = d.path().join("local.gguf");
    let body = tiny_gguf(50_000, 9);
    fs_err::write(&p, &body).unwrap();
    let store = ModelStore::new(&l);
    let out = store
        .fetch(&format!("file:{}", p.display()), &opts(Some(sha(&body))))
        .unwrap();
    assert_eq!(out.metadata.path, p);
    let err = store
        .fetch(
            &format!("file:{}", p.display()),
            &opts(Some("2".repeat(64))),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("mismatch"), "{err}");
}

#[test]
fn a_server_that_stalls_mid_body_is_resumed_after_the_stall_timeout() {
    let body = tiny_gguf(SIZE, 21);
    let srv = serve(
        body.clone(),
        Faults {
            stall_first_after: Some(700_000),
            ..Default::default()
        },
    );
    let (_d, l) = temp_layout();
    let out = ModelStore::new(&l)
        .fetch(
            &srv.url("/m/model.gguf"),
            &FetchOptions {
                stall_timeout: Some(std::time::Duration::from_secs(1)),
                ..opts(Some(sha(&body)))
            },
        )
        .unwrap();
    let c = srv.counters.lock().unwrap();
    assert_eq!(c.gets, 2, "the stalled GET, then a resume");
    assert_eq!(c.ranges, vec!["700000-".to_string()]);
    assert_eq!(out.resumed_from, 700_000);
    assert_eq!(fs_err::read(&out.metadata.path).unwrap(), body);
}

/// A cache hit never serves bytes that differ from the digest: a flipped
/// byte (same size), a truncated blob and a blob replaced by a symlink are
/// each noticed (the file's stamp changed, so it is hashed again) and
/// replaced, atomically, by a fresh verified download.
#[test]
fn a_corrupt_truncated_or_linked_blob_is_refetched_never_served() {
    let body = tiny_gguf(SIZE, 22);
    let srv = serve(body.clone(), Faults::default());
    let (d, l) = temp_layout();
    let store = ModelStore::new(&l);
    let url = srv.url("/m/model.gguf");
    let first = store.fetch(&url, &opts(Some(sha(&body)))).unwrap();
    let blob = first.metadata.path.clone();
    assert_eq!(srv.counters.lock().unwrap().gets, 1);
    // An untouched blob is a hit without a download.
    assert!(store.fetch(&url, &opts(Some(sha(&body)))).unwrap().cached);
    assert_eq!(srv.counters.lock().unwrap().gets, 1);

    type Damage = Box<dyn Fn(&std::path::Path)>;
    let outside = d.path().join("outside.gguf");
    let mut evil = body.clone();
    evil[SIZE - 10] ^= 0xff;
    fs_err::write(&outside, &evil).unwrap();
    let damages: Vec<(&str, Damage)> = vec![
        (
            "flipped byte",
            Box::new(|p| {
                let mut b = fs_err::read(p).unwrap();
                b[SIZE / 2] ^= 0x01;
                fs_err::write(p, b).unwrap();
            }),
        ),
        (
            "truncated",
            Box::new(|p| {
                let f = fs_err::OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(1000).unwrap();
            }),
        ),
        (
            "symlink to same-size bytes",
            Box::new(move |p| {
                fs_err::remove_file(p).unwrap();
                fs_err::os::unix::fs::symlink(&outside, p).unwrap();
            }),
        ),
    ];
    for (n, (what, damage)) in damages.iter().enumerate() {
        damage(&blob);
        let out = store.fetch(&url, &opts(Some(sha(&body)))).unwrap();
        assert!(!out.cached, "{what}: served from the cache");
        assert_eq!(srv.counters.lock().unwrap().gets, 2 + n as u32, "{what}");
        let m = fs_err::symlink_metadata(&blob).unwrap();
        assert!(
            m.file_type().is_file(),
            "{what}: the blob is a regular file again"
        );
        assert_eq!(fs_err::read(&blob).unwrap(), body, "{what}");
    }
    // The same damage with the store's index gone: the blob found by the
    // expected digest has no verification record, so it is hashed (or, not a
    // regular file, never used) before anything is handed out.
    let refs = l.bucket(llorch_io::paths::Bucket::Models).join("refs.json");
    for (n, (what, damage)) in damages.iter().enumerate() {
        damage(&blob);
        fs_err::remove_file(&refs).unwrap();
        let out = store.fetch(&url, &opts(Some(sha(&body)))).unwrap();
        assert!(!out.cached, "{what}, no index: served from the cache");
        assert_eq!(
            srv.counters.lock().unwrap().gets,
            2 + damages.len() as u32 + n as u32,
            "{what}, no index"
        );
        assert!(fs_err::symlink_metadata(&blob)
            .unwrap()
            .file_type()
            .is_file());
        assert_eq!(
            fs_err::read(&out.metadata.path).unwrap(),
            body,
            "{what}, no index"
        );
    }
    assert_eq!(
        fs_err::read(d.path().join("outside.gguf")).unwrap(),
        evil,
        "the link target was not written"
    );
}

#[test]
fn a_corrupt_index_is_an_error_not_an_empty_store() {
    let body = tiny_gguf(SIZE, 23);
    let srv = serve(body.clone(), Faults::default());
    let (_d, l) = temp_layout();
    let store = ModelStore::new(&l);
    let url = srv.url("/m/model.gguf");
    store.fetch(&url, &opts(Some(sha(&body)))).unwrap();
    let refs = l.bucket(llorch_io::paths::Bucket::Models).join("refs.json");
    fs_err::write(&refs, b"{\"refs\": {\"x\": ").unwrap();
    let err = store
        .fetch(&url, &opts(Some(sha(&body))))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("corrupt") && err.contains("refs.json"),
        "{err}"
    );
    assert_eq!(
        fs_err::read(&refs).unwrap(),
        b"{\"refs\": {\"x\": ",
        "left as it was"
    );
    assert!(
        store.gc(0).is_err(),
        "gc refuses too: it would orphan blobs"
    );
    // Moved aside, the next fetch finds the blob by digest and hashes it again.
    fs_err::rename(&refs, refs.with_extension("bad")).unwrap();
    let out = store.fetch(&url, &opts(Some(sha(&body)))).unwrap();
    assert!(out.cached);
    assert_eq!(srv.counters.lock().unwrap().gets, 1);
}

/// A partial download that is a symlink is never written through.
#[test]
fn a_partial_download_that_is_a_symlink_is_not_followed() {
    let body = tiny_gguf(SIZE, 24);
    let srv = serve(body.clone(), Faults::default());
    let (d, l) = temp_layout();
    let target = d.path().join("victim");
    fs_err::write(&target, b"precious").unwrap();
    let partial = d.path().join("dl.partial");
    fs_err::os::unix::fs::symlink(&target, &partial).unwrap();
    let got = llorch_io::download::download(
        "test",
        &srv.url("/m/model.gguf"),
        &partial,
        &llorch_io::download::DownloadOptions {
            expected_sha256: Some(sha(&body)),
            report: llorch_io::report::Reporter::QUIET,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(fs_err::read(&target).unwrap(), b"precious");
    assert!(fs_err::symlink_metadata(&partial)
        .unwrap()
        .file_type()
        .is_file());
    assert_eq!(got.digest, sha(&body));
    let _ = l;
}

/// A blob for the expected digest that is present without its index entry
/// (refs.json gone) is never vouched for by its name: truncated (its GGUF
/// header still parses) or replaced by a link to another valid GGUF, the
/// next fetch hashes it, downloads the model again and replaces it by a
/// regular file whose bytes hash to the digest.
#[test]
fn a_blob_without_its_index_is_hashed_and_replaced_never_trusted_by_name() {
    let body = tiny_gguf(SIZE, 7);
    let digest = sha(&body);
    let srv = serve(body.clone(), Faults::default());
    let (d, l) = temp_layout();
    let store = ModelStore::new(&l);
    let url = srv.url("/m/model.gguf");
    let first = store.fetch(&url, &opts(Some(digest.clone()))).unwrap();
    let blob = first.metadata.path.clone();
    let refs = l.cache.join("models-v1/refs.json");
    // Truncated, index gone.
    fs_err::write(&blob, &body[..SIZE / 2]).unwrap();
    fs_err::remove_file(&refs).unwrap();
    let again = store.fetch(&url, &opts(Some(digest.clone()))).unwrap();
    assert!(!again.cached);
    assert_eq!(
        llorch_io::digest::sha256_file(&again.metadata.path).unwrap(),
        digest
    );
    // A link to another valid GGUF, index gone.
    let other = d.path().join("other.gguf");
    fs_err::write(&other, tiny_gguf(SIZE, 8)).unwrap();
    fs_err::remove_file(&blob).unwrap();
    fs_err::os::unix::fs::symlink(&other, &blob).unwrap();
    fs_err::remove_file(&refs).unwrap();
    let third = store.fetch(&url, &opts(Some(digest.clone()))).unwrap();
    assert!(!third.cached);
    let md = fs_err::symlink_metadata(&third.metadata.path).unwrap();
    assert!(
        md.file_type().is_file(),
        "the link was replaced by the blob itself"
    );
    assert_eq!(
        llorch_io::digest::sha256_file(&third.metadata.path).unwrap(),
        digest
    );
    assert_eq!(srv.counters.lock().unwrap().gets, 3);
}
