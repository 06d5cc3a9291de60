//! The task API's validation and the router's refusals, in process and in
//! milliseconds: an `AppState` whose replicas are links that say Ready and
//! point nowhere (no llama.cpp, no engine); every request here is refused
//! before it could reach one.

use super::*;
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use tower::ServiceExt;

fn state() -> Shared {
    crate::AppState::new(
        crate::Config::default(),
        crate::pool::tests::ready_specs(1, crate::Affinity::None),
        crate::scheduler::SchedulerConfig::default(),
    )
}

/// Parsed by the API's own body parser, then validated.
fn create(body: serde_json::Value) -> Result<Validated, ApiError> {
    let t: CreateTask = crate::errors::parse_body(body.to_string().as_bytes())?;
    t.validate(&state())
}

#[test]
fn a_valid_task_gets_the_documented_defaults() {
    let (t, id, pool) = create(json!({"prompt": "hi"})).unwrap();
    let c = crate::Config::default();
    assert_eq!(
        (t.max_tokens, t.seed, t.temperature),
        (c.default_max_tokens, c.default_seed, 0.0)
    );
    assert!(!t.ignore_eos && t.stop.is_empty() && id.is_none() && pool.is_none());
    let (t, _, _) = create(json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4096, "temperature": 2.0, "task_id": "a-1_B", "pool": "p"})).unwrap();
    assert_eq!(t.max_tokens, 4096);
    assert_eq!(t.messages.unwrap()[0].role, "user");
}

#[test]
fn each_hostile_field_is_refused_by_name() {
    let long = "x".repeat(64 * 1024 + 1);
    let cases = [
        (json!({}), "prompt"),
        (json!({"prompt": ""}), "prompt"),
        (json!({"prompt": long}), "prompt"),
        (
            json!({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}),
            "messages",
        ),
        (json!({"messages": []}), "messages"),
        (json!({"prompt": "a", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "a", "max_tokens": 4097}), "max_tokens"),
        (json!({"prompt": "a", "temperature": -0.1}), "temperature"),
        (json!({"prompt": "a", "temperature": 2.5}), "temperature"),
        (json!({"prompt": "a", "deadline_ms": 0}), "deadline_ms"),
        (
            json!({"prompt": "a", "deadline_ms": 86_400_001u64}),
            "deadline_ms",
        ),
        (json!({"prompt": "a", "task_id": ""}), "task_id"),
        (json!({"prompt": "a", "task_id": "../etc"}), "task_id"),
        (json!({"prompt": "a", "task_id": "x".repeat(65)}), "task_id"),
        (json!({"prompt": "a", "pool": ""}), "pool"),
        (json!({"prompt": "a", "pool": "p\u{7}"}), "pool"),
        (json!({"prompt": "a", "pool": "p".repeat(257)}), "pool"),
        (json!({"prompt": "a", "unknown": 1}), "unknown"),
        (json!({"prompt": 5}), "prompt"),
    ];
    for (body, field) in cases {
        let e = create(body.clone()).expect_err(&body.to_string());
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(e.field.as_deref(), Some(field), "{body}: {}", e.message);
        assert!(!e.message.is_empty());
    }
}

fn post(path: &str, body: &str, host: &str, content_type: &str) -> Request<Body> {
    Request::post(path)
        .header(header::HOST, host)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn answer(r: axum::response::Response) -> (StatusCode, serde_json::Value) {
    let status = r.status();
    let b = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    (
        status,
        serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn the_router_refuses_before_any_engine_is_asked() {
    let app = router(state());
    let local = "127.0.0.1:8080";
    let cases: [(&str, &str, &str, &str, StatusCode, &str); 9] = [
        (
            "/v1/tasks",
            r#"{"prompt":"a","temperature":9}"#,
            local,
            "application/json",
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            "/v1/tasks",
            "{not json",
            local,
            "application/json",
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            "/v1/tasks",
            r#"{"prompt":"a","pool":"nope"}"#,
            local,
            "application/json",
            StatusCode::NOT_FOUND,
            "POOL_NOT_FOUND",
        ),
        // A page elsewhere cannot post a form or text, nor name this host otherwise.
        (
            "/v1/tasks",
            r#"{"prompt":"a"}"#,
            local,
            "text/plain",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "",
        ),
        (
            "/v1/tasks",
            r#"{"prompt":"a"}"#,
            "evil.example:8080",
            "application/json",
            StatusCode::FORBIDDEN,
            "HOST_NOT_ALLOWED",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"p","messages":[{"role":"user","content":"a"}],"temperature":3}"#,
            local,
            "application/json",
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"p","messages":"a"}"#,
            local,
            "application/json",
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            "/v1/completions",
            r#"{"model":"p","prompt":"a","max_tokens":100000}"#,
            local,
            "application/json",
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            "/v1/tasks/none/cancel",
            "{}",
            local,
            "application/json",
            StatusCode::NOT_FOUND,
            "TASK_NOT_FOUND",
        ),
    ];
    for (path, body, host, ct, status, code) in cases {
        let (s, v) = answer(
            app.clone()
                .oneshot(post(path, body, host, ct))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s, status, "{path} {body}: {v}");
        if !code.is_empty() {
            assert_eq!(v["error"]["code"], code, "{path} {body}: {v}");
        }
    }
}
