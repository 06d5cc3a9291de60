//! Stop signals: SIGINT, SIGTERM and SIGHUP all mean "drain and stop" for
//! the long-running commands (`serve`, `engine up --foreground`,
//! `orchestratord`).

/// Wait for SIGINT, SIGTERM or SIGHUP; returns its name.
pub async fn wait_for_stop() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut hup = signal(SignalKind::hangup()).expect("install SIGHUP handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
}

/// Undo an inherited "ignore SIGINT": a non-interactive shell starts
/// background jobs (`cmd &`) with SIGINT ignored, and an ignored signal stays
/// ignored across `exec`, so `kill -INT` would not stop a long build or fetch.
/// After this, SIGINT stops the command at any phase, as SIGTERM does (every
/// cache write is a rename after verification, so nothing is left
/// half-written); the serving phase installs its own drain handler.
/// SIGHUP is left alone (`nohup` ignores it on purpose).
pub fn unignore_interrupt() {
    // SAFETY: sigaction/signal on SIGINT with a null or zeroed struct, before any thread installs handlers.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGINT, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
        {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
        }
    }
}

/// Block (outside any async runtime) until SIGINT, SIGTERM or SIGHUP; returns its name.
pub fn block_until_stop() -> &'static str {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
        .block_on(wait_for_stop())
}
