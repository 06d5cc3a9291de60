//! `GET /v1/models`, and the names and fingerprint a pool's answers carry:
//! the model's name from its reference, and `system_fingerprint` (the
//! engine build plus the runtime flags that change what it computes).

use crate::{EngineInfo, Shared};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// Flags that change the numbers llama.cpp computes for the same build (or
/// the prompt it renders from messages): they go into `system_fingerprint`
/// with the build fingerprint.
const NUMERIC_FLAGS: &[&str] = &[
    "-fa",
    "--flash-attn",
    "-b",
    "--batch-size",
    "-ub",
    "--ubatch-size",
    "-ctk",
    "--cache-type-k",
    "-ctv",
    "--cache-type-v",
    "--no-mmap",
    "--mlock",
    "-c",
    "--ctx-size",
    "--parallel",
    "-np",
    "--no-cont-batching",
    "--cont-batching",
    "-t",
    "--threads",
    "--embeddings",
    "--pooling",
    "--jinja",
    "--no-jinja",
];

/// `fp_` + 16 hex of sha256(build fingerprint, numeric flags with values).
pub fn system_fingerprint(e: &EngineInfo) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(e.fingerprint.as_bytes());
    let mut i = 0;
    while i < e.flags.len() {
        let f = &e.flags[i];
        let name = f.split('=').next().unwrap_or(f);
        if NUMERIC_FLAGS.contains(&name) {
            h.update(b"\0");
            h.update(f.as_bytes());
            if !f.contains('=') {
                if let Some(v) = e.flags.get(i + 1).filter(|v| !v.starts_with('-')) {
                    h.update(b"=");
                    h.update(v.as_bytes());
                    i += 1;
                }
            }
        }
        i += 1;
    }
    let hex = format!("{:x}", h.finalize());
    format!("fp_{}", &hex[..16])
}

/// The model's name from its reference (the file name without `.gguf`).
pub fn model_alias(e: &EngineInfo) -> String {
    let tail = e
        .model_ref
        .rsplit(['/', '#', ':'])
        .next()
        .unwrap_or(&e.model_ref);
    tail.strip_suffix(".gguf").unwrap_or(tail).to_string()
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `GET /v1/models`: every pool id, then each model name that routes to a
/// pool (once: a name shared by pools routes to the first). Each entry says
/// its pool and that pool's state (OpenAI clients ignore the extra fields).
pub async fn models(State(st): State<Shared>) -> Response {
    let stopping = st.stopping.load(std::sync::atomic::Ordering::SeqCst);
    let mut data: Vec<Value> = Vec::new();
    let mut names = std::collections::HashSet::new();
    let entry = |id: &str, p: &crate::Pool| {
        let members = st.members(&p.group);
        let replicas: Vec<Value> = members
            .iter()
            .map(|m| json!({"replica": m.replica, "state": m.state(stopping), "queue_depth": m.queue.len(),
                            "running": m.running.load(std::sync::atomic::Ordering::SeqCst),
                            "tokens_out": m.tokens_out.load(std::sync::atomic::Ordering::Relaxed)}))
            .collect();
        let mode = p
            .last_engine
            .lock()
            .unwrap()
            .as_ref()
            .map(|e| e.mode())
            .unwrap_or("exact");
        json!({"id": id, "object": "model", "created": 0, "owned_by": "llama-orch",
               "pool": p.group.as_str(), "state": crate::api::group_state(&st, &members),
               "mode": mode, "slots": p.slots, "replicas": replicas,
               "serves": crate::endpoints::serves(p).as_str(),
               "endpoints": crate::endpoints::serves(p).endpoints()})
    };
    for p in st.heads() {
        names.insert(p.group.to_string());
        data.push(entry(p.group.as_str(), p));
    }
    for p in st.heads() {
        let mut aliases = p.aliases.clone();
        if let Some(e) = p.last_engine.lock().unwrap().as_ref() {
            aliases.push(model_alias(e));
        }
        for a in aliases {
            if names.insert(a.clone()) {
                data.push(entry(&a, p));
            }
        }
    }
    Json(json!({"object": "list", "data": data})).into_response()
}
