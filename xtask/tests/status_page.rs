//! The status page in a real browser: headless Chromium (Debian's
//! `chromium` and `chromium-driver`, installed by `cargo xtask doctor
//! --install --test-servers`) driven over WebDriver (fantoccini) against a
//! real `serve --stack` with lazy pools and real llama-server engines.
//! Screenshots of each state land in `target/test-artifacts/status-page/`.
//!
//! Every wait is on a state of the page or of the server (a generous bound
//! only stops a hang); nothing is timed by a fixed sleep.

mod common;

use fantoccini::{Client, ClientBuilder, Locator};
use llorch_io::cmd::{Cmd, Io, KillOnDrop};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use test_support::workspace_root as root;

/// Only a hung page or server reaches this; every wait ends on a state first.
const HANG: Duration = Duration::from_secs(300);
const HOSTILE_MODEL: &str = "<img src=x onerror=window.__pwned=1>";
const HOSTILE_LOG: &str =
    "<script>window.__pwned=2</script><img src=x onerror=\"window.__pwned=3\"> from the engine";

use common::xtask_in as xtask;

fn artifacts() -> PathBuf {
    let d = root().join("target/test-artifacts/status-page");
    fs_err::create_dir_all(&d).unwrap();
    d
}

/// `serve --stack FILE` on a free port, once it serves: the child and its URL.
fn serve(rt: &Path, stack: &Path) -> (KillOnDrop, String) {
    common::serving(
        xtask(rt)
            .args(["serve", "--stack", stack.to_str().unwrap()])
            .args(["--addr", "127.0.0.1:0"]),
        Io::Inherit,
    )
}

/// chromedriver on a free port (another process may take the port first: try again).
fn chromedriver() -> (KillOnDrop, String) {
    let program = ["chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|p| Cmd::new(p).arg("--version").output().is_ok_and(|o| o.0))
        .expect("chromedriver is not installed: run `cargo xtask doctor --install --test-servers` (Debian: chromium and chromium-driver)");
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = KillOnDrop(
            Cmd::new(program)
                .arg(format!("--port={port}"))
                .spawn(Io::Piped, Io::Null)
                .unwrap(),
        );
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let started = lines.any(|l| l.is_ok_and(|l| l.contains("started successfully")));
        if started {
            std::thread::spawn(move || lines.for_each(drop));
            return (child, format!("http://127.0.0.1:{port}"));
        }
    }
    panic!("chromedriver did not start on any of five free ports");
}

async fn browser(driver: &str) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--window-size=1500,1300"]}),
    );
    // chromedriver listens on loopback: plain HTTP, no TLS stack.
    let http = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(http)
        .capabilities(caps)
        .connect(driver)
        .await
        .expect("a headless Chromium session")
}

/// Wait until the page's `predicate` (a JS expression) is true.
async fn until(c: &Client, what: &str, predicate: &str) {
    let start = Instant::now();
    loop {
        let v = c
            .execute(&format!("return !!({predicate});"), vec![])
            .await
            .unwrap();
        if v == json!(true) {
            return;
        }
        assert!(start.elapsed() < HANG, "the page never showed {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    fs_err::write(artifacts().join(format!("{name}.png")), png).unwrap();
}

/// A cell's text in pool `pool`'s row of table `table` (`data-pool` or `data-run`).
fn cell(table: &str, key: &str, id: &str, class: &str) -> String {
    format!(
        "(document.querySelector('#{table} tr[{key}=\"{id}\"] td.{class}') || {{}}).textContent"
    )
}

/// Start a task on `pool`: its id.
fn task(http: &reqwest::blocking::Client, url: &str, pool: &str, max_tokens: u32) -> String {
    let r: Value = http
        .post(format!("{url}/v1/tasks"))
        .json(
            &json!({"pool": pool, "prompt": "Once upon a time", "max_tokens": max_tokens,
                      "ignore_eos": true}),
        )
        .send()
        .unwrap()
        .json()
        .unwrap();
    r["task_id"].as_str().expect("a task id").to_string()
}

/// Read a task's stream until `stop` says so on an event name; the rest is dropped.
fn read_stream(http: &reqwest::blocking::Client, url: &str, id: &str, stop: &str) {
    let resp = http
        .get(format!("{url}/v1/tasks/{id}/stream"))
        .send()
        .unwrap();
    for line in BufReader::new(resp).lines() {
        let line = line.unwrap();
        if line == format!("event: {stop}") || line == "event: error" {
            return;
        }
    }
}

/// Live processes whose stdout is `log` (a pool's engine).
fn engines_writing(log: &Path) -> Vec<i32> {
    fs_err::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| fs_err::read_link(format!("/proc/{pid}/fd/1")).is_ok_and(|p| p == log))
        .collect()
}

/// CPU time `pid`'s own threads used (user + system), milliseconds.
fn cpu_ms(pid: u32) -> u64 {
    let stat = fs_err::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    // utime and stime: fields 14 and 15 of the line, 11 and 12 after the state.
    (fields[10] + fields[11]) * 1000 / hz
}

fn rss_kib(pid: u32) -> u64 {
    fs_err::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn the_status_page_follows_a_stack_in_a_real_browser() {
    let rt = tempfile::tempdir().unwrap();
    let n = std::process::id();
    let (lazy, evil) = (format!("st-lazy-{n}"), format!("st-evil-{n}"));
    // A model whose file name is markup: its alias and ref reach the page.
    let fetched = xtask(rt.path())
        .args(["model", "fetch", "--profile", "cpu", "--json"])
        .output()
        .unwrap();
    assert!(fetched.0, "model fetch: {}", fetched.2);
    let meta: Value = serde_json::from_str(&fetched.1).unwrap();
    let hostile = rt.path().join("m").join(format!("{HOSTILE_MODEL}.gguf"));
    fs_err::create_dir_all(hostile.parent().unwrap()).unwrap();
    fs_err::copy(meta["metadata"]["path"].as_str().unwrap(), &hostile).unwrap();
    let cpu = fs_err::read_to_string(root().join("requirements/cpu.yaml")).unwrap();
    let evil_profile: String = cpu
        .lines()
        .map(|l| match l.trim_start().strip_prefix("ref: ") {
            Some(_) => format!("  ref: 'file:{}'", hostile.display()),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    fs_err::write(rt.path().join("evil.yaml"), evil_profile).unwrap();
    let stack = rt.path().join("stack.yaml");
    fs_err::write(
        &stack,
        format!(
            "schema: 1\npools:\n  - id: {lazy}\n    profile: cpu\n    load: lazy\n  - id: {evil}\n    profile: {}\n    load: lazy\n",
            rt.path().join("evil.yaml").display()
        ),
    )
    .unwrap();
    let (server, url) = serve(rt.path(), &stack);
    let (_driver, driver_url) = chromedriver();
    let http = llorch_io::http::blocking_client();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let c = runtime.block_on(browser(&driver_url));
    let layout = test_support::layout(rt.path());
    let lazy_log = engine_runtime::run_state::RunPaths::new(
        &layout,
        &llorch_types::PoolId::parse(&lazy).unwrap(),
    )
    .log;

    runtime.block_on(async {
        c.goto(&format!("{url}/status")).await.unwrap();
        until(&c, "the live feed", "document.querySelector('#live').dataset.live === 'yes'").await;
        let state = cell("pools", "data-pool", &lazy, "state");
        until(&c, "the lazy pool unloaded", &format!("{state} === 'unloaded'")).await;
        // The hostile model name is text in the page, and no script of it ran.
        let model = "[...document.querySelectorAll('#engines td.model')].map(e => e.textContent).join('\\n')";
        until(&c, "the hostile model name as text", &format!("({model}).includes('{HOSTILE_MODEL}')")).await;
        shot(&c, "1-unloaded").await;
        // Record when the page saw the pool become ready (to compare with the server's event).
        c.execute(
            &format!(
                "window.__readyAt = null; new MutationObserver(() => {{ if (!window.__readyAt && {state} === 'ready') window.__readyAt = Date.now(); }}).observe(document.body, {{subtree: true, childList: true, characterData: true}});"
            ),
            vec![],
        )
        .await
        .unwrap();
    });

    // A request loads the pool: loading, then ready, then the request in the table.
    let id = task(&http, &url, &lazy, 32);
    read_stream(&http, &url, &id, "end");
    runtime.block_on(async {
        let events = "[...document.querySelectorAll('#events tbody tr')].map(r => [...r.cells].map(c => c.textContent).join('|'))";
        until(&c, "unloaded → loading", &format!("{events}.some(r => r.includes('|{lazy}|0|unloaded|loading'))")).await;
        until(&c, "loading → ready", &format!("{events}.some(r => r.includes('|{lazy}|0|loading|ready'))")).await;
        let state = cell("pools", "data-pool", &lazy, "state");
        until(&c, "the pool ready", &format!("{state} === 'ready'")).await;
        let ok = format!("[...document.querySelectorAll('#requests tr[data-status=\"ok\"]')].find(r => r.querySelector('td.pool').textContent === '{lazy}')");
        until(&c, "the request with its tokens and TTFT", &format!("{ok} && {ok}.querySelector('td.tokens').textContent === '32' && /^[0-9]+$/.test({ok}.querySelector('td.ttft').textContent)")).await;
        shot(&c, "2-ready-with-request").await;
        // How long after the server's event the page showed it.
        let lag = c.execute("return window.__readyAt;", vec![]).await.unwrap();
        let snap: Value = llorch_io::http::async_client()
            .get(format!("{url}/v1/status"))
            .send().await.unwrap().json().await.unwrap();
        let at = snap["events"].as_array().unwrap().iter()
            .find(|e| e["pool"] == json!(lazy) && e["to"] == "ready").unwrap()["at_ms"].as_u64().unwrap();
        if let Some(seen) = lag.as_u64() {
            eprintln!("the page showed `ready` {} ms after the server saw it", seen.saturating_sub(at));
        }
    });

    // A canceled request shows canceled.
    let id = task(&http, &url, &lazy, 4000);
    read_stream(&http, &url, &id, "token");
    let r = http
        .post(format!("{url}/v1/tasks/{id}/cancel"))
        .json(&json!({}))
        .send()
        .unwrap();
    assert!(r.status().is_success(), "cancel: {}", r.status());
    runtime.block_on(async {
        until(
            &c,
            "the canceled request",
            "document.querySelector('#requests tr[data-status=\"canceled\"]')",
        )
        .await;
        shot(&c, "3-canceled").await;
    });

    // The engine killed: the replica shows the restart and comes back.
    let pids = engines_writing(&lazy_log);
    assert_eq!(pids.len(), 1, "one engine for the lazy pool: {pids:?}");
    // SAFETY: a signal to the engine this test's server started.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    runtime.block_on(async {
        let restarts = cell("replicas", "data-run", &lazy, "restarts");
        until(&c, "the restart counted", &format!("{restarts} === '1'")).await;
        let state = cell("pools", "data-pool", &lazy, "state");
        until(&c, "the pool ready again", &format!("{state} === 'ready'")).await;
        shot(&c, "4-restarted").await;
    });

    // A log line with markup, shown on a click, is text; nothing in it runs.
    {
        use std::io::Write;
        let mut f = fs_err::OpenOptions::new()
            .append(true)
            .open(&lazy_log)
            .unwrap();
        writeln!(f, "{HOSTILE_LOG}").unwrap();
    }
    runtime.block_on(async {
        c.find(Locator::Css(&format!("button[data-log=\"{lazy}\"]")))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        until(&c, "the log with the hostile line as text", &format!("document.querySelector('#log-text').textContent.includes({})", json!(HOSTILE_LOG))).await;
        shot(&c, "5-log").await;
        let clean = c
            .execute(
                "return [window.__pwned === undefined, document.querySelectorAll('main img, main script, #log-text *').length];",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(clean, json!([true, 0]), "markup from a model name or a log ran or became elements");
    });
    runtime.block_on(async { c.close().await.unwrap() });

    // The same facts in the terminal: once, as JSON, and the live feed.
    let (ok, out, err) = xtask(rt.path())
        .args(["status", "--addr", &url])
        .output()
        .unwrap();
    assert!(ok, "status: {err}");
    let line = out
        .lines()
        .find(|l| l.starts_with(&lazy))
        .unwrap_or_else(|| panic!("no row for {lazy}: {out}"));
    assert!(line.contains("ready"), "{line}");
    assert!(
        out.contains(&format!("replica {lazy}: ready")) && out.contains("restarts 1"),
        "{out}"
    );
    assert!(
        !out.contains('\u{1b}'),
        "no escape sequence printed: {out:?}"
    );
    let (ok, out, err) = xtask(rt.path())
        .args(["status", "--addr", &url, "--json"])
        .output()
        .unwrap();
    assert!(ok, "status --json: {err}");
    let snap: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(snap["pools"][0]["id"], json!(lazy));
    let mut watch = KillOnDrop(
        xtask(rt.path())
            .args(["status", "--addr", &url, "--watch", "--json"])
            .spawn(Io::Piped, Io::Null)
            .unwrap(),
    );
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let seqs: Vec<u64> = (0..2)
        .map(|_| {
            let l = lines.next().expect("a snapshot line").unwrap();
            serde_json::from_str::<Value>(&l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(seqs[1] > seqs[0], "the feed moves on: {seqs:?}");
    drop(watch);

    watchers_leave_the_server_unaffected(&http, &url, server.id(), &lazy, &runtime);
}

/// 200 watchers of the feed and one that never reads: the server's memory
/// stays bounded and the task API still answers (latency measured, printed).
fn watchers_leave_the_server_unaffected(
    http: &reqwest::blocking::Client,
    url: &str,
    pid: u32,
    pool: &str,
    runtime: &tokio::runtime::Runtime,
) {
    let latency = |n: usize| -> Vec<f64> {
        (0..n)
            .map(|_| {
                let t = Instant::now();
                let id = task(http, url, pool, 4);
                read_stream(http, url, &id, "end");
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect()
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (c0, t0) = (cpu_ms(pid), Instant::now());
    let before = median(latency(7));
    let cpu_before = (cpu_ms(pid) - c0) as f64 / t0.elapsed().as_secs_f64();
    let rss_before = rss_kib(pid);
    // One that connects and never reads a byte.
    let mut stuck = std::net::TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    {
        use std::io::Write;
        write!(
            stuck,
            "GET /v1/status/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        .unwrap();
    }
    let counts: Vec<std::sync::Arc<std::sync::atomic::AtomicU64>> =
        (0..200).map(|_| Default::default()).collect();
    let _watchers: Vec<_> = counts
        .iter()
        .map(|n| {
            let (n, url) = (n.clone(), url.to_string());
            runtime.spawn(async move {
                use futures_util::StreamExt;
                let r = llorch_io::http::async_client()
                    .get(format!("{url}/v1/status/events"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let mut body = r.bytes_stream();
                while let Some(Ok(chunk)) = body.next().await {
                    let k = chunk
                        .windows(15)
                        .filter(|w| w == b"event: snapshot")
                        .count();
                    n.fetch_add(k as u64, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Every watcher has had several snapshots.
    let start = Instant::now();
    while counts
        .iter()
        .any(|n| n.load(std::sync::atomic::Ordering::Relaxed) < 3)
    {
        assert!(start.elapsed() < HANG, "watchers were not fed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (c0, t0) = (cpu_ms(pid), Instant::now());
    let during = median(latency(7));
    let cpu_during = (cpu_ms(pid) - c0) as f64 / t0.elapsed().as_secs_f64();
    let snap: Value = http
        .get(format!("{url}/v1/status"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(
        snap["watchers"].as_u64().unwrap() >= 200,
        "{}",
        snap["watchers"]
    );
    let rss_during = rss_kib(pid);
    eprintln!(
        "task latency (4 tokens, median of 7): {before:.0} ms alone, {during:.0} ms with 200 watchers and a stuck one ({:.2}x); serve's own CPU {cpu_before:.0} -> {cpu_during:.0} ms/s; serve RSS {} -> {} MiB",
        during / before,
        rss_before / 1024,
        rss_during / 1024
    );
    // Memory: a watcher holds a shared snapshot, not a queue of them.
    assert!(
        rss_during < rss_before + 64 * 1024,
        "200 watchers grew serve by {} MiB",
        (rss_during - rss_before) / 1024
    );
    drop(stuck);
}
