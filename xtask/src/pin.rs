//! `cargo xtask pin bump`: follow upstream in one command. Resolves the next
//! llama.cpp (the next release of the default pin's sdist package, a named
//! version, or a git revision), records its identity (sha256, the llama.cpp
//! commit, each backend's bundle tree digest) as a new pin, builds the
//! profile with it and runs the haiku proof on that engine; only then is
//! `toolchains/llama.cpp.yaml` rewritten (atomically), with the new pin as
//! the default. A failed step writes nothing there (the engine it built
//! stays in the cache, where gc finds it).

use crate::{print_json, Ctx};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use engine_provisioner::build::BuildOptions;
use llorch_io::cmd::Cmd;
use llorch_profile::{Backend, Pin, PinsFile, Profile, SourceSpec};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Args)]
pub struct PinCmd {
    #[command(subcommand)]
    cmd: PinSub,
}

#[derive(Subcommand)]
enum PinSub {
    /// Move the default pin to the next llama.cpp: build it, prove it, then record it
    Bump(BumpArgs),
}

#[derive(Args)]
pub struct BumpArgs {
    /// This release of the default pin's sdist package (default: the newest on pip's index)
    #[arg(long, conflicts_with = "git")]
    pub to: Option<String>,
    /// A llama.cpp git revision (full commit id, tag or branch) from the git pin's URL
    #[arg(long)]
    pub git: Option<String>,
    /// The profile to build and prove (default: cpu)
    #[arg(long, short)]
    pub profile: Option<String>,
    /// Record the pin after the build, without the haiku proof
    #[arg(long)]
    pub skip_haiku: bool,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

/// A resolved candidate: the new pin and the pins file that would hold it.
pub struct Candidate {
    pub name: String,
    pub pin: Pin,
    /// The new text of `toolchains/llama.cpp.yaml` (comments kept).
    pub text: String,
}

#[derive(Serialize)]
struct BumpReport {
    from_pin: String,
    to_pin: String,
    from_commit: String,
    to_commit: String,
    source: serde_json::Value,
    bundle_trees: std::collections::BTreeMap<String, String>,
    profile: String,
    from_fingerprint: Option<String>,
    to_fingerprint: String,
    build_s: f64,
    compile_cache: Option<engine_provisioner::compile_cache::CompileStats>,
    haiku: &'static str,
    written: String,
}

impl PinCmd {
    pub fn run(self, ctx: &Ctx) -> Result<()> {
        match self.cmd {
            PinSub::Bump(a) => bump(ctx, &a),
        }
    }
}

fn pins_path(ctx: &Ctx) -> PathBuf {
    ctx.layout.root.join("toolchains/llama.cpp.yaml")
}

fn bump(ctx: &Ctx, a: &BumpArgs) -> Result<()> {
    let say = |m: &str| {
        if !a.json {
            llorch_io::info!("{m}")
        }
    };
    let path = pins_path(ctx);
    let original =
        fs_err::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let before = PinsFile::load(&path)?;
    let old = before.pins[&before.default].clone();
    let cand = resolve(ctx, a.to.as_deref(), a.git.as_deref(), &say)?;
    // The candidate profile, built and proven with the candidate pins file
    // in a scratch workspace root (the real file is untouched until the end).
    let scratch = candidate_root(ctx, &cand.text)?;
    let name = a.profile.as_deref();
    let old_profile = ctx.profile(name)?;
    let profile = Profile::resolve(scratch.path(), Some(&profile_arg(&old_profile)))?;
    if profile.pin_name != cand.name {
        bail!(
            "profile `{}` names pin `{}` itself, so a new default pin would not change what it builds; bump with a profile that uses the default pin",
            profile.name,
            profile.pin_name
        );
    }
    let from_fp = engine_provisioner::build::plan(&old_profile, &Default::default())
        .ok()
        .map(|p| p.fingerprint);
    say(&format!(
        "building profile `{}` with pin {} (llama.cpp {})",
        profile.name,
        cand.name,
        &cand.pin.commit[..12]
    ));
    let built = engine_provisioner::build(
        &profile,
        &ctx.layout,
        &BuildOptions {
            quiet: a.json,
            ..Default::default()
        },
    )
    .with_context(|| {
        format!(
            "build of profile `{}` with pin {} failed; nothing written to {}",
            profile.name,
            cand.name,
            path.display()
        )
    })?;
    let haiku = if a.skip_haiku {
        "skipped"
    } else {
        say("running the haiku proof on the new engine");
        // The proof reads the pins of the scratch root, as the build did.
        let layout = llorch_io::paths::Layout::at(
            scratch.path().to_path_buf(),
            ctx.layout.cache.clone(),
            ctx.layout.runtime.clone(),
        );
        let output = if a.json {
            llorch_proof::Output::Quiet
        } else {
            llorch_proof::Output::Live
        };
        if !llorch_proof::cli(&profile, profile.pool(), &layout, output)? {
            bail!(
                "the haiku proof failed on pin {}; nothing written to {}",
                cand.name,
                path.display()
            );
        }
        "passed"
    };
    // The file changed under us (an edit, another bump): refuse rather than lose it.
    let now = fs_err::read_to_string(&path)?;
    if now != original {
        bail!(
            "{} changed while the new pin was built; nothing written (run the bump again)",
            path.display()
        );
    }
    llorch_io::fsx::write_atomic(&path, cand.text.as_bytes())
        .with_context(|| format!("write {}", path.display()))?;
    let report = BumpReport {
        from_pin: before.default.clone(),
        to_pin: cand.name.clone(),
        from_commit: old.commit.clone(),
        to_commit: cand.pin.commit.clone(),
        source: serde_json::to_value(&cand.pin.source)?,
        bundle_trees: cand.pin.bundle_trees.clone(),
        profile: profile.name.clone(),
        from_fingerprint: from_fp,
        to_fingerprint: built.fingerprint.clone(),
        build_s: built.duration_s,
        compile_cache: built.compile_cache.clone(),
        haiku,
        written: path.display().to_string(),
    };
    if a.json {
        return print_json(&report);
    }
    println!("pin bumped: {} -> {}", report.from_pin, report.to_pin);
    println!(
        "  llama.cpp   {} -> {}",
        report.from_commit, report.to_commit
    );
    if let SourceSpec::PypiSdist {
        package,
        version,
        sha256,
        ..
    } = &cand.pin.source
    {
        println!("  source      {package}=={version} sha256 {sha256}");
    }
    for (b, d) in &report.bundle_trees {
        println!("  bundle tree {b}: {d}");
    }
    println!(
        "  engine      {} -> {} ({:.0}s{})",
        report
            .from_fingerprint
            .as_deref()
            .map(|f| &f[..12])
            .unwrap_or("-"),
        &report.to_fingerprint[..12],
        report.build_s,
        match &report.compile_cache {
            Some(s) => format!(", compiler cache {} hits / {} misses", s.hits, s.misses),
            None => String::new(),
        }
    );
    println!("  haiku proof {haiku}");
    println!("  written     {}", report.written);
    Ok(())
}

/// How the scratch root finds the same profile: by name when it is one of
/// the workspace's, else by its path.
fn profile_arg(p: &Profile) -> String {
    p.path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|_| p.path.parent().is_some_and(|d| d.ends_with("requirements")))
        .unwrap_or_else(|| p.path.display().to_string())
}

/// A scratch workspace root holding the candidate pins file and the
/// workspace's profiles.
pub fn candidate_root(ctx: &Ctx, text: &str) -> Result<tempfile::TempDir> {
    let t = tempfile::Builder::new().prefix("llorch-pin-").tempdir()?;
    fs_err::create_dir_all(t.path().join("toolchains"))?;
    fs_err::write(t.path().join("toolchains/llama.cpp.yaml"), text)?;
    let req = t.path().join("requirements");
    fs_err::create_dir_all(&req)?;
    for e in fs_err::read_dir(ctx.layout.root.join("requirements"))? {
        let e = e?;
        if e.file_type()?.is_file() {
            fs_err::copy(e.path(), req.join(e.file_name()))?;
        }
    }
    // Checked as the real file would be.
    PinsFile::load(&t.path().join("toolchains/llama.cpp.yaml"))
        .map_err(|e| anyhow!("the new pins file does not load: {e}"))?;
    Ok(t)
}

/// Resolve the next pin without writing anything.
pub fn resolve(
    ctx: &Ctx,
    to: Option<&str>,
    git: Option<&str>,
    say: &dyn Fn(&str),
) -> Result<Candidate> {
    let path = pins_path(ctx);
    let text = fs_err::read_to_string(&path)?;
    let pins = PinsFile::load(&path)?;
    let current = &pins.pins[&pins.default];
    let (name, pin) = match git {
        Some(rev) => resolve_git(&pins, rev, say)?,
        None => {
            let SourceSpec::PypiSdist {
                package,
                version,
                subdir,
                ..
            } = &current.source
            else {
                bail!(
                    "the default pin `{}` is not a package sdist, so there is no next release to find; use `--git REV`",
                    pins.default
                );
            };
            let target = match to {
                Some(v) => v.to_string(),
                None => newest_version(package)?,
            };
            if &target == version {
                bail!(
                    "the default pin `{}` is already {package} {target}",
                    pins.default
                );
            }
            resolve_sdist(ctx, package, &target, subdir.as_deref(), say)?
        }
    };
    if pins.pins.contains_key(&name) && pins.default == name {
        bail!("pin `{name}` is already the default");
    }
    Ok(Candidate {
        text: with_pin(&text, &name, &pin)?,
        name,
        pin,
    })
}

/// The newest version of `package` on pip's index (`pip index versions`).
fn newest_version(package: &str) -> Result<String> {
    let out = Cmd::new("python3")
        .args(["-m", "pip", "index", "versions", package])
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .read()
        .with_context(|| format!("ask pip's index for the versions of {package}"))?;
    parse_newest(&out).ok_or_else(|| anyhow!("pip listed no versions of {package}:\n{out}"))
}

/// `llama-cpp-python (0.3.36)` → `0.3.36`.
pub fn parse_newest(text: &str) -> Option<String> {
    let line = text
        .lines()
        .find(|l| !l.starts_with("WARNING") && l.contains('('))?;
    let v = line.split('(').nth(1)?.split(')').next()?.trim();
    (!v.is_empty()).then(|| v.to_string())
}

fn resolve_sdist(
    ctx: &Ctx,
    package: &str,
    version: &str,
    subdir: Option<&str>,
    say: &dyn Fn(&str),
) -> Result<(String, Pin)> {
    if version.is_empty()
        || !version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+' | '!'))
    {
        bail!("`{version}` is not a package version");
    }
    let dl = tempfile::Builder::new().prefix("pin-bump-").tempdir_in({
        let d = ctx.layout.downloads();
        fs_err::create_dir_all(&d)?;
        d
    })?;
    say(&format!("downloading {package}=={version} sdist with pip"));
    Cmd::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "-q", "-d"])
        .arg(dl.path())
        .arg("--no-binary")
        .arg(package)
        .arg(format!("{package}=={version}"))
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .read()
        .with_context(|| {
            format!("pip download {package}=={version} (is it a release on pip's index?)")
        })?;
    let archive = fs_err::read_dir(dl.path())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".tar.gz"))
        .ok_or_else(|| anyhow!("pip downloaded no .tar.gz sdist for {package}=={version}"))?;
    let sha256 = llorch_io::digest::sha256_file(&archive)?;
    let tree = dl.path().join("tree");
    engine_provisioner::extract::extract_tar_gz(&archive, &tree, None)?;
    let top = fs_err::read_dir(&tree)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .ok_or_else(|| anyhow!("the {package}=={version} sdist holds no directory"))?;
    let sub = subdir.unwrap_or("vendor/llama.cpp");
    let commit = engine_provisioner::source::vendored_commit(&top, sub)
        .with_context(|| format!("which llama.cpp commit {package}=={version} vendors at {sub}"))?;
    let llama = top.join(sub);
    let mut bundle_trees = std::collections::BTreeMap::new();
    for (b, name) in [(Backend::Cpu, "cpu"), (Backend::Cuda, "cuda")] {
        let (_, files) = engine_provisioner::bundle::tree_files(&llama, b)?;
        bundle_trees.insert(
            name.to_string(),
            engine_provisioner::bundle::tree_digest(&files),
        );
    }
    let pin = Pin {
        commit,
        source: SourceSpec::PypiSdist {
            package: package.into(),
            version: version.into(),
            sha256,
            subdir: Some(sub.into()),
        },
        description: Some(format!(
            "llama.cpp as vendored by the {package} {version} sdist (fetched with pip)"
        )),
        bundle_trees,
    };
    // The source cache gets this very file (checked against the digest just
    // recorded), so the build below does not download the sdist again.
    engine_provisioner::source::fetch_using(&pin, &ctx.layout, say, Some(&archive))?;
    Ok((format!("{package}-{version}"), pin))
}

fn resolve_git(pins: &PinsFile, rev: &str, say: &dyn Fn(&str)) -> Result<(String, Pin)> {
    let url = pins
        .pins
        .values()
        .find_map(|p| match &p.source {
            SourceSpec::Git { url, .. } => Some(url.clone()),
            _ => None,
        })
        .ok_or_else(|| anyhow!("no git pin in the pins file names llama.cpp's URL"))?;
    let is_commit = rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit {
        rev.to_ascii_lowercase()
    } else {
        say(&format!("resolving {rev} at {url}"));
        engine_provisioner::source::resolve_remote_rev(&url, rev)?
    };
    let pin = Pin {
        commit: commit.clone(),
        source: SourceSpec::Git {
            url: url.clone(),
            rev: (!is_commit).then(|| rev.to_string()),
            submodules: false,
        },
        description: Some(format!("llama.cpp {rev} from {url}, cloned with git")),
        bundle_trees: Default::default(),
    };
    Ok((format!("upstream-{}", &commit[..7]), pin))
}

/// The pins file with `pin` added as `name` (or replacing it) and made the
/// default; comments and the other pins stay as written.
pub fn with_pin(text: &str, name: &str, pin: &Pin) -> Result<String> {
    let block = llorch_profile::pin_yaml(name, pin)?;
    let indented: String = block.lines().map(|l| format!("  {l}\n")).collect();
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    let mut done = false;
    while let Some(l) = lines.next() {
        if l.starts_with("default:") {
            out.push_str(&format!("default: {name}\n"));
            continue;
        }
        // An existing block of the same name is dropped (replaced below).
        if l == format!("  {name}:") {
            while lines
                .peek()
                .is_some_and(|n| n.starts_with("    ") || n.trim().is_empty())
            {
                lines.next();
            }
            continue;
        }
        out.push_str(l);
        out.push('\n');
        if l == "pins:" && !done {
            out.push_str(&indented);
            done = true;
        }
    }
    if !done {
        bail!("the pins file has no top-level `pins:` line");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_version_parses() {
        let t = "WARNING: pip index is currently an experimental command.\nllama-cpp-python (0.3.36)\nAvailable versions: 0.3.36, 0.3.35\n";
        assert_eq!(parse_newest(t).as_deref(), Some("0.3.36"));
        assert_eq!(parse_newest("nothing"), None);
    }

    fn load(text: &str) -> PinsFile {
        let d = tempfile::tempdir().unwrap();
        fs_err::write(d.path().join("p.yaml"), text).unwrap();
        PinsFile::load(&d.path().join("p.yaml")).unwrap()
    }

    #[test]
    fn a_new_pin_becomes_the_default_and_comments_stay() {
        let text = "# comment\nschema: 1\ndefault: a\npins:\n  a:\n    commit: 4df29be4f4c3673f428170fda944a5b19f743bb8\n    source:\n      kind: git\n      url: https://example.invalid/l.git\n";
        let pin = Pin {
            commit: "0c1e57098bba43ac29e6e3b677cdceebdd22334f".into(),
            source: SourceSpec::Git {
                url: "https://example.invalid/l.git".into(),
                rev: Some("b1".into()),
                submodules: false,
            },
            description: Some("next".into()),
            bundle_trees: Default::default(),
        };
        let out = with_pin(text, "b", &pin).unwrap();
        assert!(out.starts_with("# comment\n"), "{out}");
        let parsed = load(&out);
        assert_eq!(parsed.default, "b");
        assert_eq!(parsed.pins["b"], pin);
        assert!(parsed.pins.contains_key("a"));
        // Bumping to the same name again replaces it.
        let again = with_pin(&out, "b", &pin).unwrap();
        let parsed = load(&again);
        assert_eq!(parsed.pins.len(), 2);
        assert!(with_pin("schema: 1\n", "b", &pin).is_err());
    }
}
