//! Pool ids and the run ids of their replicas: they become file names (run
//! files, logs, locks), so nothing but the checked form is accepted anywhere
//! they enter.

use crate::excerpt;
use serde::{Deserialize, Serialize};

/// A valid pool id: `[a-z0-9][a-z0-9_-]{0,63}`, or the run id of a pool's
/// replica `k` (1 to 64): that id plus `.r<k>` ([`PoolId::replica`]). Pool ids
/// become file names (run files, logs, locks), so nothing else is accepted
/// anywhere they enter; a pool a user declares never has the replica form
/// ([`PoolId::is_replica`]), so replica run files cannot collide with a pool's.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct PoolId(String);

#[derive(Debug, thiserror::Error)]
#[error("invalid pool id `{shown}`: a pool id is 1-64 characters of a-z, 0-9, '-' or '_', starting with a letter or digit (it names run files, logs and locks)")]
pub struct BadPoolId {
    pub shown: String,
}

impl PoolId {
    pub fn parse(s: &str) -> Result<PoolId, BadPoolId> {
        let base = match s.rsplit_once(".r") {
            Some((base, k))
                if !k.is_empty()
                    && k.len() <= 2
                    && !k.starts_with('0')
                    && k.bytes().all(|c| c.is_ascii_digit())
                    && k.parse::<usize>().is_ok_and(|k| k <= MAX_REPLICA) =>
            {
                base
            }
            _ => s,
        };
        let b = base.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 64
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_');
        if ok {
            Ok(PoolId(s.to_string()))
        } else {
            Err(BadPoolId {
                shown: excerpt(s, 40),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The run id of replica `k` of this pool: the pool's own id for replica
    /// 0 (so a one-replica pool keeps its run files), `<id>.r<k>` otherwise.
    pub fn replica(&self, k: usize) -> PoolId {
        assert!(k <= MAX_REPLICA, "replica index {k} out of range");
        if k == 0 {
            return self.clone();
        }
        PoolId(format!("{}.r{k}", self.base()))
    }

    /// Whether this is the run id of a replica above 0 (`<id>.r<k>`).
    pub fn is_replica(&self) -> bool {
        self.0.contains('.')
    }

    /// The pool this id belongs to (itself, unless it is a replica's run id).
    pub fn base(&self) -> &str {
        self.0.split('.').next().unwrap_or(&self.0)
    }
}

/// The highest replica index a run id may carry (64 replicas: 0 to 63).
pub const MAX_REPLICA: usize = 63;

impl std::fmt::Display for PoolId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for PoolId {
    type Err = BadPoolId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PoolId::parse(s)
    }
}

impl<'de> Deserialize<'de> for PoolId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PoolId::parse(&s).map_err(serde::de::Error::custom)
    }
}
