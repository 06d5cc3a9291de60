//! OpenAI's streamed answers of the task path: task events → `data:`
//! chunks (a role delta, one chunk per engine frame, the chunk with
//! `finish_reason`, the usage chunk if asked, `[DONE]`), and the object of
//! each chunk (`Head`).

use crate::admission::DisconnectGuard;
use crate::errors::ApiError;
use crate::events::{EndEvent, TaskEvent, TokenEvent};
use crate::openai::{
    chat_logprobs, error_json, event_error, finish_reason, text_logprobs, usage, Kind,
};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::time::Duration;

pub(crate) struct Head {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub fp: String,
    pub kind: Kind,
    pub logprobs: bool,
}

impl Head {
    fn chunk(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion.chunk", Kind::Text => "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fp,
            "choices": choices,
        })
    }
    fn token(&self, t: &TokenEvent) -> Value {
        match self.kind {
            Kind::Chat => {
                let mut c = json!({"index": 0, "delta": {"content": t.t}, "logprobs": Value::Null, "finish_reason": Value::Null});
                if self.logprobs {
                    c["logprobs"] =
                        json!({"content": chat_logprobs(t.probs.as_deref().unwrap_or(&[]))});
                }
                self.chunk(json!([c]))
            }
            Kind::Text => {
                let lp = if self.logprobs {
                    text_logprobs(t.probs.as_deref().unwrap_or(&[]))
                } else {
                    Value::Null
                };
                self.chunk(json!([{"index": 0, "text": t.t, "logprobs": lp, "finish_reason": Value::Null}]))
            }
        }
    }
    fn last(&self, end: &EndEvent) -> Value {
        match self.kind {
            Kind::Chat => self.chunk(json!([{"index": 0, "delta": {}, "logprobs": Value::Null, "finish_reason": finish_reason(end)}])),
            Kind::Text => self.chunk(json!([{"index": 0, "text": "", "logprobs": Value::Null, "finish_reason": finish_reason(end)}])),
        }
    }
}

/// `data:` chunks: (chat) a role delta, one chunk per engine frame, a chunk
/// with `finish_reason`, the usage chunk if asked, `[DONE]`. An error after
/// the stream started is one `data: {"error": …}` frame, then the end.
pub(crate) fn stream(
    head: Head,
    include_usage: bool,
    first: Vec<TaskEvent>,
    rx: tokio::sync::mpsc::UnboundedReceiver<TaskEvent>,
    guard: DisconnectGuard,
) -> Response {
    type Out = std::collections::VecDeque<String>;
    let pending: std::collections::VecDeque<TaskEvent> = first.into();
    let state = ((rx, pending), guard, head, false, Out::new());
    let events = futures_util::stream::unfold(
        state,
        move |((mut rx, mut pending), g, head, mut done, mut out)| async move {
            loop {
                if let Some(d) = out.pop_front() {
                    let ev = Ok::<_, std::convert::Infallible>(Event::default().data(d));
                    return Some((ev, ((rx, pending), g, head, done, out)));
                }
                if done {
                    return None;
                }
                let next = match pending.pop_front() {
                    Some(ev) => Some(ev),
                    None => rx.recv().await,
                };
                match next {
                    Some(TaskEvent::Started(_)) => {
                        if head.kind == Kind::Chat {
                            let c = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": Value::Null, "finish_reason": Value::Null}]);
                            out.push_back(head.chunk(c).to_string());
                        }
                    }
                    Some(TaskEvent::Token(t)) => out.push_back(head.token(&t).to_string()),
                    Some(TaskEvent::End(e)) => {
                        done = true;
                        if e.canceled {
                            let err = ApiError::new(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "CANCELED",
                                format!("the request was canceled ({})", e.stop_reason),
                            );
                            out.push_back(error_json(err).to_string());
                        } else {
                            out.push_back(head.last(&e).to_string());
                            if include_usage {
                                let mut u = head.chunk(json!([]));
                                u["usage"] = usage(&e);
                                out.push_back(u.to_string());
                            }
                            out.push_back("[DONE]".into());
                        }
                    }
                    Some(TaskEvent::Error(e)) => {
                        done = true;
                        out.push_back(error_json(event_error(&e, head.kind)).to_string());
                    }
                    None => return None,
                }
            }
        },
    );
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response()
}
