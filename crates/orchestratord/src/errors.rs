//! One error type for every answer of the API ([`ApiError`], in the task
//! API's and OpenAI's shape at once), the body parser that names the field
//! at fault, and the layer that puts the framework's own errors (404, 405,
//! 413) in that shape.

use crate::Shared;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// Every error the API answers: status, a stable code, a message and the field at fault.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after_s: None,
        }
    }
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            field: Some(field.into()),
            ..ApiError::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message)
        }
    }
    /// The same error under another stable code (an API's own, e.g. OpenAI's `context_length_exceeded`).
    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = code;
        self
    }
    pub(crate) fn retry_after(mut self, s: u64) -> ApiError {
        self.retry_after_s = Some(s);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Also OpenAI's shape (`type`, `param`), so OpenAI clients read every error.
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        };
        let mut body = json!({"error": {
            "code": self.code,
            "message": self.message,
            "type": kind,
            "param": self.field,
        }});
        if let Some(f) = &self.field {
            body["error"]["field"] = json!(f);
        }
        let mut r = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after_s {
            r.headers_mut().insert(
                "retry-after",
                HeaderValue::from_str(&s.to_string()).unwrap(),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// Anthropic's error type for a status.
fn anthropic_type(status: u16) -> &'static str {
    match status {
        400 | 405 | 415 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

/// An error in Anthropic's shape: `{"type": "error", "error": {"type", "message"}}`.
pub fn anthropic_error_body(e: &ApiError) -> serde_json::Value {
    json!({"type": "error", "error": {"type": anthropic_type(e.status.as_u16()), "message": e.message}})
}

/// Whether a path answers in Anthropic's shape.
pub fn is_anthropic_path(path: &str) -> bool {
    path == "/v1/messages" || path.starts_with("/v1/messages/")
}

/// Re-shape an error answer of ours for an Anthropic client (status and headers kept).
async fn to_anthropic(r: Response) -> Response {
    let (mut parts, body) = r.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let message = v["error"]["message"].as_str().unwrap_or("").to_string();
    let out = json!({"type": "error", "error": {"type": anthropic_type(parts.status.as_u16()), "message": message}});
    let body = axum::body::Body::from(out.to_string());
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, body)
}

/// Parse a JSON body into `T`, naming the field at fault.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let v = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let inner = e.inner().to_string();
        let path = e.path().to_string();
        let field = if let Some(rest) = inner.strip_prefix("unknown field `") {
            rest.split('`').next().unwrap_or("body").to_string()
        } else if path == "." || inner.contains("EOF") || e.inner().is_syntax() {
            "body".to_string()
        } else {
            path
        };
        let msg = if field == "body" && e.inner().is_syntax() {
            format!("invalid JSON: {inner}")
        } else {
            inner
        };
        ApiError::invalid(field, msg)
    })?;
    // One JSON value and nothing after it (`{...}xyz` is not a request).
    de.end().map_err(|e| {
        ApiError::invalid(
            "body",
            format!("invalid JSON: unexpected data after the request object ({e})"),
        )
    })?;
    Ok(v)
}

/// Every error in the API's shape: what the framework answers on its own
/// (413 for a body over the limit, 405 for a method a path does not take,
/// 404 for no such path: plain text or empty) becomes an [`ApiError`].
pub(crate) async fn error_shape(
    State(st): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let r = next.run(req).await;
    let status = r.status();
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) {
        return r;
    }
    if is_json {
        return if is_anthropic_path(&path) {
            to_anthropic(r).await
        } else {
            r
        };
    }
    let shown = llorch_types::excerpt(&path, 64);
    let e = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError {
            field: Some("body".into()),
            ..ApiError::new(
                status,
                "BODY_TOO_LARGE",
                format!(
                    "the request body is over {} bytes (max_body_bytes)",
                    st.cfg.max_body_bytes
                ),
            )
        },
        StatusCode::METHOD_NOT_ALLOWED => ApiError::new(
            status,
            "METHOD_NOT_ALLOWED",
            format!("{method} is not served on {shown}"),
        ),
        StatusCode::NOT_FOUND => ApiError::new(
            status,
            "NOT_FOUND",
            format!("no endpoint {shown} (GET /v1/capabilities lists what is served)"),
        ),
        _ => ApiError::new(
            status,
            "HTTP_ERROR",
            format!(
                "{} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            ),
        ),
    };
    let allow = r.headers().get(header::ALLOW).cloned();
    let mut out = e.into_response();
    if let Some(a) = allow {
        out.headers_mut().insert(header::ALLOW, a);
    }
    if is_anthropic_path(&path) {
        return to_anthropic(out).await;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::CreateTask;

    fn field(body: &str) -> (u16, Option<String>, String) {
        let e = parse_body::<CreateTask>(body.as_bytes()).unwrap_err();
        (e.status.as_u16(), e.field, e.message)
    }

    #[test]
    fn a_body_is_one_json_object_and_errors_name_the_field() {
        parse_body::<CreateTask>(br#"{"prompt": "x"}"#).unwrap();
        parse_body::<CreateTask>(b"{\"prompt\": \"x\"}  \n").unwrap();
        let (s, f, m) = field(r#"{"prompt": "x"}xyz"#);
        assert_eq!((s, f.as_deref()), (400, Some("body")));
        assert!(m.contains("after the request object"), "{m}");
        assert_eq!(
            field(r#"{"prompt": "x"}{"prompt": "y"}"#).1.as_deref(),
            Some("body")
        );
        assert_eq!(
            field(r#"{"prompt": "x", "colour": 1}"#).1.as_deref(),
            Some("colour")
        );
        assert_eq!(field(r#"{"prompt": 5}"#).1.as_deref(), Some("prompt"));
        let (_, f, m) = field("{not json");
        assert_eq!(f.as_deref(), Some("body"));
        assert!(m.starts_with("invalid JSON"), "{m}");
    }

    #[test]
    fn every_error_is_in_both_apis_shape() {
        let r = ApiError::invalid("stop", "too many").into_response();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let r = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "QUEUE_FULL", "full")
            .retry_after(3)
            .into_response();
        assert_eq!(r.headers()["retry-after"], "3");
        let r = ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "no").into_response();
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
    }
}
