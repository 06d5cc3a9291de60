//! A git pin over https, for real: a smart-HTTP git server (`git
//! http-backend` behind Python's TLS server) on 127.0.0.1 with a throwaway
//! CA. An untrusted certificate is refused; trusted through `SSL_CERT_FILE`,
//! the pinned commit is fetched and checked out, and a pin whose commit the
//! server does not have is refused.
//!
//! One test in this file: it sets `SSL_CERT_FILE` for the whole process.

use engine_provisioner::source::{self, SourceError};
use llorch_io::cmd::Cmd;
use llorch_io::paths::Layout;
use llorch_profile::{Pin, SourceSpec};
use std::path::Path;

const SERVER: &str = r#"
import http.server, os, ssl, subprocess, sys
root, cert, key, portfile = sys.argv[1:5]

class H(http.server.BaseHTTPRequestHandler):
    def cgi(self, body=b""):
        path, _, query = self.path.partition("?")
        env = dict(os.environ, GIT_PROJECT_ROOT=root, GIT_HTTP_EXPORT_ALL="1",
                   REQUEST_METHOD=self.command, PATH_INFO=path, QUERY_STRING=query,
                   CONTENT_TYPE=self.headers.get("Content-Type", ""),
                   CONTENT_LENGTH=str(len(body)), REMOTE_ADDR="127.0.0.1")
        out = subprocess.run(["git", "http-backend"], input=body, env=env,
                             capture_output=True).stdout
        sep = b"\r\n\r\n" if b"\r\n\r\n" in out else b"\n\n"
        head, _, payload = out.partition(sep)
        status, headers = 200, []
        for line in head.decode().splitlines():
            k, _, v = line.partition(":")
            if k.lower() == "status":
                status = int(v.split()[0])
            elif k:
                headers.append((k, v.strip()))
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        self.cgi()

    def do_POST(self):
        self.cgi(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

    def log_message(self, *a):
        pass

srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
with open(portfile + ".tmp", "w") as f:
    f.write(str(srv.server_address[1]))
os.rename(portfile + ".tmp", portfile)
srv.serve_forever()
"#;

fn openssl(dir: &Path, args: &[&str]) {
    Cmd::new("openssl")
        .args(args)
        .dir(dir)
        .read()
        .unwrap_or_else(|e| panic!("openssl {args:?}: {e}"));
}

/// A throwaway CA and a certificate for 127.0.0.1 signed by it.
fn certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=llorch test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    fs_err::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ],
    );
}

/// A bare repository `repo.git` under `root` with one commit; returns its
/// id and its branch name.
fn repository(root: &Path) -> (String, String) {
    let work = root.join("work");
    let repo = git2::Repository::init(&work).unwrap();
    fs_err::write(work.join("CMakeLists.txt"), "project(fake C)\n").unwrap();
    let mut idx = repo.index().unwrap();
    idx.add_path(Path::new("CMakeLists.txt")).unwrap();
    let tree = repo.find_tree(idx.write_tree().unwrap()).unwrap();
    let sig = git2::Signature::now("t", "t@example.invalid").unwrap();
    let id = repo
        .commit(Some("HEAD"), &sig, &sig, "one", &tree, &[])
        .unwrap();
    let branch = repo.head().unwrap().shorthand().unwrap().to_string();
    git2::build::RepoBuilder::new()
        .bare(true)
        .clone(work.to_str().unwrap(), &root.join("srv/repo.git"))
        .unwrap();
    (id.to_string(), branch)
}

struct Server(std::process::Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_git_pin_over_https_is_fetched_verified_and_refused_when_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    certificates(d);
    let (commit, branch) = repository(d);
    fs_err::write(d.join("server.py"), SERVER).unwrap();
    let portfile = d.join("port");
    let _srv = Server(
        Cmd::new("python3")
            .arg(d.join("server.py"))
            .arg(d.join("srv"))
            .arg(d.join("srv.pem"))
            .arg(d.join("srv.key"))
            .arg(&portfile)
            .spawn(llorch_io::cmd::Io::Inherit, llorch_io::cmd::Io::Inherit)
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let port = loop {
        if let Ok(p) = fs_err::read_to_string(&portfile) {
            break p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the test server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let url = format!("https://127.0.0.1:{port}/repo.git");
    let pin = |commit: &str, rev: Option<&str>| Pin {
        commit: commit.into(),
        source: SourceSpec::Git {
            url: url.clone(),
            rev: rev.map(str::to_string),
            submodules: false,
        },
        description: None,
        bundle_trees: Default::default(),
    };
    let layout = |name: &str| {
        let r = d.join(name);
        Layout::at(r.clone(), r.join("cache"), r.join("rt"))
    };

    // The throwaway CA is not trusted yet: TLS verification refuses the server.
    let err = source::fetch(&pin(&commit, None), &layout("untrusted"), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // SAFETY: the only test in this binary; nothing else reads the environment now.
    unsafe { std::env::set_var("SSL_CERT_FILE", d.join("ca.pem")) };
    let tree = source::fetch(&pin(&commit, Some(&branch)), &layout("ok"), &|_| {}).unwrap();
    assert_eq!(
        fs_err::read_to_string(tree.join("CMakeLists.txt")).unwrap(),
        "project(fake C)\n"
    );
    let head = git2::Repository::open(&tree)
        .unwrap()
        .head()
        .unwrap()
        .target()
        .unwrap();
    assert_eq!(head.to_string(), commit);

    // A pin whose commit the server does not have.
    let other = "0123456789abcdef0123456789abcdef01234567";
    let err = source::fetch(&pin(other, None), &layout("wrong"), &|_| {}).unwrap_err();
    assert!(matches!(err, SourceError::UnknownCommit { .. }), "{err}");
}
