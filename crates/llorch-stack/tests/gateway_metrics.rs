//! The metrics an inference gateway routes on, under real load: a batched
//! pool of the default profile (2 slots) gets 6 concurrent streaming
//! clients; `/metrics`, read with a maintained Prometheus text parser by
//! the very series names the rendered endpoint-picker config names, shows
//! queued requests, running requests and KV-cache utilization rise, and all
//! three return to zero when the load ends; `/v1/capabilities` says the same
//! and its KV capacity is llama-server's own (`/slots`: slots x context).

use llorch_profile::stack::Stack as StackSpec;
use llorch_stack::{start_pools, PoolsOptions};
use orchestratord::client::stream_task;
use orchestratord::Config;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use test_support::workspace_root as root;

/// `family{label="value"}` → (family, label, value).
fn parse_spec(spec: &str) -> (String, String, String) {
    let (family, rest) = spec.split_once('{').expect("a spec with a label");
    let (label, value) = rest.trim_end_matches('}').split_once('=').unwrap();
    (family.into(), label.into(), value.trim_matches('"').into())
}

/// The value of each spec in a `/metrics` text (parsed by `prometheus-parse`).
fn read_specs(text: &str, specs: &[(String, String)]) -> HashMap<String, f64> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("/metrics parses");
    specs
        .iter()
        .map(|(key, spec)| {
            let (family, label, value) = parse_spec(spec);
            let v = scrape
                .samples
                .iter()
                .find(|s| s.metric == family && s.labels.get(&label) == Some(value.as_str()))
                .map(|s| match s.value {
                    prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                    ref other => panic!("{family} is not a gauge: {other:?}"),
                })
                .unwrap_or_else(|| panic!("no series {spec} in /metrics:\n{text}"));
            (key.clone(), v)
        })
        .collect()
}

async fn get(url: &str) -> String {
    llorch_io::http::async_client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_running_and_kv_gauges_follow_real_load_by_the_names_the_gateway_reads() {
    let dir = tempfile::tempdir().unwrap();
    let pool = format!("gw-{}", std::process::id());
    let stack_file = dir.path().join("stack.yaml");
    fs_err::write(
        &stack_file,
        format!("schema: 1\npools:\n  - id: {pool}\n    profile: cpu\n    mode: batched\n    slots: 2\n"),
    )
    .unwrap();
    let spec = StackSpec::load(&stack_file, &root()).unwrap();
    // The names the endpoint picker will read: from the rendered manifests.
    let manifests = dir.path().join("k8s");
    llorch_deploy::k8s::render(
        &spec,
        &llorch_deploy::k8s::RenderOptions {
            image: "registry.example/llorch:t".into(),
            model_image: None,
            claim: "models".into(),
            model_file: None,
            hosts: 1,
            namespace: None,
            out: manifests.clone(),
        },
    )
    .unwrap();
    let specs = llorch_deploy::k8s::rendered_metric_specs(&manifests).unwrap();
    assert_eq!(specs.len(), 3, "{specs:?}");
    let layout = test_support::layout(&dir.path().join("rt"));
    let stack = start_pools(
        &spec,
        &layout,
        Config {
            addr: "127.0.0.1:0".parse().unwrap(),
            health_interval: Duration::from_millis(50),
            ..Default::default()
        },
        &PoolsOptions {
            report: llorch_io::report::Reporter::QUIET,
            ..Default::default()
        },
        "gateway metrics test",
    )
    .await
    .unwrap();
    let base = stack.orchestrator_url();
    let metrics = || async { read_specs(&get(&format!("{base}/metrics")).await, &specs) };
    let idle = metrics().await;
    assert!(idle.values().all(|v| *v == 0.0), "{idle:?}");

    // Six clients on two slots: four wait, two run, each generating 96 tokens.
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let base = base.clone();
            tokio::spawn(async move {
                let body = json!({"prompt": format!("Client {i} counts slowly from one to a hundred:"),
                                  "max_tokens": 96, "ignore_eos": true});
                stream_task(&llorch_io::http::async_client(), &base, &body, None, None)
                    .await
                    .unwrap()
            })
        })
        .collect();
    // Sample until each gauge was seen above zero (or every client ended).
    let mut peak: HashMap<String, f64> = HashMap::new();
    let mut caps_kv_seen = 0.0f64;
    let started = Instant::now();
    while clients.iter().any(|c| !c.is_finished()) {
        for (k, v) in metrics().await {
            let p = peak.entry(k).or_default();
            *p = p.max(v);
        }
        let caps: Value =
            serde_json::from_str(&get(&format!("{base}/v1/capabilities")).await).unwrap();
        caps_kv_seen = caps_kv_seen.max(caps["kv_cache"]["utilization"].as_f64().unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for c in clients {
        let r = c.await.unwrap();
        assert_eq!(r.tokens_out(), 96, "{:?}", r.error);
    }
    let elapsed = started.elapsed();
    assert!(
        peak["queuedRequestsSpec"] >= 1.0,
        "{peak:?} over {elapsed:?}"
    );
    assert!(
        peak["runningRequestsSpec"] >= 1.0 && peak["runningRequestsSpec"] <= 2.0,
        "{peak:?}"
    );
    let kv = peak["kvUsageSpec"];
    assert!(kv > 0.0 && kv <= 1.0, "{peak:?}");
    assert!(caps_kv_seen > 0.0 && caps_kv_seen <= 1.0, "{caps_kv_seen}");

    // The load is over: every gauge returns to zero (the health loop samples
    // /slots once more after the last task), in /metrics and in capabilities.
    let st = stack.server.state.clone();
    assert!(
        // Woken by state changes; the bound only stops a hang.
        st.wait_until(Duration::from_secs(600), |s| {
            let m = s.members(&s.pools[0].group);
            orchestratord::metrics::kv_utilization(&m).0 == 0
        })
        .await,
        "the KV gauge never returned to zero"
    );
    let after = metrics().await;
    assert!(after.values().all(|v| *v == 0.0), "{after:?}");
    let caps: Value = serde_json::from_str(&get(&format!("{base}/v1/capabilities")).await).unwrap();
    assert_eq!(caps["kv_cache"]["tokens_held"], 0);
    // The capacity is llama-server's own: its slots' contexts summed.
    let e = stack.engine().unwrap();
    let slots = e
        .server()
        .slots(&llorch_io::http::async_client(), Duration::from_secs(5))
        .await
        .unwrap();
    let (held, capacity) = llorch_io::llama_server::kv_use(&slots);
    assert_eq!(held, 0);
    assert_eq!(caps["kv_cache"]["capacity"].as_u64().unwrap(), capacity);
    assert_eq!(slots.len(), 2);
    stack.stop(Duration::from_secs(5)).await;
}
