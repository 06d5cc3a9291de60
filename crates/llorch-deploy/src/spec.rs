//! `/opt/llorch/image.json`: what an image serves (its pools, the engine
//! and model each expects) and where every other file in it came from.
//! Written by [`crate::image::build`], read by `serve --in-image`.

use crate::image::SPEC_FILE;
use crate::DeployError;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const SPEC_SCHEMA: u32 = 1;

/// `/opt/llorch/image.json`: what the image serves and where its files came from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    pub schema: u32,
    pub pools: Vec<ImagePool>,
    /// Every file of the image but this one, with its origin and sha256.
    pub files: Vec<Explained>,
    pub compressor: String,
}

/// One pool the image can serve.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImagePool {
    pub id: String,
    /// The profile file, relative to [`IMAGE_ROOT`](crate::image::IMAGE_ROOT).
    pub profile: String,
    pub profile_sha256: String,
    pub fingerprint: String,
    pub pin: String,
    pub backend: String,
    /// The model the pool expects at `$LLORCH_MODEL`: its sha256, and the
    /// ref it was published under (for `model fetch` into a volume).
    pub model_sha256: String,
    pub model_ref: String,
    pub mode: String,
    pub slots: u32,
    pub replicas: u32,
    pub affinity: String,
    pub ctx_size: u32,
    pub threads: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Explained {
    pub path: String,
    pub origin: String,
    pub sha256: String,
}

impl ImageSpec {
    /// Read the spec an image carries (`$LLORCH_ROOT/image.json`).
    pub fn read(root: &Path) -> Result<ImageSpec, DeployError> {
        let p = root.join(SPEC_FILE);
        // A regular file of at most 1 MiB, as all configuration is read
        // (never a FIFO or an endless file).
        let text = llorch_profile::read_config(&p).map_err(|e| DeployError::Spec {
            path: p.display().to_string(),
            why: e.to_string(),
        })?;
        let s: ImageSpec = serde_json::from_str(&text).map_err(|e| DeployError::Spec {
            path: p.display().to_string(),
            why: e.to_string(),
        })?;
        if s.schema != SPEC_SCHEMA {
            return Err(DeployError::Spec {
                path: p.display().to_string(),
                why: format!("schema {} (this llorch reads {SPEC_SCHEMA})", s.schema),
            });
        }
        Ok(s)
    }

    /// The pool to serve: `wanted`, or the only one.
    pub fn pool(&self, wanted: Option<&str>) -> Result<&ImagePool, DeployError> {
        let ids = || {
            self.pools
                .iter()
                .map(|p| p.id.clone())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match wanted {
            Some(w) => {
                self.pools
                    .iter()
                    .find(|p| p.id == w)
                    .ok_or_else(|| DeployError::NoSuchPool {
                        pool: llorch_types::excerpt(w, 64),
                        pools: ids(),
                    })
            }
            None if self.pools.len() == 1 => Ok(&self.pools[0]),
            None => Err(DeployError::NoSuchPool {
                pool: "(none given: set LLORCH_POOL)".into(),
                pools: ids(),
            }),
        }
    }
}
