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
