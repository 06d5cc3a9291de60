//! Request limits: one table for the task API and the OpenAI endpoints, so
//! the same request is held to the same rules wherever it enters. Each rule
//! carries the sentence the client sees. (The size limits a deployment tunes,
//! prompt characters, `max_tokens`, body bytes and queue capacity, are in
//! [`crate::Config`].)

use crate::api::ApiError;

/// Stop strings per request, and characters per stop string.
pub const STOP_STRINGS: usize = 8;
pub const STOP_CHARS: usize = 64;
/// Characters of a GBNF grammar.
pub const GRAMMAR_CHARS: usize = 16 * 1024;
/// Chat roles a request may use; OpenAI's `developer` is the `system` role
/// for llama-server's chat templates.
pub const ROLES: &[(&str, &str)] = &[
    ("system", "system"),
    ("developer", "system"),
    ("user", "user"),
    ("assistant", "assistant"),
    ("tool", "tool"),
];

/// `stop`: at most [`STOP_STRINGS`] non-empty strings of at most [`STOP_CHARS`].
pub fn check_stop(stop: &[String]) -> Result<(), ApiError> {
    if stop.len() > STOP_STRINGS
        || stop
            .iter()
            .any(|s| s.is_empty() || s.chars().count() > STOP_CHARS)
    {
        return Err(ApiError::invalid(
            "stop",
            format!("stop takes at most {STOP_STRINGS} non-empty strings of at most {STOP_CHARS} characters"),
        ));
    }
    Ok(())
}

/// `grammar`: a non-empty GBNF text of at most [`GRAMMAR_CHARS`].
pub fn check_grammar(grammar: Option<&str>) -> Result<(), ApiError> {
    if grammar.is_some_and(|g| g.is_empty() || g.chars().count() > GRAMMAR_CHARS) {
        return Err(ApiError::invalid(
            "grammar",
            format!("grammar must be a non-empty GBNF text of at most {GRAMMAR_CHARS} characters"),
        ));
    }
    Ok(())
}

/// The role of message `i` as the engine's template takes it, or a 400 naming `messages[i].role`.
pub fn check_role(i: usize, role: &str) -> Result<&'static str, ApiError> {
    ROLES
        .iter()
        .find(|(r, _)| *r == role)
        .map(|(_, as_role)| *as_role)
        .ok_or_else(|| {
            ApiError::invalid(
                format!("messages[{i}].role"),
                format!(
                    "unknown role `{}`; roles are {}",
                    llorch_io::handoff::excerpt(role, 32),
                    ROLES.iter().map(|(r, _)| *r).collect::<Vec<_>>().join(", ")
                ),
            )
        })
}

/// Tools per request, and characters of a tool (or function) name.
pub const TOOLS: usize = 128;
pub const TOOL_NAME_CHARS: usize = 64;
/// Inputs per embeddings or rerank request.
pub const EMBED_INPUTS: usize = 2048;

/// Fields any API accepts and this server ignores, and why (the README
/// lists them). They are removed before a request reaches the engine.
pub const IGNORED_FIELDS: &[(&str, &str)] = &[
    (
        "user",
        "an end-user id for the provider's abuse monitoring; nothing here monitors",
    ),
    ("metadata", "tags for the client's own bookkeeping"),
    ("store", "nothing is stored here"),
    ("service_tier", "there is one tier here"),
    (
        "safety_identifier",
        "an end-user id for the provider's abuse monitoring",
    ),
    (
        "prompt_cache_key",
        "prompt caching follows the pool's mode, not the request",
    ),
    (
        "truncation",
        "a prompt over the context is refused, never truncated",
    ),
];

/// Fields that would change the answer in a way no pool here can give:
/// a 400 that names the field and says why, never silently dropped.
pub const REFUSED_FIELDS: &[(&str, &str)] = &[
    ("audio", "audio output is not served here"),
    ("prediction", "predicted outputs are not supported"),
    ("web_search_options", "web search is not available here"),
    (
        "functions",
        "the deprecated `functions` field is not supported; send `tools`",
    ),
    (
        "function_call",
        "the deprecated `function_call` field is not supported; send `tool_choice`",
    ),
    (
        "previous_response_id",
        "responses are not stored here; send the whole conversation as `input`",
    ),
    (
        "conversation",
        "conversations are not stored here; send the whole conversation as `input`",
    ),
    ("background", "background responses are not supported"),
    (
        "mcp_servers",
        "remote MCP servers are not reached from here",
    ),
    (
        "container",
        "code execution containers are not available here",
    ),
];

/// Drop the ignored fields of a request object; refuse a refused one (and
/// `modalities` other than text, `n` other than 1).
pub fn check_fields(body: &mut serde_json::Map<String, serde_json::Value>) -> Result<(), ApiError> {
    for (f, _) in IGNORED_FIELDS {
        body.remove(*f);
    }
    for (f, why) in REFUSED_FIELDS {
        if body.get(*f).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::invalid(*f, format!("`{f}`: {why}")));
        }
    }
    if let Some(m) = body.get("modalities").filter(|v| !v.is_null()) {
        if m != &serde_json::json!(["text"]) {
            return Err(ApiError::invalid(
                "modalities",
                "only text output is served here (modalities: [\"text\"])",
            ));
        }
        body.remove("modalities");
    }
    match body.get("n") {
        None | Some(serde_json::Value::Null) => {}
        Some(n) if n.as_i64() == Some(1) => {}
        Some(_) => return Err(ApiError::invalid("n", "only n=1 is supported")),
    }
    Ok(())
}

/// A tool or function name: 1 to [`TOOL_NAME_CHARS`] of `a-z A-Z 0-9 _ -` (OpenAI's rule).
pub fn check_tool_name(field: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.chars().count() <= TOOL_NAME_CHARS
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        return Err(ApiError::invalid(
            field,
            format!("a tool name is 1 to {TOOL_NAME_CHARS} characters of a-z, A-Z, 0-9, _ and -"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_ignored_or_refused_by_name() {
        let mut m = serde_json::json!({"user": "u", "metadata": {}, "model": "m", "n": 1})
            .as_object()
            .unwrap()
            .clone();
        check_fields(&mut m).unwrap();
        assert!(!m.contains_key("user") && !m.contains_key("metadata") && m.contains_key("model"));
        for (body, field) in [
            (serde_json::json!({"audio": {"voice": "x"}}), "audio"),
            (serde_json::json!({"n": 2}), "n"),
            (
                serde_json::json!({"modalities": ["text", "audio"]}),
                "modalities",
            ),
            (serde_json::json!({"functions": []}), "functions"),
        ] {
            let e = check_fields(&mut body.as_object().unwrap().clone()).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field));
            assert_eq!(e.status.as_u16(), 400);
        }
        let mut m = serde_json::json!({"modalities": ["text"]})
            .as_object()
            .unwrap()
            .clone();
        check_fields(&mut m).unwrap();
    }

    #[test]
    fn tool_names_follow_openai_rule() {
        check_tool_name("f", "get_weather-2").unwrap();
        for bad in ["", "a b", "x;y", &"a".repeat(65)] {
            assert!(check_tool_name("f", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stop_strings_are_held_to_one_limit() {
        let ok: Vec<String> = (0..STOP_STRINGS).map(|i| format!("s{i}")).collect();
        check_stop(&ok).unwrap();
        let mut many = ok.clone();
        many.push("one more".into());
        for bad in [many, vec![String::new()], vec!["x".repeat(STOP_CHARS + 1)]] {
            let e = check_stop(&bad).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("stop"));
            assert_eq!(e.status.as_u16(), 400);
        }
    }

    #[test]
    fn roles_are_checked_and_developer_is_system() {
        assert_eq!(check_role(0, "developer").unwrap(), "system");
        assert_eq!(check_role(0, "tool").unwrap(), "tool");
        let e = check_role(3, "wizard").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("messages[3].role"));
        assert!(e.message.contains("user"), "{}", e.message);
        let e = check_role(0, &"x".repeat(10_000)).unwrap_err();
        assert!(e.message.len() < 200, "quoted short");
    }

    #[test]
    fn grammars_are_bounded() {
        check_grammar(None).unwrap();
        check_grammar(Some("root ::= \"a\"")).unwrap();
        assert!(check_grammar(Some("")).is_err());
        assert!(check_grammar(Some(&"a".repeat(GRAMMAR_CHARS + 1))).is_err());
    }
}
