//! Stop signals: SIGINT, SIGTERM and SIGHUP all mean "drain and stop" for
//! the long-running commands (`serve`, `engine up --foreground`,
//! `orchestratord`).

/// SIGINT, SIGTERM and SIGHUP, caught from the moment [`StopSignals::install`]
/// returns: install before telling anyone you are ready, so a signal sent
/// right after is never met by the default action.
pub struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Install the handlers (inside a tokio runtime).
    pub fn install() -> StopSignals {
        use tokio::signal::unix::{signal, SignalKind};
        StopSignals {
            int: signal(SignalKind::interrupt()).expect("install SIGINT handler"),
            term: signal(SignalKind::terminate()).expect("install SIGTERM handler"),
            hup: signal(SignalKind::hangup()).expect("install SIGHUP handler"),
        }
    }

    /// Wait for one of them; returns its name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// For blocking code: a runtime with the stop handlers already installed;
/// [`BlockingStop::wait`] blocks until one of the signals comes.
pub struct BlockingStop {
    rt: tokio::runtime::Runtime,
    signals: StopSignals,
}

impl BlockingStop {
    pub fn install() -> BlockingStop {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
        let signals = {
            let _g = rt.enter();
            StopSignals::install()
        };
        BlockingStop { rt, signals }
    }

    pub fn wait(mut self) -> &'static str {
        self.rt.block_on(self.signals.recv())
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
