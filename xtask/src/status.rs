//! `cargo xtask status`: the status page's facts in the terminal, once or
//! following the live feed (`--watch`), for hosts without a browser.

use anyhow::{bail, Context, Result};
use clap::Args;
use orchestratord::status::page::{ago, sandbox};
use serde_json::Value;
use std::fmt::Write;

#[derive(Args)]
pub struct StatusCmd {
    /// The orchestrator: HOST:PORT or a URL
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Follow the live feed: print again on every change (Ctrl-C stops)
    #[arg(long)]
    watch: bool,
    /// The snapshot as JSON (with --watch: one line per snapshot)
    #[arg(long)]
    json: bool,
    /// The API token (needed off loopback)
    #[arg(long, env = "LLORCH_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
}

/// Text from the server, safe to print: control characters (escape
/// sequences a hostile model name could carry) are shown as `?`.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn t(v: Option<&Value>) -> String {
    clean(&match v {
        None | Some(Value::Null) => "–".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_f64() => format!("{:.1}", n.as_f64().unwrap_or(0.0)),
        Some(v) => v.to_string(),
    })
}

fn arr<'a>(v: &'a Value, k: &str) -> &'a [Value] {
    v.get(k)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn secs(v: Option<&Value>) -> String {
    ago(v.and_then(Value::as_f64))
}

/// One snapshot as the terminal shows it.
pub fn render(url: &str, s: &Value) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "llama-orch at {url}: {} (snapshot {}, {} watching)",
        t(s.get("state")),
        t(s.get("seq")),
        t(s.get("watchers"))
    );
    let _ = writeln!(
        o,
        "\n{:<20} {:<10} {:<7} {:>8} {:>5} {:>6} {:>7} {:>7} {:>9} {:>9}",
        "POOL",
        "STATE",
        "MODE",
        "REPLICAS",
        "SLOTS",
        "QUEUED",
        "RUNNING",
        "TOK/S",
        "READY FOR",
        "UNLOAD IN"
    );
    for p in arr(s, "pools") {
        render_pool(&mut o, p);
    }
    for g in arr(s, "gpus") {
        let _ = writeln!(
            o,
            "GPU {}: {} of {} MiB used",
            t(g.get("index")),
            t(g.get("used_mib")),
            t(g.get("total_mib"))
        );
    }
    render_history(&mut o, s);
    o
}

/// One pool: its row, a failure's reason, each replica, its engine and model.
fn render_pool(o: &mut String, p: &Value) {
    let reps = arr(p, "replicas");
    let ready = reps.iter().filter(|r| r["state"] == "ready").count();
    let _ = writeln!(
        o,
        "{:<20} {:<10} {:<7} {:>8} {:>5} {:>6} {:>7} {:>7} {:>9} {:>9}",
        t(p.get("id")),
        t(p.get("state")),
        t(p.get("mode")),
        format!("{ready}/{}", reps.len()),
        t(p.get("slots")),
        t(p.get("queue_depth")),
        t(p.get("running")),
        t(p.get("tokens_per_s")),
        secs(p.get("ready_for_s")),
        secs(p.get("idle_unload_in_s")),
    );
    if let Some(r) = p.get("failed_reason").filter(|r| !r.is_null()) {
        let _ = writeln!(o, "  failed: {}", t(Some(r)));
    }
    for r in reps {
        let devices: Vec<String> = arr(r, "devices")
            .iter()
            .map(|d| format!("GPU {d}"))
            .collect();
        let _ = writeln!(
            o,
            "  replica {}: {}, {}, restarts {}, tokens {}",
            t(r.get("run_id")),
            t(r.get("state")),
            if devices.is_empty() {
                "CPU or all GPUs".into()
            } else {
                devices.join(", ")
            },
            t(r.get("restarts")),
            t(r.get("tokens_out")),
        );
    }
    let model = p.get("model");
    let _ = writeln!(
        o,
        "  engine {} ({}), model {} sha256 {}, {}, sandbox {}",
        t(p.get("fingerprint")).chars().take(12).collect::<String>(),
        t(p.get("system_fingerprint")),
        t(model.and_then(|m| m.get("ref"))),
        t(model.and_then(|m| m.get("digest")))
            .chars()
            .take(12)
            .collect::<String>(),
        clean(
            p.get("engine_version")
                .and_then(Value::as_str)
                .and_then(|v| v.lines().next())
                .unwrap_or("–")
        ),
        clean(&sandbox(p.get("sandbox"))),
    );
}

/// The last requests and the last state changes.
fn render_history(o: &mut String, s: &Value) {
    let reqs = arr(s, "requests");
    let _ = writeln!(
        o,
        "\nLAST REQUESTS ({} kept, newest first; no text is recorded)\n{:<24} {:<20} {:>3} {:<20} {:>6} {:>6} {:>8} {:>8} {:>7}",
        reqs.len(),
        "API",
        "POOL",
        "R",
        "STATUS",
        "PROMPT",
        "TOKENS",
        "WAIT ms",
        "TTFT ms",
        "TOK/S"
    );
    for r in reqs.iter().take(10) {
        let _ = writeln!(
            o,
            "{:<24} {:<20} {:>3} {:<20} {:>6} {:>6} {:>8} {:>8} {:>7}",
            t(r.get("api")),
            t(r.get("pool")),
            t(r.get("replica")),
            t(r.get("status")),
            t(r.get("prompt_tokens")),
            t(r.get("tokens_out")),
            t(r.get("queue_wait_ms")),
            t(r.get("ttft_ms")),
            t(r.get("tokens_per_s")),
        );
    }
    let events = arr(s, "events");
    if !events.is_empty() {
        let _ = writeln!(o, "\nSTATE CHANGES (newest first)");
        for e in events.iter().take(8) {
            let _ = writeln!(
                o,
                "  {} replica {}: {} -> {}",
                t(e.get("pool")),
                t(e.get("replica")),
                t(e.get("from")),
                t(e.get("to"))
            );
        }
    }
}

/// `HOST:PORT` or a URL, as a base URL without a trailing slash.
fn base_url(addr: &str) -> String {
    let a = addr.trim().trim_end_matches('/');
    if a.starts_with("http://") || a.starts_with("https://") {
        a.to_string()
    } else {
        format!("http://{a}")
    }
}

fn explain(url: &str, e: reqwest::Error) -> anyhow::Error {
    if e.is_connect() {
        anyhow::anyhow!("no orchestrator answers at {url}: {e}\n  hint: start one with `cargo xtask serve` (or `serve --stack FILE`), or pass --addr HOST:PORT")
    } else {
        anyhow::anyhow!("{url}: {e}")
    }
}

fn check(url: &str, status: reqwest::StatusCode) -> Result<()> {
    match status.as_u16() {
        200 => Ok(()),
        401 => bail!("{url} wants its API token: set LLORCH_API_TOKEN (or pass --api-token)"),
        404 => bail!("{url} has no /v1/status: is it a llama-orch orchestrator of this version?"),
        s => bail!("{url}/v1/status answered {s}"),
    }
}

impl StatusCmd {
    pub fn run(self) -> Result<()> {
        let url = base_url(&self.addr);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(self.fetch(&url))
    }

    async fn fetch(&self, url: &str) -> Result<()> {
        // No proxy (a loopback orchestrator), the token on every request.
        let http = llorch_io::http::async_client_with_token(self.api_token.as_deref());
        if !self.watch {
            let r = http
                .get(format!("{url}/v1/status"))
                .send()
                .await
                .map_err(|e| explain(url, e))?;
            check(url, r.status())?;
            let snap: Value = r.json().await.context("reading the status snapshot")?;
            if self.json {
                crate::print_json(&snap)?;
            } else {
                print!("{}", render(url, &snap));
            }
            return Ok(());
        }
        use eventsource_stream::Eventsource;
        use futures_util::StreamExt;
        let r = http
            .get(format!("{url}/v1/status/events"))
            .send()
            .await
            .map_err(|e| explain(url, e))?;
        check(url, r.status())?;
        let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
        let mut events = r.bytes_stream().eventsource();
        while let Some(ev) = events.next().await {
            let ev = ev.context("reading the status feed")?;
            if ev.event != "snapshot" {
                continue;
            }
            let snap: Value = serde_json::from_str(&ev.data).context("a status snapshot")?;
            let text = if self.json {
                format!("{snap}\n")
            } else if tty {
                // Clear the screen and start at the top: a live view.
                format!("\x1b[2J\x1b[H{}", render(url, &snap))
            } else {
                format!("{}\n", render(url, &snap))
            };
            let mut out = std::io::stdout().lock();
            // The reader went away (`| head`): done, not an error.
            if std::io::Write::write_all(&mut out, text.as_bytes())
                .and_then(|_| std::io::Write::flush(&mut out))
                .is_err()
            {
                return Ok(());
            }
        }
        bail!("the orchestrator at {url} ended the feed (it stopped)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn escape_sequences_from_the_server_are_not_printed() {
        let snap = json!({"state": "ready", "pools": [{"id": "p\u{1b}[2Jx", "model": {"ref": "a\u{7}b"},
            "replicas": [{"run_id": "p", "state": "ready"}]}]});
        let out = render("http://x", &snap);
        assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{out:?}");
        assert!(out.contains("p?[2Jx") && out.contains("a?b"));
        assert_eq!(base_url("127.0.0.1:8080/"), "http://127.0.0.1:8080");
        assert_eq!(base_url("https://h:1"), "https://h:1");
    }
}
