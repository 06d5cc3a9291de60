//! `cargo xtask bench load --vs-defaults` against real engines (the default
//! profile's, shared through the workspace cache): the orchestrator, the same
//! engine direct and the same llama-server started with its own defaults are
//! each measured, and nothing of the run is left behind.

mod common;

use serde_json::Value;

#[test]
fn bench_load_measures_the_orchestrator_the_engine_and_llama_server_with_its_defaults() {
    let rt = tempfile::tempdir().unwrap();
    let (ok, out, err) = common::run(common::xtask_in(rt.path()).args([
        "bench",
        "load",
        "--mode",
        "batched",
        "--slots",
        "2",
        "--clients",
        "2",
        "--runs",
        "2",
        "--max-tokens",
        "4",
        "--vs-defaults",
        "--json",
    ]));
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["vs_defaults"], true, "{v}");
    let row = &v["rows"][0];
    for side in ["orchestrator", "direct", "defaults"] {
        let tps = row[format!("tok_per_s_{side}_median")].as_f64();
        assert!(tps.is_some_and(|t| t > 0.0), "{side}: {row}");
        assert_eq!(row[format!("errors_{side}")], 0, "{side}: {row}");
    }
    assert!(
        row["ratio_orchestrator_over_defaults_median"]
            .as_f64()
            .is_some_and(|r| r > 0.0),
        "{row}"
    );
    // The hand-started llama-server is gone, its log with it.
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix("llama-server with its defaults: "))
        .unwrap_or_else(|| panic!("no start line: {err}"));
    let (url, log) = line.split_once(" (log ").unwrap();
    let log = log.trim_end_matches(')');
    assert!(!std::path::Path::new(log).exists(), "{log} left behind");
    let port = url.rsplit(':').next().unwrap();
    // A process started with the defaults' exact arguments (an engine of
    // another test may reuse the port, never these arguments).
    let tail = ["--host", "127.0.0.1", "--port", port];
    let alive: Vec<String> = fs_err::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| fs_err::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).into_owned())
        .filter(|c| {
            let args: Vec<&str> = c.trim_end_matches('\0').split('\0').collect();
            args.len() == 7 && args[1] == "-m" && args[3..] == tail
        })
        .collect();
    assert!(
        alive.is_empty(),
        "llama-server with its defaults still runs: {alive:?}"
    );
}
