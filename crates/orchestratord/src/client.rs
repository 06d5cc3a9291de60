//! A client of this API's v1 task endpoints (used by the haiku proof, the
//! API tests and `cargo xtask bench`). It parses the SSE stream with the same
//! parser as the adapter (`eventsource-stream`) and the same event types.

use crate::events::{EndEvent, ErrorEvent, StartedEvent, TaskEvent};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::Value;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{what} answered {status}: {body}")]
    Status {
        what: String,
        status: u16,
        body: String,
    },
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    #[error("the task API's answer has no task_id: {0}")]
    NoTaskId(String),
    #[error("the event stream broke: {0}")]
    Stream(String),
    #[error(transparent)]
    Event(#[from] crate::events::EventError),
}

#[derive(Debug, Default)]
pub struct StreamResult {
    pub task_id: String,
    /// Event names in the order they arrived.
    pub order: Vec<String>,
    pub started: Option<StartedEvent>,
    pub tokens: Vec<(u64, String)>,
    pub text: String,
    pub end: Option<EndEvent>,
    pub error: Option<ErrorEvent>,
    /// From opening the stream to the first token.
    pub ttft_ms: f64,
    /// From submitting the task (POST) to the first token, for `stream_task`.
    pub ttft_from_submit_ms: f64,
    /// From the first to the last token event.
    pub decode_ms: f64,
    pub total_ms: f64,
    first_at: Option<Instant>,
}

impl StreamResult {
    /// Exactly `started`, then zero or more `token`, then one `end` or `error`.
    pub fn order_ok(&self) -> bool {
        let o: Vec<&str> = self.order.iter().map(String::as_str).collect();
        o.len() >= 2
            && o[0] == "started"
            && matches!(o[o.len() - 1], "end" | "error")
            && o[1..o.len() - 1].iter().all(|e| *e == "token")
    }
    pub fn indices_ok(&self) -> bool {
        self.tokens
            .iter()
            .enumerate()
            .all(|(n, (i, _))| *i == n as u64)
    }
    pub fn tokens_out(&self) -> u64 {
        self.end.as_ref().map(|e| e.tokens_out).unwrap_or(0)
    }
    pub fn canceled(&self) -> bool {
        self.end.as_ref().is_some_and(|e| e.canceled)
    }
}

/// Submit a task; returns its id.
pub async fn submit(
    http: &reqwest::Client,
    base: &str,
    body: &Value,
) -> Result<String, ClientError> {
    let r = http
        .post(format!("{base}/v1/tasks"))
        .json(body)
        .send()
        .await?;
    if r.status().as_u16() != 202 {
        return Err(ClientError::Status {
            what: "POST /v1/tasks".into(),
            status: r.status().as_u16(),
            body: r.text().await.unwrap_or_default(),
        });
    }
    let v: Value = r.json().await?;
    v["task_id"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| ClientError::NoTaskId(v.to_string()))
}

/// Submit a task and read its stream. With `cancel_after`, cancel once that
/// many tokens arrived (and keep reading until the stream ends).
pub async fn stream_task(
    http: &reqwest::Client,
    base: &str,
    body: &Value,
    on_token: Option<&(dyn Fn(&str) + Sync)>,
    cancel_after: Option<usize>,
) -> Result<StreamResult, ClientError> {
    let t0 = Instant::now();
    let id = submit(http, base, body).await?;
    let mut res = read_stream(http, base, &id, on_token, cancel_after).await?;
    if let Some(f) = res.first_at {
        res.ttft_from_submit_ms = (f - t0).as_secs_f64() * 1000.0;
    }
    res.total_ms = t0.elapsed().as_secs_f64() * 1000.0;
    Ok(res)
}

pub async fn cancel(http: &reqwest::Client, base: &str, id: &str) -> Result<(), ClientError> {
    let r = http
        .post(format!("{base}/v1/tasks/{id}/cancel"))
        .header("content-type", "application/json")
        .send()
        .await?;
    if r.status().as_u16() != 204 {
        return Err(ClientError::Status {
            what: "cancel".into(),
            status: r.status().as_u16(),
            body: r.text().await.unwrap_or_default(),
        });
    }
    Ok(())
}

pub async fn read_stream(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    on_token: Option<&(dyn Fn(&str) + Sync)>,
    cancel_after: Option<usize>,
) -> Result<StreamResult, ClientError> {
    let t0 = Instant::now();
    let resp = http
        .get(format!("{base}/v1/tasks/{id}/stream"))
        .send()
        .await?;
    if !resp.status().is_success() {
        return Err(ClientError::Status {
            what: "GET stream".into(),
            status: resp.status().as_u16(),
            body: resp.text().await.unwrap_or_default(),
        });
    }
    let mut res = StreamResult {
        task_id: id.to_string(),
        ..Default::default()
    };
    let mut events = resp.bytes_stream().eventsource();
    let mut canceled = false;
    while let Some(ev) = events.next().await {
        let ev = ev.map_err(|e| ClientError::Stream(e.to_string()))?;
        if ev.event == "message" && ev.data.is_empty() {
            continue; // keep-alive comment
        }
        res.order.push(ev.event.clone());
        match TaskEvent::parse(&ev.event, &ev.data)? {
            TaskEvent::Started(s) => res.started = Some(s),
            TaskEvent::Token(t) => {
                let now = Instant::now();
                let first = *res.first_at.get_or_insert(now);
                if res.tokens.is_empty() {
                    res.ttft_ms = (now - t0).as_secs_f64() * 1000.0;
                }
                res.decode_ms = (now - first).as_secs_f64() * 1000.0;
                if let Some(f) = on_token {
                    f(&t.t);
                }
                res.text.push_str(&t.t);
                res.tokens.push((t.i, t.t));
                if let Some(n) = cancel_after {
                    if !canceled && res.tokens.len() >= n {
                        canceled = true;
                        cancel(http, base, id).await?;
                    }
                }
            }
            TaskEvent::End(e) => res.end = Some(e),
            TaskEvent::Error(e) => res.error = Some(e),
        }
    }
    Ok(res)
}
