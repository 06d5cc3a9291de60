//! Kubernetes object names: DNS-1123 labels. A pool id becomes part of
//! names (`llorch-<id>`), labels and selectors; one that cannot is refused
//! by key before anything is written.

use crate::DeployError;

/// The prefix of every object rendered for a pool.
pub const PREFIX: &str = "llorch-";
/// The longest suffix added to a pool's name (`-epp-config`).
const LONGEST_SUFFIX: usize = "-epp-config".len();

/// Whether `s` is a DNS-1123 label: 1–63 characters of `a-z`, `0-9` and
/// `-`, starting and ending with a letter or digit.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A pool id that every rendered name can hold.
pub fn check_pool_id(id: &str) -> Result<(), DeployError> {
    let longest = PREFIX.len() + id.len() + LONGEST_SUFFIX;
    let why = if id.contains('_') {
        Some("`_` is not allowed in Kubernetes names (DNS-1123: a-z, 0-9, -)".to_string())
    } else if !is_dns1123_label(id) {
        Some("it must be a DNS-1123 label: a-z, 0-9 and -, starting and ending with a letter or digit".to_string())
    } else if longest > 63 {
        Some(format!(
            "`{PREFIX}{id}-epp-config` would be {longest} characters; Kubernetes names hold 63"
        ))
    } else {
        None
    };
    match why {
        Some(why) => Err(DeployError::BadName {
            key: "pools[].id".into(),
            value: llorch_types::excerpt(id, 80),
            why,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_ids_that_cannot_be_names_are_refused_by_key() {
        for ok in ["default", "chat", "a", "h100-2", &"x".repeat(45)] {
            check_pool_id(ok).unwrap();
        }
        for bad in [
            "chat_1",
            "chat-",
            "-chat",
            "Chat",
            "",
            &"x".repeat(46),
            "a.b",
        ] {
            let e = check_pool_id(bad).unwrap_err().to_string();
            assert!(e.contains("pools[].id"), "{bad}: {e}");
        }
    }
}
