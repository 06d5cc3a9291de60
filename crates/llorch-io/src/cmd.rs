//! The process door: every external command (cmake, ninja, pip, git tools,
//! package managers, the engine's `--version`) goes through [`Cmd`].
//!
//! A command knows its program, arguments, working directory and the
//! environment changes scoped to it. Running it writes the command line to
//! stderr when `LLORCH_VERBOSE` is set, and, for logged runs, as the first
//! line of the log file. A failure names the command, its exit status, the
//! log path and the last 40 lines of output.

use std::ffi::OsString;
use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// A failed process run.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("could not start `{cmd}`: {source}\n  hint: is `{program}` installed and on PATH?")]
    Spawn {
        cmd: String,
        program: String,
        source: std::io::Error,
    },
    #[error(
        "`{cmd}` failed ({status})\n--- last lines of {log} ---\n{tail}\n--- full log: {log} ---"
    )]
    Failed {
        cmd: String,
        status: String,
        log: String,
        tail: String,
    },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    FailedCaptured {
        cmd: String,
        status: String,
        stderr: String,
    },
}

/// A command to run: program, args, directory, scoped environment.
#[derive(Clone, Debug)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    dir: Option<PathBuf>,
    env: Vec<(OsString, Option<OsString>)>,
}

impl Cmd {
    pub fn new(program: impl Into<OsString>) -> Self {
        Cmd {
            program: program.into(),
            args: Vec::new(),
            dir: None,
            env: Vec::new(),
        }
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I, S>(mut self, it: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(it.into_iter().map(Into::into));
        self
    }

    pub fn dir(mut self, d: impl AsRef<Path>) -> Self {
        self.dir = Some(d.as_ref().to_path_buf());
        self
    }

    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Self {
        self.env.push((k.into(), Some(v.into())));
        self
    }

    pub fn env_remove(mut self, k: impl Into<OsString>) -> Self {
        self.env.push((k.into(), None));
        self
    }

    pub fn program(&self) -> String {
        self.program.to_string_lossy().into_owned()
    }

    fn expr(&self) -> duct::Expression {
        let mut e = duct::cmd(&self.program, &self.args);
        if let Some(d) = &self.dir {
            e = e.dir(d);
        }
        // duct lets the innermost (first applied) setting win; the last call
        // to `env`/`env_remove` must win, as with std's Command: apply in reverse.
        for (k, v) in self.env.iter().rev() {
            e = match v {
                Some(v) => e.env(k, v),
                None => e.env_remove(k),
            };
        }
        e
    }

    fn announce(&self) {
        crate::report::detail(format_args!("$ {self}"));
    }

    fn spawn_err(&self, source: std::io::Error) -> CmdError {
        CmdError::Spawn {
            cmd: self.to_string(),
            program: self.program(),
            source,
        }
    }

    /// Run to the end with stdout and stderr captured; status unchecked.
    fn captured(&self) -> Result<std::process::Output, CmdError> {
        self.announce();
        self.expr()
            .stdout_capture()
            .stderr_capture()
            .unchecked()
            .run()
            .map_err(|e| self.spawn_err(e))
    }

    /// Run, capture stdout (trimmed); stderr is captured and shown on failure.
    pub fn read(&self) -> Result<String, CmdError> {
        let out = self.captured()?;
        if !out.status.success() {
            return Err(CmdError::FailedCaptured {
                cmd: self.to_string(),
                status: out.status.to_string(),
                stderr: last_lines(&String::from_utf8_lossy(&out.stderr), 20),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Run, capture stdout and stderr apart; the exit status is not checked
    /// (tests that read both streams of a command that should fail).
    pub fn output(&self) -> Result<(bool, String, String), CmdError> {
        let out = self.captured()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Run with this process's stdin, stdout and stderr, to its end; the
    /// exit status is returned, not checked (a nested command the user
    /// watches: the haiku proof).
    pub fn status(&self) -> Result<std::process::ExitStatus, CmdError> {
        self.announce();
        self.expr()
            .unchecked()
            .run()
            .map(|o| o.status)
            .map_err(|e| self.spawn_err(e))
    }

    /// Run, capture stdout and stderr together (for `--version` style probes
    /// that print to either stream); the exit status is not checked.
    pub fn read_any(&self) -> Result<(bool, String), CmdError> {
        self.announce();
        let out = self
            .expr()
            .stderr_to_stdout()
            .stdout_capture()
            .unchecked()
            .run()
            .map_err(|e| self.spawn_err(e))?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ))
    }

    /// Run with stdout and stderr appended to `log`; each output line is also
    /// handed to `on_line` (for progress). Fails with the log tail.
    pub fn run_logged(&self, log: &Path, mut on_line: impl FnMut(&str)) -> Result<(), CmdError> {
        self.announce();
        let mut file = fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| self.spawn_err(e))?;
        let _ = writeln!(file, "$ {self}");
        let reader = self
            .expr()
            .stderr_to_stdout()
            .unchecked()
            .reader()
            .map_err(|e| self.spawn_err(e))?;
        let mut buf = BufReader::new(reader);
        let mut line = Vec::new();
        loop {
            line.clear();
            match buf.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => {
                    let _ = file.write_all(&line);
                    on_line(String::from_utf8_lossy(&line).trim_end());
                }
                Err(e) => return Err(self.spawn_err(e)),
            }
        }
        let status = buf
            .into_inner()
            .try_wait()
            .map_err(|e| self.spawn_err(e))?
            .map(|o| o.status);
        match status {
            Some(s) if s.success() => Ok(()),
            other => {
                let _ = file.flush();
                Err(CmdError::Failed {
                    cmd: self.to_string(),
                    status: other
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "unknown status".into()),
                    log: log.display().to_string(),
                    tail: crate::tail_lines(log, 40),
                })
            }
        }
    }

    /// Spawn with stdin from /dev/null and stdout and stderr as given
    /// (long-lived children: servers, engines, a proof run).
    pub fn spawn(&self, stdout: Io, stderr: Io) -> std::io::Result<std::process::Child> {
        self.spawn_with(|c| {
            c.stdout(stdout.stdio()).stderr(stderr.stdio());
        })
    }

    /// Spawn after `configure` set what this builder does not say itself
    /// (the engine's `pre_exec`, its environment cleared to an allow-list).
    /// stdin is /dev/null unless `configure` sets it.
    #[allow(clippy::disallowed_methods)] // this is the door
    pub fn spawn_with(
        &self,
        configure: impl FnOnce(&mut std::process::Command),
    ) -> std::io::Result<std::process::Child> {
        let mut c = self.to_std();
        c.stdin(std::process::Stdio::null());
        configure(&mut c);
        c.spawn()
    }

    /// A `std::process::Command` with the same program, args, dir and env,
    /// for long-lived children that a supervisor owns.
    #[allow(clippy::disallowed_methods)] // this is the door
    pub fn to_std(&self) -> std::process::Command {
        self.announce();
        let mut c = std::process::Command::new(&self.program);
        c.args(&self.args);
        if let Some(d) = &self.dir {
            c.current_dir(d);
        }
        for (k, v) in &self.env {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in &self.env {
            if let Some(v) = v {
                write!(
                    f,
                    "{}={} ",
                    k.to_string_lossy(),
                    shell_quote(&v.to_string_lossy())
                )?;
            }
        }
        write!(f, "{}", shell_quote(&self.program.to_string_lossy()))?;
        for a in &self.args {
            write!(f, " {}", shell_quote(&a.to_string_lossy()))?;
        }
        Ok(())
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Where a spawned child's stdout or stderr goes.
pub enum Io {
    Inherit,
    Null,
    Piped,
    File(std::fs::File),
}

impl Io {
    fn stdio(self) -> std::process::Stdio {
        match self {
            Io::Inherit => std::process::Stdio::inherit(),
            Io::Null => std::process::Stdio::null(),
            Io::Piped => std::process::Stdio::piped(),
            Io::File(f) => f.into(),
        }
    }
}

/// A child process that is killed and reaped when dropped while still
/// running (checked with `try_wait`, so a reaped pid is never signalled).
/// Tests and tools hold their children in it so that a panic or an early
/// return never leaves a process behind.
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The last `env`/`env_remove` of a variable wins, on every way to run.
    #[test]
    fn the_last_env_call_wins() {
        let c = Cmd::new("sh")
            .args(["-c", "echo \"${A-unset}${B-unset}\""])
            .env("A", "1")
            .env_remove("A")
            .env_remove("B")
            .env("B", "2");
        assert_eq!(c.read().unwrap(), "unset2");
        assert_eq!(c.output().unwrap().1.trim(), "unset2");
        let out = c
            .spawn(Io::Piped, Io::Null)
            .unwrap()
            .wait_with_output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "unset2");
    }

    #[test]
    fn failure_names_command_and_shows_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        let err = Cmd::new("sh")
            .args(["-c", "echo first; echo boom >&2; exit 3"])
            .run_logged(&log, |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("sh -c"), "{err}");
        assert!(err.contains("boom"), "{err}");
        assert!(err.contains("exit status: 3"), "{err}");
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let err = Cmd::new("llorch-no-such-program").read().unwrap_err();
        assert!(matches!(err, CmdError::Spawn { .. }));
    }

    #[test]
    fn display_quotes() {
        let c = Cmd::new("cmake").arg("-DX=a b").env("CC", "gcc");
        assert_eq!(c.to_string(), "CC=gcc cmake '-DX=a b'");
    }
}
