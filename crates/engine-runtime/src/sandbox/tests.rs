use super::*;
use std::path::Path;

fn access() -> EngineAccess {
    EngineAccess {
        binary: PathBuf::from("/bin/true"),
        read_files: Vec::new(),
        listen: Listen::Tcp(1),
        mps_pipe: None,
        gpu: false,
    }
}

#[test]
fn strict_names_what_the_kernel_lacks_and_auto_starts_with_less() {
    let old = Support {
        landlock_abi: 3,
        seccomp: true,
    };
    let e = Sandbox::build_on(
        SandboxMode::Strict,
        &access(),
        old,
        &RootPlan::default(),
        &Diagnose::default(),
    )
    .err()
    .expect("strict refuses ABI 3");
    let msg = e.to_string();
    assert!(msg.contains("network rules (ABI 4"), "{msg}");
    assert!(msg.contains("server.sandbox: auto"), "{msg}");
    let p = Protections::for_support(SandboxMode::Auto, old);
    assert!(p.filesystem && !p.network && p.seccomp);
    assert!(p.summary().contains("not on: "), "{}", p.summary());
    let none = Protections::for_support(
        SandboxMode::Auto,
        Support {
            landlock_abi: 0,
            seccomp: false,
        },
    );
    assert!(!none.filesystem && !none.seccomp && none.no_new_privs);
    let off = Protections::for_support(SandboxMode::Off, old);
    assert_eq!(off.missing(), Vec::<&str>::new());
    assert!(off.summary().contains("full rights"));
}

#[test]
fn an_engine_reads_its_own_tree_never_a_top_level_one() {
    let d = |p: &str| fs_rules::engine_dir(Path::new(p)).map(|d| d.display().to_string());
    assert_eq!(
        d("/home/u/.cache/llama-orch/engines-v1/f/bin/llama-server").as_deref(),
        Some("/home/u/.cache/llama-orch/engines-v1/f")
    );
    assert_eq!(
        d("/opt/llorch/srv/llama-server").as_deref(),
        Some("/opt/llorch/srv")
    );
    for top in [
        "/bin/cat",
        "/usr/bin/llama-server",
        "/llama-server",
        "/opt/bin/x",
    ] {
        assert_eq!(d(top), None, "{top}");
    }
}

#[test]
fn the_filters_compile_on_this_architecture() {
    if target_arch().is_some() {
        let f = seccomp_filters(&Diagnose::default(), false).unwrap();
        assert_eq!(
            seccomp_filters(&Diagnose::default(), true).unwrap().len(),
            2
        );
        assert_eq!(f.len(), 2);
        assert!(f[0].len() > seccomp::denied_syscalls().len());
    }
}
