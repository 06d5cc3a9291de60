//! The one place `nvidia-smi` is read: GPU memory (for pool placement),
//! compute capabilities (is a profile's arch list enough for this machine?)
//! and the driver's CUDA version (can a pulled engine run here?). Every
//! reading is parsed as hostile text: a line that does not fit is an error
//! naming it, never a guess.

use crate::cmd::{Cmd, CmdError};
use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The tool's name, looked up on `PATH` unless a caller names another.
pub const NVIDIA_SMI: &str = "nvidia-smi";

/// `nvidia-smi` did not answer, or said something that is not a reading.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The tool is missing or failed: no NVIDIA driver answers.
    #[error("no NVIDIA driver answers (`{program}`: {source})")]
    NoDriver { program: String, source: CmdError },
    /// A line that does not fit what was asked for, quoted (shortened).
    #[error("unexpected nvidia-smi {what} `{line}`")]
    Unexpected { what: &'static str, line: String },
    #[error("nvidia-smi does not say which CUDA version its driver supports")]
    NoCudaVersion,
}

fn run(program: &OsStr, args: &[&str]) -> Result<String, GpuError> {
    Cmd::new(program)
        .args(args)
        .read()
        .map_err(|source| GpuError::NoDriver {
            program: program.to_string_lossy().into_owned(),
            source,
        })
}

/// One GPU's memory as `nvidia-smi` reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuMemory {
    pub index: u32,
    pub free_mib: u64,
    pub total_mib: u64,
}

/// Where the GPU memory probe comes from (`nvidia-smi`, found on `PATH`).
/// Clones share the last reading.
#[derive(Clone, Debug)]
pub struct GpuProbe {
    pub program: String,
    last: Arc<Mutex<Option<Reading>>>,
}

/// A probe's result and when it was taken.
type Reading = (Instant, Vec<GpuMemory>);

impl Default for GpuProbe {
    fn default() -> Self {
        GpuProbe::new(NVIDIA_SMI)
    }
}

/// A reading this recent may say "it fits" without probing again (a probe
/// takes ~30 ms, which a load on demand would otherwise wait for). A reading
/// that says "it does not fit" is always taken again before anything fails.
pub const PROBE_FRESH: Duration = Duration::from_secs(1);

impl GpuProbe {
    pub fn new(program: impl Into<String>) -> GpuProbe {
        GpuProbe {
            program: program.into(),
            last: Arc::new(Mutex::new(None)),
        }
    }

    /// The last reading, if it is younger than `max_age`.
    pub fn recent(&self, max_age: Duration) -> Option<Vec<GpuMemory>> {
        self.last
            .lock()
            .unwrap()
            .as_ref()
            .filter(|(t, _)| t.elapsed() < max_age)
            .map(|(_, g)| g.clone())
    }

    /// Free and total memory of every GPU, read now (and kept as the last reading).
    pub fn read(&self) -> Result<Vec<GpuMemory>, GpuError> {
        let g = self.read_uncached()?;
        *self.last.lock().unwrap() = Some((Instant::now(), g.clone()));
        Ok(g)
    }

    fn read_uncached(&self) -> Result<Vec<GpuMemory>, GpuError> {
        read_memory(&self.program)
    }
}

/// Free and total memory of every GPU, read now with `program`.
pub fn read_memory(program: impl AsRef<OsStr>) -> Result<Vec<GpuMemory>, GpuError> {
    let out = run(
        program.as_ref(),
        &[
            "--query-gpu=index,memory.free,memory.total",
            "--format=csv,noheader,nounits",
        ],
    )?;
    parse_memory(&out)
}

/// Parse `index, free, total` lines (MiB), at most 64 GPUs.
pub fn parse_memory(text: &str) -> Result<Vec<GpuMemory>, GpuError> {
    let mut v = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()).take(64) {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let num = |s: &str| s.parse::<u64>().ok();
        let parsed = match f.as_slice() {
            [i, free, total] => match (num(i), num(free), num(total)) {
                (Some(i), Some(free), Some(total)) if i <= 63 && free <= total => Some(GpuMemory {
                    index: i as u32,
                    free_mib: free,
                    total_mib: total,
                }),
                _ => None,
            },
            _ => None,
        };
        match parsed {
            Some(g) => v.push(g),
            None => {
                return Err(GpuError::Unexpected {
                    what: "line",
                    line: llorch_types::excerpt(line, 80),
                })
            }
        }
    }
    Ok(v)
}

/// Compute capabilities of the GPUs `program` sees (`8.6` → `86`).
pub fn compute_caps(program: impl AsRef<OsStr>) -> Result<Vec<String>, GpuError> {
    let out = run(
        program.as_ref(),
        &["--query-gpu=compute_cap", "--format=csv,noheader"],
    )?;
    parse_compute_caps(&out)
}

/// Parse one `MAJOR.MINOR` per line (at most 64) into `MAJORMINOR`.
pub fn parse_compute_caps(text: &str) -> Result<Vec<String>, GpuError> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(64)
        .map(|l| match l.split_once('.') {
            Some((a, b))
                if (1..=3).contains(&a.len())
                    && (1..=2).contains(&b.len())
                    && (a.to_owned() + b).bytes().all(|c| c.is_ascii_digit()) =>
            {
                Ok(format!("{a}{b}"))
            }
            _ => Err(GpuError::Unexpected {
                what: "compute capability",
                line: llorch_types::excerpt(l, 40),
            }),
        })
        .collect()
}

/// The highest CUDA version the driver supports (the `CUDA Version:` of
/// `nvidia-smi`'s header).
pub fn driver_cuda(program: impl AsRef<OsStr>) -> Result<String, GpuError> {
    let out = run(program.as_ref(), &[])?;
    parse_driver_cuda(&out)
}

/// The `CUDA Version: X.Y` of an `nvidia-smi` header.
pub fn parse_driver_cuda(text: &str) -> Result<String, GpuError> {
    text.split("CUDA Version:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .filter(|v| {
            !v.is_empty() && v.len() <= 16 && v.bytes().all(|c| c.is_ascii_digit() || c == b'.')
        })
        .map(str::to_string)
        .ok_or(GpuError::NoCudaVersion)
}

/// The MPS control daemon's default pipe directory (`CUDA_MPS_PIPE_DIRECTORY` unset).
pub const MPS_DEFAULT_PIPE_DIR: &str = "/tmp/nvidia-mps";

/// An NVIDIA Multi-Process Service control daemon running on this machine:
/// CUDA processes that find its pipe directory share the GPU's SMs instead
/// of time-slicing it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MpsDaemon {
    pub pid: u32,
    /// Where its clients find it (`CUDA_MPS_PIPE_DIRECTORY` of the daemon, or the default).
    pub pipe_dir: String,
}

/// The MPS control daemon running here, if any (read from `/proc`).
pub fn mps_control_daemon() -> Option<MpsDaemon> {
    mps_control_daemons_in(std::path::Path::new("/proc"))
        .into_iter()
        .next()
}

/// Every MPS control daemon running here (one per pipe directory).
pub fn mps_control_daemons() -> Vec<MpsDaemon> {
    mps_control_daemons_in(std::path::Path::new("/proc"))
}

/// [`mps_control_daemon`] over a `/proc`-shaped directory: the first process
/// whose program is `nvidia-cuda-mps-control`.
pub fn mps_control_daemon_in(proc: &std::path::Path) -> Option<MpsDaemon> {
    mps_control_daemons_in(proc).into_iter().next()
}

/// Every process of a `/proc`-shaped directory whose program is
/// `nvidia-cuda-mps-control`, by pid. What cannot be read (another user's
/// environment, a process gone meanwhile) is skipped or defaulted, and reads
/// are bounded.
pub fn mps_control_daemons_in(proc: &std::path::Path) -> Vec<MpsDaemon> {
    fn read_bounded(p: &std::path::Path, max: u64) -> Option<Vec<u8>> {
        use std::io::Read;
        let mut out = Vec::new();
        fs_err::File::open(p)
            .ok()?
            .take(max)
            .read_to_end(&mut out)
            .ok()?;
        Some(out)
    }
    let Ok(rd) = fs_err::read_dir(proc) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = rd
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids.into_iter()
        .filter_map(|pid| {
            let dir = proc.join(pid.to_string());
            let cmdline = read_bounded(&dir.join("cmdline"), 4096)?;
            let program = cmdline.split(|b| *b == 0).next()?;
            let name = program.rsplit(|b| *b == b'/').next()?;
            if name != b"nvidia-cuda-mps-control" {
                return None;
            }
            let pipe_dir = read_bounded(&dir.join("environ"), 256 * 1024)
                .and_then(|env| {
                    env.split(|b| *b == 0)
                        .find_map(|kv| kv.strip_prefix(b"CUDA_MPS_PIPE_DIRECTORY="))
                        .filter(|v| !v.is_empty())
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                })
                .unwrap_or_else(|| MPS_DEFAULT_PIPE_DIR.to_string());
            Some(MpsDaemon { pid, pipe_dir })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_lines_are_parsed_and_hostile_lines_are_refused() {
        let g = parse_memory("0, 80000, 81559\n1, 512, 81559\n").unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g[1].free_mib, 512);
        for bad in [
            "0, 80000",
            "x, 1, 2",
            "0, 5, 4",
            "99, 1, 2",
            "0, 18446744073709551616, 1",
        ] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn compute_caps_and_the_driver_version_are_read_strictly() {
        assert_eq!(
            parse_compute_caps("8.6\n9.0\n\n12.0\n").unwrap(),
            ["86", "90", "120"]
        );
        for bad in ["86", "8.x", "../9", "8.6.1"] {
            assert!(parse_compute_caps(bad).is_err(), "{bad}");
        }
        let header =
            "| NVIDIA-SMI 580.95.05   Driver Version: 580.95.05   CUDA Version: 13.0     |";
        assert_eq!(parse_driver_cuda(header).unwrap(), "13.0");
        assert!(parse_driver_cuda("No devices were found").is_err());
        assert!(parse_driver_cuda("CUDA Version: $(rm)").is_err());
    }

    #[test]
    fn the_mps_control_daemon_is_found_by_its_program_and_its_pipe_dir_read_or_defaulted() {
        let d = tempfile::tempdir().unwrap();
        let proc_ = d.path();
        let put = |pid: &str, cmdline: &[u8], environ: Option<&[u8]>| {
            let p = proc_.join(pid);
            fs_err::create_dir_all(&p).unwrap();
            fs_err::write(p.join("cmdline"), cmdline).unwrap();
            if let Some(e) = environ {
                fs_err::write(p.join("environ"), e).unwrap();
            }
        };
        fs_err::create_dir_all(proc_.join("self")).unwrap();
        put("7", b"/usr/bin/llama-server\0--port\0", None);
        assert_eq!(mps_control_daemon_in(proc_), None);
        // A server process of MPS is not the control daemon.
        put("8", b"nvidia-cuda-mps-server\0", None);
        assert_eq!(mps_control_daemon_in(proc_), None);
        put("40", b"/usr/bin/nvidia-cuda-mps-control\0-d\0", None);
        assert_eq!(
            mps_control_daemon_in(proc_),
            Some(MpsDaemon {
                pid: 40,
                pipe_dir: MPS_DEFAULT_PIPE_DIR.into()
            })
        );
        put(
            "12",
            b"nvidia-cuda-mps-control\0-d\0",
            Some(b"PATH=/bin\0CUDA_MPS_PIPE_DIRECTORY=/run/mps-a\0"),
        );
        assert_eq!(mps_control_daemon_in(proc_).unwrap().pipe_dir, "/run/mps-a");
        assert_eq!(mps_control_daemon_in(&proc_.join("absent")), None);
    }
}
