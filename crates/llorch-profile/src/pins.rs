//! The pins file (`toolchains/llama.cpp.yaml`): named llama.cpp revisions
//! (git commit, pip sdist, or archive), one of them the default; and the
//! writer `pin bump` uses for one pin's YAML.

use crate::{invalid_at, parse_yaml, read_config, ConfigError, PINS_SCHEMA};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PinsFile {
    pub schema: u32,
    pub default: String,
    pub pins: BTreeMap<String, Pin>,
}

/// One pinned llama.cpp revision and where its tree comes from.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// The llama.cpp commit the tree is (verified for `git`, recorded for the others).
    pub commit: String,
    pub source: SourceSpec,
    #[serde(default)]
    pub description: Option<String>,
    /// Offline source bundles this pin accepts: backend (`cpu`, `cuda`) →
    /// the tree digest that `cargo xtask source bundle` prints. A bundle is
    /// checked against this, from the pin, before anything in it is written.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub bundle_trees: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceSpec {
    Git {
        url: String,
        /// Optional branch or tag; when given it must resolve to the pin's commit.
        #[serde(default)]
        rev: Option<String>,
        #[serde(default)]
        submodules: bool,
    },
    PypiSdist {
        package: String,
        version: String,
        sha256: String,
        #[serde(default)]
        subdir: Option<String>,
    },
    Archive {
        /// Local path (relative to the workspace root) or http(s) URL.
        location: String,
        sha256: String,
        #[serde(default)]
        strip_prefix: Option<String>,
    },
}

/// One pin as the block a pins file holds (`name:` and its keys), for
/// tools that add a pin without rewriting the rest of the file.
pub fn pin_yaml(name: &str, pin: &Pin) -> Result<String, serde_saphyr::ser::Error> {
    serde_saphyr::to_string(&BTreeMap::from([(name, pin)]))
}

impl PinsFile {
    pub fn load(path: &Path) -> Result<PinsFile, ConfigError> {
        let text = read_config(path)?;
        let pins: PinsFile = parse_yaml(path, &text)?;
        let invalid = |key: &str, message: String| invalid_at(path, &text, key, message);
        if pins.schema != PINS_SCHEMA {
            return Err(invalid(
                "schema",
                format!(
                    "schema {} is not supported (this llama-orch reads schema {PINS_SCHEMA})",
                    pins.schema
                ),
            ));
        }
        if !pins.pins.contains_key(&pins.default) {
            return Err(invalid(
                "default",
                format!("default pin `{}` is not defined", pins.default),
            ));
        }
        for (name, pin) in &pins.pins {
            if !is_full_commit(&pin.commit) {
                return Err(invalid(
                    &format!("pins.{name}.commit"),
                    format!(
                        "pin `{name}`: commit `{}` must be a full 40-hex commit id",
                        pin.commit
                    ),
                ));
            }
            match &pin.source {
                SourceSpec::PypiSdist { sha256, .. } | SourceSpec::Archive { sha256, .. }
                    if !llorch_types::is_sha256_hex(sha256) =>
                {
                    return Err(invalid(
                        &format!("pins.{name}.source.sha256"),
                        format!("pin `{name}`: sha256 `{sha256}` must be 64 lowercase hex digits"),
                    ));
                }
                _ => {}
            }
        }
        Ok(pins)
    }
}

pub fn is_full_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}
