//! The default profile's real llama-server, rebuilt from its pinned source
//! in scratch directories with no compiler cache (`engine verify
//! --rebuild`), is byte for byte the engine in the cache: one cold CPU
//! build, beside the one the other tests share.

use engine_provisioner::build::BuildOptions;

#[test]
fn the_default_engine_reproduces_bit_for_bit() {
    let root = test_support::workspace_root();
    let rt = std::env::temp_dir().join(format!("llorch-repro-{}", std::process::id()));
    let layout = test_support::layout(&rt);
    let p = llorch_profile::Profile::resolve(&root, None).unwrap();
    // The shared engine (built once per machine, under the cache lock).
    let built = engine_provisioner::build(&p, &layout, &BuildOptions::quiet()).unwrap();
    let r = engine_provisioner::reproduce::rebuild(&p, &layout, &BuildOptions::quiet()).unwrap();
    assert_eq!(r.fingerprint, built.fingerprint);
    assert!(
        r.reproduced,
        "the rebuilt engine differs: {}",
        serde_json::to_string_pretty(&r.files).unwrap()
    );
    assert!(r.files.iter().any(|f| f.file == "bin/llama-server"));
    eprintln!("reproduced {} in {:.0}s", r.fingerprint, r.rebuild_s);
}
