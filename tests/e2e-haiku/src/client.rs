//! A minimal SSE client for the orchestrator's v1 API (used by the proof,
//! the API tests and `bench stream`).

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use serde_json::Value;
use std::time::Instant;

#[derive(Debug, Default)]
pub struct StreamResult {
    pub task_id: String,
    pub order: Vec<String>,
    pub started: Value,
    pub tokens: Vec<(u64, String)>,
    pub text: String,
    pub end: Value,
    pub error: Option<Value>,
    /// From opening the stream to the first token.
    pub ttft_ms: f64,
    /// From submitting the task (POST) to the first token, for `stream_task`.
    pub ttft_from_submit_ms: f64,
    /// From the first to the last token event.
    pub decode_ms: f64,
    pub total_ms: f64,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
}

impl StreamResult {
    /// `started`, then one or more `token`, optional `metrics`, then `end`.
    pub fn order_ok(&self) -> bool {
        let o: Vec<&str> = self
            .order
            .iter()
            .map(String::as_str)
            .filter(|e| *e != "metrics")
            .collect();
        o.len() >= 3
            && o[0] == "started"
            && o[o.len() - 1] == "end"
            && o[1..o.len() - 1].iter().all(|e| *e == "token")
    }
    pub fn indices_ok(&self) -> bool {
        self.tokens
            .iter()
            .enumerate()
            .all(|(n, (i, _))| *i == n as u64)
    }
}

/// Submit a task and read its stream. With `cancel_after`, cancel once that
/// many tokens arrived (and keep reading until the stream ends).
pub async fn stream_task(
    http: &reqwest::Client,
    base: &str,
    body: &Value,
    on_token: Option<&(dyn Fn(&str) + Sync)>,
    cancel_after: Option<usize>,
) -> Result<StreamResult> {
    let t0 = Instant::now();
    let r = http
        .post(format!("{base}/v1/tasks"))
        .json(body)
        .send()
        .await?;
    if r.status().as_u16() != 202 {
        bail!(
            "POST /v1/tasks answered {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    let admitted: Value = r.json().await?;
    let id = admitted["task_id"]
        .as_str()
        .context("no task_id")?
        .to_string();
    let mut res = read_stream(http, base, &id, on_token, cancel_after).await?;
    if let Some(f) = res.first_at {
        res.ttft_from_submit_ms = (f - t0).as_secs_f64() * 1000.0;
    }
    res.total_ms = t0.elapsed().as_secs_f64() * 1000.0;
    Ok(res)
}

pub async fn read_stream(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    on_token: Option<&(dyn Fn(&str) + Sync)>,
    cancel_after: Option<usize>,
) -> Result<StreamResult> {
    let t0 = Instant::now();
    let resp = http
        .get(format!("{base}/v1/tasks/{id}/stream"))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("GET stream answered {}", resp.status());
    }
    let mut res = StreamResult {
        task_id: id.to_string(),
        ..Default::default()
    };
    let mut s = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut event = String::new();
    let mut canceled = false;
    while let Some(chunk) = s.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            if let Some(e) = line.strip_prefix("event:") {
                event = e.trim().to_string();
            } else if let Some(d) = line.strip_prefix("data:") {
                let v: Value = serde_json::from_str(d.trim()).unwrap_or(Value::Null);
                res.order.push(event.clone());
                match event.as_str() {
                    "started" => res.started = v,
                    "token" => {
                        let now = Instant::now();
                        if res.tokens.is_empty() {
                            res.ttft_ms = (now - t0).as_secs_f64() * 1000.0;
                            res.first_at = Some(now);
                        }
                        res.last_at = Some(now);
                        if let Some(f) = res.first_at {
                            res.decode_ms = (now - f).as_secs_f64() * 1000.0;
                        }
                        let t = v["t"].as_str().unwrap_or("").to_string();
                        if let Some(f) = on_token {
                            f(&t);
                        }
                        res.text.push_str(&t);
                        res.tokens.push((v["i"].as_u64().unwrap_or(u64::MAX), t));
                        if let Some(n) = cancel_after {
                            if !canceled && res.tokens.len() >= n {
                                canceled = true;
                                let r = http
                                    .post(format!("{base}/v1/tasks/{id}/cancel"))
                                    .send()
                                    .await?;
                                if r.status().as_u16() != 204 {
                                    bail!("cancel answered {}", r.status());
                                }
                            }
                        }
                    }
                    "end" => res.end = v,
                    "error" => res.error = Some(v),
                    _ => {}
                }
            }
        }
    }
    Ok(res)
}
