//! The SSE events of the v1 task API: exactly `started → token* → end`, or
//! `started? → token* → error`. Typed here, serialized once.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StartedEvent {
    pub queue_position: usize,
    pub predicted_start_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenEvent {
    /// The text piece (one engine frame: one token, or several when a token ended inside a UTF-8 character).
    pub t: String,
    /// Index of this event, contiguous from 0.
    pub i: u64,
    /// llama-server's `completion_probabilities` for the tokens of this
    /// event, when the request asked for log-probabilities (OpenAI `logprobs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probs: Option<Vec<serde_json::Value>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EndEvent {
    /// Tokens the engine generated (its own count, not the number of events).
    pub tokens_out: u64,
    pub decode_ms: f64,
    /// `eos`, `limit`, `word` (a stop string), or the cancel reason.
    pub stop_reason: String,
    pub canceled: bool,
    pub prompt_tokens: u64,
    /// Prompt tokens the engine evaluated for this task; fewer than
    /// `prompt_tokens` when a batched engine reused its prompt cache.
    #[serde(default)]
    pub prompt_evaluated: u64,
    pub prompt_ms: f64,
    pub decode_tokens_per_s: f64,
    pub queue_wait_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot_idle: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorEvent {
    pub code: String,
    pub message: String,
    pub retriable: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TaskEvent {
    Started(StartedEvent),
    Token(TokenEvent),
    End(EndEvent),
    Error(ErrorEvent),
}

/// An SSE event that is not one of the task stream's.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("bad `{name}` event {data:?}: {source}")]
    Bad {
        name: String,
        data: String,
        source: serde_json::Error,
    },
    #[error("unknown event `{0}`")]
    Unknown(String),
}

impl TaskEvent {
    pub fn name(&self) -> &'static str {
        match self {
            TaskEvent::Started(_) => "started",
            TaskEvent::Token(_) => "token",
            TaskEvent::End(_) => "end",
            TaskEvent::Error(_) => "error",
        }
    }

    pub fn data(&self) -> String {
        let r = match self {
            TaskEvent::Started(e) => serde_json::to_string(e),
            TaskEvent::Token(e) => serde_json::to_string(e),
            TaskEvent::End(e) => serde_json::to_string(e),
            TaskEvent::Error(e) => serde_json::to_string(e),
        };
        r.expect("events serialize")
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self, TaskEvent::End(_) | TaskEvent::Error(_))
    }

    /// Parse an SSE event (name + data) back (clients, tests).
    pub fn parse(name: &str, data: &str) -> Result<TaskEvent, EventError> {
        let e = |source| EventError::Bad {
            name: name.into(),
            data: data.into(),
            source,
        };
        Ok(match name {
            "started" => TaskEvent::Started(serde_json::from_str(data).map_err(e)?),
            "token" => TaskEvent::Token(serde_json::from_str(data).map_err(e)?),
            "end" => TaskEvent::End(serde_json::from_str(data).map_err(e)?),
            "error" => TaskEvent::Error(serde_json::from_str(data).map_err(e)?),
            other => return Err(EventError::Unknown(other.into())),
        })
    }
}
