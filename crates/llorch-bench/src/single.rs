//! `bench model` (sha256 throughput, loopback download vs curl),
//! `bench provision` (spawn to ready through provision vs a direct spawn) and
//! `bench stream` (decode through the orchestrator vs straight from
//! llama-server; TTFT; cancel; queue memory).

use crate::{direct_completion, median, pct, rss_kib, slots_idle, time_cmd, Ctx};
use anyhow::{Context, Result};
use engine_provisioner::build::BuildOptions;
use llorch_io::cmd::Cmd;
use llorch_io::llama_server::LlamaServer;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// A minimal file server on 127.0.0.1 (sendfile through std::io::copy) for the download bench.
fn serve_file(path: &Path) -> Result<(String, std::thread::JoinHandle<()>)> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let path = path.to_path_buf();
    let h = std::thread::spawn(move || {
        for s in l.incoming().take(2).flatten() {
            let mut s = s;
            let mut buf = [0u8; 4096];
            let mut req = Vec::new();
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let Ok(mut f) = fs_err::File::open(&path) else {
                return;
            };
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
            );
            let _ = std::io::copy(&mut f, &mut s);
        }
    });
    Ok((format!("http://{addr}/model.gguf"), h))
}

pub fn bench_model(ctx: &Ctx, mib: u64) -> Result<Value> {
    let tmp = tempfile::tempdir_in(&ctx.layout.cache)?;
    let file = tmp.path().join("big.bin");
    {
        let mut f = std::io::BufWriter::new(fs_err::File::create(&file)?);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for c in chunk.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&chunk)?;
        }
    }
    let bytes = mib as f64 * 1048576.0;
    // Warm the page cache, then hash.
    llorch_io::digest::sha256_file(&file)?;
    let mut rates = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        llorch_io::digest::sha256_file(&file)?;
        rates.push(bytes / t.elapsed().as_secs_f64() / 1e9);
    }
    let sha_gbps = median(&mut rates);
    let shani = fs_err::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .contains(" sha_ni");
    // Download: ours vs curl, same server, same file, both writing to disk.
    let (url, h) = serve_file(&file)?;
    let dest = tmp.path().join("ours.partial");
    let t = Instant::now();
    llorch_io::download::download(
        "bench",
        &url,
        &dest,
        &llorch_io::download::DownloadOptions {
            report: llorch_io::report::Reporter::QUIET,
            ..Default::default()
        },
    )?;
    let ours = bytes / t.elapsed().as_secs_f64() / 1e6;
    let t = Instant::now();
    Cmd::new("curl")
        .args(["-s", "-o"])
        .arg(tmp.path().join("curl.out"))
        .arg(&url)
        .read()
        .context("curl (install it to compare)")?;
    let curl = bytes / t.elapsed().as_secs_f64() / 1e6;
    let _ = h.join();
    Ok(json!({
        "file_mib": mib,
        "sha256_gb_per_s": sha_gbps,
        "cpu_has_sha_ni": shani,
        "download_ours_mb_per_s (hash + write)": ours,
        "download_curl_mb_per_s (write)": curl,
        "ratio_ours_over_curl": ours / curl,
    }))
}

pub fn bench_provision(ctx: &Ctx, profile: Option<&str>, runs: usize) -> Result<Value> {
    use engine_runtime::lifecycle;
    use llorch_io::handoff::{Owner, ProcessIdentity};
    let p = ctx.profile(profile)?;
    let bench_pool = crate::bench_pool(&p)?;
    let prep = llorch_stack::prepare(&p, &bench_pool, &ctx.layout, &BuildOptions::quiet())?.engine;
    let owner = Owner::Supervised {
        supervisor: ProcessIdentity::current(),
        command: "cargo xtask bench provision".into(),
    };
    let mut ours = Vec::new();
    let mut direct = Vec::new();
    for _ in 0..runs {
        // Through the lifecycle code (port choice, spawn, /health poll, PID file, handoff, /metrics check).
        let t = Instant::now();
        let e = lifecycle::spawn(&prep, &ctx.layout, &owner)?;
        ours.push(t.elapsed().as_secs_f64() * 1000.0);
        e.stop();
        // Direct: the same binary and flags, a 1 ms /health poll.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let t = Instant::now();
        let mut child = Cmd::new(&prep.binary)
            .arg("-m")
            .arg(&prep.model.path)
            .args(["--port", &port.to_string()])
            .args(&prep.flags)
            .spawn(llorch_io::cmd::Io::Null, llorch_io::cmd::Io::Null)?;
        let c = llorch_io::http::probe_client();
        loop {
            if LlamaServer::new(format!("http://127.0.0.1:{port}"), None).healthy_blocking(&c) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        direct.push(t.elapsed().as_secs_f64() * 1000.0);
        let _ = child.kill();
        let _ = child.wait();
    }
    // A no-op provision of the built binary (engine already up with the same inputs).
    let exe = std::env::current_exe()?;
    let mut pc = Cmd::new(&exe).args(["provision", "--pool", bench_pool.as_str()]);
    if let Some(pr) = profile {
        pc = pc.args(["--profile", pr]);
    }
    time_cmd(&pc)?;
    let mut noop = Vec::new();
    for _ in 0..runs {
        noop.push(time_cmd(&pc)? * 1000.0);
    }
    lifecycle::stop_pool(&ctx.layout, &bench_pool)?;
    let (mo, md) = (median(&mut ours), median(&mut direct));
    Ok(json!({
        "spawn_to_ready_provision_ms_median": mo,
        "spawn_to_ready_direct_ms_median": md,
        "provision_overhead_ms": mo - md,
        "noop_provision_ms_median": median(&mut noop),
        "runs": runs,
    }))
}

pub fn bench_stream(
    ctx: &Ctx,
    profile: Option<&str>,
    runs: usize,
    max_tokens: u32,
) -> Result<Value> {
    use futures_util::StreamExt;
    use orchestratord::client::stream_task;
    let p = ctx.profile(profile)?;
    let rt = crate::runtime()?;
    rt.block_on(async {
        let cfg = orchestratord::Config {
            addr: "127.0.0.1:0".parse().unwrap(),
            queue_capacity: 2000,
            ..Default::default()
        };
        let pool = crate::bench_pool(&p)?;
        let stack = llorch_stack::start_stack(
            &p,
            &pool,
            &ctx.layout,
            cfg,
            llorch_io::report::Reporter::QUIET,
            "cargo xtask bench stream",
        )
        .await?;
        let orch = stack.orchestrator_url();
        let engine = stack.engine()?.url;
        let http = llorch_io::http::async_client();
        let prompt = "Write a long story about a lighthouse keeper:\n";
        let body = json!({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true});
        let mut via = Vec::new();
        let mut direct = Vec::new();
        let mut ttft_via = Vec::new();
        let mut ttft_direct = Vec::new();
        for _ in 0..runs {
            // Straight from llama-server, streaming, same request. Decode rate in
            // both cases: tokens after the first over the time from first to last token.
            let (ttft, rate) = direct_completion(&http, &engine, prompt, max_tokens).await?;
            direct.push(rate);
            ttft_direct.push(ttft);
            // Through the orchestrator (the client's view: POST, open the stream, tokens).
            let res = stream_task(&http, &orch, &body, None, None).await?;
            via.push((res.tokens.len() as f64 - 1.0) / (res.decode_ms / 1000.0));
            ttft_via.push(res.ttft_from_submit_ms);
        }
        // Cancel → slot idle, from the cancel request to /slots idle.
        let mut cancel_ms = Vec::new();
        for _ in 0..runs.max(10) {
            let r: Value = http
                .post(format!("{orch}/v1/tasks"))
                .json(&json!({"prompt": prompt, "max_tokens": 1000, "ignore_eos": true}))
                .send()
                .await?
                .json()
                .await?;
            let id = r["task_id"].as_str().unwrap().to_string();
            let resp = http
                .get(format!("{orch}/v1/tasks/{id}/stream"))
                .send()
                .await?;
            let mut s = resp.bytes_stream();
            let mut seen = String::new();
            while !seen.contains("event: token") {
                seen.push_str(&String::from_utf8_lossy(&s.next().await.unwrap()?));
            }
            let t = Instant::now();
            http.post(format!("{orch}/v1/tasks/{id}/cancel"))
                .header("content-type", "application/json")
                .send()
                .await?;
            slots_idle(&http, &engine).await?;
            cancel_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            while s.next().await.is_some() {}
        }
        // Memory with 1,000 queued tasks (behind one long running task).
        let before = rss_kib();
        let mut ids = Vec::new();
        for i in 0..1001 {
            let b = if i == 0 {
                json!({"prompt": prompt, "max_tokens": 2000, "ignore_eos": true})
            } else {
                json!({"prompt": format!("{prompt} #{i}"), "max_tokens": 16})
            };
            let r: Value = http
                .post(format!("{orch}/v1/tasks"))
                .json(&b)
                .send()
                .await?
                .json()
                .await?;
            ids.push(r["task_id"].as_str().unwrap().to_string());
        }
        let after = rss_kib();
        for id in ids.iter().rev() {
            http.post(format!("{orch}/v1/tasks/{id}/cancel"))
                .header("content-type", "application/json")
                .send()
                .await?;
        }
        let server_metrics = stack.server.state.metrics.render(&stack.server.state.pools);
        let server_ttft = (server_metrics
            .lines()
            .find_map(|l| l.strip_prefix("llorch_time_to_first_token_ms_count "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0),);
        stack.stop(Duration::from_secs(5)).await;
        let (v, d) = (median(&mut via), median(&mut direct));
        let (tv, td) = (median(&mut ttft_via), median(&mut ttft_direct));
        anyhow::Ok(json!({
            "decode_tok_per_s_direct_median": d,
            "decode_tok_per_s_orchestrator_median": v,
            "ratio_orchestrator_over_direct": v / d,
            "ttft_ms_direct_p50": td,
            "ttft_ms_orchestrator_p50 (POST + stream)": tv,
            "ttft_overhead_ms_p50": tv - td,
            "cancel_to_slot_idle_ms_p50": pct(&cancel_ms, 0.5),
            "cancel_to_slot_idle_ms_p99": pct(&cancel_ms, 0.99),
            "rss_kib_before_1000_queued": before,
            "rss_kib_with_1000_queued": after,
            "rss_kib_per_queued_task": (after as f64 - before as f64) / 1000.0,
            "server_ttft_observations": server_ttft.0,
            "runs": runs,
            "max_tokens": max_tokens,
        }))
    })
}
