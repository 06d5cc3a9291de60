//! `oci://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]` references, parsed
//! strictly (host, port, repository path components, tag grammar, digest).

use crate::{excerpt, is_sha256_hex};

/// A reference that is not `oci://HOST[:PORT]/REPO[:TAG|@sha256:HEX]`.
#[derive(Debug, thiserror::Error)]
#[error("`{reference}` is not an OCI reference: {why}\n  expected oci://HOST[:PORT]/REPO[:TAG] or oci://HOST[:PORT]/REPO@sha256:HEX")]
pub struct BadOciRef {
    pub reference: String,
    pub why: String,
}

/// `oci://HOST[:PORT]/REPO[:TAG|@sha256:HEX]`, checked part by part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OciRef {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_repo(r: &str) -> bool {
    // Lowercase path components of [a-z0-9] joined by one of `._-` (or `__`), separated by `/`.
    r.len() <= 255
        && !r.is_empty()
        && r.split('/').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
                && !c.contains("..")
                && !c.contains("--")
        })
}

fn valid_host(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((a, p)) if !a.ends_with(']') || h.starts_with('[') => (a, Some(p)),
        _ => (h, None),
    };
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
            })
    };
    host_ok && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0))
}

impl OciRef {
    pub fn parse(s: &str) -> Result<OciRef, BadOciRef> {
        let bad = |why: &str| BadOciRef {
            reference: excerpt(s, 200),
            why: why.into(),
        };
        if s.len() > 1024 {
            return Err(bad("longer than 1024 characters"));
        }
        let rest = s
            .strip_prefix("oci://")
            .ok_or_else(|| bad("it does not start with oci://"))?;
        let (registry, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("no repository after the registry"))?;
        if !valid_host(registry) {
            return Err(bad("the registry is not HOST or HOST:PORT"));
        }
        let (path, digest) = match path.split_once('@') {
            Some((p, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("only sha256 digests are accepted"))?;
                if !is_sha256_hex(hex) {
                    return Err(bad("the digest is not sha256: and 64 lowercase hex digits"));
                }
                (p, Some(d.to_string()))
            }
            None => (path, None),
        };
        let (repo, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => {
                if !valid_tag(t) {
                    return Err(bad("the tag is not 1-128 of [A-Za-z0-9_.-]"));
                }
                (r, Some(t.to_string()))
            }
            _ => (path, None),
        };
        if !valid_repo(repo) {
            return Err(bad(
                "the repository is not lowercase [a-z0-9._-] components separated by /",
            ));
        }
        Ok(OciRef {
            registry: registry.to_string(),
            repository: repo.to_string(),
            tag,
            digest,
        })
    }

    /// The same repository with another tag (and no digest).
    pub fn with_tag(&self, tag: &str) -> Result<OciRef, BadOciRef> {
        if !valid_tag(tag) {
            return Err(BadOciRef {
                reference: format!("{self}"),
                why: format!("`{}` is not a valid tag", excerpt(tag, 80)),
            });
        }
        Ok(OciRef {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        })
    }

    /// The registry is this machine (plain HTTP allowed).
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => self.registry.as_str(),
        };
        let host = host.trim_matches(['[', ']']);
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl std::fmt::Display for OciRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "oci://{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_parsed_strictly() {
        let r = OciRef::parse("oci://127.0.0.1:5000/llorch/engines:abc").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "llorch/engines");
        assert_eq!(r.tag.as_deref(), Some("abc"));
        assert!(r.is_loopback());
        assert_eq!(r.to_string(), "oci://127.0.0.1:5000/llorch/engines:abc");
        let d = format!("oci://ghcr.io/org/models@sha256:{}", "a".repeat(64));
        let r = OciRef::parse(&d).unwrap();
        assert!(!r.is_loopback());
        assert_eq!(r.digest.unwrap(), format!("sha256:{}", "a".repeat(64)));
        for bad in [
            "https://x/y",
            "oci://x",
            "oci:///repo",
            "oci://x/UPPER",
            "oci://x/../etc",
            "oci://x/a//b",
            "oci://x/a:bad/tag",
            "oci://x/a:-tag",
            "oci://x:99999/a",
            "oci://x/a@sha256:abc",
            "oci://x/a@md5:aaaa",
            "oci://ho st/a",
        ] {
            assert!(OciRef::parse(bad).is_err(), "{bad}");
        }
        assert!(OciRef::parse(&format!("oci://x/{}", "a".repeat(300))).is_err());
    }
}
