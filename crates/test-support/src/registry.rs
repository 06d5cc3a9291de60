//! A real OCI registry for tests: the reference `distribution` server
//! (Debian's `docker-registry`, installed by `cargo xtask doctor --install
//! --test-servers`) on 127.0.0.1, with its own storage, optionally with
//! htpasswd auth; and a proxy in front of it that can cut blob downloads.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct TestRegistry {
    child: std::process::Child,
    pub dir: tempfile::TempDir,
    pub addr: String,
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl TestRegistry {
    /// Start a registry; with `user`, it requires that user (password `s3cret`).
    pub fn start(user: Option<&str>) -> TestRegistry {
        let bin = which("docker-registry").expect(
            "the OCI registry server `docker-registry` is not installed: run `cargo xtask doctor --install --test-servers` (CI does)",
        );
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let addr = format!("127.0.0.1:{port}");
            let mut cfg = format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n  secret: llorch-test\n",
                dir.path().join("data").display()
            );
            if let Some(u) = user {
                let out = llorch_io::cmd::Cmd::new("htpasswd")
                    .args(["-Bbn", u, "s3cret"])
                    .read()
                    .expect("htpasswd (apache2-utils) is installed by `doctor --install --test-servers`");
                fs_err::write(dir.path().join("htpasswd"), out).unwrap();
                cfg.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: llorch-test\n    path: {}\n",
                    dir.path().join("htpasswd").display()
                ));
            }
            fs_err::write(dir.path().join("config.yml"), cfg).unwrap();
            let log = fs_err::File::create(dir.path().join("registry.log")).unwrap();
            let child = llorch_io::cmd::Cmd::new(&bin)
                .arg("serve")
                .arg(dir.path().join("config.yml"))
                .spawn(
                    llorch_io::cmd::Io::File(log.try_clone().unwrap().into()),
                    llorch_io::cmd::Io::File(log.into()),
                )
                .unwrap();
            let mut reg = TestRegistry { child, dir, addr };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = reg.child.try_wait() {
                    break; // port taken between free_port and bind: try another
                }
                if TcpStream::connect(&reg.addr).is_ok() {
                    return reg;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = reg.child.kill();
        }
        panic!("the test registry did not start");
    }

    pub fn url(&self, repo: &str) -> String {
        format!("oci://{}/{repo}", self.addr)
    }

    /// The stored bytes of a blob (to tamper with).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// A proxy on 127.0.0.1 in front of a registry. Each request gets its own
/// upstream connection (`Connection: close`); the response to a blob `GET`
/// is cut after `cut_after` bytes while `cutting` is on; `dead` refuses
/// every connection (a registry that is gone).
pub struct CuttingProxy {
    pub addr: String,
    pub cut_after: Arc<AtomicUsize>,
    pub cutting: Arc<AtomicBool>,
    pub dead: Arc<AtomicBool>,
    /// Cut only blob GETs whose path contains this (a layer's digest).
    pub only: Arc<Mutex<Option<String>>>,
    /// After this many blob GETs the proxy goes dead.
    pub die_after_blob_gets: Arc<AtomicUsize>,
    /// The request heads seen, in order.
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl CuttingProxy {
    pub fn start(upstream: &str) -> CuttingProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let p = CuttingProxy {
            addr,
            cut_after: Arc::new(AtomicUsize::new(usize::MAX)),
            cutting: Arc::new(AtomicBool::new(false)),
            dead: Arc::new(AtomicBool::new(false)),
            die_after_blob_gets: Arc::new(AtomicUsize::new(usize::MAX)),
            only: Arc::new(Mutex::new(None)),
            requests: Arc::new(Mutex::new(Vec::new())),
        };
        let only = p.only.clone();
        let (cut, cutting, dead, reqs, up, die) = (
            p.cut_after.clone(),
            p.cutting.clone(),
            p.dead.clone(),
            p.requests.clone(),
            upstream.to_string(),
            p.die_after_blob_gets.clone(),
        );
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                if dead.load(Ordering::SeqCst) {
                    drop(c);
                    continue;
                }
                let only = only.lock().unwrap().clone();
                let (cut, cutting, reqs, up, dead2, die2) = (
                    cut.clone(),
                    cutting.clone(),
                    reqs.clone(),
                    up.clone(),
                    dead.clone(),
                    die.clone(),
                );
                std::thread::spawn(move || {
                    let _ = relay(c, &up, &cut, &cutting, &reqs, only.as_deref());
                    let gets = reqs
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|h| h.starts_with("GET") && h.contains("/blobs/"))
                        .count();
                    if gets >= die2.load(Ordering::SeqCst) {
                        // (Counted over every blob GET, the config's included.)
                        dead2.store(true, Ordering::SeqCst);
                    }
                });
            }
        });
        p
    }

    pub fn url(&self, repo: &str) -> String {
        format!("oci://{}/{repo}", self.addr)
    }

    pub fn blob_gets(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.starts_with("GET") && h.contains("/blobs/"))
            .cloned()
            .collect()
    }
}

fn relay(
    mut c: TcpStream,
    upstream: &str,
    cut: &AtomicUsize,
    cutting: &AtomicBool,
    reqs: &Mutex<Vec<String>>,
    only: Option<&str>,
) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if c.read(&mut b)? == 0 {
            return Ok(());
        }
        head.push(b[0]);
        if head.len() > 64 * 1024 {
            return Ok(());
        }
    }
    let text = String::from_utf8_lossy(&head).to_string();
    reqs.lock().unwrap().push(text.clone());
    let mut lines: Vec<&str> = text
        .trim_end()
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    lines.push("Connection: close");
    let body_len: usize = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut u = TcpStream::connect(upstream)?;
    u.write_all(format!("{}\r\n\r\n", lines.join("\r\n")).as_bytes())?;
    let mut body = vec![0u8; body_len];
    c.read_exact(&mut body)?;
    u.write_all(&body)?;
    let first = text.lines().next().unwrap_or("");
    let is_blob = text.starts_with("GET")
        && first.contains("/blobs/")
        && only.is_none_or(|d| first.contains(d));
    let limit = if is_blob && cutting.load(Ordering::SeqCst) {
        cut.load(Ordering::SeqCst)
    } else {
        usize::MAX
    };
    let mut sent = 0usize;
    let mut buf = [0u8; 8192];
    loop {
        let n = u.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let take = n.min(limit - sent);
        c.write_all(&buf[..take])?;
        sent += take;
        if sent >= limit {
            // The registry "dies" mid-response.
            let _ = c.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
    }
    Ok(())
}
