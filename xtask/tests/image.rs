//! The container image against real processes: built from the default
//! engine (shared through the workspace cache), unpacked by an independent
//! tool (`umoci`), and its entrypoint run chrooted in its own mount and pid
//! namespaces, as the image's non-root user, with only the unpacked root,
//! the model (read-only) and a state directory mounted. The haiku proof
//! passes against it; two builds in two cache directories give one digest;
//! a model that is not the one the image expects is refused before anything
//! serves.

use llorch_io::cmd::{Cmd, Io};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use test_support::workspace_root as root;

fn xtask(cache: &Path, rt: &Path) -> Cmd {
    // None of the caller's LLORCH_* (a model, a pool, a token, a registry).
    std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with("LLORCH_"))
        .fold(Cmd::new(env!("CARGO_BIN_EXE_xtask")), |c, k| {
            c.env_remove(k)
        })
        .env("LLORCH_ROOT", root())
        .env("LLORCH_CACHE_DIR", cache)
        .env("LLORCH_RUNTIME_DIR", rt)
        .dir(root())
}

fn json_of(cmd: Cmd, what: &str) -> Value {
    let (ok, out, err) = cmd.output().unwrap();
    assert!(ok, "{what}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{what}: {e}: {out}"))
}

fn is_root() -> bool {
    Cmd::new("id")
        .arg("-u")
        .read()
        .is_ok_and(|s| s.trim() == "0")
}

/// The default profile's image, built into `out` from `cache`.
fn build_image(cache: &Path, rt: &Path, out: &Path) -> Value {
    json_of(
        xtask(cache, rt)
            .args(["image", "build", "--json", "--out"])
            .arg(out),
        "image build",
    )
}

/// `umoci unpack` of the layout's one tag into `bundle` (rootless unless root).
fn unpack(layout: &Path, tag: &str, bundle: &Path) -> PathBuf {
    let mut c = Cmd::new("umoci").arg("unpack");
    if !is_root() {
        c = c.arg("--rootless");
    }
    c.arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(bundle)
        .read()
        .expect("umoci unpack (installed by `cargo xtask doctor --install --test-servers`)");
    bundle.join("rootfs")
}

/// The image config's environment, as the layout says (not as we wrote it).
fn image_env(layout: &Path) -> Vec<String> {
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let index: Value =
        serde_json::from_slice(&fs_err::read(layout.join("index.json")).unwrap()).unwrap();
    let m: Value = serde_json::from_slice(
        &fs_err::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let c: Value = serde_json::from_slice(
        &fs_err::read(blob(m["config"]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    assert_eq!(c["config"]["User"], "65532:65532");
    assert_eq!(
        c["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/llorch", "serve", "--in-image"])
    );
    c["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// The entrypoint's process tree. On drop the pid namespace's init (the
/// entrypoint, `unshare`'s one child) is killed first, and the kernel kills
/// everything else in the namespace with it; then `unshare`. Killing
/// `unshare` alone does not do it as root: the inner `--setuid` clears the
/// parent-death signal `--kill-child` gave the entrypoint (the clean-clone CI
/// left one serving so once).
struct Entrypoint(llorch_io::cmd::KillOnDrop);

impl Entrypoint {
    /// The namespace's init as the host sees it (`unshare`'s children).
    fn inits(&self) -> Vec<i32> {
        let outer = self.0.id();
        fs_err::read_to_string(format!("/proc/{outer}/task/{outer}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for Entrypoint {
    fn drop(&mut self) {
        for pid in self.inits() {
            // SAFETY: kill(2) of our unreaped child's child (unshare waits for it).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The entrypoint, chrooted into `rootfs` in new mount and pid namespaces,
/// with `model` bound read-only at /models/model.gguf and `state` at
/// /var/lib/llorch; as uid 65532 when we are root (else in a user namespace
/// that maps us to root, where only our uid exists).
fn run_entrypoint(rootfs: &Path, env: &[String], model: &Path, state: &Path) -> Entrypoint {
    for d in ["proc", "dev"] {
        fs_err::create_dir_all(rootfs.join(d)).unwrap();
    }
    fs_err::write(rootfs.join("models/model.gguf"), b"").unwrap();
    let setuid = if is_root() {
        Cmd::new("chown")
            .arg("65532:65532")
            .arg(state)
            .read()
            .unwrap();
        "--setuid=65532 --setgid=65532"
    } else {
        ""
    };
    let envs: Vec<String> = env
        .iter()
        .filter(|e| !e.starts_with("PORT="))
        .map(|e| format!("'{e}'"))
        .collect();
    let script = format!(
        r#"set -e
R='{r}'
mount --bind '{state}' "$R/var/lib/llorch"
mount --bind '{model}' "$R/models/model.gguf"
mount -o remount,bind,ro "$R/models/model.gguf"
mount -t tmpfs -o mode=755 tmpfs "$R/dev"
for d in null zero urandom random; do touch "$R/dev/$d"; mount --bind /dev/$d "$R/dev/$d"; done
exec /usr/bin/env -i {envs} PORT=0 LLORCH_API_TOKEN=image-test-token /usr/bin/unshare --root="$R" --wd=/opt/llorch --mount-proc {setuid} /usr/local/bin/llorch serve --in-image
"#,
        r = rootfs.display(),
        state = state.display(),
        model = model.display(),
        envs = envs.join(" "),
    );
    let mut ns = Cmd::new("unshare");
    if !is_root() {
        ns = ns.args(["--user", "--map-root-user"]);
    }
    Entrypoint(llorch_io::cmd::KillOnDrop(
        ns.args(["--mount", "--pid", "--fork", "--kill-child", "bash", "-c"])
            .arg(script)
            .spawn(Io::Piped, Io::Piped)
            .unwrap(),
    ))
}

/// Where the entrypoint serves (its `serving … at URL` line), or everything
/// it said on stderr if it exited first.
fn served_at(child: &mut Entrypoint) -> Result<String, String> {
    let child = &mut child.0;
    let stderr = child.0.stderr.take().unwrap();
    let err_text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let et = err_text.clone();
    let err_reader = std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut t = et.lock().unwrap();
            t.push_str(&l);
            t.push('\n');
        }
    });
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("serving ") {
            let at = rest.split(" at ").nth(1).unwrap();
            let url = at
                .split_whitespace()
                .next()
                .unwrap()
                .replace("0.0.0.0", "127.0.0.1");
            std::thread::spawn(move || lines.for_each(drop));
            return Ok(url);
        }
    }
    // Stdout closed: the entrypoint exited; its stderr says why.
    let _ = child.0.wait();
    let _ = err_reader.join();
    let t = err_text.lock().unwrap().clone();
    Err(t)
}

fn default_model(cache: &Path, rt: &Path) -> PathBuf {
    let v = json_of(
        xtask(cache, rt).args(["model", "fetch", "--json"]),
        "model fetch",
    );
    PathBuf::from(
        v["metadata"]["path"]
            .as_str()
            .or(v["path"].as_str())
            .unwrap(),
    )
}

/// A scratch directory, its runtime dir, the shared cache (its default
/// engine built once per machine: a hit after `ci` built it), and the
/// default profile's image built from it into `<tmp>/image-a`.
fn scratch_and_image() -> (tempfile::TempDir, PathBuf, PathBuf, Value) {
    let tmp = tempfile::tempdir().unwrap();
    let rt = tmp.path().join("rt");
    let shared = root().join("cache");
    let (ok, _, err) = xtask(&shared, &rt)
        .args(["engine", "build"])
        .output()
        .unwrap();
    assert!(ok, "engine build: {err}");
    let a = build_image(&shared, &rt, &tmp.path().join("image-a"));
    (tmp, rt, shared, a)
}

#[test]
fn the_image_reproduces_in_another_cache_and_its_unpacked_entrypoint_serves_the_haiku() {
    let (tmp, rt, shared, a) = scratch_and_image();
    // Another cache directory, its engine copied in and checked: the same image.
    let other = tmp.path().join("another/cache");
    let (ok, _, err) = xtask(&other, &rt)
        .args(["engine", "build", "--reuse-from"])
        .arg(&shared)
        .output()
        .unwrap();
    assert!(ok, "engine build --reuse-from: {err}");
    let b = build_image(&other, &rt, &tmp.path().join("image-b"));
    assert_eq!(a["image"]["digest"], b["image"]["digest"], "{a}\n{b}");
    assert_eq!(a["image"]["layers"], b["image"]["layers"]);
    let digest = a["image"]["digest"].as_str().unwrap();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );

    // Unpacked by umoci, run by hand: the haiku proof passes against it.
    let layout = tmp.path().join("image-a");
    let rootfs = unpack(&layout, "default", &tmp.path().join("bundle"));
    let spec: Value =
        serde_json::from_slice(&fs_err::read(rootfs.join("opt/llorch/image.json")).unwrap())
            .unwrap();
    // Every file of the image is explained (origin and sha256), and only those are there.
    let explained: std::collections::BTreeSet<String> = spec["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_string())
        .collect();
    let mut present = std::collections::BTreeSet::new();
    let mut stack = vec![rootfs.clone()];
    while let Some(d) = stack.pop() {
        for e in fs_err::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else {
                assert!(t.is_file(), "{} is not a regular file", e.path().display());
                present.insert(format!(
                    "/{}",
                    e.path().strip_prefix(&rootfs).unwrap().display()
                ));
            }
        }
    }
    present.remove("/opt/llorch/image.json");
    assert_eq!(present, explained);
    let model = default_model(&shared, &rt);
    let state = tmp.path().join("state");
    fs_err::create_dir_all(&state).unwrap();
    let mut child = run_entrypoint(&rootfs, &image_env(&layout), &model, &state);
    let url = served_at(&mut child).unwrap_or_else(|e| panic!("the entrypoint exited:\n{e}"));
    let handoff = state.join("run/engines/default.json");
    let rt2 = tokio::runtime::Runtime::new().unwrap();
    let report = rt2
        .block_on(async {
            let t = llorch_proof::Target::running(&url, &handoff, Some("image-test-token".into()))?;
            llorch_proof::prove(&t, &|_| {}).await
        })
        .unwrap();
    assert!(report.passed, "{:#?}", report.checks);
    assert_eq!(report.checks.len(), 9, "{:#?}", report.checks);
    // Off loopback the API wants the token; probes and metrics are open.
    let http = llorch_io::http::blocking_client();
    let caps = http.get(format!("{url}/v1/capabilities")).send().unwrap();
    assert_eq!(caps.status().as_u16(), 401);
    assert_eq!(
        http.get(format!("{url}/readyz"))
            .send()
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    // Nothing of it outlives the test: its namespace's init is gone (and
    // with it every process of the namespace, the engine among them).
    let inits = child.inits();
    assert_eq!(inits.len(), 1, "one namespace init: {inits:?}");
    drop(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while llorch_io::handoff::ProcessIdentity::of(inits[0] as u32).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the entrypoint outlived the test"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn the_image_refuses_a_model_that_does_not_hash_to_the_digest_it_expects() {
    let (tmp, rt, shared, _) = scratch_and_image();
    let layout = tmp.path().join("image-a");
    let rootfs = unpack(&layout, "default", &tmp.path().join("bundle"));
    // The real model, cut short: its GGUF header still parses.
    let good = default_model(&shared, &rt);
    let bytes = fs_err::read(&good).unwrap();
    let bad = tmp.path().join("model.gguf");
    fs_err::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let state = tmp.path().join("state");
    fs_err::create_dir_all(&state).unwrap();
    let mut child = run_entrypoint(&rootfs, &image_env(&layout), &bad, &state);
    let err = served_at(&mut child).expect_err("a model of the wrong digest was served");
    assert!(err.contains("sha256") || err.contains("digest"), "{err}");
    assert!(!state.join("run/engines/default.json").exists());
}

/// `image build --to` pushes the layout to a registry (the reference
/// registry server on 127.0.0.1) and the registry serves the layout's own
/// digest, every layer and config blob byte for byte.
#[test]
fn the_image_is_pushed_with_its_own_digest() {
    let (tmp, rt, shared, a) = scratch_and_image();
    let reg = test_support::registry::TestRegistry::start(None);
    let to = reg.url("llorch/image");
    let out = json_of(
        xtask(&shared, &rt)
            .args(["image", "build", "--json", "--out"])
            .arg(tmp.path().join("image-push"))
            .args(["--to", &to]),
        "image build --to",
    );
    let digest = a["image"]["digest"].as_str().unwrap();
    assert_eq!(
        out["image"]["digest"], digest,
        "the same inputs, the same image"
    );
    assert_eq!(out["pushed"]["digest"], digest, "{out}");
    assert!(
        out["pushed"]["reference"]
            .as_str()
            .unwrap()
            .ends_with(":default"),
        "{out}"
    );
    // What the registry stores is the layout's bytes.
    let layout = tmp.path().join("image-push");
    for l in out["image"]["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap();
        let local = fs_err::read(
            layout
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
        )
        .unwrap();
        assert_eq!(fs_err::read(reg.blob_path(d)).unwrap(), local, "{d}");
    }
}

/// An image of a stack holds every pool (pools of one build share one
/// engine entry) and names each file once.
#[test]
fn a_stack_image_holds_every_pool_and_each_file_once() {
    let (tmp, rt, shared, _) = scratch_and_image();
    let stack = tmp.path().join("stack.yaml");
    fs_err::write(
        &stack,
        "schema: 1\npools:\n  - id: chat\n    profile: cpu\n  - id: embed\n    profile: cpu-embed\n",
    )
    .unwrap();
    let layout = tmp.path().join("image-stack");
    let out = json_of(
        xtask(&shared, &rt)
            .args(["image", "build", "--json", "--stack"])
            .arg(&stack)
            .arg("--out")
            .arg(&layout),
        "image build --stack",
    );
    let pools: Vec<&str> = out["image"]["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(pools, ["chat", "embed"]);
    let rootfs = unpack(&layout, "chat", &tmp.path().join("bundle"));
    let spec: Value =
        serde_json::from_slice(&fs_err::read(rootfs.join("opt/llorch/image.json")).unwrap())
            .unwrap();
    let paths: Vec<&str> = spec["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    let unique: std::collections::BTreeSet<&&str> = paths.iter().collect();
    assert_eq!(paths.len(), unique.len(), "{paths:?}");
    assert!(rootfs.join("opt/llorch/requirements/embed.yaml").is_file());
}
