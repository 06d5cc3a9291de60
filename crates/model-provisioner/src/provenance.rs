//! One JSON line per fetch or verification in `.runtime/provenance/models.jsonl`.

use serde::Serialize;
use std::io::Write;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct Record<'a> {
    pub time: String,
    pub event: &'a str,
    #[serde(rename = "ref")]
    pub reference: &'a str,
    pub resolved_url: Option<&'a str>,
    pub revision: Option<&'a str>,
    pub digest: &'a str,
    pub size_bytes: u64,
    pub verified: bool,
    pub duration_ms: u64,
}

/// Append a record; O_APPEND writes of one line are atomic for concurrent writers.
pub fn append(runtime: &Path, rec: &Record) -> std::io::Result<()> {
    let dir = runtime.join("provenance");
    fs_err::create_dir_all(&dir)?;
    let mut line = serde_json::to_string(rec).map_err(std::io::Error::other)?;
    line.push('\n');
    let mut f = fs_err::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("models.jsonl"))?;
    f.write_all(line.as_bytes())
}
