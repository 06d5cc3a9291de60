//! Resumable, verified downloads.
//!
//! Bytes stream into `cache/downloads/<key>.partial` while being hashed. After
//! a network failure the partial file stays and the next attempt asks for the
//! rest with `Range: bytes=N-`; only a `206` whose `Content-Range` starts at
//! N is accepted as a resume, anything else restarts from zero. Transient
//! errors (connection drops, 408/429/5xx) retry with backoff. A digest
//! mismatch deletes the partial (the bytes are wrong, resuming them would
//! not help). The caller renames the verified file into the store.

use crate::digest::HashingWriter;
use reqwest::header::{AUTHORIZATION, CONTENT_RANGE, RANGE};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const MAX_ATTEMPTS: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("{reference}: {url} answered 404 Not Found\n  hint: check the ref (organization, repository, revision and file name)")]
    NotFound { reference: String, url: String },
    #[error("{reference}: {url} answered {status}{hint}")]
    Http {
        reference: String,
        url: String,
        status: u16,
        hint: String,
    },
    #[error("{reference}: downloading {url} failed after {attempts} attempts: {last}\n  the partial file is kept; run the same command again to resume")]
    GaveUp {
        reference: String,
        url: String,
        attempts: u32,
        last: String,
    },
    #[error("sha256 mismatch for {reference}\n  url:      {url}\n  expected: {expected}\n  actual:   {actual}\n  the download was deleted; nothing was added to the store")]
    DigestMismatch {
        reference: String,
        url: String,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    Io(#[from] crate::IoError),
}

/// What a finished download produced.
#[derive(Debug)]
pub struct Downloaded {
    pub partial: PathBuf,
    pub digest: String,
    pub size: u64,
    /// Bytes transferred in this call (less than `size` after a resume).
    pub transferred: u64,
    pub resumed_from: u64,
}

#[derive(Clone, Debug, Default)]
pub struct DownloadOptions {
    pub bearer: Option<String>,
    pub expected_sha256: Option<String>,
    /// What this call may print: progress, warnings.
    pub report: crate::report::Reporter,
    /// A read that gets nothing for this long is a lost connection (retried
    /// with resume); default [`DEFAULT_STALL`].
    pub stall_timeout: Option<std::time::Duration>,
}

/// How long a download may receive nothing before it is retried.
pub const DEFAULT_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// Download `url` into `partial`, resuming what is there.
pub fn download(
    reference: &str,
    url: &str,
    partial: &Path,
    opts: &DownloadOptions,
) -> Result<Downloaded, DownloadError> {
    let client = crate::http::download_client(opts.stall_timeout.unwrap_or(DEFAULT_STALL));
    use crate::io;
    if let Some(p) = partial.parent() {
        fs_err::create_dir_all(p).map_err(io("create the download dir"))?;
    }
    let mut last = String::new();
    let mut transferred = 0u64;
    let mut first_resume: Option<u64> = None;
    let mut progress = Progress::new(reference, opts.report);
    for attempt in 0..MAX_ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(crate::http::backoff(attempt - 1));
        }
        let have = fs_err::metadata(partial).map(|m| m.len()).unwrap_or(0);
        let mut req = client.get(url);
        if let Some(t) = &opts.bearer {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        if have > 0 {
            req = req.header(RANGE, format!("bytes={have}-"));
        }
        let mut resp = match req.send() {
            Ok(r) => r,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        let status = resp.status().as_u16();
        let resuming = have > 0
            && status == 206
            && resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with(&format!("bytes {have}-")));
        if let Some(retry) = answer(status, have, reference, url, partial)? {
            last = retry;
            continue;
        }
        let Some(file) = open_partial(partial, resuming)? else {
            last = "the partial download was not a regular file (removed)".into();
            continue;
        };
        let mut w = HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, file));
        let start = if resuming {
            w.prime(partial)
                .map_err(io("re-read the partial download"))?;
            first_resume.get_or_insert(have);
            have
        } else {
            0
        };
        let total = resp.content_length().map(|n| n + start);
        progress.start(start, total);
        let mut buf = vec![0u8; 256 * 1024];
        let result: Result<(), String> = loop {
            match resp.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if let Err(e) = w.write_all(&buf[..n]) {
                        return Err(crate::IoError::new("write", e).into());
                    }
                    transferred += n as u64;
                    progress.advance(w.written);
                }
                Err(e) => break Err(e.to_string()),
            }
        };
        let size = w.written;
        let (bw, digest) = w.finish();
        let file = bw.into_inner().map_err(|e| {
            crate::IoError::new(format!("flush {}", partial.display()), e.into_error())
        })?;
        if let Err(e) = result {
            last = format!("connection lost after {size} bytes: {e}");
            continue;
        }
        if let Some(t) = total {
            if size != t {
                last = format!("short body: {size} of {t} bytes");
                continue;
            }
        }
        file.sync_all().map_err(io("sync the download"))?;
        progress.finish();
        if let Some(exp) = &opts.expected_sha256 {
            if exp != &digest {
                let _ = fs_err::remove_file(partial);
                return Err(DownloadError::DigestMismatch {
                    reference: reference.into(),
                    url: url.into(),
                    expected: exp.clone(),
                    actual: digest,
                });
            }
        }
        return Ok(Downloaded {
            partial: partial.to_path_buf(),
            digest,
            size,
            transferred,
            resumed_from: first_resume.unwrap_or(0),
        });
    }
    progress.finish();
    Err(DownloadError::GaveUp {
        reference: reference.into(),
        url: url.into(),
        attempts: MAX_ATTEMPTS,
        last,
    })
}

/// What an answer's status means: go on (`None`), try again (why), or give up.
fn answer(
    status: u16,
    have: u64,
    reference: &str,
    url: &str,
    partial: &Path,
) -> Result<Option<String>, DownloadError> {
    Ok(match status {
        200 | 206 => None,
        416 if have > 0 => {
            // The server has nothing past our end: our partial is not a prefix it knows.
            let _ = fs_err::remove_file(partial);
            Some("416 Range Not Satisfiable (restarting)".into())
        }
        404 => {
            return Err(DownloadError::NotFound {
                reference: reference.into(),
                url: url.into(),
            })
        }
        s if crate::http::is_transient_status(s) => Some(format!("HTTP {s}")),
        s => {
            let hint = if s == 401 || s == 403 {
                "\n  hint: the server refused access: the file may be private or gated (an hf: ref: set HF_TOKEN, a read token, and accept the model's terms)"
            } else {
                ""
            };
            return Err(DownloadError::Http {
                reference: reference.into(),
                url: url.into(),
                status: s,
                hint: hint.into(),
            });
        }
    })
}

/// The partial file, appended to when resuming, else truncated; never
/// written through a link: a partial that is one is removed (`None`: try
/// again), and the open refuses one that appears meanwhile.
fn open_partial(partial: &Path, resuming: bool) -> Result<Option<fs_err::File>, DownloadError> {
    use crate::io;
    use fs_err::os::unix::fs::OpenOptionsExt;
    if fs_err::symlink_metadata(partial).is_ok_and(|m| !m.file_type().is_file()) {
        fs_err::remove_file(partial).map_err(io("remove a partial download that is not a file"))?;
        return Ok(None);
    }
    let file = fs_err::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resuming)
        .truncate(!resuming)
        .custom_flags(libc::O_NOFOLLOW)
        .open(partial)
        .map_err(io("open the partial download"))?;
    Ok(Some(file))
}

/// A bar (bytes, rate, ETA) on a terminal; a line every 5 s otherwise; nothing when quiet.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    name: String,
    total: Option<u64>,
    last: Instant,
    started: Instant,
}

impl Progress {
    pub fn new(name: &str, report: crate::report::Reporter) -> Progress {
        let quiet = !report.shows_progress();
        let tty = std::io::stderr().is_terminal();
        Progress {
            bar: None,
            plain: !quiet && !tty,
            name: name.to_string(),
            total: None,
            last: Instant::now(),
            started: Instant::now(),
        }
        .with_bar(!quiet && tty)
    }

    fn with_bar(mut self, on: bool) -> Self {
        if on {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "  {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            b.set_message(self.name.clone());
            self.bar = Some(b);
        }
        self
    }

    pub fn start(&mut self, pos: u64, total: Option<u64>) {
        self.total = total;
        if let Some(b) = &self.bar {
            b.set_length(total.unwrap_or(0));
            b.set_position(pos);
        }
    }

    pub fn advance(&mut self, pos: u64) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
        } else if self.plain && self.last.elapsed().as_secs() >= 5 {
            self.last = Instant::now();
            let rate = pos as f64 / self.started.elapsed().as_secs_f64().max(1e-3) / 1e6;
            match self.total {
                Some(t) => crate::info!(
                    "  {}: {:.1}/{:.1} MB ({rate:.1} MB/s)",
                    self.name,
                    pos as f64 / 1e6,
                    t as f64 / 1e6
                ),
                None => crate::info!(
                    "  {}: {:.1} MB ({rate:.1} MB/s)",
                    self.name,
                    pos as f64 / 1e6
                ),
            }
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
