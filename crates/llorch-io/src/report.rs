//! The one way library code talks to the person running it: progress
//! ([`info`]), warnings ([`warn`]) and detail ([`detail`]), all on stderr,
//! filtered by one process-wide [`Level`] that the CLI sets from its global
//! `--quiet` / `--verbose` (stdout stays for results: a `--json` document,
//! a path). Libraries never print any other way (`xtask/tests/tidy.rs`).
//!
//! Long work (a build, a fetch, a provision, a stack, an image) is handed a
//! [`Reporter`] in its options: the process's level, or quieter for that one
//! call (a `--json` command, a bench, a test), never louder. Its progress
//! bars ask it whether to draw.

use std::fmt::Display;
use std::sync::atomic::{AtomicU8, Ordering};

/// How much the person running llama-orch wants to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Nothing but errors (which the CLI prints when it fails).
    Quiet = 0,
    /// Progress and warnings (the default).
    Normal = 1,
    /// Also every external command line and other detail.
    Verbose = 2,
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Normal as u8);

/// Set the level for the rest of the process (the CLI, once, at start).
pub fn set(level: Level) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}

/// The level now; `LLORCH_VERBOSE` set in the environment counts as `--verbose`.
pub fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        0 => Level::Quiet,
        _ if std::env::var_os("LLORCH_VERBOSE").is_some() => Level::Verbose,
        1 => Level::Normal,
        _ => Level::Verbose,
    }
}

/// A progress line (`building …`, `downloading …`): shown unless `--quiet`.
pub fn info(msg: impl Display) {
    if level() >= Level::Normal {
        eprintln!("{msg}");
    }
}

/// A warning (the message says `warning:` itself where it reads better):
/// shown unless `--quiet`.
pub fn warn(msg: impl Display) {
    if level() >= Level::Normal {
        eprintln!("{msg}");
    }
}

/// Detail (an external command line): shown with `--verbose` only.
pub fn detail(msg: impl Display) {
    if level() >= Level::Verbose {
        eprintln!("{msg}");
    }
}

/// [`info`] with `format!` arguments: `llorch_io::info!("building {x}")`.
#[macro_export]
macro_rules! info {
    ($($t:tt)*) => { $crate::report::info(format_args!($($t)*)) };
}

/// [`warn`] with `format!` arguments.
#[macro_export]
macro_rules! warn {
    ($($t:tt)*) => { $crate::report::warn(format_args!($($t)*)) };
}

/// What one call may print: the process's level ([`Reporter::PROCESS`],
/// the default), or nothing but errors ([`Reporter::QUIET`]: a `--json`
/// command keeps stderr clean, a bench or a test its output).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reporter {
    quiet: bool,
}

impl Reporter {
    /// The process's level (`--quiet`, `--verbose`, `LLORCH_VERBOSE`).
    pub const PROCESS: Reporter = Reporter { quiet: false };
    /// Errors only, whatever the process's level.
    pub const QUIET: Reporter = Reporter { quiet: true };

    /// [`Reporter::QUIET`] when `quiet` (a command's `--json`), else the process's.
    pub fn quiet_if(quiet: bool) -> Reporter {
        Reporter { quiet }
    }

    /// The level this reporter prints at.
    pub fn level(self) -> Level {
        if self.quiet {
            Level::Quiet
        } else {
            level()
        }
    }

    /// Whether progress (lines, bars) is shown.
    pub fn shows_progress(self) -> bool {
        self.level() >= Level::Normal
    }

    /// A progress line, unless quiet.
    pub fn info(self, msg: impl Display) {
        if self.shows_progress() {
            eprintln!("{msg}");
        }
    }

    /// A warning, unless quiet.
    pub fn warn(self, msg: impl Display) {
        if self.shows_progress() {
            eprintln!("{msg}");
        }
    }

    /// Detail, with `--verbose` only.
    pub fn detail(self, msg: impl Display) {
        if self.level() >= Level::Verbose {
            eprintln!("{msg}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_level_orders_what_is_shown() {
        assert!(Level::Quiet < Level::Normal && Level::Normal < Level::Verbose);
        set(Level::Quiet);
        assert_eq!(level(), Level::Quiet);
        // A reporter is never louder than the process.
        assert!(!Reporter::PROCESS.shows_progress());
        set(Level::Normal);
        assert!(Reporter::PROCESS.shows_progress());
        assert!(!Reporter::QUIET.shows_progress());
        assert_eq!(Reporter::quiet_if(true), Reporter::QUIET);
        assert_eq!(Reporter::quiet_if(false), Reporter::default());
    }
}
