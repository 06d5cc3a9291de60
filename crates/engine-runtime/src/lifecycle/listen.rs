//! Where an engine listens: a free TCP port among the profile's candidates,
//! or its unix socket (`run/<pool>.d/engine.sock`), and how its URL and
//! `--host` are written.

use super::{io, EngineError};
use llorch_io::paths::Layout;
use llorch_types::PoolId;

pub(super) fn port_free(host: &str, port: u16) -> bool {
    std::net::TcpListener::bind((host, port)).is_ok()
}

pub(super) fn any_free_port(host: &str) -> Result<u16, EngineError> {
    let l = std::net::TcpListener::bind((host, 0)).map_err(io(format!("bind {host}:0")))?;
    Ok(l.local_addr().map_err(io("local addr"))?.port())
}

/// The most bytes of a unix socket path (`sun_path` holds 108 with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A pool's engine socket, `run/<pool>.d/engine.sock`: its directory made
/// afresh (private, never a symlink), no stale socket left in it.
pub(super) fn socket_path(
    layout: &Layout,
    pool: &PoolId,
) -> Result<std::path::PathBuf, EngineError> {
    let dir = layout.engine_socket_dir(pool);
    let sock = dir.join("engine.sock");
    let len = sock.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(EngineError::SocketPath {
            path: sock.display().to_string(),
            len,
            max: MAX_SOCKET_PATH,
        });
    }
    if fs_err::symlink_metadata(&dir).is_ok() {
        fs_err::remove_dir_all(&dir).map_err(io(format!("remove {}", dir.display())))?;
    }
    layout.ensure_private_dir(&dir)?;
    use std::os::unix::fs::PermissionsExt;
    fs_err::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(format!("chmod {}", dir.display())))?;
    Ok(sock)
}

/// The flags with `--host` set to `host` (a unix-socket engine's socket).
pub(super) fn with_host(flags: &[String], host: &str) -> Vec<String> {
    let mut out = flags.to_vec();
    match out.iter().position(|f| f == "--host") {
        Some(i) if i + 1 < out.len() => out[i + 1] = host.into(),
        _ => out.extend(["--host".into(), host.into()]),
    }
    out
}

pub(super) fn url_host(host: &str) -> String {
    match host {
        "0.0.0.0" => "127.0.0.1".into(),
        "::" => "[::1]".into(),
        h if h.contains(':') => format!("[{h}]"),
        h => h.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_replaces_the_host_flag_or_is_added() {
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            with_host(
                &f(&["--host", "127.0.0.1", "--parallel", "1"]),
                "/r/p.d/engine.sock"
            ),
            f(&["--host", "/r/p.d/engine.sock", "--parallel", "1"])
        );
        assert_eq!(
            with_host(&f(&["--parallel", "1"]), "/s.sock"),
            f(&["--parallel", "1", "--host", "/s.sock"])
        );
    }

    #[test]
    fn a_socket_path_over_the_limit_is_refused_with_the_fix_and_nothing_made() {
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("c".repeat(100));
        let layout = Layout::at(d.path().into(), cache.clone(), d.path().join("rt"));
        let e = socket_path(&layout, &PoolId::parse("pool").unwrap()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("at most 107") && msg.contains("LLORCH_CACHE_DIR"),
            "{msg}"
        );
        assert!(!cache.exists());
        let layout = Layout::at(d.path().into(), d.path().join("c"), d.path().join("rt"));
        let sock = socket_path(&layout, &PoolId::parse("pool").unwrap()).unwrap();
        assert!(sock.ends_with("run/pool.d/engine.sock") && !sock.exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs_err::metadata(sock.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
