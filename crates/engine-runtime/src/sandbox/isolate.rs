//! What only root may add to the sandbox: an engine of its own network
//! namespace (no interface up: it listens on a unix socket, which a network
//! namespace does not hide) and a dedicated unprivileged user
//! ([`ENGINE_USER`]). Both are decided in the parent and applied in the
//! child between fork and exec, before `no_new_privs`, Landlock and seccomp.

use std::ffi::CString;
use std::path::Path;

/// The user engines run as when llama-orch runs as root
/// (`cargo xtask doctor --install` creates it: a system user, no home, no shell).
pub const ENGINE_USER: &str = "llama-orch";

/// What this process may do to a child beyond an unprivileged sandbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Privilege {
    /// `CAP_SYS_ADMIN`: it may give the engine a network namespace of its own.
    pub netns: bool,
    /// `CAP_SETUID` and `CAP_SETGID`: it may run the engine as another user.
    pub setuid: bool,
}

/// Capability numbers (linux/capability.h).
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SYS_ADMIN: u32 = 21;

impl Privilege {
    /// This process's effective capabilities (`CapEff` of /proc/self/status);
    /// nothing when it is not root (an unprivileged user's capabilities in a
    /// user namespace of its own are not root's).
    pub fn detect() -> Privilege {
        // SAFETY: geteuid takes no arguments.
        if unsafe { libc::geteuid() } != 0 {
            return Privilege::default();
        }
        let caps = fs_err::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            })
            .unwrap_or(0);
        let has = |c: u32| caps & (1u64 << c) != 0;
        Privilege {
            netns: has(CAP_SYS_ADMIN),
            setuid: has(CAP_SETUID) && has(CAP_SETGID),
        }
    }
}

/// Why the dedicated user cannot reach a file the engine needs.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unreachable {
    #[error("{path} is not searchable by {user}")]
    NotSearchable { path: String, user: String },
    #[error("{path} is not {need} by {user}")]
    NotPermitted {
        path: String,
        need: &'static str,
        user: String,
    },
    #[error("{path}: {why}")]
    Unreadable { path: String, why: String },
}

/// The dedicated user, as the system's user database names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl EngineUser {
    /// [`ENGINE_USER`] from the user database; `None` when there is no such
    /// user, or it is root (uid 0 or gid 0 would be no drop at all).
    pub fn lookup() -> Option<EngineUser> {
        EngineUser::named(ENGINE_USER)
    }

    fn named(name: &str) -> Option<EngineUser> {
        let c = CString::new(name).ok()?;
        // SAFETY: `passwd` is plain data (integers and pointers); all zeroes is a valid value.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: getpwnam_r writes into `pw` and `buf` (its length given)
        // and sets `out` to `&pw` or NULL; nothing outlives this call.
        let r =
            unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
        if r != 0 || out.is_null() || pw.pw_uid == 0 || pw.pw_gid == 0 {
            return None;
        }
        Some(EngineUser {
            name: name.into(),
            uid: pw.pw_uid,
            gid: pw.pw_gid,
        })
    }

    /// Whether this user (with no supplementary groups: the child drops
    /// them) may search every directory above `path` and read `path` (with
    /// `exec`, also execute it). By the mode bits alone: a POSIX ACL that
    /// grants more is not read, so the answer errs on "no".
    pub fn may_reach(&self, path: &Path, exec: bool) -> Result<(), Unreachable> {
        use std::os::unix::fs::MetadataExt;
        let allowed = |md: &std::fs::Metadata, bit: u32| {
            let m = md.mode();
            if md.uid() == self.uid {
                m & (bit << 6) != 0
            } else if md.gid() == self.gid {
                m & (bit << 3) != 0
            } else {
                m & bit != 0
            }
        };
        let stat = |p: &Path| {
            fs_err::metadata(p).map_err(|e| Unreachable::Unreadable {
                path: p.display().to_string(),
                why: e.to_string(),
            })
        };
        let mut dir = path.parent();
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
            if !allowed(&stat(d)?, 0o1) {
                return Err(Unreachable::NotSearchable {
                    path: d.display().to_string(),
                    user: self.name.clone(),
                });
            }
            dir = d.parent();
        }
        let md = stat(path)?;
        let both = md.is_dir() || exec;
        if !allowed(&md, 0o4) || (both && !allowed(&md, 0o1)) {
            return Err(Unreachable::NotPermitted {
                path: path.display().to_string(),
                need: if both {
                    "readable and executable"
                } else {
                    "readable"
                },
                user: self.name.clone(),
            });
        }
        Ok(())
    }

    /// Whether this user may read and write the device node `path` (a GPU's),
    /// by its mode bits, and search the directories above it.
    pub fn may_use_device(&self, path: &Path) -> Result<(), Unreachable> {
        use std::os::unix::fs::MetadataExt;
        if let Some(dir) = path.parent() {
            self.may_reach(dir, false)?;
        }
        let md = fs_err::metadata(path).map_err(|e| Unreachable::Unreadable {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        let shift = if md.uid() == self.uid {
            6
        } else if md.gid() == self.gid {
            3
        } else {
            0
        };
        if (md.mode() >> shift) & 0o6 != 0o6 {
            return Err(Unreachable::NotPermitted {
                path: path.display().to_string(),
                need: "readable and writable",
                user: self.name.clone(),
            });
        }
        Ok(())
    }
}

/// In the child: a network namespace of its own, then the user's group and
/// user id (no supplementary groups), keeping a parent-death signal that
/// changing credentials clears. Only system calls, nothing allocates.
pub(super) fn enter(netns: bool, user: Option<(u32, u32)>) -> std::io::Result<()> {
    let fail = |r: libc::c_int| {
        if r != 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: plain system calls with constant or checked arguments.
    unsafe {
        if netns {
            fail(libc::unshare(libc::CLONE_NEWNET))?;
        }
        if let Some((uid, gid)) = user {
            let mut death: libc::c_int = 0;
            libc::prctl(libc::PR_GET_PDEATHSIG, &mut death as *mut libc::c_int);
            fail(libc::setgroups(0, std::ptr::null()))?;
            fail(libc::setresgid(gid, gid, gid))?;
            fail(libc::setresuid(uid, uid, uid))?;
            if death != 0 {
                fail(libc::prctl(libc::PR_SET_PDEATHSIG, death as libc::c_ulong))?;
                // The parent may have died between fork and here: then no signal comes.
                if libc::getppid() == 1 {
                    libc::_exit(1);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_never_the_engine_user_and_a_missing_user_is_none() {
        assert_eq!(EngineUser::named("root"), None);
        assert_eq!(EngineUser::named("no-such-user-llorch-test"), None);
        assert_eq!(EngineUser::named("bad\0name"), None);
    }

    #[test]
    fn reach_follows_the_mode_bits_of_every_directory_above() {
        use std::os::unix::fs::PermissionsExt;
        let me = EngineUser {
            name: "someone".into(),
            uid: 4242,
            gid: 4242,
        };
        let d = tempfile::tempdir().unwrap();
        let inner = d.path().join("inner");
        fs_err::create_dir(&inner).unwrap();
        let f = inner.join("model.gguf");
        fs_err::write(&f, b"x").unwrap();
        let set = |p: &Path, m: u32| {
            fs_err::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        set(d.path(), 0o755);
        set(&inner, 0o755);
        set(&f, 0o644);
        // The temp dir's own ancestors (/tmp: 1777) are searchable by others.
        assert_eq!(me.may_reach(&f, false), Ok(()));
        let e = me.may_reach(&f, true).unwrap_err().to_string();
        assert!(e.contains("readable and executable"), "{e}");
        set(&inner, 0o700);
        let e = me.may_reach(&f, false).unwrap_err().to_string();
        assert!(e.contains("inner is not searchable by someone"), "{e}");
        set(&inner, 0o755);
        set(&f, 0o600);
        assert!(me.may_reach(&f, false).is_err());
        // A device node the GPU driver makes 0666 is usable; 0660 root:root is not.
        set(&f, 0o666);
        assert_eq!(me.may_use_device(&f), Ok(()));
        set(&f, 0o644);
        let e = me.may_use_device(&f).unwrap_err().to_string();
        assert!(e.contains("readable and writable by someone"), "{e}");
    }
}
