//! A registry that requires credentials (htpasswd): refused without them,
//! with the hint; accepted from the environment and from a Docker config.
//! One test in its own binary: it sets environment variables.

mod support;
use test_support::registry as test_registry;

use engine_provisioner::build::{self, BuildOptions};
use engine_provisioner::registry::{self, EngineRegistry};
use support::*;
use test_registry::TestRegistry;

fn set(k: &str, v: Option<&str>) {
    // SAFETY: the only test of this binary; no other thread reads the environment now.
    unsafe {
        match v {
            Some(v) => std::env::set_var(k, v),
            None => std::env::remove_var(k),
        }
    }
}

#[test]
fn credentials_from_the_environment_or_a_docker_config_are_honoured() {
    let reg = TestRegistry::start(Some("alice"));
    let tmp = tempfile::tempdir().unwrap();
    let (archive, sha) = fake_archive(tmp.path(), "auth", &fake_server_c("auth-fake"));
    let pins = archive_pin_yaml(&archive, &sha);
    let ws1 = Workspace::new(&pins, &[("fake", CPU_PROFILE)]);
    let b = build::build(&ws1.profile("fake"), &ws1.layout, &BuildOptions::quiet()).unwrap();
    let r = EngineRegistry::new(&reg.url("llorch/engines"), false, false).unwrap();
    set("LLORCH_REGISTRY_USERNAME", None);
    set("LLORCH_REGISTRY_PASSWORD", None);
    set(
        "DOCKER_CONFIG",
        Some(tmp.path().join("no-docker").to_str().unwrap()),
    );
    let e = registry::push(&ws1.layout, &b.fingerprint, &r)
        .unwrap_err()
        .to_string();
    assert!(e.contains("LLORCH_REGISTRY_USERNAME"), "{e}");
    assert!(!e.contains("s3cret"));
    // Wrong password: refused, and the password is not printed.
    set("LLORCH_REGISTRY_USERNAME", Some("alice"));
    set("LLORCH_REGISTRY_PASSWORD", Some("wrong-pass"));
    let e = registry::push(&ws1.layout, &b.fingerprint, &r)
        .unwrap_err()
        .to_string();
    assert!(!e.contains("wrong-pass"), "{e}");
    // Right password from the environment: push.
    set("LLORCH_REGISTRY_PASSWORD", Some("s3cret"));
    registry::push(&ws1.layout, &b.fingerprint, &r).unwrap();
    // A Docker config (`auths.<host>.auth`) on another machine: pull.
    set("LLORCH_REGISTRY_USERNAME", None);
    set("LLORCH_REGISTRY_PASSWORD", None);
    let dc = tmp.path().join("docker");
    fs_err::create_dir_all(&dc).unwrap();
    // base64("alice:s3cret")
    fs_err::write(
        dc.join("config.json"),
        format!(
            r#"{{"auths": {{"{}": {{"auth": "YWxpY2U6czNjcmV0"}}}}}}"#,
            reg.addr
        ),
    )
    .unwrap();
    set("DOCKER_CONFIG", Some(dc.to_str().unwrap()));
    let ws2 = Workspace::new(
        &pins,
        &[(
            "fake",
            &format!(
                "{CPU_PROFILE}  registry:\n    url: {}\n",
                reg.url("llorch/engines")
            ),
        )],
    );
    let out = build::build(&ws2.profile("fake"), &ws2.layout, &BuildOptions::quiet()).unwrap();
    assert_eq!(out.cmake_invocations, 0, "{:?}", out.reason);
}
