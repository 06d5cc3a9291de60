//! Request limits: one table for the task API and the OpenAI endpoints, so
//! the same request is held to the same rules wherever it enters. Each rule
//! carries the sentence the client sees. (The size limits a deployment tunes,
//! prompt characters, `max_tokens`, body bytes and queue capacity, are in
//! [`crate::Config`].)

use crate::errors::ApiError;

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

/// Sampling temperature: 0 to [`TEMPERATURE_MAX`] (Anthropic's Messages
/// API: 0 to 1, its own documented range).
pub const TEMPERATURE_MAX: f64 = 2.0;
pub const TEMPERATURE_MAX_ANTHROPIC: f64 = 1.0;

/// `temperature` (absent: 0, greedy) within 0 to `max`.
pub fn check_temperature(t: Option<f64>, max: f64) -> Result<f64, ApiError> {
    match t {
        None => Ok(0.0),
        Some(t) if (0.0..=max).contains(&t) => Ok(t),
        Some(_) => Err(ApiError::invalid(
            "temperature",
            format!("temperature must be a number from 0 to {max}"),
        )),
    }
}

/// `top_p` within 0 to 1.
pub fn check_top_p(p: Option<f64>) -> Result<Option<f64>, ApiError> {
    match p {
        Some(p) if !(0.0..=1.0).contains(&p) => Err(ApiError::invalid(
            "top_p",
            "top_p must be a number from 0 to 1",
        )),
        p => Ok(p),
    }
}

/// `field` (`max_tokens`, `max_completion_tokens`, `max_output_tokens`):
/// absent, the configured default; else 1 to the configured limit.
pub fn check_max_tokens(
    field: &str,
    n: Option<i64>,
    default: u32,
    limit: u32,
) -> Result<u32, ApiError> {
    match n {
        None => Ok(default),
        Some(n) if n >= 1 && n <= i64::from(limit) => Ok(n as u32),
        Some(n) => Err(max_tokens_refused(field, n, limit)),
    }
}

/// The refusal of a `max_tokens` value (`got`: as the client sent it).
pub fn max_tokens_refused(field: &str, got: impl std::fmt::Display, limit: u32) -> ApiError {
    ApiError::invalid(
        field.to_string(),
        format!("{field} must be an integer from 1 to {limit} (got {got})"),
    )
}

/// The request's text (`field`: the prompt, the messages, the input) holds
/// at most `limit` characters.
pub fn check_prompt_chars(field: &str, chars: usize, limit: usize) -> Result<(), ApiError> {
    if chars > limit {
        return Err(ApiError::invalid(
            field.to_string(),
            format!("`{field}` holds {chars} characters; at most {limit}"),
        ));
    }
    Ok(())
}

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
                    llorch_types::excerpt(role, 32),
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

/// llama-server's own request fields: they steer its slots, its limits or
/// its answer's shape behind this server's back (a request pinned to a slot
/// stalls another client's, `n_predict` overrides `max_tokens`). A request
/// that names one is refused with the field, never relayed.
pub const ENGINE_FIELDS: &[(&str, &str)] = &[
    ("id_slot", "slots are assigned by the server"),
    ("slot_id", "slots are assigned by the server"),
    ("n_predict", "send `max_tokens`"),
    ("cache_prompt", "prompt caching follows the pool's mode"),
    ("n_keep", "the context is never shifted here"),
    ("n_discard", "the context is never shifted here"),
    (
        "t_max_predict_ms",
        "send `max_tokens` or the task API's `deadline_ms`",
    ),
    ("t_max_prompt_ms", "send the task API's `deadline_ms`"),
    ("n_cmpl", "one completion per request (`n`: 1)"),
    ("lora", "adapters are a pool's configuration"),
    ("response_fields", "the answer's shape is the API's"),
    ("return_tokens", "the answer's shape is the API's"),
    ("timings_per_token", "the answer's shape is the API's"),
    ("post_sampling_probs", "send `logprobs`"),
    ("samplers", "sampling follows the deterministic profile"),
    ("n_indent", "not served here"),
];

/// JSON nesting levels and serialized bytes of a schema a request brings
/// (a tool's `parameters`, `response_format`'s schema): a deeper or larger
/// one becomes a grammar that stalls the engine for every client.
pub const SCHEMA_DEPTH: usize = 32;
pub const SCHEMA_BYTES: usize = 64 * 1024;

/// Nesting levels of a JSON value (a scalar is 0, `[]` or `{}` is 1).
pub fn depth(v: &serde_json::Value) -> usize {
    // Iterative: a hostile value cannot overflow the stack here.
    let mut max = 0;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, d)) = stack.pop() {
        match v {
            serde_json::Value::Array(a) => {
                max = max.max(d + 1);
                stack.extend(a.iter().map(|x| (x, d + 1)));
            }
            serde_json::Value::Object(o) => {
                max = max.max(d + 1);
                stack.extend(o.values().map(|x| (x, d + 1)));
            }
            _ => {}
        }
    }
    max
}

/// A schema within [`SCHEMA_DEPTH`] levels and [`SCHEMA_BYTES`] bytes.
pub fn check_schema(field: &str, schema: &serde_json::Value) -> Result<(), ApiError> {
    let d = depth(schema);
    let bytes = serde_json::to_string(schema)
        .map(|s| s.len())
        .unwrap_or(usize::MAX);
    if d > SCHEMA_DEPTH || bytes > SCHEMA_BYTES {
        return Err(ApiError::invalid(
            field,
            format!(
                "a schema may nest at most {SCHEMA_DEPTH} levels and hold at most {SCHEMA_BYTES} bytes (this one: {d} levels, {bytes} bytes)"
            ),
        ));
    }
    Ok(())
}

/// `response_format`: `{"type": "text"}`, `{"type": "json_object"}`, or
/// `{"type": "json_schema", "json_schema": {"schema": {…}, "name"?, "strict"?}}`;
/// anything else is the client's error, naming the field.
pub fn check_response_format(v: &serde_json::Value) -> Result<(), ApiError> {
    let field = "response_format";
    let o = v.as_object().ok_or_else(|| {
        ApiError::invalid(field, "`response_format` must be an object with a `type`")
    })?;
    match o.get("type").and_then(serde_json::Value::as_str) {
        Some("text") | Some("json_object") => Ok(()),
        Some("json_schema") => {
            let js = o
                .get("json_schema")
                .and_then(serde_json::Value::as_object)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "response_format.json_schema",
                        "`json_schema` must be an object holding `schema`",
                    )
                })?;
            match js.get("schema") {
                Some(s @ serde_json::Value::Object(_)) => {
                    check_schema("response_format.json_schema.schema", s)
                }
                Some(serde_json::Value::Bool(true)) => Ok(()),
                _ => Err(ApiError::invalid(
                    "response_format.json_schema.schema",
                    "`schema` must be a JSON Schema object",
                )),
            }
        }
        _ => Err(ApiError::invalid(
            "response_format.type",
            "`type` must be `text`, `json_object` or `json_schema`",
        )),
    }
}

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
    for (f, why) in ENGINE_FIELDS {
        if body.contains_key(*f) {
            return Err(ApiError::invalid(
                *f,
                format!("`{f}` is llama-server's own field and is not passed through: {why}"),
            ));
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
    fn the_sampling_and_size_rules_hold_their_bounds_and_name_the_field() {
        assert_eq!(check_temperature(None, TEMPERATURE_MAX).unwrap(), 0.0);
        assert_eq!(check_temperature(Some(2.0), TEMPERATURE_MAX).unwrap(), 2.0);
        for bad in [-0.01, 2.01, f64::NAN, f64::INFINITY] {
            let e = check_temperature(Some(bad), TEMPERATURE_MAX).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("temperature"), "{bad}");
        }
        assert!(check_temperature(Some(1.5), TEMPERATURE_MAX_ANTHROPIC).is_err());
        assert_eq!(check_top_p(None).unwrap(), None);
        assert_eq!(check_top_p(Some(1.0)).unwrap(), Some(1.0));
        assert!(check_top_p(Some(1.01)).is_err() && check_top_p(Some(f64::NAN)).is_err());
        assert_eq!(check_max_tokens("max_tokens", None, 16, 4096).unwrap(), 16);
        assert_eq!(
            check_max_tokens("max_tokens", Some(4096), 16, 4096).unwrap(),
            4096
        );
        for bad in [0, -1, 4097, i64::MAX] {
            let e = check_max_tokens("max_completion_tokens", Some(bad), 16, 4096).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("max_completion_tokens"));
            assert!(e.message.contains(&format!("(got {bad})")), "{}", e.message);
        }
        assert!(check_prompt_chars("prompt", 10, 10).is_ok());
        let e = check_prompt_chars("messages", 11, 10).unwrap_err();
        assert_eq!(e.message, "`messages` holds 11 characters; at most 10");
    }

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
    fn engine_fields_are_refused_by_name() {
        for f in ["id_slot", "n_predict", "cache_prompt", "samplers"] {
            let mut m = serde_json::json!({"model": "m", f: 1})
                .as_object()
                .unwrap()
                .clone();
            let e = check_fields(&mut m).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(f));
        }
    }

    #[test]
    fn schemas_and_response_formats_are_bounded_and_well_formed() {
        let mut deep = serde_json::json!({"type": "string"});
        for _ in 0..SCHEMA_DEPTH {
            deep = serde_json::json!({"type": "object", "properties": {"a": deep}});
        }
        assert!(depth(&deep) > SCHEMA_DEPTH);
        let e = check_schema("tools[0].function.parameters", &deep).unwrap_err();
        assert!(e.message.contains("levels"), "{}", e.message);
        // Deep arrays do not overflow the stack.
        let mut v = serde_json::json!(1);
        for _ in 0..100_000 {
            v = serde_json::Value::Array(vec![v]);
        }
        assert_eq!(depth(&v), 100_000);
        std::mem::forget(v); // dropping 100k nested values recursively could overflow
        check_response_format(&serde_json::json!({"type": "json_object"})).unwrap();
        check_response_format(&serde_json::json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})).unwrap();
        for (bad, field) in [
            (serde_json::json!("json_object"), "response_format"),
            (serde_json::json!(["json_object"]), "response_format"),
            (serde_json::json!({}), "response_format.type"),
            (
                serde_json::json!({"type": "json_schema"}),
                "response_format.json_schema",
            ),
            (
                serde_json::json!({"type": "json_schema", "json_schema": {"schema": "x"}}),
                "response_format.json_schema.schema",
            ),
            (
                serde_json::json!({"type": "json_schema", "json_schema": {"schema": 5}}),
                "response_format.json_schema.schema",
            ),
        ] {
            let e = check_response_format(&bad).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{bad}");
        }
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
