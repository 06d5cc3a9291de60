//! A hub-style HTTP server on 127.0.0.1 with fault injection (dropped,
//! stalled and refused transfers, ignored ranges), counting what it was asked.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
pub struct Faults {
    /// Close the connection after this many body bytes, on the first GET only.
    pub drop_first_after: Option<usize>,
    /// Answer 200 with the whole body even when a Range is asked.
    pub ignore_range: bool,
    /// Answer 503 to this many GETs first.
    pub fail_first: u32,
    /// Sleep before answering a GET (to overlap concurrent fetches).
    pub delay_ms: u64,
    /// Advertise this sha256 as X-Linked-Etag.
    pub linked_etag: Option<String>,
    /// On the first GET, send this many body bytes, then nothing (the
    /// connection stays open for a minute).
    pub stall_first_after: Option<usize>,
}

#[derive(Default)]
pub struct Counters {
    pub gets: u32,
    pub heads: u32,
    pub body_bytes: u64,
    pub ranges: Vec<String>,
}

pub struct Server {
    pub addr: String,
    pub counters: Arc<Mutex<Counters>>,
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// Serve `body` at every path except those containing "missing" (404).
pub fn serve(body: Vec<u8>, faults: Faults) -> Server {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let counters = Arc::new(Mutex::new(Counters::default()));
    let c2 = counters.clone();
    let faults = Arc::new(Mutex::new(faults));
    let body = Arc::new(body);
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let (c, f, b) = (c2.clone(), faults.clone(), body.clone());
            std::thread::spawn(move || {
                let _ = handle(s, &b, &c, &f);
            });
        }
    });
    Server { addr, counters }
}

fn handle(
    mut s: TcpStream,
    body: &[u8],
    c: &Mutex<Counters>,
    f: &Mutex<Faults>,
) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(s.try_clone()?);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut range: Option<u64> = None;
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            if h.trim().is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("range: bytes=") {
                range = v.trim().trim_end_matches('-').parse().ok();
                c.lock().unwrap().ranges.push(v.trim().to_string());
            }
        }
        let sha = llorch_io::digest::sha256_bytes(body);
        let etag = f.lock().unwrap().linked_etag.clone().unwrap_or(sha);
        let common = format!("X-Repo-Commit: 0123456789abcdef0123456789abcdef01234567\r\nX-Linked-Etag: \"{etag}\"\r\nAccept-Ranges: bytes\r\n");
        if path.contains("missing") {
            s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
            continue;
        }
        if method == "HEAD" {
            c.lock().unwrap().heads += 1;
            write!(
                s,
                "HTTP/1.1 200 OK\r\n{common}Content-Length: {}\r\n\r\n",
                body.len()
            )?;
            continue;
        }
        let (n_get, delay, fail_first, drop_after, ignore_range) = {
            let mut cc = c.lock().unwrap();
            cc.gets += 1;
            let ff = f.lock().unwrap();
            (
                cc.gets,
                ff.delay_ms,
                ff.fail_first,
                ff.drop_first_after,
                ff.ignore_range,
            )
        };
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        if n_get <= fail_first {
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")?;
            continue;
        }
        let start = match range {
            Some(st) if !ignore_range && (st as usize) < body.len() => st as usize,
            _ => 0,
        };
        let part = &body[start..];
        if start > 0 {
            write!(
                s,
                "HTTP/1.1 206 Partial Content\r\n{common}Content-Range: bytes {start}-{}/{}\r\nContent-Length: {}\r\n\r\n",
                body.len() - 1,
                body.len(),
                part.len()
            )?;
        } else {
            write!(
                s,
                "HTTP/1.1 200 OK\r\n{common}Content-Length: {}\r\n\r\n",
                part.len()
            )?;
        }
        let stall = f.lock().unwrap().stall_first_after;
        if let (Some(n), true) = (stall, n_get == fail_first + 1) {
            let n = n.min(part.len());
            s.write_all(&part[..n])?;
            s.flush()?;
            c.lock().unwrap().body_bytes += n as u64;
            std::thread::sleep(Duration::from_secs(60));
            return Ok(());
        }
        let limit = if n_get == fail_first + 1 {
            drop_after
        } else {
            None
        };
        let send = limit.map(|l| l.min(part.len())).unwrap_or(part.len());
        s.write_all(&part[..send])?;
        c.lock().unwrap().body_bytes += send as u64;
        if send < part.len() {
            s.flush()?;
            let _ = s.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
    }
}
