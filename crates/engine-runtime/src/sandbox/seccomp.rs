//! The seccomp half of the engine sandbox: a deny-list compiled to BPF in
//! the parent (seccompiler), installed in the child with one system call.

use super::Diagnose;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// The filter's architecture (this build's); `None`: no filter is compiled.
pub(super) fn target_arch() -> Option<TargetArch> {
    match std::env::consts::ARCH {
        "x86_64" => Some(TargetArch::x86_64),
        "aarch64" => Some(TargetArch::aarch64),
        _ => None,
    }
}

/// System calls an engine never needs and an exploit would want.
pub(super) fn denied_syscalls() -> Vec<i64> {
    let mut v = vec![
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_bpf,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_perf_event_open,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_userfaultfd,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_fanotify_init,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_syslog,
        libc::SYS_vhangup,
        libc::SYS_personality,
    ];
    v.sort_unstable();
    v.dedup();
    v
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(|e| e.to_string())
}

/// Two filters: the deny-list and socket rules answer `EPERM`; `clone3`
/// answers `ENOSYS` (its flags sit in memory a filter cannot read, so the C
/// library falls back to `clone`, whose namespace flags the first filter
/// refuses).
///
/// `unix_only` (an engine on a unix socket): every socket family but unix refused.
pub(super) fn seccomp_filters(
    diagnose: &Diagnose,
    unix_only: bool,
) -> Result<Vec<BpfProgram>, String> {
    let arch = target_arch().ok_or("no filter for this architecture")?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    if !diagnose.without("denylist") {
        for s in denied_syscalls() {
            rules.insert(s, Vec::new());
        }
    }
    // socket(2): families other than unix and IP refused; IP only as a stream
    // (unix only for an engine on a unix socket).
    let mut socket = vec![SeccompRule::new(vec![
        cond(0, SeccompCmpOp::Ne, libc::AF_UNIX as u64)?,
        cond(0, SeccompCmpOp::Ne, libc::AF_INET as u64)?,
        cond(0, SeccompCmpOp::Ne, libc::AF_INET6 as u64)?,
    ])
    .map_err(|e| e.to_string())?];
    for family in [libc::AF_INET, libc::AF_INET6] {
        for kind in (0u64..16).filter(|k| *k != libc::SOCK_STREAM as u64) {
            socket.push(
                SeccompRule::new(vec![
                    cond(0, SeccompCmpOp::Eq, family as u64)?,
                    cond(1, SeccompCmpOp::MaskedEq(0xf), kind)?,
                ])
                .map_err(|e| e.to_string())?,
            );
        }
    }
    if unix_only {
        socket = vec![
            SeccompRule::new(vec![cond(0, SeccompCmpOp::Ne, libc::AF_UNIX as u64)?])
                .map_err(|e| e.to_string())?,
        ];
    }
    if !diagnose.without("socket") {
        rules.insert(libc::SYS_socket, socket);
    }
    // clone(2) with any namespace flag.
    let namespaces = [
        libc::CLONE_NEWNS,
        libc::CLONE_NEWCGROUP,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
    ];
    let mut clone = Vec::new();
    for ns in namespaces {
        clone.push(
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(ns as u64),
                ns as u64,
            )
            .map_err(|e| e.to_string())?])
            .map_err(|e| e.to_string())?,
        );
    }
    if !diagnose.without("clone") {
        rules.insert(libc::SYS_clone, clone);
    }
    let refuse = |errno: i32| {
        if diagnose.log_only {
            SeccompAction::Log
        } else {
            SeccompAction::Errno(errno as u32)
        }
    };
    let deny = SeccompFilter::new(rules, SeccompAction::Allow, refuse(libc::EPERM), arch)
        .map_err(|e| e.to_string())?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        refuse(libc::ENOSYS),
        arch,
    )
    .map_err(|e| e.to_string())?;
    let mut filters = vec![deny
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())?];
    if !diagnose.without("clone3") {
        filters.push(
            clone3
                .try_into()
                .map_err(|e: seccompiler::BackendError| e.to_string())?,
        );
    }
    Ok(filters)
}
