//! The llama.cpp adapter: one task → one streaming `/completion` request.
//!
//! llama-server answers `stream: true` with `data: {json}` frames, one per
//! generated token (`content`, `tokens`), then a final frame with
//! `stop: true`, `stop_type` and `timings`. Each token frame becomes a
//! `token {t, i}` event the moment it is read; nothing is buffered. Chat
//! `messages` are rendered with the model's own template through
//! llama-server's `/apply-template` first.

use crate::{AppState, Task};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

enum Outcome {
    Finished(Value),
    Canceled(&'static str),
    EngineGone(String),
    EngineError(String),
}

pub async fn run_task(st: &AppState, task: &Task) {
    let started_at = Instant::now();
    task.send(
        "started",
        json!({"queue_position": task.queue_position, "predicted_start_ms": task.predicted_start_ms}),
    );
    let Some(url) = st.engine_url() else {
        fail(
            st,
            task,
            "ENGINE_NOT_READY",
            "the engine went away before the task started".into(),
            true,
        );
        return;
    };
    let mut i: u64 = 0;
    let outcome = generate(st, task, &url, &mut i).await;
    match outcome {
        Outcome::Finished(fin) => {
            let t = &fin["timings"];
            let tokens_out = t["predicted_n"].as_u64().unwrap_or(i);
            st.metrics.completed.fetch_add(1, Ordering::Relaxed);
            task.send(
                "metrics",
                json!({
                    "prompt_tokens": t["prompt_n"], "prompt_ms": t["prompt_ms"],
                    "decode_tokens_per_s": t["predicted_per_second"], "queue_wait_ms": (started_at - task.admitted_at).as_millis() as u64,
                }),
            );
            task.finish(
                "end",
                json!({
                    "tokens_out": tokens_out,
                    "decode_ms": t["predicted_ms"].as_f64().unwrap_or(0.0),
                    "stop_reason": fin["stop_type"].as_str().unwrap_or("eos"),
                    "canceled": false,
                }),
            );
        }
        Outcome::Canceled(reason) => {
            // The upstream request is already dropped; wait until the slot is idle.
            let idle = wait_slot_idle(st, &url, Duration::from_secs(3)).await;
            let since = task.cancel_at.lock().unwrap().unwrap_or_else(Instant::now);
            st.metrics
                .cancel_latency_ms
                .observe(since.elapsed().as_secs_f64() * 1000.0);
            st.metrics.canceled.fetch_add(1, Ordering::Relaxed);
            task.finish(
                "end",
                json!({"tokens_out": i, "decode_ms": started_at.elapsed().as_millis() as u64, "stop_reason": reason, "canceled": true, "slot_idle": idle}),
            );
        }
        Outcome::EngineGone(msg) => {
            st.ready.store(false, Ordering::SeqCst);
            fail(st, task, "ENGINE_CRASHED", msg, true);
        }
        Outcome::EngineError(msg) => fail(st, task, "ENGINE_ERROR", msg, false),
    }
}

fn fail(st: &AppState, task: &Task, code: &str, message: String, retriable: bool) {
    st.metrics.failed.fetch_add(1, Ordering::Relaxed);
    task.finish(
        "error",
        json!({"code": code, "message": message, "retriable": retriable}),
    );
}

async fn generate(st: &AppState, task: &Task, url: &str, i: &mut u64) -> Outcome {
    let req = &task.req;
    let deadline = req
        .deadline_ms
        .map(|ms| task.admitted_at + Duration::from_millis(ms));
    let prompt = match (&req.prompt, &req.messages) {
        (Some(p), _) => p.clone(),
        (None, Some(m)) => match st
            .http
            .post(format!("{url}/apply-template"))
            .json(&json!({"messages": m}))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                Ok(v) => v["prompt"].as_str().unwrap_or("").to_string(),
                Err(e) => return Outcome::EngineError(format!("apply-template: {e}")),
            },
            Ok(r) => {
                return Outcome::EngineError(format!("apply-template answered {}", r.status()))
            }
            Err(e) => return Outcome::EngineGone(format!("apply-template: {e}")),
        },
        (None, None) => return Outcome::EngineError("empty task".into()),
    };
    let body = json!({
        "prompt": prompt,
        "n_predict": req.max_tokens,
        "temperature": req.temperature,
        "seed": req.seed,
        "stream": true,
        "cache_prompt": false,
        "ignore_eos": req.ignore_eos,
    });
    if task.canceled() {
        return Outcome::Canceled("canceled");
    }
    let send = st.http.post(format!("{url}/completion")).json(&body).send();
    let resp = tokio::select! {
        r = send => r,
        _ = task.cancel_notify.notified() => return Outcome::Canceled("canceled"),
    };
    let resp = match resp {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            let s = r.status();
            let text = r.text().await.unwrap_or_default();
            return Outcome::EngineError(format!(
                "llama-server answered {s}: {}",
                text.chars().take(300).collect::<String>()
            ));
        }
        Err(e) => return Outcome::EngineGone(format!("cannot reach llama-server at {url}: {e}")),
    };
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut first = true;
    loop {
        let sleep_until = deadline.map(tokio::time::Instant::from_std);
        let next = tokio::select! {
            n = stream.next() => n,
            _ = task.cancel_notify.notified() => return Outcome::Canceled("canceled"),
            _ = async { match sleep_until { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                task.request_cancel();
                return Outcome::Canceled("deadline");
            }
        };
        if task.canceled() {
            return Outcome::Canceled("canceled");
        }
        let chunk = match next {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                return Outcome::EngineGone(format!(
                    "the engine stream broke after {i} tokens: {e}"
                ))
            }
            None => {
                return Outcome::EngineGone(format!(
                    "the engine closed the stream after {i} tokens without a final frame"
                ))
            }
        };
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let v: Value = match serde_json::from_str(data.trim()) {
                Ok(v) => v,
                Err(_) => continue,
            };
            if let Some(err) = v.get("error") {
                return Outcome::EngineError(err.to_string());
            }
            if v["stop"].as_bool() == Some(true) {
                return Outcome::Finished(v);
            }
            let t = v["content"].as_str().unwrap_or("");
            if first {
                first = false;
                st.metrics
                    .ttft_ms
                    .observe(task.admitted_at.elapsed().as_secs_f64() * 1000.0);
            }
            if !task.send("token", json!({"t": t, "i": *i})) {
                // Nobody is listening any more (the client went away).
                task.request_cancel();
                return Outcome::Canceled("client_disconnected");
            }
            *i += 1;
            st.metrics.tokens_out.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Poll `/slots` until no slot is processing.
pub async fn wait_slot_idle(st: &AppState, url: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = st.http.get(format!("{url}/slots")).send().await {
            if let Ok(v) = r.json::<Value>().await {
                if v.as_array()
                    .is_some_and(|a| a.iter().all(|s| s["is_processing"].as_bool() != Some(true)))
                {
                    return true;
                }
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
