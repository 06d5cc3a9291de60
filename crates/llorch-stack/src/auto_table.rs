//! The tune table: what `cargo xtask bench tune --write` measured for one
//! engine fingerprint, model digest, device and MPS state, read by
//! `slots: auto` / `replicas: auto` ([`crate::auto`]). Read like all
//! configuration (a regular file of at most 1 MiB) and trusted only when
//! its digest matches its contents, its key matches, and every value is in
//! range.

use crate::auto::{Device, MIN_FAIRNESS};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The tune table's schema.
pub const TABLE_SCHEMA: u32 = 2;

/// One measured configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneRow {
    pub slots: u32,
    pub replicas: u32,
    /// The engine flags measured besides the profile's (a
    /// [`crate::auto::VARIANTS`] entry's; empty: the profile's own).
    pub args: Vec<String>,
    pub clients: u32,
    pub tok_per_s: f64,
    pub ttft_ms_p99: f64,
    pub fairness: f64,
}

impl TuneRow {
    /// Measurements to three decimals (as a table keeps them).
    fn round(&mut self) {
        let r = |x: f64| (x * 1000.0).round() / 1000.0;
        self.tok_per_s = r(self.tok_per_s);
        self.ttft_ms_p99 = r(self.ttft_ms_p99);
        self.fairness = r(self.fairness);
    }
}

/// How much nearer the best a configuration with engine flags beyond the
/// profile's must be to be chosen over one without (a run's noise on one
/// machine is a few per cent).
pub const FLAG_MARGIN: f64 = 0.03;

/// The configuration [`TuneTable::pick`] chose, and what it measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Pick {
    pub slots: u32,
    pub replicas: u32,
    /// Engine flags besides the profile's.
    pub args: Vec<String>,
    /// Its worst share of the best fair tokens/s over the client counts.
    pub score: f64,
    /// Per client count (ascending): (clients, its tokens/s, the best fair tokens/s).
    pub at: Vec<(u32, f64, f64)>,
    /// Configurations fair at some count that were considered.
    pub candidates: usize,
}

impl Pick {
    /// `16 clients 3813 tok/s (0.95 of the best), 64 clients 9749 tok/s (1.00)`.
    pub fn describe(&self) -> String {
        self.at
            .iter()
            .map(|(n, t, b)| format!("{n} clients {t:.0} tok/s ({:.2} of the best)", t / b))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What `bench tune --write` recorded for one engine, model, device and
/// MPS state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneTable {
    pub schema: u32,
    pub fingerprint: String,
    pub model_digest: String,
    pub device: String,
    pub mps: bool,
    pub max_tokens: u32,
    pub rows: Vec<TuneRow>,
    /// sha256 of the table with this field empty: an edited or damaged
    /// table is ignored.
    pub digest: String,
}

impl TuneTable {
    pub fn new(
        fingerprint: &str,
        model_digest: &str,
        device: &Device,
        max_tokens: u32,
        rows: Vec<TuneRow>,
    ) -> TuneTable {
        let mut rows = rows;
        for r in &mut rows {
            r.round();
        }
        let mut t = TuneTable {
            schema: TABLE_SCHEMA,
            fingerprint: fingerprint.into(),
            model_digest: model_digest.into(),
            device: device.name.clone(),
            mps: device.mps,
            max_tokens,
            rows,
            digest: String::new(),
        };
        t.digest = t.computed_digest();
        t
    }

    fn computed_digest(&self) -> String {
        let mut t = self.clone();
        t.digest = String::new();
        // Over the values as written (three decimals): JSON's float parsing
        // may be a last bit off, which must not make a table "edited".
        for r in &mut t.rows {
            r.round();
        }
        let bytes = serde_json::to_vec(&t).expect("a table serializes");
        llorch_io::digest::sha256_bytes(&bytes)
    }

    /// The configuration (slots × engines × engine flags) to run among the
    /// rows `allowed` keeps (it fits the device, it agrees with what the
    /// profile fixed): at every client count measured, the best tokens/s of
    /// the fair rows (fairness at least [`MIN_FAIRNESS`]) sets the bar; a
    /// configuration scores the worst share of that bar it reached over all
    /// client counts, and one that was unfair or not measured at any count
    /// is no candidate. The highest score wins, one with flags beyond the
    /// profile's counting [`FLAG_MARGIN`] less; ties go to more tokens/s at
    /// the largest count, then fewer engines, then fewer flags. So one good
    /// at 64 clients but slow at 16 loses to one near the best at both.
    pub fn pick(&self, allowed: impl Fn(&TuneRow) -> bool) -> Option<Pick> {
        let rows: Vec<&TuneRow> = self
            .rows
            .iter()
            .filter(|r| allowed(r) && r.fairness >= MIN_FAIRNESS)
            .collect();
        let mut counts: Vec<u32> = self.rows.iter().map(|r| r.clients).collect();
        counts.sort_unstable();
        counts.dedup();
        let bar = |n: u32| {
            rows.iter()
                .filter(|r| r.clients == n)
                .map(|r| r.tok_per_s)
                .fold(0.0, f64::max)
        };
        let bars: Vec<(u32, f64)> = counts.iter().map(|&n| (n, bar(n))).collect();
        let mut configs: Vec<(u32, u32, &[String])> = rows
            .iter()
            .map(|r| (r.slots, r.replicas, r.args.as_slice()))
            .collect();
        configs.sort_unstable();
        configs.dedup();
        let candidates = configs.len();
        configs
            .into_iter()
            .filter_map(|(slots, replicas, args)| {
                let mut at = Vec::new();
                for &(n, best) in &bars {
                    let r = rows.iter().find(|r| {
                        (r.slots, r.replicas, r.clients) == (slots, replicas, n) && r.args == args
                    })?;
                    at.push((n, r.tok_per_s, best));
                }
                let score = at
                    .iter()
                    .map(|&(_, t, b)| t / b)
                    .fold(f64::INFINITY, f64::min);
                Some(Pick {
                    slots,
                    replicas,
                    args: args.to_vec(),
                    score,
                    at,
                    candidates,
                })
            })
            .max_by(|a, b| {
                let last = |p: &Pick| p.at.last().map_or(0.0, |x| x.1);
                // Flags beyond the profile's must earn their place.
                let worth = |p: &Pick| p.score - if p.args.is_empty() { 0.0 } else { FLAG_MARGIN };
                worth(a)
                    .total_cmp(&worth(b))
                    .then(last(a).total_cmp(&last(b)))
                    .then(b.replicas.cmp(&a.replicas))
                    .then(b.args.len().cmp(&a.args.len()))
            })
    }

    /// Why this table cannot be trusted for this key, if it cannot.
    fn refuse(&self, fingerprint: &str, model_digest: &str, device: &Device) -> Option<String> {
        if self.schema != TABLE_SCHEMA {
            return Some(format!("schema {} (expected {TABLE_SCHEMA})", self.schema));
        }
        if self.digest != self.computed_digest() {
            return Some("its digest does not match its contents (edited or damaged)".into());
        }
        if self.fingerprint != fingerprint
            || self.model_digest != model_digest
            || self.device != device.name
            || self.mps != device.mps
        {
            return Some("it was measured for another engine, model, device or MPS state".into());
        }
        let bad = self.rows.iter().find(|r| {
            !(1..=llorch_profile::concurrency::MAX_SLOTS).contains(&r.slots)
                || !(1..=llorch_profile::concurrency::MAX_REPLICAS).contains(&r.replicas)
                || r.clients == 0
                || !r.tok_per_s.is_finite()
                || r.tok_per_s <= 0.0
                || !r.fairness.is_finite()
                || !crate::auto::VARIANTS.iter().any(|(_, a)| r.args == *a)
        });
        bad.map(|r| format!("a row out of range: {r:?}"))
    }
}

/// Where tables are kept: `<cache>/tune-v1/`.
pub fn tune_dir(layout: &llorch_io::paths::Layout) -> PathBuf {
    layout.bucket(llorch_io::paths::Bucket::Tune)
}

/// A table's file in `dir`: `<fingerprint 16>-<model 16>-<device>[-mps].json`.
pub fn table_path(dir: &Path, fingerprint: &str, model_digest: &str, device: &Device) -> PathBuf {
    let short = |s: &str| s.chars().take(16).collect::<String>();
    let name = format!(
        "{}-{}-{}{}.json",
        short(fingerprint),
        short(model_digest),
        device.name,
        if device.mps { "-mps" } else { "" }
    );
    dir.join(name)
}

/// The table for this key, or None with a warning that says why it is not used.
pub fn read_table(
    path: &Path,
    fingerprint: &str,
    model_digest: &str,
    device: &Device,
) -> (Option<TuneTable>, Option<String>) {
    if !path.exists() {
        return (None, None);
    }
    // A regular file of at most 1 MiB, as all configuration is read.
    let text = match llorch_profile::read_config(path) {
        Ok(t) => t,
        Err(e) => return (None, Some(format!("tune table: {e}; ignored"))),
    };
    let t: TuneTable = match serde_json::from_str(&text) {
        Ok(t) => t,
        Err(e) => {
            return (
                None,
                Some(format!(
                    "tune table {} is not a table ({e}); ignored",
                    path.display()
                )),
            )
        }
    };
    match t.refuse(fingerprint, model_digest, device) {
        Some(why) => (
            None,
            Some(format!("tune table {}: {why}; ignored", path.display())),
        ),
        None => (Some(t), None),
    }
}

/// Write a table atomically.
pub fn write_table(path: &Path, t: &TuneTable) -> Result<(), std::io::Error> {
    if let Some(dir) = path.parent() {
        fs_err::create_dir_all(dir)?;
    }
    let bytes = serde_json::to_vec_pretty(t).expect("a table serializes");
    llorch_io::fsx::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auto::tests::{gpu, table};

    #[test]
    fn a_tampered_foreign_or_unreadable_table_is_ignored_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (fp, md) = ("f".repeat(64), "m".repeat(64));
        let dev = gpu(0);
        let p = dir.path().join("t.json");
        assert_eq!(read_table(&p, &fp, &md, &dev), (None, None));
        let good = table(&[(16, 4, 10_500.0, 0.95)]);
        // Measured values as bench tune records them survive the round trip.
        let measured = table(&[(16, 4, 10_649.690_366_882_64, 0.992_526_890_405_228_5)]);
        let mut m2 = measured.clone();
        m2.rows[0].ttft_ms_p99 = 90.371_483_000_000_01;
        let m2 = TuneTable::new(
            &m2.fingerprint,
            &m2.model_digest,
            &dev,
            m2.max_tokens,
            m2.rows,
        );
        for t in [&measured, &m2] {
            write_table(&p, t).unwrap();
            assert_eq!(read_table(&p, &fp, &md, &dev), (Some(t.clone()), None));
        }
        write_table(&p, &good).unwrap();
        assert_eq!(read_table(&p, &fp, &md, &dev).0, Some(good.clone()));
        let mut edited = good.clone();
        edited.rows[0].tok_per_s = 1e9;
        write_table(&p, &edited).unwrap();
        let (t, w) = read_table(&p, &fp, &md, &dev);
        assert!(t.is_none() && w.unwrap().contains("digest"));
        let mut bad = good.clone();
        bad.rows[0].slots = 0;
        bad.digest = bad.computed_digest();
        write_table(&p, &bad).unwrap();
        assert!(read_table(&p, &fp, &md, &dev)
            .1
            .unwrap()
            .contains("out of range"));
        write_table(&p, &good).unwrap();
        let other = Device {
            mps: false,
            ..dev.clone()
        };
        assert!(read_table(&p, &fp, &md, &other)
            .1
            .unwrap()
            .contains("another"));
        fs_err::write(&p, b"{not json").unwrap();
        assert!(read_table(&p, &fp, &md, &dev)
            .1
            .unwrap()
            .contains("not a table"));
        fs_err::write(&p, vec![b' '; 2 * 1024 * 1024]).unwrap();
        assert!(read_table(&p, &fp, &md, &dev).0.is_none());
    }
}
