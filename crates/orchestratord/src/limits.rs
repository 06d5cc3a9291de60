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

#[cfg(test)]
mod tests {
    use super::*;

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
