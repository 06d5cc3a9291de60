//! Evicting models: least recently used first, never a blob an engine
//! holds (`locks/blob-<digest>.lock`). Split out of `store`.

use crate::error::ModelError;
use crate::store::{io, ModelStore};
use llorch_io::fsx::FileLock;
use serde::Serialize;
use std::collections::BTreeMap;

impl ModelStore {
    /// Evict least-recently-used blobs until the store fits `max_bytes`,
    /// never one in use: a blob is deleted only while this holds
    /// `locks/blob-<digest>.lock` exclusively, and every engine process holds
    /// it shared for as long as it lives (the kernel drops the lock when the
    /// process dies, so a crashed engine never pins a blob).
    pub fn gc(&self, max_bytes: u64) -> Result<GcReport, ModelError> {
        let refs = self.read_refs()?;
        // One blob may have several refs: its last use is the latest of them.
        let mut blobs: BTreeMap<String, BlobUse> = BTreeMap::new();
        for (r, e) in &refs.refs {
            if e.in_place.is_some() {
                continue;
            }
            let b = blobs
                .entry(e.digest.clone())
                .or_insert((0, e.size_bytes, Vec::new()));
            b.0 = b.0.max(e.last_use);
            b.2.push(r.clone());
        }
        let mut total: u64 = blobs.values().map(|b| b.1).sum();
        let mut order: Vec<(String, BlobUse)> = blobs.into_iter().collect();
        order.sort_by_key(|(_, b)| b.0);
        let mut report = GcReport {
            before_bytes: total,
            ..Default::default()
        };
        for (digest, (_, size, rs)) in order {
            if total <= max_bytes {
                break;
            }
            let lock = self.layout.blob_lock(&digest);
            let Some(_lease) = FileLock::try_exclusive(&lock).map_err(io("lock blob for gc"))?
            else {
                report.kept_in_use.push(digest);
                continue;
            };
            let _ = fs_err::remove_file(self.blob(&digest));
            self.update_refs(|r| {
                for x in &rs {
                    r.refs.remove(x);
                }
            })?;
            total -= size;
            report.evicted.push(digest);
        }
        report.after_bytes = total;
        Ok(report)
    }
}

/// (last use, size, refs) of one blob.
type BlobUse = (u64, u64, Vec<String>);

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub before_bytes: u64,
    pub after_bytes: u64,
    pub evicted: Vec<String>,
    pub kept_in_use: Vec<String>,
}
