//! A stand-in for an exploited engine (tests only): started in the engine's
//! sandbox, it tries what an attacker would and prints one JSON line per
//! attempt, `{"who", "attempt", "allowed", "detail"}`. The sandbox test
//! fails if any attempt but binding its own port is allowed.
//!
//! Arguments: `--port P` (its own port) or `--unix PATH` (its own socket,
//! as an engine with `server.listen: unix`), `--connect C` (a listener outside),
//! `--secret FILE` (a file under the user's home), `--write-dir DIR` (outside
//! its reach), and `--child` when it re-executed itself (the restrictions
//! must survive exec); `--safe` (unconfined control runs) skips ptrace,
//! signals and the re-exec.
//!
//! `sandbox-probe run PROGRAM [ARGS…]` instead runs PROGRAM in the engine's
//! sandbox (`auto`, reading PROGRAM's directory's parent, as an engine's
//! build) and exits with its status: how a GPU program is checked under the
//! sandbox on a host without a Rust toolchain (`docs/gpu/sandbox_cuda.sh`).

use llorch_io::cmd::Cmd;
use std::io::Write;
use std::net::{TcpListener, TcpStream};

fn report(who: &str, attempt: &str, result: Result<String, std::io::Error>) {
    let (allowed, detail) = match result {
        Ok(d) => (true, d),
        Err(e) => (false, e.to_string()),
    };
    let line =
        serde_json::json!({"who": who, "attempt": attempt, "allowed": allowed, "detail": detail});
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn os(r: libc::c_long) -> Result<String, std::io::Error> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(format!("returned {r}"))
    }
}

fn arg(args: &[String], name: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| panic!("sandbox-probe: {name} is required"))
}

/// `run PROGRAM [ARGS…]`: PROGRAM in the engine sandbox; its exit status.
fn run_sandboxed(args: &[String]) -> ! {
    use engine_runtime::sandbox::{Diagnose, EngineAccess, Sandbox};
    let program = std::path::PathBuf::from(&args[0]);
    // Bisecting a failing program: LLORCH_SANDBOX_PROBE_WITHOUT (parts, by
    // commas: landlock, seccomp, nnp, net, scopes, ioctl, denylist, socket,
    // clone, clone3), LLORCH_SANDBOX_PROBE_READ / _WRITE (extra paths, by
    // colons), LLORCH_SANDBOX_PROBE_SECCOMP_LOG=1 (log, don't refuse).
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let paths = |k: &str| {
        env(k)
            .split(':')
            .filter(|p| !p.is_empty())
            .map(std::path::PathBuf::from)
            .collect::<Vec<_>>()
    };
    let diagnose = Diagnose {
        without: env("LLORCH_SANDBOX_PROBE_WITHOUT")
            .split(',')
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect(),
        read: paths("LLORCH_SANDBOX_PROBE_READ"),
        write: paths("LLORCH_SANDBOX_PROBE_WRITE"),
        log_only: env("LLORCH_SANDBOX_PROBE_SECCOMP_LOG") == "1",
    };
    let sandbox = Sandbox::build_diagnostic(
        llorch_profile::SandboxMode::Auto,
        &EngineAccess {
            binary: program.clone(),
            read_files: Vec::new(),
            listen: engine_runtime::sandbox::Listen::Tcp(1),
            mps_pipe: None,
            // A GPU program is what `run` is for (docs/gpu/sandbox_cuda.sh).
            gpu: true,
        },
        &diagnose,
    )
    .unwrap_or_else(|e| {
        eprintln!("sandbox-probe: {e}");
        std::process::exit(2)
    });
    eprintln!(
        "sandbox-probe: {} (diagnose: {diagnose:?})",
        sandbox.protections.summary()
    );
    let status = Cmd::new(&program)
        .args(&args[1..])
        .spawn_with(|c| sandbox.apply_to(c))
        .and_then(|mut c| c.wait())
        .unwrap_or_else(|e| {
            eprintln!("sandbox-probe: start {}: {e}", program.display());
            std::process::exit(2)
        });
    eprintln!("sandbox-probe: {} exited: {status}", program.display());
    std::process::exit(status.code().unwrap_or(1))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("run") && args.len() > 2 {
        run_sandboxed(&args[2..]);
    }
    let child = args.iter().any(|a| a == "--child");
    // Unconfined runs (the test's control) skip what would disturb the test process.
    let safe = args.iter().any(|a| a == "--safe");
    let who = if child { "child" } else { "engine" };
    let unix = args
        .iter()
        .position(|a| a == "--unix")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let connect = arg(&args, "--connect");
    let secret = arg(&args, "--secret");
    let write_dir = arg(&args, "--write-dir");

    // Allowed: its own port or socket (kept open while it tries the rest);
    // the re-executed copy's socket is a second name in the same directory.
    let own: Result<Box<dyn std::any::Any>, std::io::Error> = match &unix {
        Some(path) => {
            let path = if child {
                format!("{path}.child")
            } else {
                path.clone()
            };
            std::os::unix::net::UnixListener::bind(path).map(|l| Box::new(l) as _)
        }
        None => TcpListener::bind(format!("127.0.0.1:{}", arg(&args, "--port")))
            .map(|l| Box::new(l) as _),
    };
    report(
        who,
        if unix.is_some() {
            "bind_own_socket"
        } else {
            "bind_own_port"
        },
        own.as_ref()
            .map(|_| "bound".into())
            .map_err(|e| std::io::Error::new(e.kind(), e.to_string())),
    );
    // SAFETY: setuid with a constant argument.
    report(
        who,
        "setuid_root",
        os(unsafe { libc::setuid(0) } as libc::c_long),
    );
    network(who, &connect);
    report(
        who,
        "read_home_file",
        fs_err::read_to_string(&secret).map(|s| format!("read {} bytes", s.len())),
    );
    report(
        who,
        "write_outside",
        fs_err::write(format!("{write_dir}/escaped-{who}"), b"x").map(|_| "written".into()),
    );
    process(who, safe);
    report(
        who,
        "exec_shell",
        Cmd::new("/bin/sh")
            .args(["-c", "echo shell ran"])
            .output()
            .map(|(_, out, _)| out)
            .map_err(|e| std::io::Error::other(e.to_string())),
    );
    drop(own);
    if !child && !safe {
        // Its own binary may run (it is the engine): the copy is as confined.
        let me = std::env::current_exe().expect("current_exe");
        let status = Cmd::new(me).args(&args[1..]).arg("--child").status();
        report(
            who,
            "exec_self",
            status
                .map(|s| format!("ran, {s}"))
                .map_err(|e| std::io::Error::other(e.to_string())),
        );
    }
}

/// What an engine must not do on the network: bind another port, connect
/// out, make a TCP socket (on a unix socket), UDP or netlink sockets.
fn network(who: &str, connect: &str) {
    report(
        who,
        "bind_another_port",
        TcpListener::bind("127.0.0.1:0").map(|l| format!("bound {:?}", l.local_addr())),
    );
    report(
        who,
        "connect_out",
        TcpStream::connect(format!("127.0.0.1:{connect}")).map(|_| "connected".into()),
    );
    // SAFETY: socket with constant arguments; closed when it succeeds.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        report(who, "tcp_socket", os(fd as libc::c_long));
        if fd >= 0 {
            libc::close(fd);
        }
    }
    report(
        who,
        "udp_socket",
        std::net::UdpSocket::bind("127.0.0.1:0").map(|_| "bound".into()),
    );
    // SAFETY: plain system calls with constant arguments; fds are closed when they succeed.
    unsafe {
        let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0);
        report(who, "netlink_socket", os(fd as libc::c_long));
        if fd >= 0 {
            libc::close(fd);
        }
    }
}

/// What an engine must not do to other processes: trace or signal its
/// parent (not in `--safe` control runs), make a user namespace, set up
/// io_uring, rename its parent; what it may: name its own threads.
fn process(who: &str, safe: bool) {
    // SAFETY: ptrace/kill/unshare/io_uring_setup with constant or checked arguments.
    unsafe {
        let parent = libc::getppid();
        if !safe {
            report(
                who,
                "ptrace_parent",
                os(libc::ptrace(libc::PTRACE_ATTACH, parent, 0, 0) as libc::c_long),
            );
            report(
                who,
                "signal_parent",
                os(libc::kill(parent, libc::SIGWINCH) as libc::c_long),
            );
        }
        report(
            who,
            "unshare_user_namespace",
            os(libc::unshare(libc::CLONE_NEWUSER) as libc::c_long),
        );
        let mut params = [0u8; 120];
        let fd = libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr());
        report(who, "io_uring", os(fd));
    }
    // Allowed: naming its own threads (CUDA does, through /proc/self/task/<tid>/comm).
    {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid takes no arguments.
            let _ = tid_tx.send(unsafe { libc::gettid() });
            let _ = done_rx.recv();
        });
        let tid = tid_rx.recv().expect("the thread's id");
        report(
            who,
            "name_own_thread",
            fs_err::write(format!("/proc/self/task/{tid}/comm"), b"probe-worker")
                .map(|_| "named".into()),
        );
        let _ = done_tx.send(());
        let _ = t.join();
    }
    if !safe {
        // SAFETY: getppid takes no arguments.
        let parent = unsafe { libc::getppid() };
        report(
            who,
            "name_parent",
            fs_err::write(format!("/proc/{parent}/comm"), b"pwned").map(|_| "renamed".into()),
        );
    }
}
